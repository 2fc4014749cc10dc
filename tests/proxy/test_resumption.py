"""TLS session resumption, bounded (issue #19), and a proxy serving on sockets it is given.

Loopback, as tests/proxy/test_mtls_loopback.py: host A (web) dials out, host B (db) terminates.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from agent.identity.store import IdentityStore
from agent.proxy.catalog import Catalog
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import InboundPolicy
from agent.proxy.tls import Credentials
from tests.proxy.test_mtls_loopback import World, echo_server, request, run


def _reuseport_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def test_proxy_start_on_given_sockets(tmp_path: Path) -> None:
    """A worker's proxy serves on the supervisor's bound sockets: it binds nothing itself, and its
    stop closes only its own copies (the supervisor's stay open, their port still bound)."""

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        _, b = await world.start(app_port)
        b_in = b.listening["inbound"][1]
        inbound, outbound = _reuseport_socket(), _reuseport_socket()
        kept = socket.socket(fileno=socket.dup(outbound.fileno()))  # the supervisor's copy
        a = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 1), outbound=("127.0.0.1", 1)),
            Credentials.load(IdentityStore(world.tmp / "a")),
            InboundPolicy(),
            world.proxies[0].catalog,
            lambda sock: ("127.0.0.1", b_in),
        )
        await a.start(sockets={"inbound": [inbound], "outbound": [outbound]})
        try:
            port = outbound.getsockname()[1]
            assert a.listening["outbound"] == ("127.0.0.1", port)
            assert a.listening["inbound"] == ("127.0.0.1", inbound.getsockname()[1])
            assert await request(port, b"hi") == b"echo:hi"
            assert a.stats.opened["outbound:mtls"] == 1
        finally:
            await a.stop(0.5)
        # The supervisor's copy still listens: a new connection is queued, not refused.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        kept.close()
        server.close()

    run(tmp_path, body)


def test_proxy_start_without_a_direction_refuses(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = Proxy(
            ListenerSettings(),
            Credentials.load(IdentityStore(world.tmp / "a")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", 1),
        )
        sock = _reuseport_socket()
        try:
            await a.start(sockets={"inbound": [sock]})
        except ValueError as exc:
            assert "outbound" in str(exc)
        else:
            raise AssertionError("started without an outbound socket")
        finally:
            await a.stop(0.1)

    run(tmp_path, body)
