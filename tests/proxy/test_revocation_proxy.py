"""Revocation on the data plane, on loopback: a RevokedSet refuses new mTLS connections at the
end of the handshake (inbound: the client's certificate; outbound: the server's) and cuts the
open ones, counted and logged. Two proxies as in test_mtls_loopback: A (shop/web) dials B
(shop/db) through its outbound listener."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.proxy.catalog import Catalog
from agent.proxy.listeners import Proxy
from agent.proxy.revocation import RevokedSet, normal_serial
from agent.telemetry.proxy_metrics import ProxyMetrics
from tests.proxy.test_mtls_loopback import DB, WEB, World, run

OTHER = "spiffe://cluster.local/ns/shop/sa/other"


async def echo() -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def open_echo(a: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A long-lived connection A -> B, proven up by one echo."""
    reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    return reader, writer


async def cut(reader: asyncio.StreamReader) -> bool:
    """The connection ended (EOF or reset) rather than staying open."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def refused(a: Proxy) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
    try:
        writer.write(b"ping")
        return await cut(reader)
    finally:
        writer.close()


def test_revoking_the_client_cuts_its_inbound_connections_and_refuses_new_ones(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, port = await echo()
        a, b = await world.start(port)
        b.metrics = ProxyMetrics()
        kept_reader, kept_writer = await open_echo(a)
        assert b.set_revoked(RevokedSet(identities=frozenset({OTHER}))) == 0  # not ours: kept
        reader, _writer = await open_echo(a)
        assert len(b.peers) == 2

        assert b.set_revoked(RevokedSet(identities=frozenset({WEB, OTHER}))) == 2
        assert await cut(reader) and await cut(kept_reader)
        assert b.stats.refused["inbound:revoked_closed"] == 2
        assert len(b.peers) == 0
        assert await refused(a)
        await asyncio.sleep(0.1)
        assert b.stats.refused["inbound:peer_revoked"] == 1
        text = "".join(b.metrics.render([]))
        assert 'meshagent_connections_refused_total{direction="inbound",reason="peer_revoked"} 1' in text
        assert 'meshagent_revoked_connections_closed_total{direction="inbound"} 2' in text
        assert b.set_revoked(RevokedSet(identities=frozenset({WEB, OTHER}))) == 0  # the same set again
        kept_writer.close()
        server.close()

    run(tmp_path, body)


def test_revoking_the_server_by_serial_cuts_outbound_connections(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, port = await echo()
        a, b = await world.start(port)
        reader, _writer = await open_echo(a)
        serial = normal_serial(b.credentials.identity.summary.serial)
        assert a.set_revoked(RevokedSet(serials=frozenset({serial}))) == 1
        assert await cut(reader)
        assert a.stats.refused["outbound:revoked_closed"] == 1
        assert await refused(a)
        await asyncio.sleep(0.1)
        assert a.stats.refused["outbound:peer_revoked"] == 1
        # Un-revoked (the set no longer lists it): connections work again.
        a.set_revoked(RevokedSet.empty())
        reader, writer = await open_echo(a)
        writer.close()
        server.close()

    run(tmp_path, body)


def test_a_revoked_identity_that_is_not_the_peer_cuts_nothing(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, port = await echo()
        a, b = await world.start(port)
        reader, writer = await open_echo(a)
        assert a.set_revoked(RevokedSet(identities=frozenset({WEB}), serials=frozenset({"abc"}))) == 0
        assert b.set_revoked(RevokedSet(identities=frozenset({DB}))) == 0  # B's own identity: not a peer
        writer.write(b"still")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
        assert (len(a.peers), len(b.peers)) == (1, 1)
        writer.close()
        for _ in range(50):  # a closed connection leaves the books (no entry kept per past connection)
            if (len(a.peers), len(b.peers)) == (0, 0):
                break
            await asyncio.sleep(0.02)
        assert (len(a.peers), len(b.peers)) == (0, 0)
        server.close()

    run(tmp_path, body)


@pytest.mark.parametrize("in_catalog", [True, False], ids=["catalog-wins", "uncatalogued"])
def test_a_revoked_address_is_refused_unless_the_catalog_claims_it(tmp_path: Path, in_catalog: bool) -> None:
    """The authority takes a revoked host out of the catalog; its address is refused rather than
    passed through unmeshed. An address a catalog entry claims (a host enrolled there since)
    goes to that entry."""

    async def body(world: World) -> None:
        server, port = await echo()
        a, _b = await world.start(port)
        if not in_catalog:
            a.catalog = Catalog([])
        a.set_revoked(RevokedSet(addresses=frozenset({"127.0.0.1"})))
        if in_catalog:
            _reader, writer = await open_echo(a)
            writer.close()
        else:
            assert await refused(a)
            assert a.stats.refused["outbound:peer_revoked"] == 1
            assert a.stats.opened["outbound:passthrough"] == 0
        server.close()

    run(tmp_path, body)
