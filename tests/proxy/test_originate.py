"""originate(): one verified upstream connection, no app, as the L4 path and the HTTP routers'
pools use it. Real sockets on loopback: a second proxy's inbound listener (identity shop/db) in
front of an echo app."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.identity.store import IdentityStore
from agent.proxy.catalog import Catalog
from agent.proxy.decisions import Originate, Passthrough
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.originate import Failed, Originated, originate
from agent.proxy.policy import InboundPolicy
from agent.proxy.relay import Leg
from agent.proxy.revocation import RevokedSet
from agent.proxy.tls import Credentials
from agent.proxy.transport_header import SessionProtocol
from tests.support import issue_identity

TD = "cluster.local"
DB = f"spiffe://{TD}/ns/shop/sa/db"
DB_NAME = "db.shop.serviceaccount.identity.linkerd.cluster.local"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
WEB_NAME = "web.shop.serviceaccount.identity.linkerd.cluster.local"


class Collect(Leg):
    """A transport-less leg paired with the originated one: what the server sends piles up."""

    def __init__(self) -> None:
        super().__init__()
        self.got = bytearray()
        self.ended = asyncio.Event()

    def sink(self) -> Callable[[bytes], object]:
        return self.send

    def send(self, data: bytes) -> None:
        self.got += data

    def send_eof(self) -> None:
        self.ended.set()

    def start(self) -> None:
        pass

    def close(self) -> None:
        self.ended.set()


async def echo() -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def run(tmp: Path, body: Callable[[Proxy, Proxy, int], Awaitable[None]]) -> None:
    issue_identity(tmp / "authority", "shop/web", tmp / "a")
    issue_identity(tmp / "authority", "shop/db", tmp / "b")

    async def main() -> None:
        server, app_port = await echo()
        b = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0), direct=True),
            Credentials.load(IdentityStore(tmp / "b")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", app_port),
        )
        a = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0)),
            Credentials.load(IdentityStore(tmp / "a")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", 1),
        )
        await b.start()
        try:
            await asyncio.wait_for(body(a, b, app_port), 20)
        finally:
            await a.stop(0.1)
            await b.stop(0.1)
            server.close()

    asyncio.run(main())


async def roundtrip(made: Originated, payload: bytes) -> bytes:
    sink = Collect()
    made.leg.pair(sink)
    made.leg.send(payload)
    await asyncio.wait_for(sink.ended.wait(), 5)
    return bytes(sink.got)


def test_mtls_to_the_expected_identity_registered_for_revocation(tmp_path: Path) -> None:
    async def body(a: Proxy, b: Proxy, app_port: int) -> None:
        b_in = b.listening["inbound"][1]
        made = await originate(a, Originate(("127.0.0.1", b_in), DB_NAME, DB), "198.18.0.1:80")
        assert isinstance(made, Originated)
        assert made.kind == "mtls" and made.server_label is not None and "db" in made.server_label
        assert 'server_id="' in made.tls_labels
        assert len(a.peers) == 1  # a revocation of db would find and cut it
        assert await roundtrip(made, b"hi") == b"echo:hi"
        # The same destination again resumes the session kept from the first connection.
        again = await originate(a, Originate(("127.0.0.1", b_in), DB_NAME, DB), "198.18.0.1:80")
        assert isinstance(again, Originated)
        assert a.stats.handshakes["resumed_outbound"] == 1
        again.leg.close()

    run(tmp_path, body)


def test_transport_header_names_the_port_and_session_protocol(tmp_path: Path) -> None:
    async def body(a: Proxy, b: Proxy, app_port: int) -> None:
        b_in = b.listening["inbound"][1]
        action = Originate(("127.0.0.1", b_in), DB_NAME, DB, header_port=app_port)
        made = await originate(a, action, "198.18.0.1:80", SessionProtocol.HTTP1)
        assert isinstance(made, Originated) and made.kind == "mtls_header"
        assert await roundtrip(made, b"over the header") == b"echo:over the header"

    run(tmp_path, body)


def test_failures_are_values_with_the_step_that_failed(tmp_path: Path) -> None:
    async def body(a: Proxy, b: Proxy, app_port: int) -> None:
        b_in = b.listening["inbound"][1]
        wrong = await originate(a, Originate(("127.0.0.1", b_in), DB_NAME, WEB), "198.18.0.1:80")
        assert isinstance(wrong, Failed) and wrong.kind == "identity"
        assert a.stats.failures["outbound_identity"] == 1
        a.set_revoked(RevokedSet(identities=frozenset({DB})))
        revoked = await originate(a, Originate(("127.0.0.1", b_in), DB_NAME, DB), "198.18.0.1:80")
        assert isinstance(revoked, Failed) and revoked.kind == "revoked"
        # A closed port: nothing listens where a listener just was.
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        closed_port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        refused = await originate(a, Originate(("127.0.0.1", closed_port), DB_NAME, DB), "198.18.0.1:80")
        assert isinstance(refused, Failed) and refused.kind == "connect"
        plain = await originate(a, Passthrough(("127.0.0.1", closed_port), ""), "198.18.0.1:80")
        assert isinstance(plain, Failed) and plain.kind == "connect"
        assert a.open_legs == 0  # nothing left behind by the failures

    run(tmp_path, body)


def test_passthrough_is_plain_tcp(tmp_path: Path) -> None:
    async def body(a: Proxy, b: Proxy, app_port: int) -> None:
        made = await originate(a, Passthrough(("127.0.0.1", app_port), "tls-labels"), "198.18.0.1:80")
        assert isinstance(made, Originated) and made.kind == "passthrough"
        assert made.tls_labels == "tls-labels" and len(a.peers) == 0
        assert await roundtrip(made, b"plain") == b"echo:plain"

    run(tmp_path, body)
