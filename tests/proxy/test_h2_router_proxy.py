"""The routed HTTP/2 path through a real Proxy: the app's h2c connection to a routed parent
address is accepted by the outbound listener, detected (the HTTP/2 preface) by RoutedDetect and
handed to H2Router, whose streams go to grpcio and h2 servers (h1's loopback world, plain TCP
endpoints)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, StreamEnded

from agent.proxy.h2_router import worker_pool
from agent.proxy.h2_upstream import _DrainingH2
from agent.proxy.routes import Backend, EndpointRef, Ref, RouteTable, Timeouts
from tests.proxy.test_h1_router_world import World, policy, run
from tests.proxy.test_h2_router import GrpcServer, H2Server, RawClient, eventually
from tests.support import metric_sum


def _backend(name: str, weight: int, port: int) -> Backend:
    endpoint = EndpointRef("127.0.0.1", port, None, None)
    return Backend(Ref("", "Service", "shop", name, 8080), weight, None, (endpoint,))


def _calls(port: int, n: int) -> list[bytes]:
    """`n` unary calls in turn on one channel (one app connection)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        say = channel.unary_unary("/demo.Echo/Say")
        return [say(b"%d" % i, timeout=10) for i in range(n)]


def test_grpc_through_the_outbound_listener_is_split_per_call(tmp_path: Path) -> None:
    g1, g2 = GrpcServer("g1"), GrpcServer("g2")

    async def body(world: World) -> None:
        pol = policy(_backend("v1", 75, g1.port), _backend("v2", 25, g2.port))
        a = await world.proxy(RouteTable([pol]))
        assert a.router is not None
        a.router.rng.seed(11)  # the weighted draws: a fixed sequence
        replies = await asyncio.to_thread(_calls, world.port, 200)
        assert len(replies) == 200
        v1 = sum(r.startswith(b"g1:") for r in replies)
        assert 130 <= v1 <= 170  # 75 %: sigma ~6
        assert g1.calls + g2.calls == 200
        assert a.stats.opened["outbound:routed"] == 1  # one app connection, routed
        assert worker_pool(a).status()["connections"] == 2
        assert a.metrics is not None
        text = "\n".join(line for f in a.metrics.families() for line in f.render())
        family = "outbound_http_route_backend_requests_total"
        assert metric_sum(text, family, 'backend_name="v1"') == v1
        assert metric_sum(text, family, 'backend_name="v2"') == 200 - v1
        assert metric_sum(text, "request_total", 'target_addr="198.18.0.10:8080"') == 200
        # Stopping: the idle pooled upstreams close at once, they do not hold the drain.
        loop = asyncio.get_running_loop()
        started = loop.time()
        await a.stop(30.0)
        assert loop.time() - started < 20  # not the 30 s drain: nothing held it
        assert worker_pool(a).status()["connections"] == 0 and a.open_legs == 0

    try:
        run(tmp_path, body)
    finally:
        g1.stop()
        g2.stop()


def test_plain_h2_timeout_through_the_outbound_listener(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        h = await H2Server("h").start()
        try:
            pol = policy(_backend("h", 1, h.port), timeouts=Timeouts(request_s=0.2))
            await world.proxy(RouteTable([pol]))
            url = f"http://127.0.0.1:{world.port}"
            async with httpx.AsyncClient(base_url=url, http1=False, http2=True, timeout=10) as client:
                hung = await client.get("/hang")
                assert hung.status_code == 504 and hung.http_version == "HTTP/2"
                assert hung.headers["l5d-proxy-error"].startswith("request timed out")
                ok = await client.get("/who")
                assert (ok.status_code, ok.text) == (200, "h")
        finally:
            await h.stop()

    run(tmp_path, body)


def test_an_open_h2_connection_follows_a_new_policy(tmp_path: Path) -> None:
    """A long-lived connection (a gRPC channel) is not pinned to the policy it was accepted
    with: each stream looks the destination up again."""

    async def body(world: World) -> None:
        a_srv, b_srv = await H2Server("a").start(), await H2Server("b").start()
        try:
            a = await world.proxy(RouteTable([policy(_backend("a", 1, a_srv.port))]))
            url = f"http://127.0.0.1:{world.port}"
            async with httpx.AsyncClient(base_url=url, http1=False, http2=True, timeout=10) as client:
                assert (await client.get("/who")).text == "a"
                a.apply_routes(RouteTable([policy(_backend("b", 1, b_srv.port))]))
                assert (await client.get("/who")).text == "b"  # the same connection
            assert a.stats.opened["outbound:routed"] == 1
        finally:
            await a_srv.stop()
            await b_srv.stop()

    run(tmp_path, body)


class _DrainingClient(RawClient):
    """A client that lets streams up to a graceful GOAWAY's last one finish (RFC 9113 §6.8;
    h2's own connection would call their frames protocol errors), as gRPC's clients do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = _DrainingH2(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.events = []
        self.flush()


def test_a_removed_policy_sends_goaway_and_finishes_the_streams_in_flight(tmp_path: Path) -> None:
    """The route object removed: the next stream is served as before and a GOAWAY(NO_ERROR)
    names it last, so the client's next streams open a new connection (L4 then); a stream in
    flight finishes, one sent past the GOAWAY is refused (unprocessed: the client retries it)."""

    async def body(world: World) -> None:
        a_srv = await H2Server("a").start()
        try:
            a = await world.proxy(RouteTable([policy(_backend("a", 1, a_srv.port))]))
            client = await _DrainingClient.open(world.port)
            writer = client.writer
            ended = lambda: {e.stream_id for e in client.events if isinstance(e, StreamEnded)}  # noqa: E731
            first = client.get(b"/who")
            await client.until(lambda: first in ended())
            slow = client.get(b"/sleep")  # in flight when the policy goes
            await eventually(lambda: a_srv.requests["/sleep"] == 1)
            a.apply_routes(RouteTable())
            last, past = client.get(b"/who"), client.get(b"/who")  # past: sent before the GOAWAY came
            await client.until(lambda: {slow, last} <= ended() and past in client.resets())
            goaway = [e for e in client.events if isinstance(e, ConnectionTerminated)]
            assert [(g.error_code, g.last_stream_id) for g in goaway] == [(ErrorCodes.NO_ERROR, last)]
            assert client.resets() == {past: ErrorCodes.REFUSED_STREAM}
            bodies: dict[int, bytes] = {}
            for e in client.events:
                if isinstance(e, DataReceived):
                    bodies[e.stream_id] = bodies.get(e.stream_id, b"") + bytes(e.data)
            assert bodies[first] == bodies[last] == b"a" and slow in bodies
            assert a_srv.requests["/who"] == 2
            writer.close()
        finally:
            await a_srv.stop()

    run(tmp_path, body)
