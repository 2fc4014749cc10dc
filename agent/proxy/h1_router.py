"""HTTP/1 per-request routing for a destination with a policy (design-21 §4.2).

`H1Router` is a transport-less relay `Leg` paired with the app's leg (routed_detect hands it
over). The app's bytes are parsed with httptools (llhttp); one request at a time: its rule is
selected (`ParentPolicy.select`), then `http_dispatch.dispatch` runs the attempts through this
module's `Exchange`: an attempt sends the head and the body read so far on a pooled upstream
connection (`_Upstream`, over `originate()`: mTLS to the endpoint's own identity), reads the
response head (held until the retry decision), then the response is forwarded (head
re-serialized, body re-framed from the parser's spans) or discarded. Pipelined requests wait
their turn (parsed, the app's reading paused); the upstream returns to the pool when its
response ended cleanly and neither side said close.

Flow control: the app's socket full → the upstream's reading pauses (`_AppFlow`); the
upstream's socket full (a large upload) → the app's reading pauses (`_UpFlow`).

Synthesized answers (Linkerd's respond.rs + our header): empty body, `content-length: 0`,
`l5d-proxy-error` and `meshagent-proxy-error`, `connection: close` when the connection closes.
Upgrade and CONNECT become L4 to the endpoint picked for them. Request trailers are dropped.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import httptools

from agent.logs import Throttled, get_logger
from agent.telemetry.metrics import join, labels
from agent.telemetry.proxy_metrics import target, tls_connect

from .decisions import Refuse, route_routed_endpoint
from .http_dispatch import AttemptResult, dispatch
from .http_pool import HttpPool, PoolKey
from .originate import Failed, Originated, originate
from .relay import Leg
from .routes import EndpointRef, RequestView
from .transport_header import SessionProtocol

if TYPE_CHECKING:
    from .http_balance import EndpointPick
    from .http_dispatch import RouterContext
    from .listeners import Proxy
    from .routed_detect import RoutedConn
    from .routes import ParentPolicy, Rule

log = get_logger("meshagent.proxy.h1_router")

MAX_HEAD: Final = 64 * 1024
"""Request head bound (431 past it); response heads are bounded the same (502)."""
MAX_PENDING: Final = 64 * 1024
"""Request body bytes read ahead of the upstream before the app's reading pauses."""
MAX_WAITING: Final = 16
"""Pipelined requests parsed ahead of the current one before the app's reading pauses."""
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Hop-by-hop: this connection's business, never forwarded (the router speaks for each side).
HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
REASONS: Final = {
    400: b"Bad Request",
    404: b"Not Found",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
TIMEOUT_LABELS: Final = {
    "request": "REQUEST_TIMEOUT",
    "response": "RESPONSE_STREAM_TIMEOUT",
    "idle": "IDLE_TIMEOUT",
}
OUTBOUND: Final = labels(("direction", "outbound"))
OUTBOUND_DST: Final = labels(("direction", "outbound"), ("peer", "dst"))
NO_ENDPOINT: Final = tls_connect(None)  # a synthesized answer's labels: no endpoint answered


def synthesized(status: int, message: str, close: bool) -> bytes:
    """Linkerd's error response (respond.rs), with our header next to `l5d-proxy-error`."""
    text = message.encode("latin-1", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
        b"content-length: 0\r\n",
        b"l5d-proxy-error: " + text + b"\r\n",
        b"meshagent-proxy-error: " + text + b"\r\n",
    ]
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head)


class _Worker:
    """What every H1Router of one proxy (worker process) shares: the idle upstreams and the
    bytes held for retries."""

    def __init__(self, proxy: Proxy) -> None:
        s = proxy.settings
        self.pool: HttpPool[_Upstream] = HttpPool(s.http_pool_idle_s, s.http_pool_max_idle)
        self.retry_total = s.http_retry_buffer_total
        self.retry_held = 0
        self.http: dict[str, Any] = {}  # per-request families' HttpMetrics per label set
        self.failed_log = Throttled(log, "http.upstream_failed")

    def stop(self) -> None:
        """The proxy stops: idle upstreams close now, busy ones when their response ended."""
        self.pool.max_idle = 0
        self.pool.close_all()


_WORKERS: weakref.WeakKeyDictionary[Proxy, _Worker] = weakref.WeakKeyDictionary()


def worker_state(proxy: Proxy) -> _Worker:
    found = _WORKERS.get(proxy)
    if found is None:
        found = _WORKERS[proxy] = _Worker(proxy)
        proxy.stop_hooks.append(found.stop)
    return found


def pool_key(ep: EndpointRef) -> PoolKey:
    return (ep.address, ep.port, ep.identity, ep.header_port)


async def originate_endpoint(proxy: Proxy, ep: EndpointRef) -> Originated | Failed:
    """A new connection to `ep` (originate(): mTLS to its identity, header, ...), unpaired."""
    action = route_routed_endpoint(
        ep.address, ep.port, ep.identity, ep.server_name, ep.header_port, proxy.settings.unmeshed_outbound
    )
    dst = f"{ep.address}:{ep.port}"
    if isinstance(action, Refuse):
        return Failed(action.reason, "connect")
    made = await originate(proxy, action, dst, SessionProtocol.HTTP1)
    if isinstance(made, Failed):
        return made
    proxy.observe(made.leg, join(OUTBOUND_DST, target(ep.address, ep.port), made.tls_labels))
    proxy.stats.opened[f"outbound:http1_{made.kind}"] += 1
    return made


async def open_upstream(proxy: Proxy, ep: EndpointRef) -> _Upstream | Failed:
    """A new pooled-kind upstream to `ep`. Cancelled (a deadline) while it connects: the
    connection is finished all the same and goes to the pool (the next request's)."""
    task = asyncio.get_running_loop().create_task(originate_endpoint(proxy, ep), name="h1-connect")
    try:
        made = await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda done: _pool_late(proxy, ep, done))
        raise
    return made if isinstance(made, Failed) else _upstream(made, ep)


def _upstream(made: Originated, ep: EndpointRef) -> _Upstream:
    up = _Upstream(pool_key(ep), made.tls_labels)
    made.leg.pair(up)
    return up


def _pool_late(proxy: Proxy, ep: EndpointRef, done: asyncio.Task[Originated | Failed]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    made = done.result()
    if isinstance(made, Originated):
        up = _upstream(made, ep)
        worker_state(proxy).pool.put(up.key, up)


# --- the upstream side ------------------------------------------------------------------


class _UpFlow:
    """The upstream's stand-in transport: its socket's buffer filled/drained (an upload)."""

    __slots__ = ("up",)

    def __init__(self, up: _Upstream) -> None:
        self.up = up

    def pause_reading(self) -> None:
        self.up.writable(False)

    def resume_reading(self) -> None:
        self.up.writable(True)

    def is_closing(self) -> bool:
        return self.up.closed

    def close(self) -> None:
        self.up.close()

    def abort(self) -> None:
        self.up.close()

    def can_write_eof(self) -> bool:
        return False


class _Upstream(Leg):
    """One HTTP/1 connection to an endpoint: a transport-less leg paired with the originated
    leg. Busy: its bytes go to the attempt that owns it; idle (pooled): any byte or EOF from the
    endpoint ends it."""

    __slots__ = ("can_write", "key", "owner", "tls_labels")

    def __init__(self, key: PoolKey, tls_labels: str) -> None:
        super().__init__()
        self.key = key
        self.tls_labels = tls_labels
        self.owner: _Attempt | None = None
        self.can_write = True
        self.transport = _UpFlow(self)  # type: ignore[assignment]

    def sink(self) -> Callable[[bytes], object]:
        return self.send

    def send(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            self.close()  # an idle connection that speaks: not ours to guess, not reusable
            return
        owner.data(data)

    def send_many(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if self.closed:
                return
            self.send(chunk)

    def send_eof(self) -> None:
        self.read_eof = True
        owner = self.owner
        if owner is None:
            self.close()
        else:
            owner.ended()

    def start(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        peer, self.peer, self.forward = self.peer, None, None
        if peer is not None and not peer.closed:
            peer.close()
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.ended()

    def abort(self) -> None:
        peer = self.peer
        self.close()
        if peer is not None:
            peer.abort()

    def write(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.closed or peer.transport is None or peer.transport.is_closing():
            return
        peer.send(data)

    def reading(self, on: bool) -> None:
        peer = self.peer
        if peer is None or peer.transport is None or peer.closed:
            return
        if on:
            peer.transport.resume_reading()
        else:
            peer.transport.pause_reading()

    def writable(self, on: bool) -> None:
        self.can_write = on
        owner = self.owner
        if owner is not None:
            owner.ex.router.upload_flow()


# --- one request ------------------------------------------------------------------------


class _Request:
    """A parsed request head and its body as it arrives."""

    __slots__ = (
        "body",
        "body_len",
        "chunked",
        "complete",
        "ended",
        "expect",
        "has_body",
        "head_size",
        "headers",
        "keep_alive",
        "kept",
        "kept_len",
        "method",
        "started",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.keep_alive = True
        self.upgrade = False
        self.chunked = False
        self.has_body = False
        self.expect = False
        self.body: deque[bytes] = deque()  # read, not yet sent upstream
        self.body_len = 0  # bytes in `body`
        self.kept: list[bytes] | None = []  # the whole body while it may be retried
        self.kept_len = 0
        self.complete = False
        self.started = 0.0
        self.ended = 0.0  # when its body ended (the response timeout's start)

    def view(self) -> RequestView:
        path, _, query = self.url.partition(b"?")
        headers: dict[str, str] = {}
        for name, value in self.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return RequestView(
            method=self.method,
            path=path.decode("latin-1"),
            query=query.decode("latin-1"),
            host=headers.get("host", ""),
            headers=headers,
        )

    def head(self) -> bytes:
        """The request line and headers as received, without hop-by-hop ones: the upstream
        connection is kept alive (or not) by its own response."""
        parts = [self.method, b" ", self.url, b" HTTP/", self.version, b"\r\n"]
        for name, value in self.headers:
            if name.lower() not in HOP:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def frame(self, chunk: bytes) -> bytes:
        if not self.chunked:
            return chunk
        return b"%x\r\n%s\r\n" % (len(chunk), chunk)

    def end(self) -> bytes:
        return b"0\r\n\r\n" if self.chunked else b""


def unfinished(req: _Request) -> bool:
    """A request whose body has not all been read (a bodyless one is whole at its head)."""
    return req.has_body and not req.complete


class _Attempt:
    """One attempt's response on one upstream: parsed, its head held until dispatch decides,
    then forwarded (re-framed) or dropped."""

    __slots__ = (
        "bodyless",
        "chunked",
        "complete",
        "ex",
        "failed",
        "got",
        "head_buf",
        "head_done",
        "headers",
        "held",
        "keep_alive",
        "length",
        "parser",
        "reason",
        "reused",
        "sent_all",
        "state",
        "status",
        "up",
    )

    def __init__(self, ex: _Exchange, up: _Upstream, reused: bool) -> None:
        self.ex = ex
        self.up = up
        self.reused = reused
        loop = asyncio.get_running_loop()
        self.head_done: asyncio.Future[AttemptResult] = loop.create_future()
        self.state = "head"  # head → held → forward | discard → done
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.chunked = False
        self.length = False
        self.bodyless = False
        self.complete = False
        self.failed = False
        self.held: list[bytes] = []
        self.got = 0  # response bytes read
        self.sent_all = False  # the whole request (body and its end) was written
        # A response to HEAD is its head alone, which llhttp cannot be told: cut at the blank line.
        self.head_buf: bytearray | None = bytearray() if ex.req.method == b"HEAD" else None
        self.parser: Any = None if self.head_buf is not None else httptools.HttpResponseParser(self)

    # upstream events

    def data(self, data: bytes) -> None:
        self.got += len(data)
        if self.complete:  # bytes after the response: the connection is not reusable
            self.keep_alive = False
            return
        if self.head_buf is not None:
            self.head_buf += data
            end = self.head_buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head_buf) > MAX_HEAD:
                    self._broken("response head too large")
                return
            head, rest = bytes(self.head_buf[: end + 4]), self.head_buf[end + 4 :]
            self.head_buf = None
            if rest:
                self.keep_alive = False
            self.parser = httptools.HttpResponseParser(self)
            data = head
            self.bodyless = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(f"invalid response: {exc}")
            return
        if self.bodyless and self.state != "head" and not self.complete:
            self._message_complete()  # (HEAD: the head was all there is)

    def ended(self) -> None:
        """The upstream finished writing or closed."""
        if self.complete:
            if self.state == "done":
                return
            self.keep_alive = False
            return
        if self.state != "head" and not self.chunked and not self.length and not self.bodyless:
            self.keep_alive = False  # close-delimited: the end of the connection is the end of the body
            self._message_complete()
            return
        self._broken("connection closed before the response ended")

    def _broken(self, why: str) -> None:
        self.failed = True
        self.keep_alive = False
        state = self.state
        if state == "head":
            self.state = "done"
            if not self.head_done.done():
                self.head_done.set_result(AttemptResult(None, None, "IO", self))
            self.up.close()
        elif state == "forward":
            self.state = "done"
            self.up.close()
            self.ex.router.truncated(why)
        else:  # held or discarded: dispatch's decision (or discard) closes it
            self.up.close()

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state == "head":  # (after the head: trailers, dropped)
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim (100 Continue, 103): to an HTTP/1.1 app at once; the final head follows.
            self.ex.router.interim(status, self.reason, self.headers)
            self.reason, self.headers = b"", []
            return
        self.status = status
        self.keep_alive = self.keep_alive and parser.should_keep_alive()
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif lower == b"content-length":
                self.length = True
        if status in (204, 304) or self.ex.req.method == b"HEAD":
            self.bodyless = True
        self.state = "held"
        self.up.reading(False)  # the body waits for the decision
        if not self.head_done.done():
            self.head_done.set_result(AttemptResult(status, None, None, self))

    def on_body(self, data: bytes) -> None:
        state = self.state
        if state == "forward":
            self.ex.router.write_body(data, self.chunked)
        elif state == "held":
            self.held.append(data)

    def on_message_complete(self) -> None:
        if self.state == "head":  # (an interim response's end)
            return
        self._message_complete()

    def _message_complete(self) -> None:
        if self.complete:
            return
        self.complete = True
        if self.state == "forward":
            self.ex.response_done(self)
        elif self.state == "discard":
            self.ex.release(self)

    # dispatch's decisions

    def forward(self) -> None:
        self.state = "forward"
        router = self.ex.router
        router.write_head(self)
        for span in self.held:
            router.write_body(span, self.chunked)
        self.held.clear()
        if self.complete:
            self.ex.response_done(self)
        elif self.failed:  # the upstream broke while its head was held
            self.state = "done"
            router.truncated("connection closed before the response ended")
        else:
            router.downstream_flow()

    def discard(self) -> None:
        self.state = "discard"
        self.held.clear()
        self.keep_alive = self.keep_alive and self.complete  # an unread body: not drained, closed
        self.ex.release(self)


class _Exchange:
    """The `Exchange` of http_dispatch for the app connection's current request."""

    def __init__(self, router: H1Router, req: _Request, view: RequestView, rule: Rule) -> None:
        self.router = router
        self.req = req
        self.view = view
        self.rule = rule
        self.current: _Attempt | None = None  # the attempt the request body goes to
        self.answered = False
        self.final: _Attempt | None = None
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.server_label = ""
        # http_dispatch's optional hooks: the response timeout counts from the body's end, and the
        # route's durations run to the response's end (Linkerd's).
        self.request_ended_at: float | None = asyncio.get_running_loop().time() if req.complete else None
        self.on_request_end: Callable[[], None] | None = None
        self.on_response_end: Callable[[str | None], None] | None = None
        self.request_moved_at: float | None = None  # loop time the body last came (dispatch's idle)
        self.moved = -1  # bytes relayed either way when the idle timer last looked
        self.moved_at = time.monotonic()
        self.sent = False  # an attempt wrote (part of) the body: a next one starts from the kept copy

    def retry_eligible(self) -> bool:
        req = self.req
        return (
            req.method in IDEMPOTENT
            and req.complete
            and req.kept is not None
            and not req.expect
            and not req.upgrade
        )

    async def attempt(self, pick: EndpointPick, deadline: float | None) -> AttemptResult:
        router = self.router
        req = self.req
        key = pool_key(pick.endpoint)
        pool = router.worker.pool
        for _ in range(2):
            up = pool.get(key)
            reused = up is not None
            if up is None:
                made = await open_upstream(router.proxy, pick.endpoint)
                if isinstance(made, Failed):
                    return AttemptResult(None, None, "IO", None, connect_failed=True)
                up = made
            if router.closed:
                pool.discard(key, up)
                raise asyncio.CancelledError
            if self.sent:  # a retry (or a second try): the body again, from the kept copy
                req.body = deque(req.kept or ())
                req.body_len = req.kept_len if req.kept is not None else 0
            self.sent = True
            attempt = _Attempt(self, up, reused)
            up.owner = attempt
            self.current = attempt
            up.reading(True)
            up.write(req.head())
            self.send_body()
            try:
                result = await attempt.head_done
            except asyncio.CancelledError:
                self._drop(attempt)
                raise
            # A kept connection the server closed as we wrote (its idle timeout): the request
            # never reached it; once more on a new connection, not a retry (design §4.5).
            if (
                result.error is not None
                and reused
                and attempt.got == 0
                and req.kept is not None
                and req.complete
            ):
                self.current = None
                continue
            if result.status is not None:
                self.server_label = up.tls_labels
            return result
        return AttemptResult(None, None, "IO", None)

    def send_body(self) -> None:
        """What the app sent of the body so far goes to the current attempt's upstream."""
        attempt, req = self.current, self.req
        if attempt is None or attempt.sent_all or attempt.state in ("discard", "done"):
            return
        up = attempt.up
        drained = bool(req.body)
        while req.body and up.can_write and not up.closed:
            chunk = req.body.popleft()
            req.body_len -= len(chunk)
            up.write(req.frame(chunk))
        if req.complete and not req.body and not up.closed:
            attempt.sent_all = True
            up.write(req.end())
        if drained:
            self.router._flow()  # room again for the app's next bytes

    def forward(self, result: AttemptResult) -> None:
        attempt = result.upstream
        assert isinstance(attempt, _Attempt)
        self.answered = True
        self.final = attempt
        self.router.answered(self, attempt.status)
        attempt.forward()

    def discard(self, result: AttemptResult) -> None:
        attempt = result.upstream
        if isinstance(attempt, _Attempt):
            if self.current is attempt:
                self.current = None
            attempt.discard()

    def respond_error(self, status: int, grpc_status: int, error: str, message: str, close: bool) -> None:
        self.answered = True
        if self.current is not None:
            self._drop(self.current)
        self.router.answered(self, status)
        close = close or unfinished(self.req) or self.router.unrouted
        self.router.respond(status, message, close)
        self.router.exchange_done(self, close)

    # the attempts' ends

    def _drop(self, attempt: _Attempt) -> None:
        """An attempt given up (cancelled by a deadline, or replaced): its connection closes."""
        if self.current is attempt:
            self.current = None
        attempt.state = "done"
        attempt.up.owner = None
        self.router.worker.pool.discard(attempt.up.key, attempt.up)

    def release(self, attempt: _Attempt) -> None:
        """A discarded or finished attempt gives its connection back (or closes it)."""
        attempt.state = "done"
        up = attempt.up
        if up.owner is attempt:
            up.owner = None
        pool = self.router.worker.pool
        if attempt.keep_alive and attempt.complete and attempt.sent_all and not up.closed:
            up.reading(True)  # idle: an EOF from the endpoint marks it closed
            pool.put(up.key, up)
        else:
            pool.discard(up.key, up)

    def ended(self, error: str | None) -> None:
        """The relayed response ended (None) or broke after its head (a Linkerd error label)."""
        done, self.on_response_end = self.on_response_end, None
        if done is not None:
            done(error)

    def response_done(self, attempt: _Attempt) -> None:
        self.ended(None)
        router = self.router
        router.end_body(attempt.chunked and not attempt.bodyless)
        self.release(attempt)
        router.exchange_done(self, router.closing or not self.req.keep_alive)


# --- the app side -----------------------------------------------------------------------


class _AppFlow:
    """The router's stand-in transport: the app leg pauses and resumes "reading" here when its
    socket's write buffer fills and drains (the response's upstream reading follows)."""

    __slots__ = ("router",)

    def __init__(self, router: H1Router) -> None:
        self.router = router

    def pause_reading(self) -> None:
        self.router.app_writable(False)

    def resume_reading(self) -> None:
        self.router.app_writable(True)

    def is_closing(self) -> bool:
        return self.router.closed

    def close(self) -> None:
        self.router.close()

    def abort(self) -> None:
        self.router.abort()

    def can_write_eof(self) -> bool:
        return False


class _TooLarge(Exception):
    pass


class H1Router(Leg):
    """Serves one routed HTTP/1 app connection (see the module docstring)."""

    def __init__(self, conn: RoutedConn) -> None:
        super().__init__()
        self.proxy = conn.proxy
        self.ctx: RouterContext = conn.ctx
        self.policy: ParentPolicy = conn.policy
        self.app = conn.app
        self.orig = conn.orig
        self.first = conn.early
        self.worker = worker_state(conn.proxy)
        self.transport = _AppFlow(self)  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.building: _Request | None = None
        self.waiting: deque[_Request] = deque()  # parsed, after the active one (pipelined)
        self.active: _Exchange | _Request | None = None
        self.task: asyncio.Task[None] | None = None
        self.can_write_app = True
        self.app_done = False  # the app finished writing
        self.closing = False  # close once the current response is out
        self.unrouted = False  # the policy was removed: this request is the connection's last
        self.tunnel = False
        self.tunnel_bytes: list[bytes] = []
        self.reading = True
        self.target = target(*conn.orig)

    # --- Leg API: the app's bytes --------------------------------------------------------

    def sink(self) -> Callable[[bytes], object]:
        return self.send

    def send(self, data: bytes) -> None:
        if self.closed or self.closing:
            return
        if self.tunnel:  # (a read in flight while the tunnel connects: its first bytes)
            self.tunnel_bytes.append(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_bytes(data[exc.args[0] :] if exc.args else b"")
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _TooLarge):
                self._refuse(431, "request head too large")
            else:
                log.warning("http.router_failed", error=repr(exc.__context__ or exc))
                self._refuse(400, "invalid request")
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"invalid request: {exc}")
            return
        self._flow()

    def send_many(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.send(chunk)

    def send_eof(self) -> None:
        """The app finished writing. As hyper's server (http1_half_close off, Linkerd's): a
        request not yet answered is given up (a client that closed cannot be told from one
        that half-closed, and the upstream might never answer); a response already under way
        finishes, then the connection ends."""
        self.app_done = True
        if self.tunnel:
            return  # (the tunnel's pairing carries the app's EOF on)
        active = self.active
        if isinstance(active, _Exchange) and active.final is not None and not self.waiting:
            return  # the response streams; exchange_done then closes
        if active is not None or self.waiting or (self.building is not None and not self.building.complete):
            self.abort()
            return
        self._shutdown()

    def start(self) -> None:
        first, self.first = self.first, b""
        if first:
            self.send(first)

    def close(self) -> None:
        self._teardown(False)

    def abort(self) -> None:
        self._teardown(True)

    # --- httptools callbacks (the app's requests) ----------------------------------------

    def on_message_begin(self) -> None:
        self.building = _Request()

    def on_url(self, url: bytes) -> None:
        req = self.building
        assert req is not None
        req.url += url
        req.head_size += len(url)
        if req.head_size > MAX_HEAD:
            raise _TooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.building
        if req is None or req.started:  # (trailers: dropped, documented)
            return
        req.headers.append((name, value))
        req.head_size += len(name) + len(value) + 4
        if req.head_size > MAX_HEAD:
            raise _TooLarge

    def on_headers_complete(self) -> None:
        req = self.building
        assert req is not None
        parser = self.parser
        req.started = time.monotonic()
        req.method = parser.get_method()
        req.version = parser.get_http_version().encode()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade() or req.method == b"CONNECT"
        for name, value in req.headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                req.chunked = b"chunked" in value.lower()
                req.has_body = True
            elif lower == b"content-length":
                req.has_body = value.strip() not in (b"0", b"")
            elif lower == b"expect" and value.lower().startswith(b"100-"):
                req.expect = True
        if req.method not in IDEMPOTENT or req.expect or req.upgrade:
            req.kept = None  # never retried: nothing kept
        if self.active is None:
            self._begin(req)
        else:
            self.waiting.append(req)

    def on_body(self, data: bytes) -> None:
        req = self.building
        if req is None or self.closed:  # (the rest of a feed after the connection ended)
            return
        req.body.append(data)
        req.body_len += len(data)
        kept = req.kept
        if kept is not None:
            limit = self._retry_limit()
            if (
                req.kept_len + len(data) > limit
                or self.worker.retry_held + len(data) > self.worker.retry_total
            ):
                if self.worker.retry_held + len(data) > self.worker.retry_total:
                    self.ctx.metrics.retry_buffer_full()
                self.worker.retry_held -= req.kept_len
                req.kept, req.kept_len = None, 0
            else:
                kept.append(data)
                req.kept_len += len(data)
                self.worker.retry_held += len(data)
        self._body_arrived(req)

    def on_message_complete(self) -> None:
        req = self.building
        if req is None:
            return
        req.complete = True
        req.ended = time.monotonic()
        active = self.active
        if isinstance(active, _Exchange) and active.req is req:
            active.request_ended_at = asyncio.get_running_loop().time()
            if active.on_request_end is not None:
                active.on_request_end()
        self._body_arrived(req)

    # --- one request at a time -----------------------------------------------------------

    def _request(self) -> _Request | None:
        return self._request_of(self.active)

    @staticmethod
    def _request_of(active: _Exchange | _Request | None) -> _Request | None:
        return active.req if isinstance(active, _Exchange) else active

    def _retry_limit(self) -> int:
        active = self.active
        if isinstance(active, _Exchange) and active.rule.retry is not None:
            return active.rule.retry.max_request_bytes
        return 65536

    def _body_arrived(self, req: _Request) -> None:
        active = self.active
        if isinstance(active, _Exchange) and active.req is req:
            active.request_moved_at = asyncio.get_running_loop().time()
            active.send_body()

    def _begin(self, req: _Request) -> None:
        view = req.view()
        # The policy as of now (a weight change reaches kept-alive connections at their next
        # request); a destination no longer routed finishes this connection on the last one.
        policy = self.proxy.routes.lookup(*self.orig)
        if policy is not None:
            self.policy = policy
        else:  # answered by the old policy with `connection: close`: the app's next one goes L4
            self.unrouted = True
        ctx = self.proxy.router
        if ctx is not None:
            self.ctx = ctx
        rule = self.policy.select(view)
        if rule is None:
            self.active = req
            self._count(404)
            close = not req.keep_alive or unfinished(req) or self.unrouted  # (unread body: not worth reading)
            self.respond(404, "no route matches the request", close)
            self._done_plain(req, close)
            return
        if req.upgrade:
            self.active = req
            self._tunnel_to(req, rule)
            return
        ex = _Exchange(self, req, view, rule)
        self.active = ex
        self.task = task = asyncio.get_running_loop().create_task(self._run(ex), name="h1-route")
        self.proxy._tasks.add(task)
        task.add_done_callback(self.proxy._tasks.discard)

    async def _run(self, ex: _Exchange) -> None:
        try:
            await dispatch(self.ctx, self.policy, ex.rule, ex)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never out of a task unseen: end this connection only
            log.warning("http.router_failed", error=repr(exc))
            self.abort()
            return
        if not ex.answered:
            self.abort()
            return
        final = ex.final
        if final is not None and final.state == "forward" and self.active is ex:
            self._body_timer(ex)

    def _body_timer(self, ex: _Exchange) -> None:
        """The response body streams: the request timeout (all of it), the response timeout
        (from the request's end) and the idle timeout (no byte either way) end it with a cut, as
        the head is out. One timer, re-armed (design §4.6)."""
        if self.active is not ex or self.closed:
            return
        t = ex.rule.timeouts
        now = time.monotonic()
        req = ex.req
        hard = [req.started + t.request_s] if t.request_s is not None else []
        if t.response_s is not None:
            hard.append((req.ended or now) + t.response_s)
        reason = "request" if t.request_s is not None and now >= req.started + t.request_s else "response"
        if hard and now >= min(hard):
            self._body_timeout(ex, reason)
            return
        at = min(hard) if hard else None
        if t.idle_s is not None:
            moved = self.rx + self.app.rx
            if moved != ex.moved:
                ex.moved, ex.moved_at = moved, now
            elif now - ex.moved_at >= t.idle_s:
                self._body_timeout(ex, "idle")
                return
            idle_at = ex.moved_at + t.idle_s
            at = idle_at if at is None else min(at, idle_at)
        if at is not None:
            ex.deadline_timer = asyncio.get_running_loop().call_later(
                max(0.0, at - now), self._body_timer, ex
            )

    def _body_timeout(self, ex: _Exchange, which: str) -> None:
        ex.ended(TIMEOUT_LABELS[which])
        log.info("http.response_timed_out", dst=f"{self.orig[0]}:{self.orig[1]}", timeout=which)
        if ex.final is not None:
            ex._drop(ex.final)
        self.abort()

    def answered(self, ex: _Exchange, status: int) -> None:
        self._count(status, ex.server_label)

    def exchange_done(self, ex: _Exchange, close: bool) -> None:
        if self.active is not ex:
            return
        if ex.deadline_timer is not None:
            ex.deadline_timer.cancel()
        # Answered before its body ended (an early 413, a 504): the rest cannot be told from a
        # next request without reading it all; the connection ends instead.
        self._done_plain(ex.req, close or unfinished(ex.req))

    def _release_kept(self, req: _Request) -> None:
        """The request's body copy for retries no longer counts against the worker's bound."""
        if req.kept is not None:
            self.worker.retry_held -= req.kept_len
            req.kept, req.kept_len = None, 0

    def _done_plain(self, req: _Request, close: bool) -> None:
        self._release_kept(req)
        self.active = None
        if close or (self.app_done and not self.waiting):
            self._shutdown()
            return
        if self.waiting:
            self._begin(self.waiting.popleft())
        self._flow()

    def _flow(self) -> None:
        """Read from the app unless its bytes would pile up: the current request's body ahead of
        its upstream, or pipelined requests waiting their turn. Reading on while a response is
        pending is how the app's close is seen (then the request is given up, as hyper does)."""
        if self.closed:
            return
        active = self.active
        want = True
        if (
            self.tunnel
            or (active is not None and not isinstance(active, _Exchange))
            or (
                self.waiting
                and (len(self.waiting) >= MAX_WAITING or sum(r.body_len for r in self.waiting) > MAX_PENDING)
            )
        ):
            want = False
        elif isinstance(active, _Exchange):
            req = active.req
            attempt = active.current
            blocked = attempt is not None and not attempt.up.can_write
            if not req.complete and (req.body_len > MAX_PENDING or blocked):
                want = False
        if want != self.reading:
            self.reading = want
            transport = self.app.transport
            if transport is not None and not self.app.closed:
                if want:
                    transport.resume_reading()
                else:
                    transport.pause_reading()

    def upload_flow(self) -> None:
        active = self.active
        if isinstance(active, _Exchange):
            active.send_body()
        self._flow()

    # --- writing to the app --------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        app = self.app
        transport = app.transport
        if not data or transport is None or transport.is_closing() or self.forward is None:
            return
        self.rx += len(data)  # what the app leg is sent: its tx
        self.forward(data)

    def interim(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        req = self._request()
        if req is None or req.version != b"1.1":
            return
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self._write(b"".join(parts))

    def write_head(self, attempt: _Attempt) -> None:
        req = self._request()
        # (a request body not all read: the connection ends after this response; say so)
        close = req is None or not req.keep_alive or self.app_done or unfinished(req) or self.unrouted
        if not attempt.length and not attempt.chunked and not attempt.bodyless:
            close = True  # close-delimited: the app learns the end from the close
        version = req.version if req is not None else b"1.1"
        parts = [b"HTTP/%s %d %s\r\n" % (version, attempt.status, attempt.reason)]
        for name, value in attempt.headers:
            if name.lower() not in HOP:
                parts += (name, b": ", value, b"\r\n")
        if close:
            parts.append(b"connection: close\r\n")
            self.closing = True
        elif version == b"1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self._write(b"".join(parts))

    def write_body(self, data: bytes, chunked: bool) -> None:
        if not data:
            return
        self._write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    def end_body(self, chunked: bool) -> None:
        if chunked:
            self._write(b"0\r\n\r\n")

    def respond(self, status: int, message: str, close: bool) -> None:
        self._write(synthesized(status, message, close))
        if close:
            self.closing = True

    def truncated(self, why: str) -> None:
        """The upstream broke off a response whose head is out: the app must see a broken
        connection, not a shorter body."""
        active = self.active
        if isinstance(active, _Exchange):
            active.ended("IO")
        self.worker.failed_log.warning("truncated", dst=f"{self.orig[0]}:{self.orig[1]}", reason=why)
        self.abort()

    def app_writable(self, on: bool) -> None:
        self.can_write_app = on
        self.downstream_flow()

    def downstream_flow(self) -> None:
        active = self.active
        if isinstance(active, _Exchange) and active.final is not None and active.final.state == "forward":
            active.final.up.reading(self.can_write_app)

    # --- counting ------------------------------------------------------------------------

    def _count(self, status: int, tls_labels: str = "") -> None:
        """The per-request families (request_total, response_total, response_latency_ms) count
        routed requests as the L4 accounting does: target_addr the address the app dialled."""
        metrics = self.proxy.metrics
        req = self._request()
        if metrics is None or req is None or not self.proxy.settings.http_accounting:
            return
        base = join(OUTBOUND, self.target, tls_labels or NO_ENDPOINT)
        cache = self.worker.http
        http = cache.get(base)
        if http is None:
            http = cache[base] = metrics.http(base)
        http.exchange(req.method, status, time.monotonic() - req.started)
        if self.app.metrics is not None:
            self.app.metrics.http = http  # held (not idle-dropped) while the connection is open

    # --- refusals, upgrades, the end -----------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        if self.active is None or isinstance(self.active, _Request):
            self.respond(status, message, True)
            self._shutdown()
        else:
            self.abort()  # a response is under way: nothing sane can be written

    def _tunnel_to(self, req: _Request, rule: Rule) -> None:
        """Upgrade / CONNECT: the route's endpoint for it, then L4 (the head and what follows)."""
        self.tunnel = True
        self.reading = False
        if self.app.transport is not None:
            self.app.transport.pause_reading()
        if self.proxy.metrics is not None:
            self.proxy.metrics.routes.routed_fallback("upgrade")
        task = asyncio.get_running_loop().create_task(self._tunnel(req, rule), name="h1-tunnel")
        self.proxy._tasks.add(task)
        task.add_done_callback(self.proxy._tasks.discard)

    def _upgrade_bytes(self, rest: bytes) -> None:
        if self.tunnel and rest:
            self.tunnel_bytes.insert(0, rest)  # (the tunnel's first bytes)
        elif not self.tunnel:
            self._refuse(400, "a pipelined upgrade is not supported")

    async def _tunnel(self, req: _Request, rule: Rule) -> None:
        ctx = self.ctx
        backend = rule.pick(ctx.rng, lambda b: ctx.balancer.available(b, ctx.endpoints(b)))
        pick = None if backend is None else ctx.balancer.pick(backend, ctx.endpoints(backend))
        if pick is None:
            self._count(503)
            self.respond(503, "no backend of this route is available (fail-fast)", True)
            self._shutdown()
            return
        made = await originate_endpoint(self.proxy, pick.endpoint)
        if ctx.balancer.finished(pick, "connect_failed" if isinstance(made, Failed) else "success", 1) or (
            isinstance(made, Failed)
        ):  # a back-off began or ended: the gauge follows the balancer's counts
            ctx.gauge(self.policy.parent, pick.backend)
        if isinstance(made, Failed):
            self._count(502)
            self.respond(502, "connection to the backend endpoint failed", True)
            self._shutdown()
            return
        app, leg = self.app, made.leg
        if self.closed or app.closed:
            leg.close()
            return
        self._count(200 if req.method == b"CONNECT" else 101, made.tls_labels)
        # From here the connection is L4 to the endpoint: the request head as received, what
        # followed it, then the legs relay (pairing replays the app's reads in flight).
        self.closed = True
        app.peer = app.forward = None
        self.peer = self.forward = None
        head = [req.method, b" ", req.url, b" HTTP/", req.version, b"\r\n"]
        for name, value in req.headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        leg.send(b"".join(head) + b"".join(self.tunnel_bytes))
        self.tunnel_bytes.clear()
        app.pair(leg)

    def _shutdown(self) -> None:
        """Done with the app: what was written is flushed, then the connection closes."""
        if self.closed:
            return
        app = self.app
        self._teardown(False)
        if not app.closed:
            app.close()

    def _teardown(self, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        active = self.active
        self.active = None
        for req in (*self.waiting, self._request_of(active), self.building):
            if req is not None:
                self._release_kept(req)
        self.waiting.clear()
        if isinstance(active, _Exchange):
            active.ended("CANCEL")  # (a no-op unless a relayed response was cut short)
            if active.deadline_timer is not None:
                active.deadline_timer.cancel()
            for attempt in (active.current, active.final):
                if attempt is not None and attempt.state != "done":
                    active._drop(attempt)
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        app = self.app
        if not app.closed:
            if abort:
                app.abort()
            else:
                app.close()
        self.peer = self.forward = None
