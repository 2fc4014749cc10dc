"""The inbound proxy port as an in-cluster linkerd2-proxy in opaque-transport mode dials it, on
loopback: mTLS with ALPN transport.l5d.io/v1, then Linkerd's transport header naming the app's
port. Refusals, each counted with its reason while the proxy keeps serving; and our outbound
side writing the header to an endpoint whose catalog entry has `opaque_port`.

A direct connection's original destination is the listener's own address (no NAT): the resolver
here returns the accepted socket's local address, as SO_ORIGINAL_DST does for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.identity.store import IdentityStore
from agent.logs import _FIELDS
from agent.proxy.catalog import Catalog, CatalogEntry
from agent.proxy.decisions import ServedPorts
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.tls import Credentials
from agent.proxy.transport_header import (
    ALPN,
    PREFACE,
    HeaderReader,
    SessionProtocol,
    TransportHeader,
    encode,
)
from agent.telemetry.metrics import labels
from agent.telemetry.proxy_metrics import ProxyMetrics
from tests.support import issue_identity

TD = "cluster.local"
DB = f"spiffe://{TD}/ns/shop/sa/db"
DB_NAME = "db.shop.serviceaccount.identity.linkerd.cluster.local"
WEB_NAME = "web.shop.serviceaccount.identity.linkerd.cluster.local"


async def line_server() -> tuple[asyncio.AbstractServer, int]:
    """Reads one line, answers `echo:<line>` and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(b"echo:" + line)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def local_address(sock: Any) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return host, port


class Host:
    """Host B (shop/db) with its inbound proxy, and host A's (shop/web) credentials."""

    def __init__(self, tmp: Path) -> None:
        issue_identity(tmp / "authority", "shop/web", tmp / "a")
        issue_identity(tmp / "authority", "shop/db", tmp / "b")
        self.tmp = tmp
        self.web = Credentials.load(IdentityStore(tmp / "a"))
        self.metrics = ProxyMetrics()
        self.proxies: list[Proxy] = []

    async def start(self, app_port: int, policy: InboundPolicy | None = None) -> Proxy:
        b = Proxy(
            ListenerSettings(
                inbound=("127.0.0.1", 0),
                outbound=("127.0.0.1", 0),
                detect_timeout_s=1.0,
                direct=True,
                served_ports=ServedPorts(((app_port, app_port),)),
            ),
            Credentials.load(IdentityStore(self.tmp / "b")),
            policy or InboundPolicy(),
            Catalog([]),
            local_address,
            self.metrics,
        )
        await b.start()
        self.proxies.append(b)
        return b

    async def stop(self) -> None:
        for p in self.proxies:
            await p.stop(0.5)

    def refused(self, reason: str) -> float:
        child = self.metrics.refused.child(labels(("direction", "inbound"), ("reason", reason)))
        return float(child.value)


def run(tmp: Path, body: Callable[[Host], Awaitable[None]]) -> None:
    async def main() -> None:
        host = Host(tmp)
        try:
            await asyncio.wait_for(body(host), 30)
        finally:
            await host.stop()

    asyncio.run(main())


async def direct(
    port: int,
    context: ssl.SSLContext | None,
    payload: bytes,
    server_name: str = DB_NAME,
    eof: bool = False,
) -> bytes:
    """Dial the direct port (TLS unless `context` is None), send `payload`, read to the end;
    a refused, reset or failed connection reads as what arrived before (often b"")."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_name if context else None
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(payload)
        if eof and context is None:
            writer.write_eof()
        return await reader.read()
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


def test_header_to_a_served_port_is_relayed_to_it(tmp_path: Path) -> None:
    async def body(host: Host) -> None:
        server, app_port = await line_server()
        b = await host.start(app_port)
        port = b.listening["inbound"][1]
        got = await direct(port, host.web.client_opaque, encode(TransportHeader(app_port)) + b"hello\n")
        assert got == b"echo:hello\n"
        # The header and the first bytes in separate writes, HTTP/1 as the session protocol.
        header = encode(TransportHeader(app_port, session_protocol=SessionProtocol.HTTP1))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=host.web.client_opaque, server_hostname=DB_NAME
        )
        for part in (header[:5], header[5:], b"GET / HTTP/1.1\r\n"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)
        assert await reader.read() == b"echo:GET / HTTP/1.1\r\n"
        writer.close()
        assert b.stats.opened["inbound:header"] == 2
        assert not b.stats.refused
        server.close()

    run(tmp_path, body)


def test_refusals_are_counted_with_their_reason_and_the_proxy_keeps_serving(tmp_path: Path) -> None:
    async def body(host: Host) -> None:
        server, app_port = await line_server()
        b = await host.start(app_port)
        port = b.listening["inbound"][1]
        opaque = host.web.client_opaque
        cases: list[tuple[str, Awaitable[bytes]]] = [
            ("header_unserved_port", direct(port, opaque, encode(TransportHeader(22)) + b"x\n")),
            ("header_unserved_port", direct(port, opaque, encode(TransportHeader(port)) + b"x\n")),
            ("header_empty", direct(port, opaque, PREFACE + (0).to_bytes(4, "big"))),
            ("header_too_large", direct(port, opaque, PREFACE + (2**31).to_bytes(4, "big"))),
            ("header_bad_preface", direct(port, opaque, b"GET / HTTP/1.1\r\n\r\n" + b"x" * 32)),
            ("header_malformed", direct(port, opaque, PREFACE + b"\x00\x00\x00\x03\xff\xff\xff")),
            ("direct_no_alpn", direct(port, host.web.client, encode(TransportHeader(app_port)))),
            ("direct_not_tls", direct(port, None, encode(TransportHeader(app_port)), eof=True)),
            ("direct_foreign_sni", direct(port, opaque, b"x\n", server_name="api.example.com")),
        ]
        for reason, attempt in cases:
            assert await attempt == b"", reason
        await truncated(port, opaque, encode(TransportHeader(app_port))[:-2])
        expected = {f"inbound:{reason}": 0 for reason, _ in cases}
        for reason, _ in cases:
            expected[f"inbound:{reason}"] += 1
        expected["inbound:header_truncated"] = 1
        assert dict(b.stats.refused) == expected
        for kind, count in expected.items():
            assert host.refused(kind.removeprefix("inbound:")) == count, kind
        assert not b.stats.opened
        # Still serving.
        got = await direct(port, opaque, encode(TransportHeader(app_port)) + b"after\n")
        assert got == b"echo:after\n"
        server.close()

    run(tmp_path, body)


async def truncated(port: int, context: ssl.SSLContext, partial: bytes) -> None:
    """Part of a header, then close_notify: the reader's end comes before the header's."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=DB_NAME)
    writer.write(partial)
    await writer.drain()
    ssl_object = writer.get_extra_info("ssl_object")
    transport = writer.transport
    # asyncio's TLS transport cannot half-close: close it, which sends close_notify.
    assert ssl_object is not None
    transport.close()
    await asyncio.sleep(0.2)


def test_policy_applies_to_the_header_target_port(tmp_path: Path) -> None:
    async def body(host: Host) -> None:
        server, app_port = await line_server()
        policy = InboundPolicy(ports={app_port: PortPolicy(DefaultPolicy.DENY)})
        b = await host.start(app_port, policy)
        port = b.listening["inbound"][1]
        assert await direct(port, host.web.client_opaque, encode(TransportHeader(app_port)) + b"x\n") == b""
        assert b.stats.refused == {"inbound:denied": 1}
        deny = host.metrics.authz_deny.render()
        assert any(f'target_port="{app_port}"' in line and WEB_NAME in line for line in deny)
        server.close()

    run(tmp_path, body)


def test_an_audit_port_admits_whom_it_would_refuse_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`audit` (Linkerd's audit default policy): a client the allow-list leaves out is admitted,
    counted as allowed by `authz_name="audit"` and logged as `connection.audited`."""

    async def body(host: Host) -> None:
        server, app_port = await line_server()
        allow = (f"spiffe://{TD}/ns/other/*",)
        policy = InboundPolicy(ports={app_port: PortPolicy(DefaultPolicy.AUDIT, allow)})
        b = await host.start(app_port, policy)
        port = b.listening["inbound"][1]
        got = await direct(port, host.web.client_opaque, encode(TransportHeader(app_port)) + b"x\n")
        assert got == b"echo:x\n"
        assert not b.stats.refused
        allowed = host.metrics.authz_allow.render()
        assert any('authz_name="audit"' in line and WEB_NAME in line for line in allowed), allowed
        server.close()

    with caplog.at_level("INFO"):
        run(tmp_path, body)
    audited = [r for r in caplog.records if r.getMessage() == "connection.audited"]
    assert len(audited) == 1
    assert getattr(audited[0], _FIELDS)["would_refuse"] == "not_authorized"


def test_outbound_to_an_opaque_port_writes_the_header_first(tmp_path: Path) -> None:
    """Host A's outbound proxy, catalog entry with opaque_port, dials that port with the ALPN and
    writes the header: read by a TLS server with HeaderReader, then end to end through B."""

    async def body(host: Host) -> None:
        app, app_port = await line_server()
        seen: list[Any] = []
        b_creds = Credentials.load(IdentityStore(host.tmp / "b"))

        async def header_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
            header_reader = HeaderReader()
            while True:
                chunk = await reader.read(1)  # a byte at a time: any split must do
                result = header_reader.feed(chunk)
                if isinstance(result, TransportHeader):
                    seen.append(result)
                    break
            seen.append(header_reader.rest + await reader.readline())
            writer.write(b"ok\n")
            await writer.drain()
            writer.close()

        tls_server = await asyncio.start_server(header_server, "127.0.0.1", 0, ssl=b_creds.server)
        opaque_port = tls_server.sockets[0].getsockname()[1]

        def a_proxy(dst_port: int, opaque: int) -> Proxy:
            entry = CatalogEntry.from_doc(
                {"cidr": "127.0.0.1/32", "ports": [dst_port], "identity": DB, "opaque_port": opaque}
            )
            return Proxy(
                ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0)),
                host.web,
                InboundPolicy(),
                Catalog([entry]),
                lambda sock: ("127.0.0.1", dst_port),
            )

        a = a_proxy(app_port, opaque_port)
        await a.start()
        host.proxies.append(a)
        reader, writer = await asyncio.open_connection(*a.listening["outbound"])
        writer.write(b"hello\n")
        assert await reader.read() == b"ok\n"
        writer.close()
        assert seen == [ALPN, TransportHeader(app_port), b"hello\n"]
        assert a.stats.opened["outbound:mtls_header"] == 1

        # End to end: A's outbound -> B's direct port -> the app.
        b = await host.start(app_port)
        a2 = a_proxy(app_port, b.listening["inbound"][1])
        await a2.start()
        host.proxies.append(a2)
        reader, writer = await asyncio.open_connection(*a2.listening["outbound"])
        writer.write(b"through\n")
        assert await reader.read() == b"echo:through\n"
        writer.close()
        assert b.stats.opened["inbound:header"] == 1
        app.close()
        tls_server.close()

    run(tmp_path, body)


@pytest.mark.parametrize("alpn", [None, ["h2"]])
def test_outbound_fails_when_the_endpoint_does_not_select_the_alpn(tmp_path: Path, alpn: Any) -> None:
    async def body(host: Host) -> None:
        plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # same certificate, no transport ALPN
        gen = IdentityStore(host.tmp / "b").current.resolve()
        plain.load_cert_chain(gen / "cert.pem", gen / "key.pem")
        plain.load_verify_locations(cafile=gen / "bundle.pem")
        plain.verify_mode = ssl.CERT_REQUIRED
        if alpn:
            plain.set_alpn_protocols(alpn)
        got: list[bytes] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):  # the proxy aborts: expected
                got.append(await reader.read())
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=plain)
        port = server.sockets[0].getsockname()[1]
        entry = CatalogEntry.from_doc(
            {"cidr": "127.0.0.1/32", "ports": [8080], "identity": DB, "opaque_port": port}
        )
        a = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0)),
            host.web,
            InboundPolicy(),
            Catalog([entry]),
            lambda sock: ("127.0.0.1", 8080),
        )
        await a.start()
        host.proxies.append(a)
        reader, writer = await asyncio.open_connection(*a.listening["outbound"])
        writer.write(b"secret\n")
        with contextlib.suppress(ConnectionError):  # aborted: reset or EOF
            assert await reader.read() == b""
        writer.close()
        await asyncio.sleep(0.1)
        assert a.stats.refused == {"outbound:transport_alpn_not_selected": 1}
        assert b"secret" not in b"".join(got)  # the app's bytes never reached a header-less peer
        server.close()

    run(tmp_path, body)


def test_mtls_on_an_app_port_is_read_first_and_still_counted(tmp_path: Path) -> None:
    """Transparent mode (a linkerd2-proxy's TLS to the app's own port, no ALPN): the first
    decrypted bytes are read before the app is dialled, then reach it whole and are counted."""

    async def body(host: Host) -> None:
        async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(http, "127.0.0.1", 0)
        app_port = server.sockets[0].getsockname()[1]
        b = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0)),
            Credentials.load(IdentityStore(host.tmp / "b")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", app_port),
            host.metrics,
        )
        await b.start()
        host.proxies.append(b)
        request = b"GET / HTTP/1.1\r\nHost: db\r\n\r\n"
        got = await direct(b.listening["inbound"][1], host.web.client, request)
        assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"ok")
        assert b.stats.opened["inbound:mtls"] == 1
        await asyncio.sleep(0.1)
        requests = [line for line in host.metrics.request_total.render() if not line.startswith("#")]
        assert len(requests) == 1 and f'client_id="{WEB_NAME}"' in requests[0]
        assert requests[0].endswith(" 1")
        server.close()

    run(tmp_path, body)


def test_records_decrypted_in_one_read_are_looked_at_once() -> None:
    """A client sending one byte per TLS record must not make the first-bytes check re-read its
    buffer once per record (quadratic work on the event loop): one read, one look."""
    from agent.proxy.listeners import _Prefix

    looks: list[bytes] = []
    prefix = _Prefix(lambda data: bool(looks.append(data)), lambda: None)
    prefix.send_many([b"x"] * 10_000)
    assert looks == [b"x" * 10_000]
