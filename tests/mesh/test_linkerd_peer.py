"""A meshed host called as an in-cluster linkerd2-proxy calls an ExternalWorkload (issue #16).

The client is tests/linkerd/peer.py (linkerd2-proxy's client side, header bytes from protoc),
in the unmeshed `cl` namespace, with a pod certificate made as Linkerd's identity controller
makes it (one DNS SAN) and signed by the mesh's issuer. Host b runs real nginx (HTTP/1),
redis (opaque) and a grpcio server (native HTTP/2) behind its agent. One mesh and one agent
start for the whole module; the tests run in file order and each checks its own deltas.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.netlab import netns_supported
from tests.linkerd.certs import linkerd_ca, linkerd_name, linkerd_pod_cert
from tests.mesh import apps
from tests.mesh.conftest import PY, Agent, Mesh, build_mesh, wait_for

pytestmark = pytest.mark.netns

B = "198.18.2.2"  # b on the link to cl, where the peer runs
HTTP, REDIS, GRPC, INBOUND = 8080, 6379, 50051, 4143
CLIENT = linkerd_name("web", "shop")  # the peer's identity, as Linkerd names it
SERVER_NAME = linkerd_name("legacy", "shop")  # the ExternalWorkload's meshTLS.serverName
SERVER_ID = "spiffe://cluster.local/ns/shop/sa/legacy"  # its meshTLS.identity
ALPN = "transport.l5d.io/v1"
PREFACE = b"transport.l5d.io/v1\r\n\r\n"


@dataclass
class World:
    mesh: Mesh
    b: Agent
    certs: Path
    spec: Path
    direct: dict[str, Any]

    def tls(self, cert: str = "web") -> list[str]:
        return [
            f"--cert={self.certs / f'{cert}.crt'}",
            f"--key={self.certs / f'{cert}.key'}",
            f"--bundle={self.mesh.authority_dir / 'trust-bundle.pem'}",
            f"--server-name={SERVER_NAME}",
            f"--server-id={SERVER_ID}",
            f"--host={B}",
        ]

    def peer(self, *args: str, timeout: float = 120) -> Any:
        out = self.mesh.cl.run(PY, "-m", "tests.linkerd.peer", *args, timeout=timeout).stdout
        return json.loads(out)

    def forwarder(self, listen: int, *args: str) -> None:
        proc = self.mesh.cl.popen(
            PY, "-m", "tests.linkerd.peer", "forward", f"--listen=127.0.0.1:{listen}", *args
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr

    def metrics(self) -> list[str]:
        return self.mesh.cl.run("curl", "-sf", f"http://{B}:4191/metrics").stdout.splitlines()

    def status(self) -> Any:
        return json.loads(
            self.mesh.cl.run("curl", "-sS", "--max-time", "5", f"http://{B}:4191/status").stdout
        )


def total(lines: list[str], family: str, *parts: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(family + "{") and all(p in line for p in parts)
    )


def _write_cert(directory: Path, name: str, chain_and_key: tuple[bytes, bytes]) -> None:
    (directory / f"{name}.crt").write_bytes(chain_and_key[0])
    (directory / f"{name}.key").write_bytes(chain_and_key[1])


def _spec(body: bytes) -> list[dict[str, Any]]:
    host = [["host", f"{B}:{HTTP}"], ["user-agent", "linkerd-peer"]]
    b64 = base64.b64encode(body).decode()
    return [
        {"name": "get", "target": "/", "headers": host},
        {"name": "get_http10", "target": "/", "version": "HTTP/1.0", "headers": host},
        {"name": "absolute_form", "target": f"http://{B}:{HTTP}/", "headers": host},
        {"name": "post", "method": "POST", "target": "/echo", "headers": host, "body": b64},
        {
            "name": "post_chunked",
            "method": "POST",
            "target": "/echo",
            "headers": host,
            "body": b64,
            "chunked": True,
        },
        {"name": "chunked_response", "target": "/chunked", "headers": host},
        {"name": "fail", "target": "/fail", "headers": host},
        {"name": "concurrent", "target": "/", "headers": host, "count": 100},
        {"name": "ten_mb", "target": "/big.bin", "headers": host},
    ]


REQUESTS_PER_RUN = 108  # the spec's requests: 8 single ones and 100 concurrent


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    reason = netns_supported()
    if reason:
        pytest.skip(reason)
    with build_mesh(tmp_path_factory.mktemp("linkerd-peer")) as mesh:
        apps.nginx_linkerd(mesh.b, mesh.tmp, HTTP)
        apps.redis(mesh.b, REDIS)
        apps.grpc_echo(mesh.b, GRPC)
        b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", [B], inbound_policy="all-authenticated")

        certs = mesh.tmp / "peer-certs"
        certs.mkdir()
        issuer = x509.load_pem_x509_certificate((mesh.authority_dir / "issuer.crt").read_bytes())
        key = serialization.load_pem_private_key((mesh.authority_dir / "issuer.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        _write_cert(certs, "web", linkerd_pod_cert(issuer, key, "web", "shop"))
        # Signed by the mesh's issuer, but naming another trust domain.
        _write_cert(
            certs, "other-td", linkerd_pod_cert(issuer, key, "web", "shop", trust_domain="other.example")
        )
        # Another mesh altogether: its own CA, which b does not trust.
        foreign, foreign_key = linkerd_ca()
        _write_cert(certs, "foreign", linkerd_pod_cert(foreign, foreign_key, "web", "shop"))

        spec = mesh.tmp / "spec.json"
        spec.write_text(json.dumps(_spec(os.urandom(200_000))))
        # The direct call, before b's agent intercepts anything: what the app answers.
        direct = json.loads(
            mesh.cl.run(PY, "-m", "tests.linkerd.peer", "direct", f"--to={B}:{HTTP}", f"--spec={spec}").stdout
        )
        b.start()
        w = World(mesh, b, certs, spec, direct["results"])
        yield w
        assert b.proc is not None and b.proc.poll() is None, "b's agent died"
        assert "Traceback" not in b.log.read_text()


def _same_as_direct(world: World, got: dict[str, Any]) -> None:
    for name, want in world.direct.items():
        results = got["results"][name]
        for r in results:
            assert r["reset"] is None, (name, r)
            assert r["orig_proto"] in ("HTTP/1.1", "HTTP/1.0"), (name, r)  # the host downgraded
            assert (r["status"], r["body_len"], r["body_sha256"]) == (
                want[0]["status"],
                want[0]["body_len"],
                want[0]["body_sha256"],
            ), name
    assert got["results"]["ten_mb"][0]["body_len"] == 10 * 2**20
    assert got["results"]["post"][0]["body_len"] == 200_000


def test_http1_upgraded_through_the_header_and_transparently(world: World) -> None:
    """GET, HTTP/1.0, absolute-form, POST (sized and chunked), a chunked answer, a 500, 100
    concurrent streams and 10 MB on one h2 connection: what nginx answers directly, byte for
    byte, and request_total / response_total exact with the peer's Linkerd identity."""
    spec = f"--spec={world.spec}"
    opened = Counter(world.status()["connections"]["opened"])
    via_header = world.peer("requests", *world.tls(), f"--target-port={HTTP}", "--session=http2", spec)
    assert via_header["alpn"] == ALPN
    _same_as_direct(world, via_header)
    transparent = world.peer("requests", *world.tls(), "--mode=transparent", f"--target-port={HTTP}", spec)
    assert transparent["alpn"] is None
    _same_as_direct(world, transparent)
    # All 216 requests on two connections, each through the gateway by its own path.
    moved = Counter(world.status()["connections"]["opened"]) - opened
    assert moved == Counter({"inbound:header_orig_proto": 1, "inbound:mtls_orig_proto": 1}), moved

    who = ('direction="inbound"', f'client_id="{CLIENT}"', f'target_port="{HTTP}"')
    expected = 2 * REQUESTS_PER_RUN
    wait_for(lambda: total(world.metrics(), "request_total", *who) == expected, "requests counted", world.b)
    lines = world.metrics()
    assert total(lines, "response_total", *who) == expected
    assert total(lines, "response_total", *who, 'status_code="500"', 'classification="failure"') == 2
    assert (
        total(lines, "response_total", *who, 'status_code="200"', 'classification="success"') == expected - 2
    )


def test_redis_benchmark_through_the_opaque_forwarder(world: World) -> None:
    """redis-benchmark via a forwarder that dials 4143 with the ALPN and header {port: 6379}
    (no session protocol, as for an opaque port), and via transparent mTLS to 6379."""
    opened = Counter(world.status()["connections"]["opened"])
    world.forwarder(7001, *world.tls(), f"--target-port={REDIS}")
    args = ["-h", "127.0.0.1", "-p", "7001", "-n", "2000", "-c", "10", "-t", "set,get", "-q", "--csv"]
    bench = world.mesh.cl.run("redis-benchmark", *args, timeout=120)
    rows = [line for line in bench.stdout.splitlines() if line.startswith(('"SET"', '"GET"'))]
    assert len(rows) == 2, bench.stdout + bench.stderr
    assert "error" not in (bench.stdout + bench.stderr).lower()
    marker = "opaque-" + secrets.token_hex(8)
    world.mesh.cl.run("redis-cli", "-h", "127.0.0.1", "-p", "7001", "set", "peer-key", marker)
    world.forwarder(7002, *world.tls(), "--mode=transparent", f"--target-port={REDIS}")
    got = world.mesh.cl.run("redis-cli", "-h", "127.0.0.1", "-p", "7002", "get", "peer-key").stdout.strip()
    assert got == marker
    moved = Counter(world.status()["connections"]["opened"]) - opened
    assert moved["inbound:header"] >= 10 and moved["inbound:mtls"] == 1, moved


GRPC_CLIENT = """
import sys, grpc
for port in sys.argv[1:]:
    with grpc.insecure_channel("127.0.0.1:" + port) as ch:
        say = ch.unary_unary("/demo.Echo/Say")
        assert say(b"peer", timeout=10) == b"hi peer"
        for msg, code, details in (
            (b"fail", "UNAVAILABLE", "down for maintenance"),
            (b"missing", "NOT_FOUND", "no such thing"),
        ):
            try:
                say(msg, timeout=10)
                raise SystemExit("no error for " + msg.decode())
            except grpc.RpcError as err:
                assert (err.code().name, err.details()) == (code, details), (err.code(), err.details())
print("ok")
"""


def test_grpc_native_h2_unchanged(world: World) -> None:
    """A real grpcio client through the peer: header {port: 50051, session: http2} on 4143,
    and transparent mTLS to 50051; answers and grpc-status trailers unchanged."""
    opened = Counter(world.status()["connections"]["opened"])
    world.forwarder(7003, *world.tls(), f"--target-port={GRPC}", "--session=http2")
    world.forwarder(7004, *world.tls(), "--mode=transparent", f"--target-port={GRPC}")
    assert world.mesh.cl.run(PY, "-c", GRPC_CLIENT, "7003", "7004").stdout.strip() == "ok"
    moved = Counter(world.status()["connections"]["opened"]) - opened
    assert moved == Counter({"inbound:header": 1, "inbound:mtls": 1}), moved  # raw h2, no gateway


def _counts(world: World) -> Counter[str]:
    """Refusals and failures as /status shows them ("refused:inbound:header_empty", ...)."""
    conns = world.status()["connections"]
    return Counter(
        {f"{kind}:{reason}": n for kind in ("refused", "failures") for reason, n in conns[kind].items()}
    )


def _counted_once(world: World, what: str, before: Counter[str], reason: str, n: int = 1) -> None:
    """Exactly one counter moved, by `n`: the one for `reason`."""

    def moved() -> bool:
        return +(_counts(world) - before) == Counter({reason: n})

    wait_for(moved, f"{what}: counted as {reason} x{n} (moved: {dict(_counts(world) - before)})", world.b)


def test_refused_and_counted(world: World) -> None:
    """Each misbehaviour: no byte of the app comes back, the agent counts it under its own
    reason, and still serves."""
    get = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
    h2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"

    def header(port: int) -> bytes:
        out = world.mesh.cl.run(PY, "-m", "tests.linkerd.peer", "header", f"--port={port}").stdout
        return bytes.fromhex(out.strip())

    on_4143 = [f"--port={INBOUND}", f"--alpn={ALPN}"]
    cut, garbage = PREFACE + b"\0\0\0\x10\x08", PREFACE + b"\0\0\0\x05\xff\xff\xff\xff\xff"
    cases: list[tuple[str, list[str], bytes, str]] = [
        ("wrong ALPN (h2)", [f"--port={INBOUND}", "--alpn=h2"], h2_preface, "refused:inbound:direct_no_alpn"),
        ("header for the admin port", on_4143, header(4191) + get, "refused:inbound:header_unserved_port"),
        ("header for a port nobody listens on", on_4143, header(9) + get, "failures:inbound_connect"),
        ("header length 0", on_4143, PREFACE + b"\0\0\0\0" + get, "refused:inbound:header_empty"),
        ("header length 2^31", on_4143, PREFACE + b"\x80\0\0\0" + get, "refused:inbound:header_too_large"),
        ("truncated header", [*on_4143, "--wait=0"], cut, "refused:inbound:header_truncated"),
        ("garbage after the preface", on_4143, garbage, "refused:inbound:header_malformed"),
        ("no preface", on_4143, get, "refused:inbound:header_bad_preface"),
    ]  # fmt: skip
    for what, args, send, reason in cases:
        before = _counts(world)
        got = world.peer("probe", *world.tls(), *args, f"--send-hex={send.hex()}")
        # A server may refuse an ALPN it does not speak in the handshake; the header cases need one.
        assert got["handshake"] == "ok" or "ALPN" in what, (what, got)
        assert got["received_len"] == 0, (what, got)
        _counted_once(world, what, before, reason)

    for what, cert, reason in (
        ("another trust domain, same issuer", "other-td", "refused:inbound:foreign_trust_domain"),
        ("another mesh's CA", "foreign", "failures:inbound_tls_handshake"),
    ):
        before = _counts(world)
        got = world.peer("probe", *world.tls(cert), f"--port={HTTP}", f"--send-hex={get.hex()}")
        assert got["received_len"] == 0, (what, got)
        _counted_once(world, what, before, reason)

    before = _counts(world)
    flood = world.peer("flood", *world.tls(), f"--target-port={HTTP}", "--session=http2", "--streams=300")
    assert flood["alpn"] == ALPN and flood["goaway"] is None, flood
    limit = flood["max_concurrent_streams"]
    assert limit is not None and limit < 300
    # Streams past the advertised limit refused one by one; the others answered.
    assert flood["resets"] == {"REFUSED_STREAM": 300 - limit} and flood["responses"] == {"200": limit}, flood
    _counted_once(world, "stream flood", before, "refused:inbound:h2_refused_stream", 300 - limit)

    bad = world.mesh.tmp / "bad-orig-proto.json"
    host = [["host", f"{B}:{HTTP}"]]
    bad.write_text(
        json.dumps([{"name": "bad", "upgrade": False, "headers": [*host, ["l5d-orig-proto", "HTTP/9.9"]]}])
    )
    before = _counts(world)
    got = world.peer("requests", *world.tls(), f"--target-port={HTTP}", "--session=http2", f"--spec={bad}")
    r = got["results"]["bad"][0]
    assert r["reset"] is None and r["status"] == 400, r
    _counted_once(world, "bad l5d-orig-proto", before, "refused:inbound:orig_proto_bad_value")

    # The same refusals on /metrics, by reason.
    lines, refused = world.metrics(), world.status()["connections"]["refused"]
    for key in [c[3] for c in cases] + ["refused:inbound:foreign_trust_domain"]:
        if key.startswith("refused:"):
            reason = key.removeprefix("refused:inbound:")
            parts = ('direction="inbound"', f'reason="{reason}"')
            assert (
                total(lines, "meshagent_connections_refused_total", *parts)
                == refused[f"inbound:{reason}"]
                == 1
            )

    # Still serving, and nothing leaked: one more upgraded GET.
    ok = world.mesh.tmp / "ok.json"
    ok.write_text(json.dumps([{"name": "get", "target": "/", "headers": host}]))
    got = world.peer("requests", *world.tls(), f"--target-port={HTTP}", "--session=http2", f"--spec={ok}")
    assert got["results"]["get"][0]["status"] == 200
    assert world.status()["connections"]["open"] == 0
    assert world.b.proc is not None and world.b.proc.poll() is None
    assert "Traceback" not in world.b.log.read_text()
