"""HTTP/1.x request accounting, sans-IO: watches a connection's two byte streams as they are
relayed (never changes or holds them) and reports each finished exchange.

For each request: the method, the response's status code, and the latency from the request's
head to the end of the response (what linkerd's `response_latency_ms` measures). It follows
message framing only: Content-Length, chunked transfer coding, responses without a body
(HEAD, 1xx, 204, 304) and bodies that end with the connection; pipelined requests queue up.
A `101 Switching Protocols`, a CONNECT, or a head over 64 KiB ends accounting for the
connection (the bytes still flow; they are just not counted as requests).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Final

MAX_HEAD: Final = 64 * 1024


class _Framing:
    """One direction's message framing: head, then a body of known or chunked length."""

    __slots__ = ("buf", "chunk_left", "length", "mode")

    def __init__(self) -> None:
        self.buf = b""
        self.mode = "head"  # head | length | chunk-size | chunk-data | chunk-crlf | trailers | eof | off
        self.length = 0
        self.chunk_left = 0

    def body(self, chunked: bool, length: int | None, has_body: bool) -> None:
        if not has_body:
            self.mode = "head"
        elif chunked:
            self.mode = "chunk-size"
        elif length is not None:
            if length < 0:
                self.mode = "off"
                return
            self.length = length
            self.mode = "length" if length > 0 else "head"
        else:
            self.mode = "eof"

    def consume_body(self, data: bytes, pos: int) -> tuple[int, bool]:
        """Advance through body bytes from `pos`; returns (new pos, message complete)."""
        end = len(data)
        while pos < end:
            mode = self.mode
            if mode == "length":
                take = min(self.length, end - pos)
                self.length -= take
                pos += take
                if self.length == 0:
                    self.mode = "head"
                    return pos, True
            elif mode == "chunk-size":
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self.buf += data[pos:]
                    return end, False
                line = (self.buf + data[pos:nl]).split(b";", 1)[0].strip()
                self.buf = b""
                pos = nl + 1
                try:
                    size = int(line, 16)
                except ValueError:
                    self.mode = "off"
                    return end, False
                self.chunk_left = size
                self.mode = "chunk-data" if size else "trailers"
            elif mode == "chunk-data":
                take = min(self.chunk_left, end - pos)
                self.chunk_left -= take
                pos += take
                if self.chunk_left == 0:
                    self.mode = "chunk-crlf"
            elif mode == "chunk-crlf":
                nl = data.find(b"\n", pos)
                if nl < 0:
                    return end, False
                pos = nl + 1
                self.mode = "chunk-size"
            elif mode == "trailers":
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self.buf += data[pos:]
                    return end, False
                line = (self.buf + data[pos:nl]).strip()
                self.buf = b""
                pos = nl + 1
                if not line:
                    self.mode = "head"
                    return pos, True
            else:  # eof: everything until the connection closes; off: not accounting
                return end, False
        return pos, False


def _header(lower_head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (given as b"\\r\\nname:") in a lowercased head, if present."""
    at = lower_head.find(name)
    if at < 0:
        return None
    start = at + len(name)
    end = lower_head.find(b"\r\n", start)
    return lower_head[start : end if end >= 0 else len(lower_head)].strip()


def _parse_head(head: bytes) -> tuple[list[bytes], bool, int | None]:
    """(start line words, chunked, content length): only what framing needs, without building
    a header dict; -1 for a content length that is not a number."""
    nl = head.find(b"\r\n")
    start = (head if nl < 0 else head[:nl]).split(b" ", 2)
    lower = head.lower()
    encoding = _header(lower, b"\r\ntransfer-encoding:")
    length_text = _header(lower, b"\r\ncontent-length:")
    length: int | None = None
    if length_text is not None:
        length = int(length_text) if length_text.isdigit() else -1
    return start, encoding is not None and b"chunked" in encoding, length


class Http1Accounting:
    """Feed it `client(data)` and `server(data)` as bytes cross; `on_exchange(method, status,
    latency_s)` is called once per finished exchange (status 0: no response came)."""

    def __init__(
        self, on_exchange: Callable[[bytes, int, float], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.on_exchange = on_exchange
        self.clock = clock
        self.requests = _Framing()
        self.responses = _Framing()
        self.pending: deque[tuple[bytes, float]] = deque()
        self.status = 0
        self.active = True

    def _stop(self) -> None:
        self.active = False
        self.requests.mode = self.responses.mode = "off"

    def client(self, data: bytes) -> None:
        f = self.requests
        if f.mode == "head" and not f.buf and data.endswith(b"\r\n\r\n"):
            # Fast path, the common shape: exactly one whole bodiless request head in this read.
            end = data.find(b"\r\n\r\n")
            if end == len(data) - 4:
                low = data.lower()
                if b"\r\ncontent-length:" not in low and b"\r\ntransfer-encoding:" not in low:
                    method = data[: data.find(b" ")]
                    if method != b"CONNECT":
                        self.pending.append((method, self.clock()))
                        return
        pos = 0
        while self.active and pos < len(data):
            if f.mode == "head":
                pos = self._head(f, data, pos, self._request_head)
            else:
                pos, _ = f.consume_body(data, pos)
                if f.mode in ("off", "eof"):
                    return

    def server(self, data: bytes) -> None:
        f = self.responses
        if f.mode == "head" and not f.buf and self.pending and data.startswith(b"HTTP/1."):
            # Fast path: a whole response (head and Content-Length body) in this read.
            end = data.find(b"\r\n\r\n")
            status_text = data[9:12]
            if end > 0 and status_text.isdigit() and status_text[0] != 49:  # not 1xx
                low = data[:end].lower()
                at = low.find(b"\r\ncontent-length:")
                if at > 0 and b"\r\ntransfer-encoding:" not in low and self.pending[0][0] != b"HEAD":
                    eol = low.find(b"\r\n", at + 17)
                    length_text = low[at + 17 : eol if eol > 0 else end].strip()
                    if length_text.isdigit():
                        self.status = status = int(status_text)
                        body = 0 if status in (204, 304) else int(length_text)  # never a body
                        rest = end + 4 + body - len(data)
                        if rest == 0:
                            method, started = self.pending.popleft()
                            self.on_exchange(method, status, self.clock() - started)
                            return
                        if rest > 0:  # the body follows in later reads
                            f.length, f.mode = rest, "length"
                            return
        pos = 0
        while self.active and pos < len(data):
            if f.mode == "head":
                pos = self._head(f, data, pos, self._response_head)
            else:
                pos, done = f.consume_body(data, pos)
                if done:
                    self._finish()
                if f.mode in ("off", "eof"):
                    return

    def closed(self) -> None:
        """The connection ended: a body that runs to the close is complete; the rest never got one.
        Idempotent: either side of the connection may report the end."""
        if not self.active and not self.pending:
            return
        if self.responses.mode == "eof" and self.pending:
            self._finish()
        while self.pending:
            method, started = self.pending.popleft()
            self.on_exchange(method, 0, self.clock() - started)
        self._stop()

    def _head(self, f: _Framing, data: bytes, pos: int, handle: Callable[[bytes], None]) -> int:
        """Collect a head up to its blank line; returns where the rest of `data` starts."""
        if f.buf:  # a head split across reads: the terminator may straddle them
            joined = f.buf + data[pos:]
            end = joined.find(b"\r\n\r\n")
            if end < 0:
                f.buf = joined
                if len(joined) > MAX_HEAD:
                    self._stop()
                return len(data)
            f.buf = b""
            handle(joined[:end])
            return len(data) - (len(joined) - end - 4)
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            f.buf = data[pos:]
            return len(data)
        handle(data[pos:end])
        return end + 4

    def _request_head(self, head: bytes) -> None:
        start, chunked, length = _parse_head(head.lstrip(b"\r\n"))
        method = start[0] if start and start[0] else b"?"
        if method == b"CONNECT":
            self._stop()
            return
        self.pending.append((method, self.clock()))
        self.requests.body(chunked, length, True)
        if self.requests.mode == "eof":  # a request body is never delimited by the close
            self.requests.mode = "head"

    def _response_head(self, head: bytes) -> None:
        start, chunked, length = _parse_head(head.lstrip(b"\r\n"))
        try:
            status = int(start[1])
        except (IndexError, ValueError):
            self._stop()
            return
        self.status = status
        if status == 101:  # the connection is now another protocol: count this, then stop
            self._finish()
            self._stop()
            return
        if 100 <= status < 200:
            return  # interim: the real response follows
        method = self.pending[0][0] if self.pending else b""
        has_body = method != b"HEAD" and status not in (204, 304)
        self.responses.body(chunked, length, has_body)
        if self.responses.mode == "head":
            self._finish()

    def _finish(self) -> None:
        if not self.pending:
            return
        method, started = self.pending.popleft()
        self.on_exchange(method, self.status, self.clock() - started)
