"""HTTP/2 client connections to routed endpoints, shared by every app connection of a worker.

`H2Upstream` is a transport-less relay `Leg` paired with one originated leg (mTLS to the
endpoint's own identity, from originate.py): the endpoint's bytes come in through `send`, the
client side of an `h2` connection answers them, and its output goes out through the pair.
Streams belong to handlers (one per routed attempt, h2_router.py) that get the response's events.

`H2Pool` keeps the connections per endpoint: a stream goes on the first connection with room
(the server's SETTINGS_MAX_CONCURRENT_STREAMS, at most `max_streams`), a new connection is
opened when all are full; concurrent openers of one endpoint share one connect (a task of its
own: a request that gives up never cancels it for the others). A GOAWAY puts a connection in
drain (no new streams; streams up to its last-stream-id finish, later ones are refused
unprocessed); the next request opens its replacement. A connection without streams for 60 s is
closed; at Proxy.stop the pool drains (idle ones close at once).

Flow control both ways, no buffer grows: request DATA is queued per stream and sent as the
endpoint's window allows (the router acknowledges the app's DATA once it left the queue), and
response DATA is acknowledged to the endpoint only once the router consumed it (`consumed`). The
connection-level window is as large as all stream windows together, so a slow app stream holds
its own window, never its neighbours'; response bytes the router drops are acknowledged too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

from ..logs import get_logger
from .relay import Leg
from .routes import EndpointRef

log = get_logger("meshagent.proxy.h2_upstream")

Header = tuple[bytes, bytes]
DEFAULT_WINDOW: Final = 65535
MAX_HEADER_LIST: Final = 64 * 1024
MAX_STREAMS: Final = 100  # per connection, whatever the server allows (and before its SETTINGS)
IDLE_S: Final = 60.0  # a connection without streams this long is closed
OPEN_TRIES: Final = 4  # connections opened for one stream that others filled up first, at most


class StreamHandler(Protocol):
    """What an upstream stream reports (all called from the event loop, never raising)."""

    def on_response(self, headers: list[Header], ended: bool) -> None: ...
    def on_data(self, data: bytes, flow: int) -> None: ...
    def on_trailers(self, headers: list[Header]) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, error: str, refused: bool) -> None: ...
    def on_batch_end(self) -> None: ...
    def on_sent(self) -> None: ...


@dataclass(frozen=True)
class ConnectFailed:
    """Why no connection to an endpoint: `kind` as originate's (connect, tls, identity, ...)."""

    kind: str
    reason: str


class _Flow:
    """The stand-in transport: the originated leg pauses and resumes "reading" here when its
    socket's write buffer fills and drains; the request bodies wait meanwhile."""

    __slots__ = ("conn",)

    def __init__(self, conn: H2Upstream) -> None:
        self.conn = conn

    def pause_reading(self) -> None:
        self.conn.writable = False

    def resume_reading(self) -> None:
        self.conn._writable_again()

    def is_closing(self) -> bool:
        return self.conn.closed

    def close(self) -> None:
        self.conn.close()

    def abort(self) -> None:
        self.conn.close()

    def can_write_eof(self) -> bool:
        return False


class _Out:
    """A stream's request body waiting for the endpoint's window."""

    __slots__ = ("chunks", "end", "ended")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.end = False  # end the stream once the chunks went
        self.ended = False


class _DrainingH2(H2Connection):
    """h2's connection, but a graceful GOAWAY (NO_ERROR) lets the streams up to its last stream
    id finish, as RFC 9113 §6.8 says: h2 itself closes the connection state at any GOAWAY, so
    the responses still coming would be protocol errors. New streams are never opened on it
    (H2Upstream drains). A GOAWAY with an error code stays terminal."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class H2Upstream(Leg):
    """One HTTP/2 client connection to one endpoint (see the module docstring)."""

    def __init__(
        self,
        key: str,
        on_gone: Callable[[H2Upstream], None],
        max_streams: int = MAX_STREAMS,
        tls_labels: str = "",
    ) -> None:
        super().__init__()
        self.key = key
        self.tls_labels = tls_labels  # the endpoint's, for the per-request families
        self.on_gone = on_gone
        self.max_streams = max_streams
        self.transport = _Flow(self)  # type: ignore[assignment]
        self.handlers: dict[int, StreamHandler] = {}
        self.outs: dict[int, _Out] = {}
        self.batch: list[StreamHandler] = []  # handlers that saw a response head in this read
        self.writable = True
        self.draining = False  # GOAWAY received or sent: no new streams
        self.output: list[bytes] = []
        self.idle_timer: asyncio.TimerHandle | None = None
        config = H2Configuration(client_side=True, header_encoding=None)
        self.h2 = conn = _DrainingH2(config)
        conn.local_settings = Settings(
            client=True,
            initial_values={SettingCodes.ENABLE_PUSH: 0, SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST},
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(max_streams * DEFAULT_WINDOW)

    # --- what the router uses -----------------------------------------------------------------

    def has_room(self) -> bool:
        if self.closed or self.draining:
            return False
        limit = min(self.max_streams, self.h2.remote_settings.max_concurrent_streams)
        return len(self.handlers) < limit

    def open(self, headers: list[Header], handler: StreamHandler, end_stream: bool) -> int | None:
        """Start a stream; None when the connection cannot take it (closed, draining, full)."""
        if not self.has_room():
            return None
        sid = self.h2.get_next_available_stream_id()
        try:
            self.h2.send_headers(sid, headers, end_stream=end_stream)
        except ProtocolError as exc:
            log.debug("h2_upstream.open_refused", error=str(exc))
            return None
        self.handlers[sid] = handler
        out = self.outs[sid] = _Out()
        out.end = out.ended = end_stream
        self._cancel_idle()
        self._flush()
        return sid

    def send_body(self, sid: int, data: bytes, end: bool) -> None:
        out = self.outs.get(sid)
        if out is None or out.ended:
            return
        if data:
            out.chunks.append(data)
        out.end = out.end or end
        self._pump(sid, out)
        self._flush()

    def queued(self, sid: int) -> bool:
        """Request bytes of `sid` still waiting for the endpoint's window or socket."""
        out = self.outs.get(sid)
        return out is not None and bool(out.chunks)

    def consumed(self, sid: int, flow: int) -> None:
        """The router took (or dropped) `flow` bytes of `sid`'s response: the endpoint may send
        more. Also once the stream ended or was cancelled: the connection's window is shared,
        and bytes never acknowledged would shrink it for every other stream for good."""
        if flow and not self.closed:
            with contextlib.suppress(ProtocolError, KeyError):
                self.h2.acknowledge_received_data(flow, sid)
            self._flush()

    def cancel(self, sid: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """The router is done with `sid` (a discarded attempt, a client that went away)."""
        if self.handlers.pop(sid, None) is None:
            return
        self.outs.pop(sid, None)
        if not self.closed:
            with contextlib.suppress(ProtocolError, KeyError):
                self.h2.reset_stream(sid, code)
            self._flush()
            self._maybe_idle()

    def drain(self) -> None:
        """No new streams; close once the open ones ended."""
        self.draining = True
        if not self.handlers:
            self.close()

    # --- the endpoint side (Leg API) ----------------------------------------------------------

    def sink(self) -> Callable[[bytes], object]:
        return self.send

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.warning("h2_upstream.protocol_error", error=type(exc).__name__)
            self._flush()
            self._teardown("IO")
            return
        for event in events:
            try:
                self._event(event)
            except Exception as exc:  # a handler's bug ends this connection, never the worker
                log.warning("h2_upstream.failed", error=repr(exc))
                self._teardown("UNKNOWN")
                return
        batch, self.batch = self.batch, []
        for handler in batch:
            handler.on_batch_end()
        self._flush()
        if self.draining and not self.handlers:
            self.close()

    def send_many(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.send(chunk)

    def send_eof(self) -> None:
        self._teardown("IO")

    def start(self) -> None:
        if self.output and self.forward is not None:
            data = b"".join(self.output)
            self.output.clear()
            self._write(data)

    def close(self) -> None:
        self._teardown("IO")

    def abort(self) -> None:
        self._teardown("IO")

    # --- events -------------------------------------------------------------------------------

    def _event(self, event: object) -> None:
        if isinstance(event, DataReceived):
            handler = self.handlers.get(event.stream_id)
            if handler is None:
                with contextlib.suppress(ProtocolError, KeyError):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            handler.on_data(bytes(event.data or b""), event.flow_controlled_length)
        elif isinstance(event, ResponseReceived):
            handler = self.handlers.get(event.stream_id)
            if handler is not None:
                ended = event.stream_ended is not None
                headers = [(bytes(n), bytes(v)) for n, v in event.headers or ()]
                if ended:
                    self._forget(event.stream_id)
                handler.on_response(headers, ended)
                if not ended:
                    self.batch.append(handler)
        elif isinstance(event, TrailersReceived):
            handler = self.handlers.get(event.stream_id)
            if handler is not None:
                self._forget(event.stream_id)
                handler.on_trailers([(bytes(n), bytes(v)) for n, v in event.headers or ()])
        elif isinstance(event, StreamEnded):
            handler = self.handlers.get(event.stream_id)
            if handler is not None:
                self._forget(event.stream_id)
                handler.on_end()
        elif isinstance(event, StreamReset):
            handler = self.handlers.pop(event.stream_id, None)
            self.outs.pop(event.stream_id, None)
            if handler is not None:
                refused = event.error_code == ErrorCodes.REFUSED_STREAM
                handler.on_reset("REFUSED" if refused else "RESET", refused)
            self._maybe_idle()
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                out = self.outs.get(event.stream_id)
                if out is not None:
                    self._pump(event.stream_id, out)
            else:
                self._pump_all()
        elif isinstance(event, ConnectionTerminated):
            self._goaway(event.last_stream_id)
        elif isinstance(event, InformationalResponseReceived):
            pass  # 1xx: not forwarded (the router answers its app's Expect itself: never sent)

    def _goaway(self, last: int | None) -> None:
        """The endpoint stops taking streams: those past `last` were never processed (retryable);
        the others finish here, then the connection closes. The pool opens its replacement."""
        self.draining = True
        self.on_gone(self)
        last = last if last is not None else 0
        for sid in [s for s in self.handlers if s > last]:
            handler = self.handlers.pop(sid)
            self.outs.pop(sid, None)
            handler.on_reset("GO_AWAY", True)

    def _forget(self, sid: int) -> None:
        """The response ended: the stream is no longer the connection's to report."""
        self.handlers.pop(sid, None)
        out = self.outs.pop(sid, None)
        if out is not None and not out.ended:
            # Answered before the request body finished: the rest is not wanted (RFC 9113 §8.1).
            with contextlib.suppress(ProtocolError, KeyError):
                self.h2.reset_stream(sid, ErrorCodes.NO_ERROR)
        self._maybe_idle()

    # --- request bodies -----------------------------------------------------------------------

    def _pump(self, sid: int, out: _Out) -> None:
        h2conn = self.h2
        sent = False
        try:
            while out.chunks and self.writable:
                window = h2conn.local_flow_control_window(sid)
                if window <= 0:
                    break
                chunk = out.chunks[0]
                size = min(window, h2conn.max_outbound_frame_size, len(chunk))
                if size < len(chunk):
                    out.chunks[0] = chunk[size:]
                    chunk = chunk[:size]
                else:
                    out.chunks.popleft()
                h2conn.send_data(sid, chunk)
                sent = True
            if not out.chunks and out.end and not out.ended:
                out.ended = True
                h2conn.end_stream(sid)
        except (ProtocolError, KeyError):  # the stream was closed meanwhile (reset, answered)
            out.chunks.clear()
            out.ended = True
        if sent and not out.chunks:
            handler = self.handlers.get(sid)
            if handler is not None:
                handler.on_sent()

    def _pump_all(self) -> None:
        for sid, out in list(self.outs.items()):
            if out.chunks or (out.end and not out.ended):
                self._pump(sid, out)

    def _writable_again(self) -> None:
        self.writable = True
        self._pump_all()
        self._flush()

    # --- the connection -----------------------------------------------------------------------

    def _flush(self) -> None:
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
            return
        self.rx += len(data)  # what the endpoint's leg is sent: its tx
        # Past the write high-water mark the transport calls pause_writing at once: writable goes False.
        self.forward(data)  # type: ignore[misc]

    def _maybe_idle(self) -> None:
        if self.handlers or self.closed:
            return
        if self.draining:
            self.close()
            return
        if self.idle_timer is None:
            self.idle_timer = asyncio.get_running_loop().call_later(IDLE_S, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        if not self.handlers and not self.closed:
            self.draining = True
            self.on_gone(self)
            with contextlib.suppress(ProtocolError):
                self.h2.close_connection(ErrorCodes.NO_ERROR)
            self._flush()
            self.close()

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _teardown(self, error: str) -> None:
        """The connection is over: every stream still open learns it (no response yet: a
        connection error, retryable; mid-response: the router resets its app stream)."""
        if self.closed:
            return
        self.closed = True
        self.draining = True
        self._cancel_idle()
        self.on_gone(self)
        handlers, self.handlers = self.handlers, {}
        self.outs.clear()
        self.batch.clear()
        for handler in handlers.values():
            handler.on_reset(error, False)
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.close()
        self.peer = self.forward = None


@dataclass(frozen=True)
class Connected:
    """An upstream leg (handshake done, not yet paired) and its metric labels."""

    leg: Leg
    tls_labels: str = ""


Connector = Callable[[EndpointRef], Awaitable["Connected | ConnectFailed"]]


class H2Pool:
    """HTTP/2 connections per endpoint, shared by a worker's routed app connections. Keyed by
    `EndpointRef.key` (a str, its hash cached: one lookup per stream)."""

    def __init__(
        self, connect: Connector, max_streams: int = MAX_STREAMS, retry_total: int = 32 * 1024 * 1024
    ) -> None:
        self.connect = connect
        self.max_streams = max_streams
        # Request bodies the routers keep for retries, over all app connections of the worker.
        self.retry_total = retry_total
        self.retry_held = 0
        self.conns: dict[str, list[H2Upstream]] = {}
        self.opening: dict[str, asyncio.Task[H2Upstream | ConnectFailed]] = {}
        self.opened = 0  # connections opened so far (status, tests)

    def connection(self, endpoint: EndpointRef) -> H2Upstream | None:
        """A live connection to `endpoint` with room for one more stream, if any (no await)."""
        for conn in self.conns.get(endpoint.key, ()):
            if conn.has_room():
                return conn
        return None

    async def get(self, endpoint: EndpointRef) -> H2Upstream | ConnectFailed:
        """A connection with room for a stream: an existing one, else a new one. One connect per
        endpoint at a time, shared by the requests waiting for it and running as its own task:
        a waiter that gives up (its deadline, its app) never cancels the others' connect."""
        for _ in range(OPEN_TRIES):
            conn = self.connection(endpoint)
            if conn is not None:
                return conn
            key = endpoint.key
            task = self.opening.get(key)
            if task is None or task.done():
                opening = self._open(endpoint)
                task = asyncio.get_running_loop().create_task(opening, name="h2-upstream-connect")
                self.opening[key] = task
                task.add_done_callback(functools.partial(self._opened, key))
            result = await asyncio.shield(task)
            if isinstance(result, ConnectFailed) or result.has_room():
                return result
            # Filled up by the other waiters already: look again, open another.
        return ConnectFailed("connect", "no connection with room for a stream")

    def _opened(self, key: str, task: asyncio.Task[H2Upstream | ConnectFailed]) -> None:
        if self.opening.get(key) is task:
            del self.opening[key]

    async def _open(self, endpoint: EndpointRef) -> H2Upstream | ConnectFailed:
        try:
            made = await self.connect(endpoint)
        except (OSError, TimeoutError) as exc:
            return ConnectFailed("connect", str(exc) or "timeout")
        if isinstance(made, ConnectFailed):
            return made
        if made.leg.closed:
            return ConnectFailed("connect", "closed right after connecting")
        conn = H2Upstream(endpoint.key, self._gone, self.max_streams, made.tls_labels)
        made.leg.pair(conn)
        self.conns.setdefault(endpoint.key, []).append(conn)
        self.opened += 1
        return conn

    def _gone(self, conn: H2Upstream) -> None:
        conns = self.conns.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.conns[conn.key]

    def close(self) -> None:
        for conns in list(self.conns.values()):
            for conn in list(conns):
                conn.close()
        self.conns.clear()

    def drain(self) -> None:
        """The proxy is stopping: idle connections close now, busy ones once their streams
        ended (none is handed out again), so they do not hold the proxy's drain."""
        for conns in list(self.conns.values()):
            for conn in list(conns):
                conn.drain()
        self.conns.clear()

    def status(self) -> dict[str, int]:
        live = [c for conns in self.conns.values() for c in conns]
        return {
            "endpoints": len(self.conns),
            "connections": len(live),
            "streams": sum(len(c.handlers) for c in live),
            "opened": self.opened,
            "retry_held": self.retry_held,
        }
