"""The data plane on loopback: two proxies, mTLS between them, real sockets, no interception.

The original destination, which the kernel supplies under interception (tests/netns), is given
here by a fixed resolver, so these tests exercise detection, TLS, identity checks,
authorization and the relay itself.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from agent.identity.store import IdentityStore
from agent.proxy.catalog import Catalog, CatalogEntry
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.tls import Credentials
from agent.telemetry.proxy_metrics import ProxyMetrics
from tests.support import issue_identity

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
DB = f"spiffe://{TD}/ns/shop/sa/db"
DB_NAME = "db.shop.serviceaccount.identity.linkerd.cluster.local"


async def echo_server() -> tuple[asyncio.AbstractServer, int]:
    """Echoes everything, and closes its write side after the client's EOF (half-close)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class World:
    """Host A (web, outbound proxy) and host B (db, inbound proxy) on loopback."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        issue_identity(tmp / "authority", "shop/web", tmp / "a")
        issue_identity(tmp / "authority", "shop/db", tmp / "b")
        self.proxies: list[Proxy] = []

    async def start(
        self,
        app_port: int,
        policy: InboundPolicy | None = None,
        catalog_identity: str = DB,
        server_name: str = DB_NAME,
        idle_timeout_s: float = 3600.0,
        detect_timeout_s: float = 1.0,
        max_handshakes: int = 128,
        handshake_timeout_s: float = 10.0,
        native_relay: bool | None = None,
        metrics_b: ProxyMetrics | None = None,
    ) -> tuple[Proxy, Proxy]:
        """A and B; `native_relay` None: the setting's default; `metrics_b`: B's metrics."""
        native = ListenerSettings.native_relay if native_relay is None else native_relay
        b = Proxy(
            ListenerSettings(
                inbound=("127.0.0.1", 0),
                outbound=("127.0.0.1", 0),
                idle_timeout_s=idle_timeout_s,
                detect_timeout_s=detect_timeout_s,
                max_handshakes=max_handshakes,
                handshake_timeout_s=handshake_timeout_s,
                native_relay=native,
            ),
            Credentials.load(IdentityStore(self.tmp / "b")),
            policy or InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", app_port),
            metrics=metrics_b,
        )
        await b.start()
        b_in = b.listening["inbound"][1]
        catalog = Catalog(
            [
                CatalogEntry.from_doc(
                    {
                        "cidr": "127.0.0.1/32",
                        "ports": [b_in],
                        "identity": catalog_identity,
                        "server_name": server_name,
                    }
                )
            ]
        )
        a = Proxy(
            ListenerSettings(
                inbound=("127.0.0.1", 0),
                outbound=("127.0.0.1", 0),
                idle_timeout_s=idle_timeout_s,
                native_relay=native,
            ),
            Credentials.load(IdentityStore(self.tmp / "a")),
            InboundPolicy(),
            catalog,
            lambda sock: ("127.0.0.1", b_in),
        )
        await a.start()
        self.proxies += [a, b]
        return a, b

    async def stop(self) -> None:
        for p in self.proxies:
            await p.stop(0.5)


def run(tmp: Path, body: Callable[[World], Awaitable[None]], on_uvloop: bool = False) -> None:
    async def main() -> None:
        world = World(tmp)
        try:
            await asyncio.wait_for(body(world), 30)
        finally:
            await world.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if on_uvloop else None) as runner:
        runner.run(main())


async def request(port: int, payload: bytes) -> bytes:
    """Send `payload`, half-close, read to EOF; a refused or reset connection reads as b""."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_outbound_to_inbound_is_mtls_with_half_close(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await world.start(app_port)
        payload = b"x" * 3_000_000  # larger than every buffer on the way: backpressure
        assert await request(a.listening["outbound"][1], payload) == b"echo:" + payload
        assert a.stats.opened["outbound:mtls"] == 1
        assert b.stats.opened["inbound:mtls"] == 1
        server.close()

    run(tmp_path, body)


def test_many_concurrent_connections(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, _ = await world.start(app_port)
        port = a.listening["outbound"][1]
        results = await asyncio.gather(*(request(port, f"req-{i}".encode()) for i in range(200)))
        assert results == [f"echo:req-{i}".encode() for i in range(200)]
        await asyncio.sleep(0.2)
        assert a.open_connections == 0  # every leg closed: no fd leak
        server.close()

    run(tmp_path, body)


def test_wrong_server_identity_is_refused(tmp_path: Path) -> None:
    """The catalog expects shop/web at B's address, B proves shop/db: no connection."""

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, _ = await world.start(
            app_port,
            catalog_identity=WEB,
            server_name="web.shop.serviceaccount.identity.linkerd.cluster.local",
        )
        assert await request(a.listening["outbound"][1], b"hello") == b""
        assert a.stats.failures["outbound_tls"] + a.stats.failures["outbound_identity"] == 1
        server.close()

    run(tmp_path, body)


@pytest.mark.parametrize(
    ("policy", "allowed"),
    [
        (PortPolicy(DefaultPolicy.ALL_AUTHENTICATED), True),
        (PortPolicy(DefaultPolicy.DENY), False),
        (PortPolicy(DefaultPolicy.DENY, allow=(f"spiffe://{TD}/ns/shop/*",)), True),
        (PortPolicy(DefaultPolicy.ALL_AUTHENTICATED, allow=(f"spiffe://{TD}/ns/other/*",)), False),
    ],
    ids=["authenticated", "deny", "allow-glob", "not-on-allow-list"],
)
def test_inbound_authorization(tmp_path: Path, policy: PortPolicy, allowed: bool) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await world.start(app_port, policy=InboundPolicy(default=policy))
        got = await request(a.listening["outbound"][1], b"hi")
        assert got == (b"echo:hi" if allowed else b"")
        assert sum(b.stats.refused.values()) == (0 if allowed else 1)
        server.close()

    run(tmp_path, body)


@pytest.mark.parametrize(
    ("default", "allowed"),
    [(DefaultPolicy.ALL_UNAUTHENTICATED, True), (DefaultPolicy.ALL_AUTHENTICATED, False)],
    ids=["permissive", "strict"],
)
def test_plaintext_client_by_policy(tmp_path: Path, default: DefaultPolicy, allowed: bool) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        _, b = await world.start(app_port, policy=InboundPolicy(default=PortPolicy(default)))
        got = await request(b.listening["inbound"][1], b"GET / HTTP/1.1\r\n\r\n")
        assert got == (b"echo:GET / HTTP/1.1\r\n\r\n" if allowed else b"")
        assert b.stats.opened["inbound:plaintext"] == (1 if allowed else 0)
        server.close()

    run(tmp_path, body)


def test_foreign_ca_client_certificate_is_refused(tmp_path: Path) -> None:
    """A client certificate from another CA, with the right SNI, fails the handshake."""

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        _, b = await world.start(app_port)
        issue_identity(tmp_path / "other-authority", "shop/web", tmp_path / "intruder")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(tmp_path / "intruder/identity/cert.pem", tmp_path / "intruder/identity/key.pem")
        ctx.load_verify_locations(tmp_path / "b/identity/bundle.pem")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", b.listening["inbound"][1], ssl=ctx, server_hostname=DB_NAME
        )
        writer.write(b"hi")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            data = await reader.read()
            if not data:
                raise ConnectionResetError("closed")
        await asyncio.sleep(0.1)
        assert b.stats.failures["inbound_tls_handshake"] == 1
        writer.close()
        server.close()

    run(tmp_path, body)


def test_rotation_swaps_contexts_and_open_connections_stay_up(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        a, b = await world.start(server.sockets[0].getsockname()[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        # Rotate both hosts' identities (new keys), swap the contexts.
        serials = {}
        for proxy, name, ident in ((a, "a", "shop/web"), (b, "b", "shop/db")):
            old = proxy.credentials.identity.summary.serial
            fresh = issue_identity(tmp_path / "authority", ident, tmp_path / name)
            proxy.credentials.reload(IdentityStore(tmp_path / name), fresh)
            serials[name] = fresh.summary.serial
            assert serials[name] != old
        writer.write(b"after")
        assert await reader.readexactly(5) == b"after"  # the old connection lives on
        assert a.credentials.identity.summary.serial == serials["a"]
        # A new connection handshakes with the new certificates.
        r2, w2 = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        w2.write(b"new")
        assert await r2.readexactly(3) == b"new"
        w2.close()
        writer.close()
        server.close()

    run(tmp_path, body)


def test_idle_connections_are_closed(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        a, _ = await world.start(server.sockets[0].getsockname()[1], idle_timeout_s=1.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the idle sweep
        assert a.open_connections == 0
        writer.close()
        server.close()

    run(tmp_path, body)


def test_a_client_hello_waiting_when_the_detect_timer_fires_is_still_mtls(tmp_path: Path) -> None:
    """uvloop runs due timers before it polls sockets: on a loop too busy to read, the detect
    timer fires with the ClientHello already in the socket. It must not be taken for plaintext
    (strict: refused; permissive: relayed to the app as if it were)."""

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        strict = InboundPolicy(default=PortPolicy(DefaultPolicy.ALL_AUTHENTICATED))
        _, b = await world.start(app_port, policy=strict, detect_timeout_s=0.2)
        hello = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = Credentials.load(IdentityStore(world.tmp / "a")).client
        tls = client.wrap_bio(*hello, server_side=False, server_hostname=DB_NAME)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        loop = asyncio.get_running_loop()
        with socket.create_connection(("127.0.0.1", b.listening["inbound"][1])) as sock:
            await asyncio.sleep(0.05)  # b accepts: its detect timer runs from here (due at 0.2 s)
            ping, pong = socket.socketpair()

            def busy() -> None:
                # An I/O callback (after this turn's poll) sends the ClientHello and keeps the
                # loop busy past 0.2 s: the next turn runs the due timer before it polls again.
                loop.remove_reader(pong)
                sock.sendall(hello[1].read())
                time.sleep(0.4)

            loop.add_reader(pong, busy)
            ping.send(b"!")
            sock.setblocking(False)
            first = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
            ping.close()
            pong.close()
        assert first == b"\x16", f"b answered {first!r}, not a TLS handshake record"
        assert not b.stats.refused, b.stats.refused
        server.close()

    run(tmp_path, body, on_uvloop=True)


def _foreign_domain_client(tmp_path: Path) -> ssl.SSLContext:
    """A client certificate for spiffe://evil.example/ns/shop/sa/web, signed by the very issuer
    of this mesh (one authority issuing for two trust domains, or a mis-issue)."""
    from cryptography.hazmat.primitives import serialization

    from agent.authority.ca import load_authority
    from agent.authority.signing import issue_leaf, parse_csr
    from agent.identity.certinfo import utcnow
    from agent.identity.names import WorkloadIdentity
    from agent.identity.pki import generate_key, make_csr

    material = load_authority(tmp_path / "authority")
    key = generate_key()
    leaf = issue_leaf(
        material, WorkloadIdentity("evil.example", "shop", "web"), parse_csr(make_csr(key).decode()), utcnow()
    )
    chain = [leaf, *material.chain_tail]
    (tmp_path / "evil.crt").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    (tmp_path / "evil.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(tmp_path / "evil.crt", tmp_path / "evil.key")
    ctx.load_verify_locations(tmp_path / "b/identity/bundle.pem")
    return ctx


def test_all_authenticated_refuses_another_trust_domain_of_the_same_issuer(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        strict = InboundPolicy(default=PortPolicy(DefaultPolicy.ALL_AUTHENTICATED))
        a, b = await world.start(app_port, policy=strict)
        # This trust domain's client is admitted...
        assert await request(a.listening["outbound"][1], b"ok") == b"echo:ok"
        # ...the same issuer's certificate for another trust domain is not.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            b.listening["inbound"][1],
            ssl=_foreign_domain_client(world.tmp),
            server_hostname=DB_NAME,
        )
        writer.write(b"hi")
        try:
            got = await reader.read()
        except (ssl.SSLError, ConnectionError):
            got = b""
        assert got == b""
        assert b.stats.refused["inbound:foreign_trust_domain"] == 1
        assert b.stats.opened["inbound:mtls"] == 1
        writer.close()
        server.close()

    run(tmp_path, body)


def _client_hello(tmp: Path) -> bytes:
    """A real ClientHello for b's name (b terminates it and waits for the client's answer)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = Credentials.load(IdentityStore(tmp / "a")).client
    tls = client.wrap_bio(incoming, outgoing, server_side=False, server_hostname=DB_NAME)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_burst_over_the_handshake_limit_waits_and_gets_through(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await world.start(app_port, max_handshakes=2)
        port = a.listening["outbound"][1]
        # 2 in handshakes and 16 waiting (8 per slot): none refused
        results = await asyncio.gather(*(request(port, f"req-{i}".encode()) for i in range(18)))
        assert results == [f"echo:req-{i}".encode() for i in range(18)]
        assert b.stats.handshakes["queued"] > 0
        assert b.handshakes.status()["active"] == 0
        assert not b.stats.refused
        server.close()

    run(tmp_path, body, on_uvloop=True)


def test_silent_client_hellos_hold_at_most_the_limit_and_a_full_line_is_refused(tmp_path: Path) -> None:
    """limit 1: one silent handshake, 8 waiting (8 per slot), the 10th refused at once; a
    waiter whose deadline passes is closed and counted."""

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        _, b = await world.start(app_port, max_handshakes=1, handshake_timeout_s=1.0)
        hello = _client_hello(world.tmp)
        loop = asyncio.get_running_loop()
        socks = []
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", b.listening["inbound"][1]))
            sock.sendall(hello)
            socks.append(sock)
            await asyncio.sleep(0.02)  # in order: b reads each before the next
        status = b.handshakes.status()
        assert (status["active"], status["waiting"]) == (1, 8), status
        assert b.stats.refused["inbound:handshakes_over_limit"] == 1
        socks[-1].setblocking(False)
        assert await asyncio.wait_for(loop.sock_recv(socks[-1], 1), 2) == b""  # closed at once
        await asyncio.sleep(1.3)  # every deadline (1 s from accept) has passed
        status = b.handshakes.status()
        assert (status["active"], status["waiting"]) == (0, 0), status
        assert status["timed_out_waiting"] >= 1
        for sock in socks:
            sock.close()
        server.close()

    run(tmp_path, body, on_uvloop=True)


def test_a_failed_handshake_frees_its_tls_state_at_once(tmp_path: Path) -> None:
    """A failed handshake's error is a value without a traceback: no reference cycle keeps the
    leg (and its OpenSSL state) alive until the cyclic GC, which a flood outran (130 MB)."""
    import gc

    from agent.proxy.relay import TlsLeg

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        _, b = await world.start(app_port)
        hello = _client_hello(world.tmp)
        gc.collect()
        gc.disable()
        try:
            loop = asyncio.get_running_loop()
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", b.listening["inbound"][1])) as sock:
                    sock.sendall(hello)
                    sock.setblocking(False)
                    await asyncio.wait_for(loop.sock_recv(sock, 1), 5)  # b's handshake state exists
            for _ in range(50):
                if b.stats.failures["inbound_tls_handshake"] == 20:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            alive = sum(1 for o in gc.get_objects() if isinstance(o, TlsLeg))
        finally:
            gc.enable()
        assert b.stats.failures["inbound_tls_handshake"] == 20
        assert alive == 0
        server.close()

    run(tmp_path, body, on_uvloop=True)
