"""The routed HTTP/2 path on loopback: an h2c client (httpx, grpcio) → H2Router → upstream
servers (small `h2` servers written here, grpcio servers), real sockets, one process.

The router is paired with the accepted app leg exactly as RoutedDetect hands it over; the
upstream connections come from a plain-TCP connector here (the mTLS one through originate() is
exercised in test_h2_router_mtls.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from typing import Any, ClassVar

import grpc
import httpx
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from hyperframe.frame import GoAwayFrame

from agent.proxy.h2_router import H2Router
from agent.proxy.h2_upstream import Connected, ConnectFailed, H2Pool
from agent.proxy.http_dispatch import RouterContext
from agent.proxy.relay import Leg
from agent.proxy.routed_detect import RoutedConn
from agent.proxy.routes import (
    MATCH_ALL,
    NO_TIMEOUTS,
    Backend,
    BudgetSpec,
    EndpointRef,
    Match,
    ParentPolicy,
    PathMatch,
    Ref,
    RetryPolicy,
    RouteTable,
    Rule,
    Timeouts,
)
from agent.proxy.services import ServiceTable
from agent.telemetry.route_metrics import RouteMetrics
from tests.support import metric_sum

PARENT = Ref("", "Service", "shop", "web", 8080)
ROUTE = Ref("", "default", "", "http")

# --- upstream servers ---------------------------------------------------------------------------


class H2Server:
    """A small HTTP/2 server (prior knowledge): `/who` its name, `/status/N` an empty N, `/big/N`
    N bytes, `/echo` the request body back once it ended, `/hang` never answers. With
    `goaway_after`, it sends GOAWAY once that many responses went out on a connection."""

    def __init__(
        self, name: str, goaway_after: int | None = None, refuse_first_connection: bool = False
    ) -> None:
        self.name = name
        self.goaway_after = goaway_after
        self.refuse_first_connection = refuse_first_connection  # GOAWAY(last 0) at its first request
        self.goaway_once = False  # only the first connection sends its GOAWAY
        self.resets = 0  # RST_STREAMs received
        self.connections = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> H2Server:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _H2ServerConn(self), "127.0.0.1", 0
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def endpoint(self) -> EndpointRef:
        return EndpointRef("127.0.0.1", self.port, None, None)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in list(_H2ServerConn.live):
                if conn.owner is self and conn.transport is not None:
                    conn.transport.close()


class _H2ServerConn(asyncio.Protocol):
    live: ClassVar[set[_H2ServerConn]] = set()

    def __init__(self, owner: H2Server) -> None:
        self.owner = owner
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.bodies: dict[int, bytearray] = {}
        self.paths: dict[int, str] = {}
        self.pending: dict[int, bytes] = {}
        self.answered = 0
        self.number = 0
        self.refusing = False
        self.last: int | None = None  # a GOAWAY's last stream, once sent
        self.done: set[int] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections += 1
        self.number = self.owner.connections
        _H2ServerConn.live.add(self)
        self.h2.initiate_connection()
        self._flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        _H2ServerConn.live.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                headers = dict(event.headers)
                path = headers[b":path"].decode()
                self.paths[event.stream_id] = path
                self.bodies[event.stream_id] = bytearray()
                self.owner.requests[path] += 1  # (its StreamEnded follows, if it ended)
                if self.owner.refuse_first_connection and self.owner.connections == 1:
                    self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=0)
                    self.refusing = True
            elif isinstance(event, DataReceived):
                self.bodies[event.stream_id] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded) and not self.refusing:
                self._answer(event.stream_id)
            elif isinstance(event, WindowUpdated):
                for sid in list(self.pending):
                    self._send_body(sid)
            elif isinstance(event, StreamReset):
                self.pending.pop(event.stream_id, None)
                self.owner.resets += 1
        self._flush()
        self._drained()

    def _answer(self, sid: int) -> None:
        path = self.paths[sid]
        if path == "/hang" or (self.last is not None and sid > self.last):
            return
        if path == "/stall":  # a head, then nothing
            self.h2.send_headers(sid, [(b":status", b"200")])
            return
        if path == "/drip":  # a head, a byte every 0.1 s five times, then nothing
            self.h2.send_headers(sid, [(b":status", b"200")])
            for i in range(5):
                asyncio.get_running_loop().call_later(0.1 * (i + 1), self._drip, sid)
            return
        if path == "/sleep":  # answered 0.3 s later
            self.paths[sid] = "/who"
            asyncio.get_running_loop().call_later(0.3, self._later, sid)
            return
        status, body = 200, b""
        if path == "/who":
            body = self.owner.name.encode()
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
        elif path.startswith("/fail/"):  # a 503 with a body
            status, body = 503, b"x" * int(path.rsplit("/", 1)[1])
        elif path.startswith("/big/"):
            body = bytes(i % 251 for i in range(int(path.rsplit("/", 1)[1])))
        elif path == "/echo":
            body = bytes(self.bodies[sid])
        headers = [(b":status", str(status).encode()), (b"content-length", str(len(body)).encode())]
        headers.append((b"x-backend", self.owner.name.encode()))
        self.h2.send_headers(sid, headers, end_stream=not body)
        if body:
            self.pending[sid] = body
            self._send_body(sid)
        else:
            self.done.add(sid)
            self._answered()

    def _drip(self, sid: int) -> None:
        if self.transport is not None and not self.transport.is_closing() and sid not in self.done:
            with contextlib.suppress(ProtocolError):  # (the stream may be reset meanwhile)
                self.h2.send_data(sid, b"d")
            self._flush()

    def _later(self, sid: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._answer(sid)
            self._flush()

    def _send_body(self, sid: int) -> None:
        body = self.pending[sid]
        while body:
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                break
            self.h2.send_data(sid, body[:window])
            body = body[window:]
        if body:
            self.pending[sid] = body
            return
        del self.pending[sid]
        self.h2.end_stream(sid)
        self.done.add(sid)
        self._answered()

    def _answered(self) -> None:
        self.answered += 1
        once = self.owner.goaway_once and self.number > 1
        if self.owner.goaway_after is not None and self.answered == self.owner.goaway_after and not once:
            # A graceful GOAWAY, written past h2's state machine (which would refuse to answer
            # the streams it lets finish): streams up to `last` are answered, later ones ignored.
            self.last = self.h2.highest_inbound_stream_id
            self._flush()
            frame = GoAwayFrame(0, last_stream_id=self.last, error_code=0)
            if self.transport is not None:
                self.transport.write(frame.serialize())

    def _drained(self) -> None:
        """After a GOAWAY: close once every stream up to its last one was answered."""
        if self.last is not None and all(sid > self.last for sid in self.paths if sid not in self.done):
            self._flush()
            if self.transport is not None:
                self.transport.close()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)


class GrpcServer:
    """A grpcio server (no generated code): /demo.Echo/Say answers `name:request`; a request
    b"fail" gets UNAVAILABLE (a trailers-only response), b"slow" sleeps 2 s first."""

    def __init__(self, name: str, fail_first: int = 0) -> None:
        self.name = name
        self.calls = 0
        self.fail_first = fail_first  # the first N calls fail UNAVAILABLE, whatever they ask
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        methods = {
            "Say": grpc.unary_unary_rpc_method_handler(self._say),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
        }
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("demo.Echo", methods)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _say(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.fail_first
        if fail or request == b"fail":
            context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")
        if request == b"slow":
            context.add_callback(lambda: None)
            threading.Event().wait(2.0)
        return self.name.encode() + b":" + request

    def _stream(self, request: bytes, context: grpc.ServicerContext) -> Any:
        """One message at once, the next after 2 s."""
        yield self.name.encode()
        threading.Event().wait(2.0)
        yield b"late"

    def endpoint(self) -> EndpointRef:
        return EndpointRef("127.0.0.1", self.port, None, None)

    def stop(self) -> None:
        self.server.stop(0)


# --- the router under test --------------------------------------------------------------------


async def plain_connect(key: EndpointRef) -> Connected | ConnectFailed:
    """The pool's connector in these tests: plain TCP to the endpoint (no mTLS)."""
    leg = Leg()
    try:
        await asyncio.get_running_loop().create_connection(lambda: leg, key.address, key.port)
    except OSError as exc:
        return ConnectFailed("connect", str(exc))
    return Connected(leg)


def backend(name: str, weight: int, *endpoints: EndpointRef) -> Backend:
    return Backend(Ref("", "Service", "shop", name, 8080), weight, None, tuple(endpoints))


def policy(
    *backends: Backend, timeouts: Timeouts = NO_TIMEOUTS, retry: RetryPolicy | None = None
) -> ParentPolicy:
    rule = Rule(ROUTE, tuple(backends), timeouts, retry)
    return ParentPolicy(PARENT, BudgetSpec(), ("test",), (rule,), ((MATCH_ALL, rule),))


class _App(Leg):
    """The accepted app connection, handed to an H2Router as RoutedDetect does."""

    def __init__(self, front: Front) -> None:
        super().__init__()
        self.front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # reading paused until paired
        front = self.front
        conn = RoutedConn(None, front.ctx, front.policy, self, b"", ("198.18.0.10", 8080))  # type: ignore[arg-type]
        router = H2Router(conn, pool=front.pool)
        front.routers.append(router)
        self.pair(router)


class Front:
    """A loopback listener whose connections are routed by `policy`."""

    def __init__(self, ctx: Any, pol: ParentPolicy, pool: H2Pool) -> None:
        self.ctx = ctx
        self.policy = pol
        self.pool = pool
        self.routers: list[H2Router] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> Front:
        self.server = await asyncio.get_running_loop().create_server(lambda: _App(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        for router in self.routers:
            router.close()
        self.pool.close()
        if self.server is not None:
            self.server.close()


def make_ctx(*policies: ParentPolicy) -> RouterContext:
    return RouterContext(RouteTable(policies), ServiceTable.empty(), RouteMetrics(), rng=random.Random(7))


async def routed(pol: ParentPolicy, pool: H2Pool | None = None) -> Front:
    return await Front(make_ctx(pol), pol, pool or H2Pool(plain_connect)).start()


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(body(), 30)

    asyncio.run(main())


def h2_client(front: Front) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=front.url, http1=False, http2=True, timeout=10)


# --- tests -------------------------------------------------------------------------------------


def test_one_connection_splits_its_streams_across_backends_by_weight() -> None:
    async def body() -> None:
        a, b = await H2Server("a").start(), await H2Server("b").start()
        front = await routed(policy(backend("a", 80, a.endpoint()), backend("b", 20, b.endpoint())))
        try:
            async with h2_client(front) as client:
                for _ in range(10):  # 400 requests, 40 at a time on the one connection
                    got = await asyncio.gather(*(client.get("/who") for _ in range(40)))
                    assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in got)
            assert len(front.routers) == 1  # one app connection
            total = a.requests["/who"] + b.requests["/who"]
            assert total == 400
            assert 0.70 <= a.requests["/who"] / total <= 0.90  # 80 %: sigma = 2 %
            assert a.connections == 1 and b.connections == 1  # one upstream connection each
        finally:
            await front.stop()
            await a.stop()
            await b.stop()

    run(body)


async def grpc_in_thread(port: int, request: bytes) -> Any:
    return await asyncio.to_thread(grpc_call_full, port, request, 10.0)


def grpc_call_full(port: int, request: bytes, timeout: float) -> tuple[grpc.StatusCode, Any, dict[str, str]]:
    """(code, reply or details, trailing metadata) of one unary call through the router."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        say = channel.unary_unary("/demo.Echo/Say")
        try:
            return grpc.StatusCode.OK, say(request, timeout=timeout), {}
        except grpc.RpcError as exc:
            meta = {k: v for k, v in (exc.trailing_metadata() or ())}  # type: ignore[attr-defined]
            return exc.code(), exc.details(), meta  # type: ignore[attr-defined]


GRPC_RETRY = RetryPolicy(limit=1, http=(), grpc=frozenset({14}))


def test_grpc_trailers_only_unavailable_is_retried_when_the_route_names_it() -> None:
    async def body() -> None:
        server = GrpcServer("g1", fail_first=1)
        front = await routed(policy(backend("g", 1, server.endpoint()), retry=GRPC_RETRY))
        try:
            code, reply, _meta = await grpc_in_thread(front.port, b"x")
            assert (code, reply) == (grpc.StatusCode.OK, b"g1:x")
            assert server.calls == 2  # the first answered UNAVAILABLE (trailers-only), retried
            text = "\n".join(line for f in front.ctx.metrics.families() for line in f.render())
            assert "outbound_http_route_retry_requests_total{" in text
            assert metric_sum(text, "outbound_http_route_retry_requests_total") == 1
            assert metric_sum(text, "outbound_http_route_retry_successes_total") == 1
        finally:
            await front.stop()
            server.stop()

    run(body)


def test_grpc_bodies_past_the_workers_retry_buffer_are_not_retried() -> None:
    async def body() -> None:
        server = GrpcServer("g1", fail_first=1)
        pool = H2Pool(plain_connect, retry_total=4)  # smaller than any gRPC message
        front = await routed(policy(backend("g", 1, server.endpoint()), retry=GRPC_RETRY), pool)
        try:
            code, _details, _meta = await grpc_in_thread(front.port, b"x")
            assert code == grpc.StatusCode.UNAVAILABLE and server.calls == 1
            text = "\n".join(line for f in front.ctx.metrics.families() for line in f.render())
            assert "meshagent_http_retry_buffer_full_total 1" in text.splitlines()
            assert pool.retry_held == 0
        finally:
            await front.stop()
            server.stop()

    run(body)


def test_grpc_unavailable_is_not_retried_without_grpc_conditions() -> None:
    async def body() -> None:
        server = GrpcServer("g1", fail_first=1)
        # A retry policy for HTTP statuses only: a gRPC call (a POST) is never eligible.
        front = await routed(
            policy(backend("g", 1, server.endpoint()), retry=RetryPolicy(1, ((500, 599),), frozenset()))
        )
        try:
            code, details, _meta = await grpc_in_thread(front.port, b"x")
            assert code == grpc.StatusCode.UNAVAILABLE and details == "down for maintenance"
            assert server.calls == 1
        finally:
            await front.stop()
            server.stop()

    run(body)


def test_grpc_request_timeout_is_deadline_exceeded_from_the_proxy() -> None:
    async def body() -> None:
        server = GrpcServer("g1")
        front = await routed(policy(backend("g", 1, server.endpoint()), timeouts=Timeouts(request_s=0.3)))
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            code, details, meta = await grpc_in_thread(front.port, b"slow")
            took = loop.time() - started
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert details.startswith("request timed out")  # (the wording is dispatch's)
            assert meta["l5d-proxy-error"] == meta["meshagent-proxy-error"] == details
            assert took >= 0.25  # not before the deadline (the answer is the proxy's: its headers)
            code, reply, _ = await grpc_in_thread(front.port, b"fast")  # the connection still serves
            assert (code, reply) == (grpc.StatusCode.OK, b"g1:fast")
        finally:
            await front.stop()
            server.stop()

    run(body)


def test_grpc_without_an_endpoint_is_unavailable_trailers_only() -> None:
    async def body() -> None:
        front = await routed(policy(backend("g", 1)))  # a backend with no endpoint: fail-fast
        try:
            code, details, meta = await grpc_in_thread(front.port, b"x")
            assert code == grpc.StatusCode.UNAVAILABLE
            assert "fail-fast" in details and meta["l5d-proxy-error"] == details
        finally:
            await front.stop()

    run(body)


def test_plain_h2_synthesized_errors_carry_the_mesh_headers() -> None:
    async def body() -> None:
        a = await H2Server("a").start()
        front = await routed(policy(backend("a", 1, a.endpoint()), timeouts=Timeouts(request_s=0.3)))
        try:
            async with h2_client(front) as client:
                hung = await client.get("/hang")
                assert hung.status_code == 504
                assert hung.headers["l5d-proxy-error"].startswith("request timed out")
                assert hung.headers["meshagent-proxy-error"] == hung.headers["l5d-proxy-error"]
                ok = await client.get("/who")  # same connection: a 504 is not fatal
                assert (ok.status_code, ok.text) == (200, "a")
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_no_route_is_404() -> None:
    async def body() -> None:
        a = await H2Server("a").start()
        rule = Rule(ROUTE, (backend("a", 1, a.endpoint()),), NO_TIMEOUTS, None)
        only_api = Match(PathMatch("PathPrefix", "/api"), None, (), ())
        pol = ParentPolicy(PARENT, BudgetSpec(), ("test",), (rule,), ((only_api, rule),))
        front = await routed(pol)
        try:
            async with h2_client(front) as client:
                miss = await client.get("/who")
                assert miss.status_code == 404 and "l5d-proxy-error" in miss.headers
                assert a.requests["/who"] == 0
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_bodies_larger_than_the_windows_flow_both_ways() -> None:
    async def body() -> None:
        a = await H2Server("a").start()
        front = await routed(policy(backend("a", 1, a.endpoint())))
        try:
            async with h2_client(front) as client:
                big = await client.get("/big/3000000")  # 3 MB down: 45 stream windows
                assert big.content == bytes(i % 251 for i in range(3_000_000))
                sent = bytes(range(256)) * 4096  # 1 MiB up, echoed back
                echoed, echoed2 = await asyncio.gather(
                    client.post("/echo", content=sent), client.post("/echo", content=sent[::-1])
                )
                assert echoed.content == sent and echoed2.content == sent[::-1]
            assert front.pool.status()["retry_held"] == 0  # nothing kept once answered
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_goaway_from_upstream_drains_and_a_new_connection_serves_the_rest() -> None:
    async def body() -> None:
        a = await H2Server("a", goaway_after=1).start()
        front = await routed(policy(backend("a", 1, a.endpoint())))
        try:
            async with h2_client(front) as client:
                for _ in range(3):
                    r = await client.get("/who")
                    assert (r.status_code, r.text) == (200, "a")
            assert a.connections == 3  # one per GOAWAY, none of the requests failed
            # Many streams in flight when the GOAWAY comes: those up to its last stream finish
            # on the draining connection, the later ones (refused, unprocessed) go to a new one.
            b = await H2Server("b", goaway_after=5).start()
            b.goaway_once = True
            front.policy = policy(backend("b", 1, b.endpoint()))
            async with h2_client(front) as client:
                got = await asyncio.gather(*(client.get("/who") for _ in range(40)))
                assert [(r.status_code, r.text) for r in got] == [(200, "b")] * 40
            assert b.connections <= 2  # (a second one only if streams came after the GOAWAY)
            await b.stop()
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_streams_refused_by_a_goaway_go_to_a_new_connection_without_a_retry_policy() -> None:
    async def body() -> None:
        a = await H2Server("a", refuse_first_connection=True).start()
        front = await routed(policy(backend("a", 1, a.endpoint())))  # no retry policy
        try:
            async with h2_client(front) as client:
                got = await asyncio.gather(*(client.get("/who") for _ in range(5)))
                assert [r.status_code for r in got] == [200] * 5
            assert a.connections == 2 and a.requests["/who"] >= 6  # refused unprocessed, then served
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_a_full_upstream_connection_gets_a_second_one() -> None:
    async def body() -> None:
        a = await H2Server("a").start()
        front = await routed(policy(backend("a", 1, a.endpoint())), H2Pool(plain_connect, max_streams=2))
        try:
            async with h2_client(front) as client:
                got = await asyncio.gather(*(client.get("/sleep") for _ in range(6)))
                assert [(r.status_code, r.text) for r in got] == [(200, "a")] * 6
            assert a.connections == 3  # 2 streams each, all 6 in flight at once
            assert front.pool.status()["opened"] == 3
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_a_reader_that_stops_stops_the_upstream_at_its_windows() -> None:
    """Backpressure end to end: an app that does not acknowledge DATA gets one stream window's
    worth; the upstream server is held at its own window (nothing piles up in the proxy), and
    everything arrives once the app reads again."""

    async def body() -> None:
        a = await H2Server("a").start()
        front = await routed(policy(backend("a", 1, a.endpoint())))
        size = 3_000_000
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
            client.initiate_connection()
            sid = client.get_next_available_stream_id()
            request = [(b":method", b"GET"), (b":path", b"/big/%d" % size)]
            client.send_headers(
                sid, [*request, (b":scheme", b"http"), (b":authority", b"web")], end_stream=True
            )
            writer.write(client.data_to_send())
            got = bytearray()
            unacked = 0
            done = False

            async def read(until: Callable[[], bool]) -> None:
                nonlocal unacked, done
                while not until():
                    data = await asyncio.wait_for(reader.read(65536), 5)
                    assert data, "the proxy closed the connection"
                    for event in client.receive_data(data):
                        if isinstance(event, DataReceived):
                            got.extend(event.data)
                            unacked += event.flow_controlled_length
                        elif isinstance(event, StreamEnded):
                            done = True
                    writer.write(client.data_to_send())  # settings acks, never a window update

            await read(lambda: len(got) >= 65535)  # our stream window: the most it may send
            await asyncio.sleep(0.3)
            assert len(got) == 65535
            [conn] = [c for c in _H2ServerConn.live if c.owner is a]
            held_back = len(conn.pending.get(1, b""))
            assert held_back >= size - 3 * 65535  # the server waits at its window: ours, the proxy's

            def enough() -> bool:
                return done or unacked >= 32768

            while not done:
                client.acknowledge_received_data(unacked, sid)
                unacked = 0
                writer.write(client.data_to_send())
                await read(enough)
            assert bytes(got) == bytes(i % 251 for i in range(size))
            writer.close()
        finally:
            await front.stop()
            await a.stop()

    run(body)


async def eventually(cond: Callable[[], bool]) -> None:
    """Wait for `cond` (what another connection does), 5 s at most."""
    async with asyncio.timeout(5):
        while not cond():  # noqa: ASYNC110 - a server's counters have no event to wait on
            await asyncio.sleep(0.01)


class RawClient:
    """An h2 client on a raw socket, for what httpx will not do (resets, many streams, bad frames)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.events: list[Any] = []
        self.flush()

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def get(self, path: bytes) -> int:
        sid = self.h2.get_next_available_stream_id()
        head = [(b":method", b"GET"), (b":path", path), (b":scheme", b"http"), (b":authority", b"web")]
        self.h2.send_headers(sid, head, end_stream=True)
        self.flush()
        return sid

    def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            if not data:
                return
            self.events += self.h2.receive_data(data)
            self.flush()

    def resets(self) -> dict[int, int]:
        return {e.stream_id: e.error_code for e in self.events if isinstance(e, StreamReset)}


def test_streams_past_100_are_refused_and_an_app_reset_cancels_the_upstream_stream() -> None:
    async def body() -> None:
        a = await H2Server("a").start()
        front = await routed(policy(backend("a", 1, a.endpoint())))
        try:
            client = await RawClient.open(front.port)
            await client.until(lambda: any(isinstance(e, RemoteSettingsChanged) for e in client.events))
            client.h2.remote_settings.max_concurrent_streams = 1000  # (h2 would not open a 101st)
            client.h2.remote_settings.acknowledge()
            sids = [client.get(b"/hang") for _ in range(101)]
            await client.until(lambda: sids[-1] in client.resets())
            assert client.resets() == {sids[-1]: ErrorCodes.REFUSED_STREAM}  # the 101st only
            await eventually(lambda: a.requests["/hang"] == 100)
            client.h2.reset_stream(sids[0], ErrorCodes.CANCEL)
            client.flush()
            await eventually(lambda: a.resets > 0)
            await asyncio.sleep(0.05)
            assert a.resets == 1  # the app's reset went upstream as one RST_STREAM
            client.writer.close()
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_a_protocol_error_ends_that_connection_only() -> None:
    async def body() -> None:
        a = await H2Server("a").start()
        front = await routed(policy(backend("a", 1, a.endpoint())))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            # The preface, then a DATA frame on stream 0 (a connection error) and a frame header
            # announcing 16 MiB: the router answers GOAWAY and closes, nothing buffered.
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            writer.write(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")
            answer = await asyncio.wait_for(reader.read(), 5)
            assert b"\x07\x00\x00\x00\x00\x00" in answer  # a GOAWAY frame (type 7, stream 0)
            writer.close()
            async with h2_client(front) as client:  # the next connection is served
                ok = await client.get("/who")
                assert (ok.status_code, ok.text) == (200, "a")
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_discarded_and_dropped_response_bytes_give_the_shared_window_back() -> None:
    """Retried responses' bodies (held, then discarded) and bodies of ended streams are
    acknowledged upstream: the one shared connection's window does not shrink, so a later
    response still flows (a leak of 60 KB per retry would stall it after two)."""

    async def body() -> None:
        a = await H2Server("a").start()
        pool = H2Pool(plain_connect, max_streams=1)  # connection window: 2 x 64 KiB
        retry = RetryPolicy(1, ((500, 599),), frozenset())
        front = await routed(policy(backend("a", 1, a.endpoint()), retry=retry), pool)
        try:
            async with h2_client(front) as client:
                for _ in range(6):
                    failed = await client.get("/fail/60000")
                    assert failed.status_code == 503 and len(failed.content) == 60000
                big = await client.get("/big/500000")
                assert big.status_code == 200 and len(big.content) == 500000
            assert a.requests["/fail/60000"] == 12 and a.connections == 1
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_a_request_giving_up_does_not_cancel_the_connect_others_wait_for() -> None:
    async def body() -> None:
        a = await H2Server("a").start()

        async def slow_connect(key: EndpointRef) -> Connected | ConnectFailed:
            await asyncio.sleep(0.3)
            return await plain_connect(key)

        backends = (backend("a", 1, a.endpoint()),)
        short = Rule(ROUTE, backends, Timeouts(backend_request_s=0.1), None)
        rest = Rule(ROUTE, backends, NO_TIMEOUTS, None)
        exact = Match(PathMatch("Exact", "/short"), None, (), ())
        pol = ParentPolicy(
            PARENT, BudgetSpec(), ("test",), (short, rest), ((exact, short), (MATCH_ALL, rest))
        )
        front = await routed(pol, H2Pool(slow_connect))
        try:
            async with h2_client(front) as client:
                first = asyncio.ensure_future(client.get("/short"))  # opens the connect, gives up
                await asyncio.sleep(0.05)
                second = asyncio.ensure_future(client.get("/who"))  # waits for the same connect
                gave_up, served = await asyncio.gather(first, second)
                assert gave_up.status_code == 504
                assert (served.status_code, served.text) == (200, "a")
            assert a.connections == 1
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_a_response_that_stalls_after_its_head_is_cut_at_the_response_timeout() -> None:
    async def body() -> None:
        a = await H2Server("a").start()
        front = await routed(policy(backend("a", 1, a.endpoint()), timeouts=Timeouts(response_s=0.3)))
        try:
            async with h2_client(front) as client:
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(httpx.RemoteProtocolError):  # the stream is reset mid-body
                    async with client.stream("GET", "/stall") as stalled:
                        assert stalled.status_code == 200  # the head came through
                        await stalled.aread()
                assert loop.time() - started >= 0.25  # (uncut, it would stall to httpx's ReadTimeout)
                await eventually(lambda: a.resets == 1)  # the upstream stream was cancelled too
                text = "\n".join(line for f in front.ctx.metrics.families() for line in f.render())
                family = "outbound_http_route_request_statuses_total"
                assert metric_sum(text, family, 'error="RESPONSE_STREAM_TIMEOUT"') == 1  # at its end
                ok = await client.get("/who")  # the connection still serves
                assert (ok.status_code, ok.text) == (200, "a")
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_a_response_body_that_goes_quiet_is_cut_at_the_idle_timeout() -> None:
    async def body() -> None:
        a = await H2Server("a").start()
        front = await routed(policy(backend("a", 1, a.endpoint()), timeouts=Timeouts(idle_s=1.0)))
        try:
            async with h2_client(front) as client:
                got = bytearray()
                with pytest.raises(httpx.RemoteProtocolError):  # reset once the bytes stop
                    async with client.stream("GET", "/drip") as dripping:
                        assert dripping.status_code == 200
                        async for chunk in dripping.aiter_raw():
                            got += chunk
                assert bytes(got) == b"ddddd"  # 0.5 s of bytes 0.1 s apart: never idle meanwhile
                await eventually(lambda: a.resets == 1)  # the upstream stream was cancelled too
                text = "\n".join(line for f in front.ctx.metrics.families() for line in f.render())
                family = "outbound_http_route_request_statuses_total"
                assert metric_sum(text, family, 'error="IDLE_TIMEOUT"') == 1
                ok = await client.get("/who")  # the connection still serves
                assert (ok.status_code, ok.text) == (200, "a")
        finally:
            await front.stop()
            await a.stop()

    run(body)


def test_an_upload_that_keeps_moving_is_not_idle_before_the_head() -> None:
    """Idle is "no DATA either way": request DATA 0.1 s apart for 1.5 s, under a 1 s idle, is
    answered (the server answers once the body ended)."""

    async def body() -> None:
        a = await H2Server("a").start()
        front = await routed(policy(backend("a", 1, a.endpoint()), timeouts=Timeouts(idle_s=1.0)))

        async def dripping() -> AsyncIterator[bytes]:
            for _ in range(15):
                await asyncio.sleep(0.1)
                yield b"x"

        try:
            async with h2_client(front) as client:
                echoed = await client.post("/echo", content=dripping())
                assert (echoed.status_code, echoed.content) == (200, b"x" * 15)
        finally:
            await front.stop()
            await a.stop()

    run(body)


def _stream_call(port: int) -> tuple[list[bytes], grpc.StatusCode, str, dict[str, str]]:
    got: list[bytes] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream("/demo.Echo/Stream")(b"", timeout=10)
        try:
            for message in call:
                got.append(message)
        except grpc.RpcError as exc:
            meta = {k: v for k, v in (exc.trailing_metadata() or ())}  # type: ignore[attr-defined]
            return got, exc.code(), exc.details(), meta  # type: ignore[attr-defined]
    return got, grpc.StatusCode.OK, "", {}


def test_a_streaming_grpc_response_past_the_deadline_ends_with_deadline_exceeded_trailers() -> None:
    async def body() -> None:
        server = GrpcServer("g1")
        front = await routed(policy(backend("g", 1, server.endpoint()), timeouts=Timeouts(request_s=0.4)))
        try:
            got, code, details, meta = await asyncio.to_thread(_stream_call, front.port)
            assert got == [b"g1"]  # the first message came through, the late one never
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "request timed out"
            text = "\n".join(line for f in front.ctx.metrics.families() for line in f.render())
            family = "outbound_http_route_request_statuses_total"
            assert metric_sum(text, family, 'error="REQUEST_TIMEOUT"') == 1
            assert meta["l5d-proxy-error"] == "request timed out"
        finally:
            await front.stop()
            server.stop()

    run(body)


def test_a_streaming_grpc_response_that_goes_quiet_ends_with_deadline_exceeded_trailers() -> None:
    async def body() -> None:
        server = GrpcServer("g1")
        front = await routed(policy(backend("g", 1, server.endpoint()), timeouts=Timeouts(idle_s=1.0)))
        try:
            got, code, details, meta = await asyncio.to_thread(_stream_call, front.port)
            assert got == [b"g1"]  # the first message came through; the next comes 2 s later
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "idle timed out"
            assert meta["l5d-proxy-error"] == "idle timed out"
            text = "\n".join(line for f in front.ctx.metrics.families() for line in f.render())
            family = "outbound_http_route_request_statuses_total"
            assert metric_sum(text, family, 'error="IDLE_TIMEOUT"') == 1
        finally:
            await front.stop()
            server.stop()

    run(body)
