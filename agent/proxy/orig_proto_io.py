"""The gateway for upgraded connections: HTTP/2 (`h2`, sans-IO) facing an in-cluster
linkerd2-proxy, HTTP/1 (`h11`, sans-IO) facing the app, glued by asyncio callbacks.

`OrigProtoGateway` is a relay `Leg` paired with the client's (decrypted) leg: the client's bytes
come in through `send`, and the gateway's HTTP/2 output goes to the client through the pair. Each
request stream is downgraded (orig_proto.py) and sent over an HTTP/1 connection to the app from a
bounded per-connection pool (`max_app_connections` open, `max_idle_app_connections` kept for
keep-alive reuse; streams past the bound wait for one), its response sent back as HTTP/2.

Flow control holds both ways without buffers growing: the client's DATA is acknowledged (its
window reopened) only once the app's socket took it below the write high-water mark, and an app
connection stops being read while its stream's response bytes wait for the client's window or
for the client's socket to drain.

Bounds: SETTINGS_MAX_CONCURRENT_STREAMS = `max_streams`; a stream past it is refused with
RST_STREAM(REFUSED_STREAM) (h2 would end the whole connection; this lets it enforce a higher hard
cap only as a backstop) and counted; header lists at `max_header_list_size` (h2 ends the
connection past it); client bytes go to h2 in slices so one read cannot open more than a few
hundred streams before they are refused. Nothing raises out of the gateway: an h2 protocol error
ends the connection with GOAWAY and is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import h11
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from ..logs import Throttled, get_logger
from .http1 import HttpSink
from .orig_proto import (
    REFUSED,
    FrameGuard,
    Http1Request,
    Refusal,
    downgrade_request,
    upgrade_response,
    upgrade_trailers,
)
from .relay import WRITE_HIGH_WATER, Leg

log = get_logger("meshagent.proxy.orig_proto")
Address = tuple[str, int]

SLICE: Final = 4096  # client bytes per h2.receive_data: <= 410 new streams before we refuse them
DEFAULT_WINDOW: Final = 65535  # SETTINGS_INITIAL_WINDOW_SIZE, h2's and RFC 9113's default
MAX_HEAD: Final = 64 * 1024  # an app response head, at most (h11's buffer bound)


@dataclass(frozen=True)
class GatewaySettings:
    max_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS; past it RST_STREAM(REFUSED_STREAM)
    max_app_connections: int = 100  # HTTP/1 connections to the app per client connection
    max_idle_app_connections: int = 100  # kept open for reuse (linkerd's inbound: unbounded)...
    idle_app_timeout_s: float = 3.0  # ...for this long (linkerd's inbound HTTP/1 pool default)
    max_header_list_size: int = 65536


class _Stream:
    """One upgraded request and its response."""

    __slots__ = (
        "answered",
        "conn",
        "ended",
        "id",
        "method",
        "out",
        "pending",
        "request",
        "request_done",
        "responded",
        "response_done",
        "started",
        "status",
        "trailers",
        "unacked",
        "version",
    )

    def __init__(self, stream_id: int, request: h11.Request, version: bytes, started: float) -> None:
        self.id = stream_id
        self.request = request
        self.method = request.method
        self.started = started
        self.conn: _AppConn | None = None
        self.pending: list[bytes] = []  # request body waiting for an app connection
        self.unacked = 0  # flow-controlled bytes taken but not yet acknowledged
        self.request_done = False
        self.responded = False  # response headers sent
        self.response_done = False  # the app's response ended (bytes may still wait in `out`)
        self.ended = False  # the HTTP/2 stream was finished (or reset) on our side
        self.out: deque[bytes] = deque()  # response body waiting for the client's window
        self.trailers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.answered: float | None = None
        self.version = version  # the request line's: h11 writes HTTP/1.1, patched for 1.0


class _AppConn(Leg):
    """One HTTP/1 connection to the app. Not paired: its bytes go to the gateway's h11 client."""

    __slots__ = ("gateway", "h11", "idle_since", "paused", "reusable", "stream")

    def __init__(self, gateway: OrigProtoGateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.stream: _Stream | None = None
        self.paused = False  # reading paused: the stream's response waits for the client
        self.reusable = True
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.resume_reading()  # not paired, but read at once: h11 parses what comes

    def data_received(self, data: bytes) -> None:
        self.rx += len(data)
        self.gateway._app_data(self, data)

    def eof_received(self) -> bool:
        self.read_eof = True
        self.gateway._app_data(self, b"")
        return False  # an HTTP/1 server that ends its side is done with the connection

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.gateway._app_lost(self)

    def pause_writing(self) -> None:
        pass  # the stream's acknowledgements wait (see `write`)

    def resume_writing(self) -> None:
        self.gateway._app_drained(self)

    def write(self, data: bytes) -> bool:
        """Write to the app; True while its buffer is below the high-water mark."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        self.tx_settled += len(data)
        return transport.get_write_buffer_size() < WRITE_HIGH_WATER

    def set_reading(self, on: bool) -> None:
        if self.transport is None or self.closed or on != self.paused:
            return
        self.paused = not on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()


class _ClientFlow:
    """The gateway's stand-in transport: the client leg pauses and resumes "reading" here when
    its socket's write buffer fills and drains, which pauses the app connections' reads."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: OrigProtoGateway) -> None:
        self.gateway = gateway

    def pause_reading(self) -> None:
        self.gateway._client_writable(False)

    def resume_reading(self) -> None:
        self.gateway._client_writable(True)

    def is_closing(self) -> bool:
        return self.gateway.closed

    def close(self) -> None:
        self.gateway.close()

    def abort(self) -> None:
        self.gateway.abort()

    def can_write_eof(self) -> bool:
        return False


class OrigProtoGateway(Leg):
    """Serves one upgraded HTTP/2 connection (see the module docstring and interfaces.md)."""

    def __init__(
        self,
        app: Address,
        connect: Callable[[Address, Leg], Awaitable[Leg]],
        http: HttpSink | None,
        settings: GatewaySettings = GatewaySettings(),  # frozen: one shared default is safe
        on_refused: Callable[[str], None] | None = None,
        observe_app: Callable[[Leg], None] | None = None,
    ) -> None:
        super().__init__()
        self.app = app
        self.connect = connect
        self.http = http
        self.settings = settings
        self.on_refused = on_refused
        self.observe_app = observe_app
        self.transport = _ClientFlow(self)  # type: ignore[assignment]
        self.streams: dict[int, _Stream] = {}
        self.conns: set[_AppConn] = set()
        self.idle: list[_AppConn] = []
        self.waiting: deque[_Stream] = deque()
        self.opening = 0
        self.sweep: asyncio.TimerHandle | None = None  # closes idle app connections
        self.tasks: set[asyncio.Task[None]] = set()
        self.writable = True
        self.client_done = False  # the client finished writing
        self.output: list[bytes] = []  # before pairing
        self.log = Throttled(log, "orig_proto.refused")
        self.guard = FrameGuard()  # our SETTINGS keep h2's default SETTINGS_MAX_FRAME_SIZE, 16 KiB
        config = H2Configuration(client_side=False, header_encoding=None)
        self.h2 = conn = H2Connection(config)
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            },
        )
        conn.initiate_connection()  # our SETTINGS advertise `max_streams`...
        # ...while h2 itself enforces only a backstop: past `max_streams` this gateway refuses the
        # stream (RST_STREAM REFUSED_STREAM, the client may retry) where h2 would end the connection.
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_streams + SLICE // 9 + 1,
                SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            },
        )
        conn.decoder.max_header_list_size = settings.max_header_list_size
        # A connection window as large as all streams' windows together: a stream's DATA stays
        # unacknowledged until the app took it, and streams waiting for an app connection must
        # not hold the window the served ones need (it would deadlock at the pool's bound).
        # Memory stays bounded by the stream windows: max_streams x 64 KiB.
        conn.increment_flow_control_window(settings.max_streams * DEFAULT_WINDOW)

    # --- the client side (Leg API) -------------------------------------------------------

    def sink(self) -> Callable[[bytes], object]:
        return self.send

    def send(self, data: bytes) -> None:
        """Bytes from the client."""
        if self.closed:
            return
        if not self.guard.feed(data):
            self._refused("h2_protocol_error", error="frame_too_large")
            self._terminate(ErrorCodes.FRAME_SIZE_ERROR)
            return
        try:
            for start in range(0, len(data), SLICE):
                events = self.h2.receive_data(data[start : start + SLICE])
                for event in events:
                    self._event(event)
                if self.closed:
                    return
        except ProtocolError as exc:
            self._refused("h2_protocol_error", error=type(exc).__name__)
            self._flush()
            self._shutdown()
            return
        except Exception as exc:  # never out of the relay's callback: end this connection only
            log.warning("orig_proto.failed", error=repr(exc))
            self._terminate(ErrorCodes.INTERNAL_ERROR)
            return
        self._flush()

    def send_many(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.send(chunk)

    def send_eof(self) -> None:
        """The client's end of stream ends the connection, its streams unanswered (HTTP/2 has no
        half-close: Rust's h2, under linkerd2-proxy, fails open streams at EOF as well); a leg
        left waiting for app responses nobody reads would outlive the client."""
        self.client_done = True
        self._shutdown()

    def start(self) -> None:
        if self.output and self.forward is not None:
            self._write(b"".join(self.output))
            self.output.clear()

    def close(self) -> None:
        self._teardown(abort=False)

    def abort(self) -> None:
        self._teardown(abort=True)

    # --- HTTP/2 events -------------------------------------------------------------------

    def _event(self, event: object) -> None:
        if isinstance(event, DataReceived):
            self._body(event)
        elif isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, StreamEnded):
            self._request_end(event.stream_id)
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self._pump(stream)
            else:
                for stream in list(self.streams.values()):
                    self._pump(stream)
        elif isinstance(event, StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.ended = True
                self._done(stream, reusable=False)
        elif isinstance(event, ConnectionTerminated):
            self._shutdown()
        # TrailersReceived: request trailers are dropped (an HTTP/1 request keeps none through
        # linkerd's downgrade); the StreamEnded that follows ends the body.

    def _request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        ended = event.stream_ended is not None
        if len(self.streams) >= self.settings.max_streams:
            self._reset(sid, ErrorCodes.REFUSED_STREAM)
            self._refused("h2_refused_stream", stream=sid)
            return
        now = time.monotonic()
        fields: list[tuple[bytes, bytes]] = [(bytes(n), bytes(v)) for n, v in event.headers or ()]
        result = downgrade_request(fields, ended)
        if result is None:  # native HTTP/2 on an upgraded connection: linkerd never mixes them
            self._reset(sid, ErrorCodes.REFUSED_STREAM)
            self._refused("orig_proto_mixed", stream=sid)
            return
        method = dict(fields).get(b":method", b"")
        if isinstance(result, Refusal):
            self._reject(sid, method, now, ended, result)
            return
        request = _h11_request(result)
        if isinstance(request, Refusal):
            self._reject(sid, method, now, ended, request)
            return
        stream = _Stream(sid, request, result.version, now)
        stream.request_done = ended
        self.streams[sid] = stream
        self._assign(stream)

    def _reject(self, sid: int, method: bytes, started: float, ended: bool, refusal: Refusal) -> None:
        """Answer 400 (no app involved) and count it: a request answered by the proxy."""
        self._refused(refusal.reason, stream=sid, detail=refusal.detail)
        fields = [
            (b":status", b"400"),
            (b"content-length", b"0"),
            (b"l5d-proxy-error", refusal.reason.encode()),
        ]
        self.h2.send_headers(sid, fields, end_stream=True)
        if not ended:
            self._reset(sid, ErrorCodes.NO_ERROR)  # its body is not wanted (RFC 9113 §8.1)
        if self.http is not None:
            self.http.exchange(method, 400, time.monotonic() - started)

    def _body(self, event: DataReceived) -> None:
        sid, size = event.stream_id, event.flow_controlled_length
        stream = self.streams.get(sid)
        data = event.data or b""
        if stream is None or stream.ended or stream.response_done:
            self.h2.acknowledge_received_data(size, sid)  # a refused or finished stream's body
            return
        conn = stream.conn
        if conn is None:
            if data:
                stream.pending.append(bytes(data))
            stream.unacked += size  # acknowledged once it reaches the app
            return
        if not data:
            self.h2.acknowledge_received_data(size, sid)
            return
        try:
            below = conn.write(conn.h11.send(h11.Data(data=bytes(data))) or b"")
        except h11.LocalProtocolError:  # more body than its content-length said
            self._fail(stream, ErrorCodes.PROTOCOL_ERROR)
            self.h2.acknowledge_received_data(size, sid)
            return
        if below:
            self.h2.acknowledge_received_data(size + stream.unacked, sid)
            stream.unacked = 0
        else:
            stream.unacked += size  # acknowledged when the app's socket drains

    def _request_end(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.request_done:
            return
        stream.request_done = True
        conn = stream.conn
        if conn is not None and not stream.response_done:
            self._end_request(stream, conn)
        elif conn is not None and stream.response_done:
            self._finish_stream(stream)

    def _end_request(self, stream: _Stream, conn: _AppConn) -> None:
        try:
            conn.write(conn.h11.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:  # less body than its content-length said
            self._fail(stream, ErrorCodes.PROTOCOL_ERROR)

    # --- the app pool --------------------------------------------------------------------

    def _assign(self, stream: _Stream) -> None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                self._bind(stream, conn)
                return
        if len(self.conns) + self.opening < self.settings.max_app_connections:
            self.opening += 1
            task = asyncio.get_running_loop().create_task(self._open(stream), name="orig-proto-connect")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self.waiting.append(stream)

    async def _open(self, stream: _Stream) -> None:
        conn = _AppConn(self)
        try:
            await self.connect(self.app, conn)
        except (OSError, TimeoutError) as exc:
            self.opening -= 1
            self._connect_failed(stream, exc)
            return
        except Exception as exc:  # a connect callable that fails otherwise: the same, logged
            self.opening -= 1
            log.warning("orig_proto.connect_failed", error=repr(exc))
            self._connect_failed(stream, exc)
            return
        self.opening -= 1
        if self.observe_app is not None:  # connected: its metrics open now and close with it
            self.observe_app(conn)
        if self.closed:
            conn.close()
            return
        self.conns.add(conn)
        if stream.ended or self.streams.get(stream.id) is not stream:
            self._release(conn)  # the client gave up meanwhile: the connection serves another
        else:
            self._bind(stream, conn)
        self._flush()

    def _connect_failed(self, stream: _Stream, exc: BaseException) -> None:
        if self.closed:
            return
        timeout = isinstance(exc, TimeoutError)
        self._refused("app_connect_failed", app=f"{self.app[0]}:{self.app[1]}", error=str(exc) or "timeout")
        if self.streams.get(stream.id) is stream and not stream.ended:
            self._respond_error(stream, 504 if timeout else 502)
        self._next_waiting()  # the slot is free again: the next waiting stream tries its own
        self._flush()

    def _bind(self, stream: _Stream, conn: _AppConn) -> None:
        stream.conn, conn.stream = conn, stream
        head = conn.h11.send(stream.request) or b""
        pending, stream.pending = stream.pending, []
        if stream.version == b"1.0":  # h11 writes only HTTP/1.1 request lines
            line_end = head.index(b"\r\n")
            head = head[: line_end - 3] + b"1.0" + head[line_end:]
            conn.reusable = False  # an HTTP/1.0 exchange may end with the connection
        conn.write(head)
        try:
            for chunk in pending:
                conn.write(conn.h11.send(h11.Data(data=chunk)) or b"")
        except h11.LocalProtocolError:
            self._fail(stream, ErrorCodes.PROTOCOL_ERROR)
            return
        if stream.request_done:
            self._end_request(stream, conn)
        self._app_drained(conn)  # acknowledge what it took, if its buffer allows

    def _next_waiting(self) -> None:
        while self.waiting:
            stream = self.waiting.popleft()
            if not stream.ended and self.streams.get(stream.id) is stream:
                self._assign(stream)
                return

    def _release(self, conn: _AppConn) -> None:
        """An app connection whose exchange completed: to a waiting stream, the idle list, or closed."""
        conn.stream = None
        conn.set_reading(True)
        while self.waiting:
            stream = self.waiting.popleft()
            if not stream.ended and self.streams.get(stream.id) is stream:
                self._bind(stream, conn)
                return
        if len(self.idle) < self.settings.max_idle_app_connections and not self.client_done:
            loop = asyncio.get_running_loop()
            conn.idle_since = loop.time()
            self.idle.append(conn)  # reused last in, first out: the oldest ones expire
            if self.sweep is None:
                self.sweep = loop.call_later(self.settings.idle_app_timeout_s, self._sweep_idle)
        else:
            conn.close()

    def _sweep_idle(self) -> None:
        """Close app connections idle past the timeout; come back while any stay idle."""
        self.sweep = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        expired = loop.time() - self.settings.idle_app_timeout_s
        for conn in [c for c in self.idle if c.idle_since <= expired]:
            self.idle.remove(conn)
            conn.close()
        if self.idle:
            oldest = min(c.idle_since for c in self.idle)
            delay = oldest + self.settings.idle_app_timeout_s - loop.time()
            self.sweep = loop.call_later(max(delay, 0.01), self._sweep_idle)

    # --- app events ----------------------------------------------------------------------

    def _app_data(self, conn: _AppConn, data: bytes) -> None:
        stream = conn.stream
        if stream is None:  # an idle connection that spoke or closed: not reusable
            conn.reusable = False
            conn.close()
            return
        try:
            conn.h11.receive_data(data)
            self._app_events(stream, conn)
        except h11.RemoteProtocolError as exc:
            conn.reusable = False
            log.debug("orig_proto.app_protocol_error", error=str(exc))
            if not stream.responded:
                self._respond_error(stream, 502)
            else:
                self._fail(stream, ErrorCodes.INTERNAL_ERROR)
            conn.close()
        except Exception as exc:
            log.warning("orig_proto.failed", error=repr(exc))
            self._fail(stream, ErrorCodes.INTERNAL_ERROR)
        self._flush()

    def _app_events(self, stream: _Stream, conn: _AppConn) -> None:
        while not stream.ended:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Data):
                if event.data:
                    if stream.answered is None:
                        stream.answered = time.monotonic()
                    stream.out.append(bytes(event.data))
                    self._pump(stream)
            elif isinstance(event, h11.Response):
                stream.status = event.status_code
                stream.responded = True
                fields = upgrade_response(event.status_code, event.http_version, list(event.headers))
                try:
                    self.h2.send_headers(stream.id, fields)
                except ProtocolError:
                    self._fail(stream, ErrorCodes.STREAM_CLOSED)
                    return
            elif isinstance(event, h11.EndOfMessage):
                stream.response_done = True
                stream.trailers = upgrade_trailers(list(event.headers))
                self._pump(stream)
            elif isinstance(event, h11.ConnectionClosed):
                conn.reusable = False
                return
            elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                # The Upgrade header never reaches the app (linkerd does not upgrade such
                # requests; connection fields are dropped): an app switching anyway gets no tunnel.
                conn.reusable = False
                self._respond_error(stream, 502)
                conn.close()
                return
            # InformationalResponse (100 Continue): the client's proxy answered its own client's
            # Expect already, and the body is being relayed: not forwarded, as hyper's client does.

    def _pump(self, stream: _Stream) -> None:
        """Send what the client's window allows; finish the stream once all of it went."""
        if stream.ended:
            return
        conn, out, h2conn = stream.conn, stream.out, self.h2
        try:
            while out and self.writable:
                window = h2conn.local_flow_control_window(stream.id)
                if window <= 0:
                    break
                chunk = out[0]
                size = min(window, h2conn.max_outbound_frame_size, len(chunk))
                if size < len(chunk):
                    out[0] = chunk[size:]
                    chunk = chunk[:size]
                else:
                    out.popleft()
                h2conn.send_data(stream.id, chunk)
        except ProtocolError:  # the client closed the stream: nothing more to send there
            self._fail(stream, ErrorCodes.STREAM_CLOSED)
            return
        if out:
            if conn is not None:
                conn.set_reading(False)  # until the client's window or socket opens
            return
        if stream.response_done:
            self._finish_stream(stream)
        elif conn is not None:
            conn.set_reading(True)

    def _finish_stream(self, stream: _Stream) -> None:
        if stream.ended or stream.out:
            return
        stream.ended = True
        try:
            if stream.trailers:
                self.h2.send_headers(stream.id, stream.trailers, end_stream=True)
            else:
                self.h2.end_stream(stream.id)
        except ProtocolError:  # reset by the client meanwhile
            self._done(stream, reusable=False)
            return
        if not stream.request_done:  # answered before its body ended: the rest is not wanted
            self._reset(stream.id, ErrorCodes.NO_ERROR)
        self._count(stream, stream.status, stream.answered)
        self._done(stream, reusable=stream.request_done)

    def _done(self, stream: _Stream, reusable: bool) -> None:
        """Forget a stream; its app connection goes back to the pool if its exchange completed."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            if not stream.responded or not stream.response_done:
                self._count(stream, 0, None)  # reset or cut off before its response ended
        if stream.unacked:
            self.h2.acknowledge_received_data(stream.unacked, stream.id)
            stream.unacked = 0
        conn, stream.conn = stream.conn, None
        if conn is not None:
            h = conn.h11
            if reusable and conn.reusable and h.our_state is h11.DONE and h.their_state is h11.DONE:
                h.start_next_cycle()
                self._release(conn)
            else:
                conn.reusable = False
                conn.stream = None
                conn.close()
        if self.client_done and not self.streams:
            self._shutdown()

    def _count(self, stream: _Stream, status: int, answered: float | None) -> None:
        if self.http is not None and stream.started >= 0:
            self.http.exchange(stream.method, status, (answered or time.monotonic()) - stream.started)
            stream.started = -1.0  # counted once

    def _respond_error(self, stream: _Stream, status: int) -> None:
        """No response from the app: answer `status` as linkerd does (502, or 504 on timeout)."""
        if stream.ended:
            return
        stream.responded = stream.response_done = True
        stream.status = status
        fields = [(b":status", str(status).encode()), (b"content-length", b"0")]
        try:
            self.h2.send_headers(stream.id, fields)
        except ProtocolError:
            self._fail(stream, ErrorCodes.STREAM_CLOSED)
            return
        stream.trailers = []
        self._finish_stream(stream)

    def _fail(self, stream: _Stream, code: ErrorCodes) -> None:
        if not stream.ended:
            stream.ended = True
            self._reset(stream.id, code)
        self._done(stream, reusable=False)

    def _app_drained(self, conn: _AppConn) -> None:
        stream = conn.stream
        if stream is not None and stream.unacked and not self.closed:
            transport = conn.transport
            if transport is not None and transport.get_write_buffer_size() < WRITE_HIGH_WATER:
                self.h2.acknowledge_received_data(stream.unacked, stream.id)
                stream.unacked = 0
                self._flush()

    def _app_lost(self, conn: _AppConn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        stream = conn.stream
        if stream is not None and not self.closed:
            if not stream.response_done:
                try:
                    conn.h11.receive_data(b"")  # a close without FIN ends a close-delimited body too
                    self._app_events(stream, conn)
                except h11.RemoteProtocolError:
                    pass
            if not stream.response_done:
                if not stream.responded:
                    self._respond_error(stream, 502)
                else:
                    self._fail(stream, ErrorCodes.INTERNAL_ERROR)
        if not self.closed:
            self._next_waiting()
        self._flush()

    # --- the client connection -----------------------------------------------------------

    def _client_writable(self, on: bool) -> None:
        self.writable = on
        if on:
            for stream in list(self.streams.values()):
                self._pump(stream)
            self._flush()
        else:
            for stream in self.streams.values():
                if stream.conn is not None:
                    stream.conn.set_reading(False)

    def _reset(self, sid: int, code: ErrorCodes) -> None:
        with contextlib.suppress(ProtocolError):  # already closed on both sides
            self.h2.reset_stream(sid, code)

    def _refused(self, reason: str, **fields: Any) -> None:
        REFUSED[reason] += 1
        if self.on_refused is not None:
            self.on_refused(reason)
        else:
            self.log.warning(reason, reason=reason, **fields)

    def _write(self, data: bytes) -> None:
        peer = self.peer
        transport = peer.transport if peer is not None else None
        if transport is None or transport.is_closing():
            return  # the client is gone (uvloop raises on a write to a closed transport)
        self.rx += len(data)  # what the client leg is sent: its tx
        self.forward(data)  # type: ignore[misc]

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if not data or self.closed:
            return
        if self.forward is None:
            self.output.append(data)
        else:
            self._write(data)

    def _terminate(self, code: ErrorCodes) -> None:
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection(code)
        self._flush()
        self._shutdown()

    def _shutdown(self) -> None:
        """The HTTP/2 connection is over: what was sent stays sent; the client leg closes."""
        self._flush()
        if self.peer is not None and not self.peer.closed:
            self.peer.send_eof()  # a TLS client gets its close_notify
        self._teardown(abort=False)

    def _teardown(self, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in list(self.streams.values()):
            if self.http is not None:
                self._count(stream, 0, None)
        self.streams.clear()
        self.waiting.clear()
        for conn in list(self.conns) + self.idle:
            conn.stream = None
            if abort:
                conn.abort()
            else:
                conn.close()
        self.conns.clear()
        self.idle.clear()
        for task in self.tasks:
            task.cancel()
        if self.sweep is not None:
            self.sweep.cancel()
        peer = self.peer
        if peer is not None and not peer.closed:
            if abort:
                peer.abort()
            else:
                peer.close()
        if self.on_closed is not None:
            self.on_closed(self, None)
        self.peer = self.forward = None


def _h11_request(request: Http1Request) -> h11.Request | Refusal:
    """The h11 event (h11 checks the head: Host present, names and values legal)."""
    try:
        return h11.Request(method=request.method, target=request.target, headers=request.headers)
    except h11.LocalProtocolError as exc:
        return Refusal("orig_proto_bad_request", str(exc))
