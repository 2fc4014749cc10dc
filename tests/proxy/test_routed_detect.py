"""A routed destination's first bytes decide: HTTP/1 is routed per request, anything else (or
silence past detect_timeout_s) takes the L4 path to the original destination with the bytes
already read; `proxy.http_routes = false` routes nothing. The directory's routes reach the
proxy (and, pickled, the workers); an authority that leaves `routes` out keeps them."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

from agent.daemon import carry_services
from agent.proxy.directory import merge
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.routes import RouteTable
from tests.proxy.test_h1_router_world import Client, World, policy, run
from tests.support import metric_sum


async def raw_server(greeting: bytes = b"") -> tuple[asyncio.AbstractServer, int]:
    """Says `greeting` first (a server-speaks-first protocol), then echoes what it reads."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if greeting:
            writer.write(greeting)
        while data := await reader.read(1000):
            writer.write(b"raw:" + data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def fallbacks(world: World, reason: str) -> float:
    assert world.a is not None and world.a.metrics is not None
    text = "\n".join(world.a.metrics.render(world.a.live_legs()))
    return metric_sum(text, "meshagent_http_routed_fallback_total", f'reason="{reason}"')


def test_http_is_routed_opaque_bytes_go_l4_with_what_was_read(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        backend = await world.server("backend")
        server, orig_port = await raw_server()
        at = ("127.0.0.1", orig_port)  # the parent's address is a real listener: L4 reaches it
        await world.proxy(RouteTable([policy(backend.backend(), at=at)]), orig=at)
        client = await Client.open(world.port)
        assert (await client.request("GET", "/who")).body == b"backend"  # routed, not to orig
        client.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
        writer.write(b"\x00\x01 not http")
        assert await reader.readexactly(15) == b"raw:\x00\x01 not http"
        writer.write(b"more")  # and the connection is L4 from here on
        assert await reader.readexactly(8) == b"raw:more"
        writer.close()
        assert fallbacks(world, "opaque") == 1
        server.close()

    run(tmp_path, body)


def test_a_silent_app_goes_l4_after_the_detect_timeout(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        backend = await world.server("backend")
        server, orig_port = await raw_server(greeting=b"220 hello\r\n")
        at = ("127.0.0.1", orig_port)
        await world.proxy(RouteTable([policy(backend.backend(), at=at)]), orig=at, detect_timeout_s=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
        assert await asyncio.wait_for(reader.readexactly(11), 5) == b"220 hello\r\n"
        writer.write(b"HELO")
        assert await reader.readexactly(8) == b"raw:HELO"
        writer.close()
        assert fallbacks(world, "detect_timeout") == 1
        assert backend.connections == 0
        server.close()

    run(tmp_path, body)


def test_http_routes_false_is_the_kill_switch(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        backend = await world.server("backend")
        server, orig_port = await raw_server()
        at = ("127.0.0.1", orig_port)
        proxy = await world.proxy(RouteTable([policy(backend.backend(), at=at)]), orig=at, http_routes=False)
        assert not proxy.routes and proxy.router is None
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
        writer.write(b"GET /who HTTP/1.1\r\nhost: w\r\n\r\n")
        assert (await reader.readexactly(8)) == b"raw:GET "  # the original destination's bytes
        writer.close()
        assert backend.connections == 0
        server.close()

    run(tmp_path, body)


def test_routes_reach_the_proxy_and_pickle_for_workers_and_an_absent_member_keeps_them(
    tmp_path: Path,
) -> None:
    doc = {
        "routes": [
            {
                "parent": {
                    "group": "meshagent.io",
                    "kind": "Host",
                    "namespace": "shop",
                    "name": "billing",
                    "port": 8080,
                    "section": "",
                    "addresses": ["198.18.2.2"],
                },
                "budget": {"ratio": 0.2, "min_per_s": 10, "ttl_s": 10},
                "sources": ["HTTPRoute shop/billing"],
                "routes": [
                    {
                        "group": "gateway.networking.k8s.io",
                        "kind": "HTTPRoute",
                        "namespace": "shop",
                        "name": "billing",
                        "created": 1.0,
                        "rules": [
                            {
                                "matches": [{"path": {"type": "RegularExpression", "value": "/api/.*"}}],
                                "backends": [
                                    {
                                        "weight": 1,
                                        "ref": {
                                            "group": "meshagent.io",
                                            "kind": "Host",
                                            "namespace": "shop",
                                            "name": "billing",
                                            "port": 8080,
                                            "section": "",
                                        },
                                        "endpoints": [
                                            {
                                                "address": "198.18.2.2",
                                                "port": 8080,
                                                "identity": None,
                                                "server_name": None,
                                            }
                                        ],
                                        "accrual": None,
                                    }
                                ],
                            }
                        ],
                    }
                ],
            }
        ]
    }
    directory = merge([], InboundPolicy(PortPolicy(DefaultPolicy("all-unauthenticated"))), doc)
    assert directory.routes.lookup("198.18.2.2", 8080) is not None, directory.rejected
    # Workers get the directory pickled (agent/workers/pool.py): the table (its regexes) too.
    copy = pickle.loads(pickle.dumps(directory, protocol=5))  # noqa: S301 - our own bytes
    assert copy.routes.lookup("198.18.2.2", 8080) is not None
    assert copy.routes.lookup("::ffff:198.18.2.2", 8080) is not None

    async def body(world: World) -> None:
        proxy = await world.proxy(RouteTable())
        assert not proxy.routes and proxy.router is None  # nothing routed: no lookup, no state
        proxy.apply(copy)
        assert proxy.routes.lookup("198.18.2.2", 8080) is not None and proxy.router is not None
        router = proxy.router
        proxy.apply(merge([], InboundPolicy(), {"routes": []}))
        assert not proxy.routes and proxy.router is router  # state kept for when routes return

    run(tmp_path, body)
    # An authority that leaves `routes` out (a replica older than #21) keeps the held ones;
    # `[]` means none.
    assert carry_services({"catalog": []}, doc)["routes"] == doc["routes"]
    assert carry_services({"routes": []}, doc)["routes"] == []
