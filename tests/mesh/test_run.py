"""`meshagent run` on two hosts: transparent mTLS between a client and a legacy server."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.mesh.conftest import PY, Mesh, fresh_metrics, wait_for

pytestmark = pytest.mark.netns


def _http_server(mesh: Mesh) -> None:
    mesh.b.popen(PY, "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", str(mesh.tmp))
    (mesh.tmp / "hello.txt").write_text("hello from the legacy host\n")
    wait_for(
        lambda: mesh.b.run("curl", "-sf", "http://127.0.0.1:8080/hello.txt", check=False).returncode == 0,
        "app up",
    )


def test_client_to_legacy_server_is_mtls_and_strict_policy_refuses_plaintext(mesh: Mesh) -> None:
    _http_server(mesh)
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
    b = mesh.enroll(
        mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"], inbound_policy="all-authenticated"
    )
    b.start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)

    got = mesh.a.run("curl", "-sS", "--max-time", "10", "http://198.18.3.2:8080/hello.txt", check=False)
    assert got.returncode == 0, got.stderr + a.log.read_text()[-3000:] + b.log.read_text()[-3000:]
    assert got.stdout == "hello from the legacy host\n"

    # The unmeshed "cluster" host has no identity: b's strict policy refuses it.
    plain = mesh.cl.run("curl", "-sS", "--max-time", "5", "http://198.18.2.2:8080/hello.txt", check=False)
    assert plain.returncode != 0
    assert "connection.refused" in b.log.read_text()

    # SIGTERM: exit 0, rules gone.
    assert a.stop() == 0
    assert b.stop() == 0
    for host in (mesh.a, mesh.b):
        assert "meshagent" not in host.run("nft", "list", "ruleset").stdout
    # Without the agent (fail open), the app is reached directly again.
    again = mesh.cl.run("curl", "-sS", "--max-time", "5", "http://198.18.2.2:8080/hello.txt", check=False)
    assert again.stdout == "hello from the legacy host\n"


def test_sighup_reloads_policy_without_dropping_connections(mesh: Mesh) -> None:
    _http_server(mesh)
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"])
    b.start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)
    url = "http://198.18.2.2:8080/hello.txt"
    assert mesh.cl.run("curl", "-sS", "--max-time", "5", url, check=False).returncode == 0  # permissive

    # A keep-alive connection from the meshed client, open across the reload.
    keepalive = mesh.a.popen(
        PY,
        "-c",
        (
            "import http.client, sys\n"
            "c = http.client.HTTPConnection('198.18.3.2', 8080, timeout=10)\n"
            "for _ in range(2):\n"
            "    c.request('GET', '/hello.txt'); r = c.getresponse(); r.read(); print(r.status, flush=True)\n"
            "    sys.stdin.readline()\n"
        ),
        stdin=subprocess.PIPE,
    )
    assert keepalive.stdout is not None and keepalive.stdin is not None
    assert keepalive.stdout.readline().strip() == "200"

    b.config.write_text(
        b.config.read_text().replace(
            'default_policy = "all-unauthenticated"', 'default_policy = "all-authenticated"'
        )
    )
    assert b.proc is not None
    b.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload.done" in b.log.read_text(), "reload", b)
    fresh_metrics(mesh.b, agent=b)  # every worker applied the new policy (it is sent, no reply awaited)

    assert mesh.cl.run("curl", "-sS", "--max-time", "5", url, check=False).returncode != 0  # strict now
    keepalive.stdin.write("\n")
    keepalive.stdin.flush()
    assert keepalive.stdout.readline().strip() == "200"  # the open connection lived through it
    keepalive.stdin.write("\n")
    keepalive.stdin.flush()
    assert keepalive.wait(timeout=10) == 0
