"""The routed HTTP/2 (and gRPC) path: the app's h2c connection to a destination with a route
policy, each stream routed on its own (design-21 §4.3).

`H2Router` is a transport-less relay `Leg` paired with the app's leg (as OrigProtoGateway): the
app's bytes come in through `send`, the server side of an `h2` connection parses them, and its
output goes to the app through the pair. Each request stream becomes an `_Exchange` (the
protocol half of http_dispatch's attempt loop): its head is matched against the parent's rules
(`ParentPolicy.select`), `dispatch` picks a backend by weight and an endpoint by load, and each
attempt is a stream on an `H2Upstream` connection to that endpoint, shared by every app
connection of the worker. So one app connection's requests split across backends by weight.
Each stream looks the destination's policy up again: a long-lived channel follows new weights;
a removed policy serves that stream and sends GOAWAY(NO_ERROR) naming it last, so the client's
next streams open a new connection, which takes the L4 path.

gRPC (request content-type `application/grpc...`): the attempt's outcome carries `grpc-status`
from a trailers-only response head, or from trailers that came in the same read as the head,
before any DATA (Linkerd's PeekTrailersBody: a peek, never a wait); otherwise the response is
streaming and is classified by its HTTP status only. Errors the proxy answers itself are
trailers-only responses: `:status 200`, `grpc-status` 4 (timeout), 14 (unavailable), 2 (other),
`grpc-message`, `l5d-proxy-error` and `meshagent-proxy-error`. Plain HTTP/2 gets 504/503/502 (404
for no route) with the two error headers.

Flow control both ways, without buffers growing: the app's DATA is acknowledged once the
upstream stream took it (its window and socket allowed); the upstream's DATA once it went to the
app (its stream window and socket allowed); bytes that never reach the app are acknowledged
all the same, since the upstream connection's window is shared. The request body is kept (for a
retry) only while it fits the rule's `max_request_bytes` and the worker's retry buffer; a longer
one streams and is never retried. After the head, the request's limit, the response timeout
(from the request's end) and the idle timeout (no DATA either way) still hold, on one timer per
stream: gRPC then ends with DEADLINE_EXCEEDED trailers, plain HTTP/2 with RST_STREAM(CANCEL).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from ..logs import Throttled, get_logger
from ..telemetry.metrics import join, labels
from ..telemetry.proxy_metrics import target, tls_connect
from .decisions import Refuse, route_routed_endpoint
from .h2_upstream import Connected, ConnectFailed, H2Pool, H2Upstream, Header
from .http_dispatch import AttemptResult, RouterContext, dispatch
from .orig_proto import FrameGuard
from .originate import Failed, originate
from .relay import Leg
from .routes import EndpointRef, ParentPolicy, RequestView, Rule
from .transport_header import SessionProtocol

if TYPE_CHECKING:
    from .http_balance import EndpointPick
    from .listeners import Proxy
    from .routed_detect import RoutedConn

log = get_logger("meshagent.proxy.h2_router")

SLICE: Final = 4096  # app bytes per h2.receive_data: bounds the streams one read can open
DEFAULT_WINDOW: Final = 65535
MAX_BODY: Final = 64 * 1024  # a request body kept for a retry, at most (Linkerd's max_request_bytes)
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
GRPC_TIMEOUT, GRPC_UNAVAILABLE, GRPC_UNKNOWN = 4, 14, 2
OUTBOUND_DST: Final = labels(("direction", "outbound"), ("peer", "dst"))  # (listeners' own)
OUTBOUND: Final = labels(("direction", "outbound"))
NO_ENDPOINT: Final = tls_connect(None)  # a synthesized answer's labels: no endpoint answered


@dataclass(frozen=True)
class H2RouterSettings:
    max_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS to the app; past it REFUSED_STREAM
    max_header_list_size: int = 65536


_POOLS: weakref.WeakKeyDictionary[Proxy, H2Pool] = weakref.WeakKeyDictionary()


def worker_pool(proxy: Proxy) -> H2Pool:
    """The worker's HTTP/2 connections to routed endpoints (one pool per proxy), opened with
    originate(): mTLS to the endpoint's own identity, as the L4 path."""
    pool = _POOLS.get(proxy)
    if pool is None:
        connect = proxy_connector(proxy)
        pool = _POOLS[proxy] = H2Pool(connect, retry_total=proxy.settings.http_retry_buffer_total)
        proxy.stop_hooks.append(pool.drain)
    return pool


def proxy_connector(proxy: Proxy) -> Callable[[EndpointRef], Awaitable[Connected | ConnectFailed]]:
    async def connect(key: EndpointRef) -> Connected | ConnectFailed:
        action = route_routed_endpoint(
            key.address,
            key.port,
            key.identity,
            key.server_name,
            key.header_port,
            proxy.settings.unmeshed_outbound,
        )
        if isinstance(action, Refuse):
            return ConnectFailed("refused", action.reason)
        where = target(key.address, key.port)
        made = await originate(proxy, action, f"{key.address}:{key.port}", SessionProtocol.HTTP2)
        if isinstance(made, Failed):
            return ConnectFailed(made.kind, made.reason)
        proxy.observe(made.leg, join(OUTBOUND_DST, where, made.tls_labels))
        proxy.stats.opened[f"outbound:h2_{made.kind}"] += 1
        return Connected(made.leg, made.tls_labels)

    return connect


def is_grpc(headers: list[Header]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(b"application/grpc")
    return False


def grpc_status(headers: list[Header]) -> int | None:
    """`grpc-status` of a header block (None: absent or not a number)."""
    for name, value in headers:
        if name == b"grpc-status":
            try:
                return int(value)
            except ValueError:
                return GRPC_UNKNOWN
    return None


def http_status(headers: list[Header]) -> int | None:
    for name, value in headers:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def request_view(headers: list[Header]) -> RequestView:
    """What route matching reads of an HTTP/2 request head (`:authority`, else `host`)."""
    method = b""
    target = authority = host = ""
    fields: dict[str, str] = {}
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                target = value.decode("latin-1")
            elif name == b":authority":
                authority = value.decode("latin-1")
            continue
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key == "host":
            host = text
        fields[key] = f"{fields[key]}, {text}" if key in fields else text
    path, _, query = target.partition("?")
    return RequestView(method, path, query, authority or host, fields)


def error_headers(grpc: bool, status: int, grpc_code: int, message: str) -> list[Header]:
    """A response the proxy answers itself, as Linkerd's (empty body, the error named twice)."""
    text = message.encode("latin-1", "replace")
    if grpc:
        return [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"content-length", b"0"),
            (b"grpc-status", str(grpc_code).encode()),
            (b"grpc-message", text),
            (b"l5d-proxy-error", text),
            (b"meshagent-proxy-error", text),
        ]
    return [
        (b":status", str(status).encode()),
        (b"content-length", b"0"),
        (b"l5d-proxy-error", text),
        (b"meshagent-proxy-error", text),
    ]


class _AppFlow:
    """The router's stand-in transport: the app leg pauses and resumes "reading" here when its
    socket's write buffer fills and drains, which stops and restarts the responses' pumps."""

    __slots__ = ("router",)

    def __init__(self, router: H2Router) -> None:
        self.router = router

    def pause_reading(self) -> None:
        self.router.writable = False

    def resume_reading(self) -> None:
        self.router._app_writable()

    def is_closing(self) -> bool:
        return self.router.closed

    def close(self) -> None:
        self.router.close()

    def abort(self) -> None:
        self.router.close()

    def can_write_eof(self) -> bool:
        return False


class _Attempt:
    """One try of an exchange on one upstream stream: the upstream's events, held until
    `dispatch` decides (forward or discard), then relayed to the app."""

    __slots__ = (
        "conn",
        "data_seen",
        "ended",
        "exchange",
        "forwarded",
        "head",
        "held",
        "peeking",
        "reset",
        "result",
        "sid",
        "trailers",
    )

    def __init__(self, exchange: _Exchange, conn: H2Upstream) -> None:
        self.exchange = exchange
        self.conn = conn
        self.sid = 0
        self.result: asyncio.Future[AttemptResult] = asyncio.get_running_loop().create_future()
        self.head: list[Header] | None = None
        self.held: list[tuple[bytes, int]] = []  # response DATA before the decision
        self.trailers: list[Header] | None = None
        self.ended = False  # the upstream response ended
        self.reset: str | None = None  # the upstream stream failed after the head
        self.forwarded = False
        self.data_seen = False
        self.peeking = False

    def _resolve(self, status: int | None, grpc: int | None, error: str | None) -> None:
        if not self.result.done():
            self.result.set_result(AttemptResult(status, grpc, error, self))

    # --- StreamHandler ------------------------------------------------------------------------

    def on_response(self, headers: list[Header], ended: bool) -> None:
        self.head = headers
        self.ended = ended
        status = http_status(headers)
        if not self.exchange.grpc:
            self._resolve(status, None, None)
        elif ended:  # trailers-only
            self._resolve(status, _grpc_or_unknown(headers), None)
        else:
            self.peeking = True  # trailers in this same read? (on_trailers / on_batch_end)
        if self.forwarded:  # (cannot happen: forward needs a result; kept for safety)
            self.exchange.relay_head(self)

    def on_data(self, data: bytes, flow: int) -> None:
        self.data_seen = True
        if self.forwarded:
            self.exchange.relay_data(data, flow)
        else:
            self.held.append((data, flow))

    def on_trailers(self, headers: list[Header]) -> None:
        self.trailers = headers
        self.ended = True
        if self.peeking and not self.data_seen:
            self.peeking = False
            self._resolve(http_status(self.head or []), _grpc_or_unknown(headers), None)
        if self.forwarded:
            self.exchange.relay_end(headers)

    def on_end(self) -> None:
        self.ended = True
        if self.peeking:  # a gRPC response with a body and no trailers: 200 only
            self.on_batch_end()
        if self.forwarded:
            self.exchange.relay_end(None)

    def on_batch_end(self) -> None:
        if self.peeking:
            self.peeking = False
            self._resolve(http_status(self.head or []), None, None)

    def on_reset(self, error: str, refused: bool) -> None:
        if not self.result.done():
            self._resolve(None, None, error)
            return
        self.reset = error
        if self.forwarded:
            self.exchange.relay_reset(error)

    def on_sent(self) -> None:
        self.exchange.body_sent(self)

    # --- decisions ----------------------------------------------------------------------------

    def discard(self) -> None:
        held = sum(flow for _data, flow in self.held)
        self.held.clear()
        if self.sid:
            self.conn.cancel(self.sid)
            self.conn.consumed(self.sid, held)  # (the connection's window, shared)


def _grpc_or_unknown(headers: list[Header]) -> int:
    code = grpc_status(headers)
    return GRPC_UNKNOWN if code is None else code


class _Exchange:
    """One app stream: the Exchange `dispatch` drives (design-21 §5)."""

    def __init__(
        self, router: H2Router, sid: int, headers: list[Header], view: RequestView, ended: bool
    ) -> None:
        self.router = router
        self.sid = sid
        self.headers = [(n, v) for n, v in headers if n not in _DROP]
        self.view = view
        self.grpc = is_grpc(headers)
        self.started = time.monotonic()
        self.request_done = ended
        self.body: list[bytes] = []  # the whole body while it fits MAX_BODY (a retry replays it)
        self.body_size = 0
        self.kept = True  # `body` is the whole body so far
        self.pending: list[bytes] = []  # DATA not yet given to an attempt
        self.unacked = 0  # the app's flow-controlled bytes taken, not yet acknowledged
        self.current: _Attempt | None = None  # the one sending the body / being relayed
        self.source: _Attempt | None = None  # the forwarded one: `out`'s bytes are its
        self.attempts = 0
        self.responded = False  # a response head went to the app
        self.ended = False  # our side of the app stream is finished (or reset)
        self.out: deque[tuple[bytes, int]] = deque()  # response DATA waiting for the app's window
        self.out_end = False
        self.out_trailers: list[Header] | None = None
        self.task: asyncio.Task[None] | None = None
        self.status = 0
        self.retry_limit = MAX_BODY
        self.grpc_retry = False  # the rule retries gRPC codes: a gRPC call is eligible
        self.deadline: float | None = None  # the request's (loop time), for the body
        self.response_s: float | None = None  # the rule's `response` timeout (from the body's end)
        self.idle_s: float | None = None  # the rule's `idle` timeout (no DATA either way)
        self.moved_at = 0.0  # loop time of the last DATA either way, once forwarded (idle)
        self.request_moved_at: float | None = None  # the app's last DATA (dispatch's idle)
        self.hard_at: float | None = None  # the body's deadline (request or response timeout)
        self.hard_message = "request timed out"
        # dispatch's optional hooks (the response timeout counts from the request's end):
        self.request_ended_at: float | None = asyncio.get_running_loop().time() if ended else None
        self.on_request_end: Callable[[], None] | None = None
        # ...and `on_response_end` (set before forward): the relayed response's end, or its error.
        self.on_response_end: Callable[[str | None], None] | None = None
        self.answered = 0.0  # when the response head went to the app (latency)
        self.complete = False  # the whole response went to the app
        self.grpc_code: int | None = None  # the response's grpc-status (head or trailers)
        self.tls_labels = ""  # the endpoint that answered (empty: the proxy did)
        self.timer: asyncio.TimerHandle | None = None

    # --- Exchange -----------------------------------------------------------------------------

    def retry_eligible(self) -> bool:
        if not self.request_done or not self.kept:
            return False
        return self.view.method in IDEMPOTENT or (self.grpc and self.grpc_retry)

    async def attempt(self, pick: EndpointPick, deadline: float | None) -> AttemptResult:
        """One attempt on a stream to `pick.endpoint`; dispatch bounds the wait for the head
        (and cancels this). A stream the endpoint refused unprocessed (REFUSED_STREAM, past a
        GOAWAY's last stream) goes once more on another connection when the body so far is kept:
        not a retry, nothing was processed (hyper's client does the same)."""
        self.deadline = deadline
        result = await self._try(pick)
        if result.error in ("REFUSED", "GO_AWAY") and self.kept and not self.ended:
            result = await self._try(pick)
        return result

    async def _try(self, pick: EndpointPick) -> AttemptResult:
        pool = self.router.pool
        key = pick.endpoint
        conn = pool.connection(key)
        if conn is None:
            got = await pool.get(key)
            if isinstance(got, ConnectFailed):
                return AttemptResult(None, None, "IO", got, connect_failed=True)
            conn = got
        if self.ended:
            return AttemptResult(None, None, "CANCEL", None)
        attempt = _Attempt(self, conn)
        data = b"".join(self.body if self.kept else self.pending)
        self.pending.clear()
        end = self.request_done
        sid = conn.open(self.headers, attempt, end_stream=end and not data)
        if sid is None:  # filled up or went away meanwhile: never sent
            return AttemptResult(None, None, "REFUSED", None)
        self.attempts += 1
        attempt.sid = sid
        self.current = attempt
        if data:
            conn.send_body(sid, data, end)
        self.body_sent(attempt)
        try:
            result = await attempt.result
        except asyncio.CancelledError:  # the head deadline passed, or the app went away
            self._drop(attempt)
            raise
        if result.error is not None:
            self._drop(attempt)
        return result

    def _drop(self, attempt: _Attempt) -> None:
        attempt.discard()
        if self.current is attempt:
            self.current = None

    def forward(self, result: AttemptResult) -> None:
        attempt = result.upstream
        if not isinstance(attempt, _Attempt) or self.ended:
            return
        attempt.forwarded = True
        self.current = self.source = attempt
        self.unkeep()  # no attempt after this one
        if not attempt.ended:
            self.moved_at = asyncio.get_running_loop().time()  # the head moved
            self._arm_body_timer()
        self.relay_head(attempt)
        for data, flow in attempt.held:
            self.relay_data(data, flow)
        attempt.held.clear()
        if attempt.ended:
            self.relay_end(attempt.trailers)
        elif attempt.reset is not None:
            self.relay_reset(attempt.reset)

    def discard(self, result: AttemptResult) -> None:
        attempt = result.upstream
        if isinstance(attempt, _Attempt):
            self._drop(attempt)

    def _arm_body_timer(self) -> None:
        """The response body's deadline: the request's limit, or `response` after the request's
        end if that comes first; and `idle` after the last DATA either way."""
        at, message = self.deadline, "request timed out"
        if self.response_s is not None and self.request_ended_at is not None:
            end = self.request_ended_at + self.response_s
            if at is None or end <= at:  # (dispatch's limit may be this one already)
                at, message = end, "response timed out"
        self.hard_at, self.hard_message = at, message
        self._rearm()

    def _rearm(self) -> None:
        """One timer at the earliest of the deadline and the idle limit. DATA only stamps
        `moved_at`; the timer, when it fires early, moves itself to the new idle limit."""
        at = self.hard_at
        if self.idle_s is not None:
            idle_at = self.moved_at + self.idle_s
            if at is None or idle_at < at:
                at = idle_at
        if at is None or self.ended:
            return
        if self.timer is not None:
            if self.timer.when() <= at:
                return  # fires first, then re-arms
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_at(at, self._timer_fired)

    def _timer_fired(self) -> None:
        self.timer = None
        if self.ended:
            return
        now = asyncio.get_running_loop().time() + 0.001  # (call_at may run a hair early)
        if self.hard_at is not None and now >= self.hard_at:
            message = self.hard_message
            self._expired(
                message, "RESPONSE_STREAM_TIMEOUT" if message.startswith("response") else "REQUEST_TIMEOUT"
            )
        elif self.idle_s is not None and now >= self.moved_at + self.idle_s:
            self._expired("idle timed out", "IDLE_TIMEOUT")
        else:
            self._rearm()

    def response_ended(self, error: str | None) -> None:
        """Tell dispatch (once) how the forwarded response ended: None cleanly, else the label."""
        hook, self.on_response_end = self.on_response_end, None
        if hook is not None:
            hook(error)

    def _expired(self, message: str, error: str) -> None:
        """A timeout passed mid-response: gRPC gets DEADLINE_EXCEEDED trailers, plain HTTP/2 a
        reset stream (its head is gone); the upstream stream is cancelled."""
        self.response_ended(error)
        attempt, self.current = self.current, None
        if attempt is not None:
            attempt.discard()
        if self.grpc and self.responded:
            self.drop_out()
            self.out_end = True
            self.out_trailers = [
                (b"grpc-status", str(GRPC_TIMEOUT).encode()),
                (b"grpc-message", message.encode()),
                (b"l5d-proxy-error", message.encode()),
                (b"meshagent-proxy-error", message.encode()),
            ]
            self.router.pump(self)
        else:
            self.router.reset(self, ErrorCodes.CANCEL)

    def respond_error(self, status: int, grpc_status: int, error: str, message: str, close: bool) -> None:
        """The proxy answers (see the module docstring); once a head went, the stream is reset."""
        attempt, self.current = self.current, None
        if attempt is not None:
            attempt.discard()
        if self.ended:
            return
        if self.responded:
            self.router.reset(
                self, ErrorCodes.CANCEL if error.endswith("TIMEOUT") else ErrorCodes.INTERNAL_ERROR
            )
            return
        self.status = 200 if self.grpc else status
        self.grpc_code = grpc_status if self.grpc else None
        self.responded = True
        self.answered = time.monotonic()
        self.router.send_head(self, error_headers(self.grpc, status, grpc_status, message), end=True)

    # --- the app's request --------------------------------------------------------------------

    def request_data(self, data: bytes, flow: int) -> None:
        if self.kept:
            pool = self.router.pool
            if self.body_size + len(data) > self.retry_limit:
                self.unkeep()
            elif pool.retry_held + len(data) > pool.retry_total:
                self.unkeep()  # the worker's bound on bodies kept for retries
                self.router.ctx.metrics.retry_buffer_full()
            else:
                self.body.append(data)
                self.body_size += len(data)
                pool.retry_held += len(data)
        self.unacked += flow
        self.request_moved_at = self.moved_at = asyncio.get_running_loop().time()
        attempt = self.current
        if attempt is not None and attempt.sid:
            attempt.conn.send_body(attempt.sid, data, False)
            self.body_sent(attempt)
        elif data:
            self.pending.append(data)  # acknowledged once an attempt took it

    def unkeep(self) -> None:
        """The body is no longer kept for a retry (too long, the worker's bound, the end)."""
        if self.kept:
            self.kept = False
            self.router.pool.retry_held -= self.body_size
            self.body.clear()
            self.body_size = 0

    def request_end(self) -> None:
        self.request_done = True
        self.request_ended_at = asyncio.get_running_loop().time()
        if self.on_request_end is not None:
            self.on_request_end()
        if self.source is not None and self.response_s is not None:
            self._arm_body_timer()  # a response already streaming: `response` starts now
        attempt = self.current
        if attempt is not None and attempt.sid:
            attempt.conn.send_body(attempt.sid, b"", True)

    def body_sent(self, attempt: _Attempt) -> None:
        """Acknowledge the app's DATA the upstream took (its queue for this stream is empty)."""
        if self.unacked and not attempt.conn.queued(attempt.sid) and not self.ended:
            self.router.ack(self.sid, self.unacked)
            self.unacked = 0

    # --- the upstream's response, once forwarded ----------------------------------------------

    def relay_head(self, attempt: _Attempt) -> None:
        if self.responded or self.ended or attempt.head is None:
            return
        self.responded = True
        self.answered = time.monotonic()
        self.status = http_status(attempt.head) or 0
        self.tls_labels = attempt.conn.tls_labels
        if self.grpc:
            self.grpc_code = grpc_status(attempt.head)
        head = [(n, v) for n, v in attempt.head if n not in _DROP]
        self.router.send_head(self, head, end=attempt.ended and attempt.trailers is None and not attempt.held)

    def relay_data(self, data: bytes, flow: int) -> None:
        if self.ended:
            self._consumed(flow)
            return
        self.moved_at = asyncio.get_running_loop().time()
        self.out.append((data, flow))
        self.router.pump(self)

    def relay_end(self, trailers: list[Header] | None) -> None:
        if trailers and self.grpc:
            self.grpc_code = grpc_status(trailers)
        self.out_end = True
        self.out_trailers = trailers
        self.router.pump(self)

    def _consumed(self, flow: int) -> None:
        source = self.source
        if flow and source is not None and source.sid:
            source.conn.consumed(source.sid, flow)

    def drop_out(self) -> None:
        """Response DATA that will never go to the app: acknowledged upstream all the same."""
        self._consumed(sum(flow for _data, flow in self.out))
        self.out.clear()

    def relay_reset(self, error: str) -> None:
        self.response_ended(error)
        self.router.reset(self, ErrorCodes.CANCEL if error == "CANCEL" else ErrorCodes.INTERNAL_ERROR)

    def cancel(self) -> None:
        """The app reset its stream or went away."""
        self.ended = True
        self.unkeep()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        attempt, self.current = self.current, None
        if attempt is not None:
            attempt.discard()
        self.drop_out()
        if self.task is not None and not self.task.done():
            self.task.cancel()


# Connection-specific fields (RFC 9113 §8.2.2): h2 refuses them; never relayed either way.
_DROP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
    }
)


class H2Router(Leg):
    """Serves one routed HTTP/2 app connection (see the module docstring)."""

    def __init__(
        self,
        conn: RoutedConn,
        pool: H2Pool | None = None,
        settings: H2RouterSettings = H2RouterSettings(),  # frozen: one shared default is safe
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.proxy = conn.proxy
        self.ctx = conn.ctx
        self.policy = conn.policy
        self.target = target(*conn.orig)
        self.http: dict[str, Any] = {}  # the per-request families per label set
        self.preread = conn.early  # (Leg.early is the relay's own)
        self.orig = conn.orig
        self.pool = pool if pool is not None else worker_pool(conn.proxy)
        self.settings = settings
        self.on_refused = on_refused
        self.transport = _AppFlow(self)  # type: ignore[assignment]
        self.streams: dict[int, _Exchange] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.writable = True
        self.app_done = False
        self.output: list[bytes] = []
        self.requests = 0
        self.goaway: int | None = None  # the last stream of our GOAWAY (the policy was removed)
        self.log = Throttled(log, "h2_router.refused")
        self.guard = FrameGuard()
        config = H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2c = H2Connection(config)
        h2c.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            },
        )
        h2c.initiate_connection()  # our SETTINGS advertise `max_streams`...
        # ...while h2 enforces only a backstop: past `max_streams` the stream is refused here
        # (RST_STREAM REFUSED_STREAM, retryable) where h2 would end the whole connection.
        h2c.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_streams + SLICE // 9 + 1,
                SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            },
        )
        h2c.decoder.max_header_list_size = settings.max_header_list_size
        # A connection window as large as all stream windows: a slow stream holds its own only.
        h2c.increment_flow_control_window(settings.max_streams * DEFAULT_WINDOW)

    # --- the app side (Leg API) ---------------------------------------------------------------

    def sink(self) -> Callable[[bytes], object]:
        return self.send

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.guard.feed(data):
            self._refused("h2_protocol_error", error="frame_too_large")
            self._terminate(ErrorCodes.FRAME_SIZE_ERROR)
            return
        try:
            for start in range(0, len(data), SLICE):
                for event in self.h2.receive_data(data[start : start + SLICE]):
                    self._event(event)
                if self.closed:
                    return
        except ProtocolError as exc:
            self._refused("h2_protocol_error", error=type(exc).__name__)
            self.flush()
            self._shutdown()
            return
        except Exception as exc:  # never out of the relay's callback: end this connection only
            log.warning("h2_router.failed", error=repr(exc))
            self._terminate(ErrorCodes.INTERNAL_ERROR)
            return
        self.flush()

    def send_many(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.send(chunk)

    def send_eof(self) -> None:
        """HTTP/2 has no half-close: the app's EOF ends the connection and its streams."""
        self.app_done = True
        self._shutdown()

    def start(self) -> None:
        """Paired with the app: our SETTINGS go out, then the bytes read while detecting."""
        if self.output and self.forward is not None:
            data = b"".join(self.output)
            self.output.clear()
            self._write(data)
        early, self.preread = self.preread, b""
        if early:
            self.send(early)

    def close(self) -> None:
        self._teardown()

    def abort(self) -> None:
        self._teardown()

    # --- HTTP/2 events from the app -----------------------------------------------------------

    def _event(self, event: object) -> None:
        if isinstance(event, DataReceived):
            ex = self.streams.get(event.stream_id)
            size = event.flow_controlled_length
            if ex is None or ex.ended:
                with contextlib.suppress(ProtocolError, KeyError):
                    self.h2.acknowledge_received_data(size, event.stream_id)
                return
            ex.request_data(bytes(event.data or b""), size)
        elif isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, StreamEnded):
            ex = self.streams.get(event.stream_id)
            if ex is not None and not ex.request_done:
                ex.request_end()
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                ex = self.streams.get(event.stream_id)
                if ex is not None:
                    self.pump(ex)
            else:
                for ex in list(self.streams.values()):
                    self.pump(ex)
        elif isinstance(event, StreamReset):
            ex = self.streams.get(event.stream_id)
            if ex is not None:
                ex.cancel()
                self._forget(ex)
        elif isinstance(event, TrailersReceived):
            pass  # request trailers: gRPC sends none; dropped (the StreamEnded that follows ends the body)
        elif isinstance(event, ConnectionTerminated):
            self.app_done = True
            self._shutdown()

    def _request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        ended = event.stream_ended is not None
        if self.goaway is not None and sid > self.goaway:  # sent before our GOAWAY reached it
            self._reset_id(sid, ErrorCodes.REFUSED_STREAM)  # unprocessed: the client retries it
            return
        if len(self.streams) >= self.settings.max_streams:
            self._reset_id(sid, ErrorCodes.REFUSED_STREAM)
            self._refused("h2_refused_stream", stream=sid)
            return
        headers = [(bytes(n), bytes(v)) for n, v in event.headers or ()]
        view = request_view(headers)
        ex = _Exchange(self, sid, headers, view, ended)
        self.streams[sid] = ex
        self.requests += 1
        if not self._current_policy():
            self._go_away(sid)
        rule = self.policy.select(view)
        if rule is None:
            ex.respond_error(404, GRPC_UNKNOWN, "NO_ROUTE", "no route matches the request", False)
            return
        self._start(ex, rule)

    def _current_policy(self) -> bool:
        """Each stream uses the proxy's policy of now (a long-lived gRPC channel sees weights
        move, backends go, routes change). False: the destination lost its policy; the stream
        keeps the one the connection had (a routed connection cannot turn L4 midway)."""
        proxy = self.proxy
        if proxy is None:
            return True
        found = proxy.routes.lookup(*self.orig)
        if found is not None:
            self.policy = found
        if proxy.router is not None:
            self.ctx = proxy.router
        return found is not None

    def _go_away(self, last: int) -> None:
        """The policy was removed: GOAWAY(NO_ERROR, `last`) so the client's next streams open a
        new connection (L4 then); the streams up to `last` finish here. Written as a frame of
        our own: h2's `close_connection` would refuse to send anything after it."""
        if self.goaway is not None:
            return
        self.goaway = last
        log.info("h2_router.policy_removed", dst=f"{self.orig[0]}:{self.orig[1]}", last_stream=last)
        self.flush()  # what h2 holds goes first
        frame = GoAwayFrame(stream_id=0, last_stream_id=last, error_code=ErrorCodes.NO_ERROR).serialize()
        if self.forward is None:
            self.output.append(frame)
        elif not self.closed:
            self._write(frame)

    def _start(self, ex: _Exchange, rule: Rule) -> None:
        ex.response_s = rule.timeouts.response_s
        ex.idle_s = rule.timeouts.idle_s
        retry = rule.retry
        if retry is not None:
            ex.retry_limit = retry.max_request_bytes
            ex.grpc_retry = ex.grpc and bool(retry.grpc)
        run = self._dispatch(self.ctx, self.policy, ex, rule)
        task = asyncio.get_running_loop().create_task(run, name="h2-route")
        ex.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _dispatch(self, ctx: RouterContext, policy: ParentPolicy, ex: _Exchange, rule: Rule) -> None:
        try:
            await dispatch(ctx, policy, rule, ex)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # a bug answers this request, never the connection's others
            log.warning("h2_router.dispatch_failed", error=repr(exc))
            ex.respond_error(502, GRPC_UNKNOWN, "UNKNOWN", "proxy error", False)
        if not ex.responded and not ex.ended:  # dispatch ended without an answer
            ex.respond_error(502, GRPC_UNKNOWN, "UNKNOWN", "no response", False)
        self.flush()

    # --- what exchanges use -------------------------------------------------------------------

    def send_head(self, ex: _Exchange, headers: list[Header], end: bool) -> None:
        try:
            self.h2.send_headers(ex.sid, headers, end_stream=end)
        except ProtocolError:
            self.reset(ex, ErrorCodes.STREAM_CLOSED)
            return
        if end:
            self._finish(ex)
        self.flush()

    def ack(self, sid: int, flow: int) -> None:
        with contextlib.suppress(ProtocolError, KeyError):
            self.h2.acknowledge_received_data(flow, sid)
        self.flush()

    def pump(self, ex: _Exchange) -> None:
        """Send the response DATA the app's window allows (acknowledging it upstream); finish
        the stream once all of it went."""
        if ex.ended:
            return
        out, h2conn = ex.out, self.h2
        try:
            while out and self.writable:
                window = h2conn.local_flow_control_window(ex.sid)
                if window <= 0:
                    break
                data, flow = out[0]
                size = min(window, h2conn.max_outbound_frame_size, len(data))
                if size < len(data):
                    out[0] = (data[size:], flow)
                    data = data[:size]
                    flow = 0  # acknowledged upstream with the chunk's last piece
                else:
                    out.popleft()
                if data:
                    h2conn.send_data(ex.sid, data)
                ex._consumed(flow)
        except ProtocolError:  # the app closed the stream meanwhile
            self.reset(ex, ErrorCodes.STREAM_CLOSED)
            return
        if not out and ex.out_end:
            try:
                if ex.out_trailers:
                    h2conn.send_headers(
                        ex.sid, [(n, v) for n, v in ex.out_trailers if n not in _DROP], end_stream=True
                    )
                else:
                    h2conn.end_stream(ex.sid)
            except ProtocolError:
                self.reset(ex, ErrorCodes.STREAM_CLOSED)
                return
            self._finish(ex)
        self.flush()

    def reset(self, ex: _Exchange, code: ErrorCodes) -> None:
        if not ex.ended:
            ex.ended = True
            self._reset_id(ex.sid, code)
        self._forget(ex)
        self.flush()

    def _finish(self, ex: _Exchange) -> None:
        """The response went out whole: a request body still coming is not wanted."""
        ex.complete = True
        ex.response_ended(None)
        if not ex.request_done:
            self._reset_id(ex.sid, ErrorCodes.NO_ERROR)
        ex.ended = True
        self._forget(ex)

    def _forget(self, ex: _Exchange) -> None:
        ex.response_ended(None if ex.complete else "CANCEL")  # (if nothing said otherwise first)
        ex.unkeep()
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
        if self.streams.get(ex.sid) is ex:
            del self.streams[ex.sid]
            self._count(ex)
        attempt = ex.current
        if attempt is not None and not attempt.ended:
            attempt.discard()
        ex.drop_out()
        if ex.unacked:
            with contextlib.suppress(ProtocolError, KeyError):
                self.h2.acknowledge_received_data(ex.unacked, ex.sid)
            ex.unacked = 0
        if self.app_done and not self.streams:
            self._shutdown()

    def _count(self, ex: _Exchange) -> None:
        """The per-request families (request_total, response_total, response_latency_ms) count
        routed streams as the L4 accounting does: target_addr the address the app dialled; a
        stream reset or cut off before its response ended is status 0."""
        proxy = self.proxy
        metrics = proxy.metrics if proxy is not None else None
        if metrics is None or not proxy.settings.http_accounting:
            return
        base = join(OUTBOUND, self.target, ex.tls_labels or NO_ENDPOINT)
        http = self.http.get(base)
        if http is None:
            http = self.http[base] = metrics.http(base)
        status = ex.status if ex.complete else 0
        grpc = ex.grpc_code if ex.grpc else None
        if ex.grpc and status and grpc is None:
            grpc = GRPC_UNKNOWN  # a gRPC response without grpc-status (the L4 accounting's rule)
        http.exchange(ex.view.method, status, (ex.answered or time.monotonic()) - ex.started, grpc)

    # --- the app connection -------------------------------------------------------------------

    def _app_writable(self) -> None:
        self.writable = True
        for ex in list(self.streams.values()):
            self.pump(ex)
        self.flush()

    def _reset_id(self, sid: int, code: ErrorCodes) -> None:
        with contextlib.suppress(ProtocolError, KeyError):
            self.h2.reset_stream(sid, code)

    def _refused(self, reason: str, **fields: Any) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)
        else:
            self.log.warning(reason, reason=reason, **fields)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if not data or self.closed:
            return
        if self.forward is None:
            self.output.append(data)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        peer = self.peer
        transport = peer.transport if peer is not None else None
        if transport is None or transport.is_closing():
            return  # the app is gone (uvloop raises on a write to a closed transport)
        self.rx += len(data)  # what the app leg is sent: its tx
        # Past the write high-water mark the transport calls pause_writing at once: writable goes False.
        self.forward(data)  # type: ignore[misc]

    def _terminate(self, code: ErrorCodes) -> None:
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection(code)
        self.flush()
        self._shutdown()

    def _shutdown(self) -> None:
        """The HTTP/2 connection is over: what was sent stays sent; the app leg closes."""
        self.flush()
        if self.peer is not None and not self.peer.closed:
            self.peer.send_eof()
        self._teardown()

    def _teardown(self) -> None:
        if self.closed:
            return
        self.closed = True
        streams, self.streams = self.streams, {}
        for ex in streams.values():
            ex.cancel()
            self._count(ex)  # cut off: status 0
        for task in list(self.tasks):
            task.cancel()
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.close()
        if self.on_closed is not None:
            self.on_closed(self, None)
        self.peer = self.forward = None
