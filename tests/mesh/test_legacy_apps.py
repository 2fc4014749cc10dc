"""Real clients on host A, real servers on legacy host B, both meshed: unchanged apps, mTLS wire."""

from __future__ import annotations

import secrets
import time

import pytest

from tests.mesh import apps
from tests.mesh.conftest import Mesh, wait_for

pytestmark = pytest.mark.netns

B = "198.18.3.2"


def test_curl_redis_benchmark_and_pgbench_through_the_mesh(mesh: Mesh) -> None:
    marker = "legacy-payload-" + secrets.token_hex(8)
    apps.nginx(mesh.b, mesh.tmp, 8080, body=marker + "\n")
    apps.redis(mesh.b)
    apps.postgres(mesh.b, mesh.cleanup)
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
    b = mesh.enroll(
        mesh.b, "shop/legacy", "198.18.2.1", [B, "198.18.2.2"], inbound_policy="all-authenticated"
    )
    b.start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)

    capture = mesh.tmp / "wire.pcap"
    dev = mesh.iface(mesh.b, 3)
    tshark = mesh.b.popen("tshark", "-q", "-i", dev, "-w", str(capture), "-f", "tcp")
    wait_for(lambda: capture.exists() and capture.stat().st_size > 0, "capture started")

    got = mesh.a.run("curl", "-sS", "--max-time", "10", f"http://{B}:8080/")
    assert got.stdout == marker + "\n"

    bench = mesh.a.run(
        "redis-benchmark",
        "-h",
        B,
        "-p",
        "6379",
        "-n",
        "2000",
        "-c",
        "10",
        "-t",
        "set,get",
        "-q",
        "--csv",
        timeout=120,
    )
    rows = [
        line for line in bench.stdout.splitlines() if line.startswith('"SET"') or line.startswith('"GET"')
    ]
    assert len(rows) == 2, bench.stdout + bench.stderr
    mesh.a.run("redis-cli", "-h", B, "set", "mesh-key", marker)
    assert mesh.a.run("redis-cli", "-h", B, "get", "mesh-key").stdout.strip() == marker

    pg = str(apps.PG_BIN / "pgbench")
    mesh.a.run(pg, "-i", "-q", "-s", "1", "-h", B, "-U", "postgres", "postgres", timeout=120)
    run = mesh.a.run(pg, "-h", B, "-U", "postgres", "-c", "4", "-t", "50", "postgres", timeout=120)
    assert "number of failed transactions: 0" in run.stdout, run.stdout
    assert "number of transactions actually processed: 200/200" in run.stdout

    time.sleep(0.5)
    tshark.terminate()
    tshark.wait(timeout=20)
    wire = capture.read_bytes()
    assert marker.encode() not in wire  # neither the HTTP body nor the redis value crossed in clear
    assert b"pgbench_accounts" not in wire and b"GET / HTTP" not in wire
    # Decode the apps' ports as TLS: that is what must be on them now.
    as_tls = [arg for port in (8080, 6379, 5432) for arg in ("-d", f"tcp.port=={port},tls")]

    def streams(display_filter: str, field: str = "tcp.stream") -> set[str]:
        out = mesh.b.run(
            "tshark", "-r", str(capture), *as_tls, "-Y", display_filter, "-T", "fields", "-e", field
        )
        return set(out.stdout.split())

    tls13 = "tls.handshake.type == 2 && tls.handshake.extensions.supported_version == 0x0304"
    ports = streams(tls13, "tcp.srcport")
    assert ports == {"8080", "6379", "5432"}, f"TLS 1.3 ServerHellos from ports {ports}"
    # Every connection that carried a byte did a TLS 1.3 handshake first.
    carrying = streams("tcp.len > 0")
    assert carrying and carrying <= streams(tls13), f"streams without TLS 1.3: {carrying - streams(tls13)}"
