"""HTTP/1.x request accounting, sans-IO: `new_accounting()` picks the compiled implementation
(http1_framer.pyx: no Python runs per request) when it was built, else the pure-Python one in
this module, which watches a connection's two byte streams as they are
relayed (never changes or holds them) and reports each finished exchange.

For each request: the method, the response's status code, and the latency linkerd's
`response_latency_ms` measures: from the end of the request's head to the first byte of the
response's body (the read that brings it), or to the end of the response when it has no body
bytes (HEAD, 204, 304, an empty body, a 101); linkerd records it at the response body's
first frame (linkerd/http/metrics/src/requests/service.rs). The sink makes that whole
milliseconds, truncated, as linkerd does. An exchange is reported when its response ends (one
cut short after its head: status 0, no response, as before). It follows message framing only:
Content-Length, chunked transfer coding, responses without a body (HEAD, 1xx, 204, 304) and
bodies that end with the connection; pipelined requests queue up, each response answering (and
timed from) the oldest. A `101 Switching Protocols`, a CONNECT or a message that is not HTTP/1
ends accounting for the connection (the bytes still flow; they are just not counted as requests).

Parsing is llhttp's, through httptools, and it runs for every request of every connection on
both proxies, so Python frames are what it costs: `attach()` makes the relay's legs call the
parsers' `feed_data` themselves (C), and an exchange runs one Python callback for its request and
one for its response, plus one for each span of response body bytes in a read (llhttp's
`on_body`, which times the first body byte). httptools cannot be told that a response answers a
HEAD (no body, whatever its Content-Length says), so once a connection sends HEAD its responses
are framed by the small Python framer below (which gives up on a head over 64 KiB). As the
compiled accounting, it stops for a connection with more than `PIPELINE` requests awaiting their
responses: a client pipelining requests the app never answers cannot grow the agent.
"""

from __future__ import annotations

import re
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Final, Protocol

from httptools import (
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)

MAX_HEAD: Final = 64 * 1024
PIPELINE: Final = 64  # requests awaiting their responses, at most (as http1_framer.pyx's)

# Connections whose request accounting stopped at one of its bounds, by "<protocol>:<reason>"
# (`h2:streams`, ...): their bytes still flowed, their requests were no longer counted. Here,
# in the module every proxy loads, for the telemetry plane and `status` to show.
STOPPED: Final[Counter[str]] = Counter()
_STATUS: Final = re.compile(rb"[0-9]{3}")
_CHUNK_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")

OnExchange = Callable[[bytes, int, float], None]


class HttpSink(Protocol):
    """Where results go (`HttpMetrics`): one exchange at a time from the Python accounting (its
    latency in seconds, which the sink truncates to whole milliseconds), or totals per status code
    from the compiled one's drain (buckets: the latency histogram's, None for status 0; the
    latencies were truncated to whole milliseconds before they were bucketed and summed)."""

    def exchange(self, method: bytes, status: int, latency_s: float, grpc: int | None = None) -> None: ...
    def add(self, status: int, count: int, buckets: list[int] | None, sum_ms: float) -> None: ...


class Accounting(Protocol):
    """What the proxy uses of either implementation."""

    @property
    def active(self) -> bool: ...
    def attach(self, client: Tapped, server: Tapped) -> None: ...
    def client(self, data: bytes) -> None: ...
    def server(self, data: bytes) -> None: ...
    def closed(self) -> None: ...
    def drain(self) -> None: ...


try:
    from . import http1_framer as _compiled
except ImportError:  # built without Cython or a C compiler: see setup.py
    _compiled = None  # type: ignore[assignment]

IMPLEMENTATION: Final = "compiled" if _compiled is not None else "python"


def new_accounting(sink: HttpSink, clock: Callable[[], float] | None = None) -> Accounting:
    """HTTP/1 accounting for one connection, reporting to `sink`."""
    if _compiled is not None:
        return _compiled.Http1Accounting(sink, clock)
    return Http1Accounting(sink.exchange, clock or time.monotonic)


class Http1Accounting:
    """Feed it `client(data)` and `server(data)` as bytes cross; `on_exchange(method, status,
    latency_s)` is called once per finished exchange (status 0: no response came), `latency_s`
    running from the request's head to its response's first body byte (or end, if it had none).
    `closed()` at the end settles what is still open."""

    __slots__ = (
        "active",
        "answered",
        "client_on",
        "clock",
        "head_framer",
        "idle",
        "legs",
        "on_exchange",
        "pending",
        "requests",
        "responses",
        "status",
    )

    def __init__(self, on_exchange: OnExchange, clock: Callable[[], float] = time.monotonic) -> None:
        self.on_exchange = on_exchange
        self.clock = clock
        self.pending: deque[tuple[bytes, float]] = deque()  # requests awaiting their response
        self.status = 0  # of the response being completed
        self.answered: float | None = None  # when the response in progress's first body byte came
        # Empty while a response is in progress: the parser's on_message_begin is this list's
        # clear (a C call, no Python frame per response), on_message_complete refills it.
        self.idle: list[bool] = [True]
        self.active = True
        self.client_on = True  # off after an Upgrade request: what follows may not be HTTP
        self.requests: HttpRequestParser | None = HttpRequestParser(_RequestEvents(self))
        self.responses: HttpResponseParser | None = HttpResponseParser(_ResponseEvents(self))
        self.head_framer: _ResponseFramer | None = None  # responses, once HEAD was sent
        self.legs: tuple[Tapped, Tapped] | None = None

    def attach(self, client: Tapped, server: Tapped) -> None:
        """Have `client` and `server` (the relay's legs) feed the parsers directly: each read
        calls `leg.tap(data)`, and `leg.accounting.failed(leg, exc)` if that raises."""
        self.legs = (client, server)
        client.accounting = server.accounting = self
        self._retap()

    def client(self, data: bytes) -> None:
        """Bytes from the client (requests)."""
        if self.client_on:
            try:
                self.requests.feed_data(data)  # type: ignore[union-attr]
            except (HttpParserUpgrade, HttpParserError) as exc:
                self._client_error(exc)

    def server(self, data: bytes) -> None:
        """Bytes from the server (responses)."""
        if not self.active:
            return
        if self.head_framer is not None:
            self.head_framer.feed(data)
            return
        try:
            self.responses.feed_data(data)  # type: ignore[union-attr]
        except (HttpParserUpgrade, HttpParserError):
            self._stop()

    def drain(self) -> None:
        """Nothing is kept back here: each exchange went to `on_exchange` as it finished."""

    def failed(self, leg: Tapped, exc: Exception) -> None:
        """A parser fed by `leg` raised (see `attach`)."""
        if not isinstance(exc, HttpParserUpgrade | HttpParserError):
            raise exc
        if self.legs is not None and leg is self.legs[0]:
            self._client_error(exc)
        else:  # 101 Switching Protocols (counted already), or the server does not speak HTTP/1
            self._stop()

    def _client_error(self, exc: Exception) -> None:
        if self.pending and self.pending[-1][0] == b"CONNECT":  # a tunnel: never an exchange
            self.pending.pop()
            self._stop()
        elif isinstance(exc, HttpParserUpgrade):  # the response says whether HTTP goes on
            self.client_on = False
            self._retap()
        else:
            self._stop()

    def _retap(self) -> None:
        """Point the legs' taps at what parses their bytes now (nothing, once stopped)."""
        if self.legs is None:
            return
        client, server = self.legs
        client.tap = self.requests.feed_data if self.client_on and self.requests else None
        if not self.active:
            server.tap = None
        elif self.head_framer is not None:
            server.tap = self.head_framer.feed
        else:
            server.tap = self.responses.feed_data  # type: ignore[union-attr]

    def closed(self) -> None:
        """The connection ended: a body that runs to the close is complete; the rest never got a
        response. Idempotent: either side of the connection may report the end.

        A response in progress that is not keep-alive is taken as one whose body ran to the close
        (HTTP/1.0 style, no length): llhttp does not say whether a `Connection: close` response
        with a Content-Length was cut short, which then counts with its status rather than 0."""
        if self.active and self.head_framer is not None:
            if self.head_framer.mode == "eof":
                self._finish()
        elif self.active and not self.idle and not self.responses.should_keep_alive():  # type: ignore[union-attr]
            self.status = self.responses.get_status_code()  # type: ignore[union-attr]
            if self.status >= 200:
                self._finish()
        self.status = 0
        while self.pending:
            self._finish()
        self._stop()

    # --- from the parsers' callbacks -------------------------------------------------------

    def _head_sent(self) -> None:
        if self.head_framer is not None:
            return
        if not self.idle:  # cannot take over in the middle of a response: stop counting
            self._stop()
        else:
            self.head_framer = _ResponseFramer(self)
            self._retap()

    def _finish(self) -> None:
        """The response in progress ended: it answers the oldest waiting request."""
        answered, self.answered = self.answered, None
        if self.pending:
            method, started = self.pending.popleft()
            ended = self.clock() if answered is None else answered
            self.on_exchange(method, self.status, ended - started)

    def _answered(self) -> None:
        """A body byte of the response in progress: the first one ends its latency."""
        if self.answered is None:
            self.answered = self.clock()

    def _stop(self) -> None:
        self.active = self.client_on = False
        self._retap()
        # No reference cycle left for the collector: parsers -> events -> self -> legs -> taps.
        self.requests = self.responses = self.head_framer = self.legs = None


class Tapped(Protocol):
    """What `attach` needs of a relay leg."""

    tap: Callable[[bytes], object] | None
    accounting: Any


class _RequestEvents:
    __slots__ = ("acct",)

    def __init__(self, acct: Http1Accounting) -> None:
        self.acct = acct

    def on_headers_complete(self) -> None:
        acct = self.acct
        if acct.requests is None:  # stopped earlier in this read: llhttp goes on to its end
            return
        if len(acct.pending) >= PIPELINE:
            acct._stop()
            return
        method = acct.requests.get_method()
        acct.pending.append((method, acct.clock()))
        if method == b"HEAD":
            acct._head_sent()


class _ResponseEvents:
    __slots__ = ("acct", "on_message_begin")

    def __init__(self, acct: Http1Accounting) -> None:
        self.acct = acct
        self.on_message_begin = acct.idle.clear

    def on_body(self, body: bytes) -> None:
        acct = self.acct
        if acct.answered is None:  # the first body bytes: the latency ends here
            acct.answered = acct.clock()

    def on_message_complete(self) -> None:
        acct = self.acct
        acct.idle.append(True)
        status = acct.status = acct.responses.get_status_code()  # type: ignore[union-attr]
        # Other 1xx are interim: the response follows (they have no body). `_finish`, inline.
        if status >= 200 or status == 101:
            answered, acct.answered = acct.answered, None
            if acct.pending:
                method, started = acct.pending.popleft()
                ended = acct.clock() if answered is None else answered
                acct.on_exchange(method, status, ended - started)


class _ResponseFramer:
    """Response framing in Python, for connections that sent HEAD: head, then a body of known,
    chunked or close-delimited length, or none (HEAD, 1xx, 204, 304). The first body byte it
    passes over ends the response's latency (`_answered`)."""

    __slots__ = ("acct", "buf", "chunk_left", "length", "mode")

    def __init__(self, acct: Http1Accounting) -> None:
        self.acct = acct
        self.buf = b""
        self.mode = "head"  # head | length | chunk-size | chunk-data | chunk-crlf | trailers | eof
        self.length = 0
        self.chunk_left = 0

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end and self.acct.head_framer is self:
            if self.mode == "head":
                pos = self._head(data, pos)
            elif self.mode == "eof":  # everything until the close
                self.acct._answered()
                return
            else:
                pos = self._body(data, pos)

    def _head(self, data: bytes, pos: int) -> int:
        joined = self.buf + data[pos:] if self.buf else data[pos:]
        end = joined.find(b"\r\n\r\n")
        if end < 0:
            self.buf = joined
            if len(joined) > MAX_HEAD:
                self.acct._stop()
            return len(data)
        self.buf = b""
        self._response_head(joined[:end].lstrip(b"\r\n"))
        return len(data) - (len(joined) - end - 4)

    def _response_head(self, head: bytes) -> None:
        acct = self.acct
        lines = head.split(b"\r\n")
        start = lines[0].split(b" ", 2)
        if len(start) < 2 or not start[0].startswith(b"HTTP/1.") or not _STATUS.fullmatch(start[1]):
            acct._stop()  # not an HTTP/1 status line
            return
        status = int(start[1])
        acct.status = status
        if status == 101:  # the connection is now another protocol: count this, then stop
            acct._finish()
            acct._stop()
            return
        if status < 200:
            return  # interim: the real response follows
        fields = dict(_field(line) for line in lines[1:])
        method = acct.pending[0][0] if acct.pending else b""
        if method == b"HEAD" or status in (204, 304):
            acct._finish()
        elif b"chunked" in fields.get(b"transfer-encoding", b""):
            self.mode = "chunk-size"
        elif b"content-length" in fields:
            length = fields[b"content-length"]
            if not length.isdigit():
                acct._stop()
            elif int(length) == 0:
                acct._finish()
            else:
                self.mode, self.length = "length", int(length)
        else:
            self.mode = "eof"  # until the close: closed() completes it

    def _body(self, data: bytes, pos: int) -> int:
        """Advance through body bytes from `pos`; returns where the rest starts."""
        mode, end = self.mode, len(data)
        if mode == "length":
            self.acct._answered()
            take = min(self.length, end - pos)
            self.length -= take
            if self.length == 0:
                self._done()
            return pos + take
        if mode == "chunk-data":
            self.acct._answered()
            take = min(self.chunk_left, end - pos)
            self.chunk_left -= take
            if self.chunk_left == 0:
                self.mode = "chunk-crlf"
            return pos + take
        nl = data.find(b"\n", pos)  # chunk-size, chunk-crlf, trailers: line by line
        if nl < 0:
            self.buf += data[pos:]
            if len(self.buf) > MAX_HEAD:
                self.acct._stop()
            return end
        line = (self.buf + data[pos:nl]).strip()
        self.buf = b""
        if mode == "chunk-size":
            size = line.split(b";", 1)[0].rstrip()
            if not _CHUNK_SIZE.fullmatch(size):  # int() would take -5, 0x5 or 1_0
                self.acct._stop()
                return end
            self.chunk_left = int(size, 16)
            self.mode = "chunk-data" if self.chunk_left else "trailers"
        elif mode == "chunk-crlf":
            self.mode = "chunk-size"
        elif not line:  # trailers end with an empty line
            self._done()
        return nl + 1

    def _done(self) -> None:
        self.mode = "head"
        self.acct._finish()


def _field(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()
