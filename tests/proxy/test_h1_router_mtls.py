"""The routed HTTP/1 path to meshed endpoints: each upstream is mTLS to the endpoint's own
identity (originate(): a second proxy's inbound listener, identity shop/db), pooled across
requests, cut by a revocation; Upgrade becomes L4 to the picked endpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.proxy.revocation import RevokedSet
from agent.proxy.routes import Backend, EndpointRef, Ref, RouteTable
from tests.proxy.test_h1_router_world import Client, World, policy, run

DB = "spiffe://cluster.local/ns/shop/sa/db"
DB_NAME = "db.shop.serviceaccount.identity.linkerd.cluster.local"


def meshed(port: int) -> Backend:
    return Backend(
        Ref("meshagent.io", "Host", "shop", "db", 8080),
        1,
        None,
        (EndpointRef("127.0.0.1", port, DB, DB_NAME),),
    )


def test_requests_go_over_pooled_mtls_to_the_endpoint_identity_and_revocation_cuts_them(
    tmp_path: Path,
) -> None:
    async def body(world: World) -> None:
        app = await world.server("db-app")
        b = await world.inbound_b(app.port)
        a = await world.proxy(RouteTable([policy(meshed(b.listening["inbound"][1]))]))
        client = await Client.open(world.port)
        for _ in range(3):
            assert (await client.request("GET", "/who")).body == b"db-app"
        assert app.connections == 1  # one pooled mTLS upstream carried all three
        assert len(a.peers) == 1  # registered: a revocation finds it
        assert a.stats.opened["outbound:http1_mtls"] == 1
        a.set_revoked(RevokedSet(identities=frozenset({DB})))
        assert len(a.peers) == 0
        resp = await client.request("GET", "/who")  # a new upstream is refused: db is revoked
        assert resp.status == 502 and "l5d-proxy-error" in resp.headers
        assert app.requests["/who"] == 3
        client.close()

    run(tmp_path, body)


async def upgrade_server() -> tuple[asyncio.AbstractServer, int]:
    """Answers an Upgrade with 101, then echoes raw bytes (a websocket stand-in)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"upgrade: raw" in head.lower()
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: raw\r\n\r\n")
        while data := await reader.read(1000):
            writer.write(b"echo:" + data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_upgrade_becomes_l4_to_the_picked_endpoint(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, port = await upgrade_server()
        backend = Backend(
            Ref("", "Service", "shop", "ws", 8080), 1, None, (EndpointRef("127.0.0.1", port, None, None),)
        )
        await world.proxy(RouteTable([policy(backend)]))
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
        writer.write(b"GET /ws HTTP/1.1\r\nhost: w\r\nconnection: upgrade\r\nupgrade: raw\r\n\r\nfirst")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert await reader.readexactly(10) == b"echo:first"
        writer.write(b"then")
        assert await reader.readexactly(9) == b"echo:then"
        writer.close()
        server.close()

    run(tmp_path, body)
