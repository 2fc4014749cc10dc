"""HTTP/2 request accounting (and so gRPC's), read off the bytes the relay passes through.

A passive observer of one cleartext HTTP/2 connection (h2c with prior knowledge, as the app
speaks it on its side of the proxy): it splits both directions into frames (RFC 9113 §4.1) and
never changes or holds a byte. The client's HEADERS on a new stream is a request; the server's
header blocks are decoded with HPACK (the `hpack` package; decoding every block in order is what
keeps its dynamic table right) for `:status` and `grpc-status`. DATA payloads are skipped, not
copied.

As linkerd-proxy does (linkerd/app/core/src/classify.rs, linkerd/http/metrics):
- latency runs from the request's HEADERS to the response body's first frame: its first DATA,
  its trailers, or its end of stream;
- a gRPC response (content-type `application/grpc...`; linkerd looks at the request's, this
  looks at the response's, which gRPC servers always set) is classified by its `grpc-status`,
  from the trailers or a trailers-only response, and a missing one is 2 (UNKNOWN); codes 2, 4,
  7, 13, 14, 15 are failures, the rest success, whatever the HTTP status;
- a stream reset or cut off before its response head is counted as no response (status 0).

Anything this does not understand (a frame over 1 MiB, a header block HPACK refuses) stops
accounting for the connection; its bytes still flow and are still counted.

What one connection can make this hold is bounded, whatever its peers send: at most
`MAX_OPEN_STREAMS` streams awaiting their response (past that, accounting stops for the
connection: a client opening streams the app never answers cannot grow the agent), one header
block (1 MiB, with its CONTINUATION frames), the HPACK table (1 MiB, the server's to fill), a
frame header's leftover on the client side and one kept frame on the server side, and 64 short
cached blocks. Each stop is counted in `http1.STOPPED` (`h2:<reason>`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

from hpack import Decoder
from hpack.exceptions import HPACKError

from .http1 import STOPPED, HttpSink, Tapped

logging.getLogger("hpack.hpack").disabled = True  # a debug record per header: not on this path

PREFACE_LEN: Final = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_KEPT_FRAME: Final = 1 << 20
# Streams awaiting their response, per connection. A client may only have as many open as the
# server's SETTINGS_MAX_CONCURRENT_STREAMS, and common servers allow 100-250 (nginx 128, hyper's
# server, which linkerd2-proxy's is, 200; Go's net/http 250): 1,000 is 4x the largest of those,
# about 150 KB of state. A connection past it is not one a server would serve.
MAX_OPEN_STREAMS: Final = 1000
MAX_CACHED_BLOCK: Final = 64  # indexed-only blocks (steady traffic's are 2-10 bytes) worth caching
DATA, HEADERS, RST_STREAM, PUSH_PROMISE, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x5, 0x7, 0x9
KEPT: Final = (HEADERS, PUSH_PROMISE, CONTINUATION, RST_STREAM, GOAWAY)  # the server's, read whole
REFUSED_STREAM: Final = 0x7  # RST_STREAM / GOAWAY error: never processed, the client retries
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20
GRPC_UNKNOWN: Final = 2


class _Stream:
    __slots__ = ("answered", "grpc", "is_grpc", "started", "status")

    def __init__(self, started: float) -> None:
        self.started = started
        self.status = 0  # the final response's, once its head came
        self.grpc: int | None = None
        self.is_grpc = False
        self.answered: float | None = None  # when the response body's first frame came


class _Framing:
    """One direction's frame boundaries across reads."""

    __slots__ = ("block", "block_end_stream", "block_stream", "buf", "skip")

    def __init__(self, skip: int = 0) -> None:
        self.buf = bytearray()
        self.skip = skip  # payload bytes still to pass over (a DATA frame's, the preface)
        self.block = bytearray()  # a header block continued over CONTINUATION frames
        self.block_stream = -1
        self.block_end_stream = False


class Http2Accounting:
    """Feed it `client(data)` and `server(data)` (or `attach` it to the relay's legs); each
    finished exchange goes to `sink.exchange(b"", status, latency_s, grpc_code)`."""

    __slots__ = (
        "active",
        "clock",
        "decoder",
        "from_client",
        "from_server",
        "last_request",
        "legs",
        "seen",
        "sink",
        "streams",
    )

    def __init__(self, sink: HttpSink, clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.clock = clock
        self.active = True
        self.streams: dict[int, _Stream] = {}
        self.last_request = 0  # stream ids only grow: a lower one's HEADERS are trailers
        self.decoder = Decoder()
        # A passive reader cannot know the table size the client allowed: accept any the
        # server's encoder announces (RFC 7541 §4.2), with a bound.
        self.decoder.max_allowed_table_size = 1 << 20
        self.decoder.max_header_list_size = (
            MAX_KEPT_FRAME  # (hpack's default, 64 KiB, is below real clients')
        )
        self.seen: dict[bytes, tuple[int | None, int | None, bool]] = {}  # see _read_block
        self.from_client = _Framing(skip=PREFACE_LEN)
        self.from_server = _Framing()
        self.legs: tuple[Tapped, Tapped] | None = None

    def attach(self, client: Tapped, server: Tapped) -> None:
        self.legs = (client, server)
        client.accounting = server.accounting = self
        client.tap, server.tap = self.client, self.server

    def client(self, data: bytes) -> None:
        if self.active:
            self._frames(self.from_client, data, self._client_frame, keep=False)

    def server(self, data: bytes) -> None:
        if self.active:
            self._frames(self.from_server, data, self._server_frame, keep=True)

    def drain(self) -> None:
        """Nothing is kept back: each exchange goes to the sink as it finishes."""

    def failed(self, leg: Tapped, exc: Exception) -> None:
        self._stop("failed")

    def closed(self) -> None:
        """The connection ended: streams with a response head count with it, the rest as none."""
        for stream_id in list(self.streams):
            self._finish(stream_id)
        self._stop(None)

    # --- frames --------------------------------------------------------------------------

    def _frames(
        self, side: _Framing, data: bytes, handle: Callable[[int, int, int, Any], None], keep: bool
    ) -> None:
        """Split `data` (after what was left over) into frames for `handle`: header frames' payloads
        whole when `keep`, every other frame's header alone, its payload skipped."""
        buf = side.buf
        if not buf and side.skip >= len(data):  # inside a DATA payload: nothing to copy or look at
            side.skip -= len(data)
            return
        buf += data
        pos, end = 0, len(buf)
        try:
            while self.active:
                if side.skip:
                    step = min(side.skip, end - pos)
                    side.skip -= step
                    pos += step
                    if side.skip:
                        break
                if end - pos < 9:
                    break
                length = int.from_bytes(buf[pos : pos + 3], "big")
                kind, flags = buf[pos + 3], buf[pos + 4]
                stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                if keep and kind in KEPT:
                    if length > MAX_KEPT_FRAME:
                        self._stop("frame_size")
                        break
                    if end - pos - 9 < length:
                        break  # the rest of this header block fragment comes with a later read
                    handle(kind, flags, stream_id, bytes(buf[pos + 9 : pos + 9 + length]))
                    pos += 9 + length
                else:
                    handle(kind, flags, stream_id, length)
                    pos += 9
                    side.skip = length
        except (HPACKError, ValueError, IndexError):
            self._stop("not_http2")
        del buf[:pos]

    def _client_frame(self, kind: int, flags: int, stream_id: int, length: Any) -> None:
        if kind == HEADERS and stream_id & 1 and stream_id > self.last_request:
            self.last_request = stream_id
            if len(self.streams) >= MAX_OPEN_STREAMS:
                self._stop("streams")  # the relay goes on; this connection is no longer counted
                return
            self.streams[stream_id] = _Stream(self.clock())
        elif kind == RST_STREAM and stream_id in self.streams:
            self._finish(stream_id)

    def _server_frame(self, kind: int, flags: int, stream_id: int, payload: Any) -> None:
        if kind == DATA:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.answered is None:
                stream.answered = self.clock()
            if flags & END_STREAM:
                self._finish(stream_id)
        elif kind in (HEADERS, PUSH_PROMISE):
            side = self.from_server
            start, stop = 0, len(payload)
            if flags & PADDED:
                start, stop = 1, stop - payload[0]
            if kind == PUSH_PROMISE:
                start += 4  # the promised stream's id
            elif flags & PRIORITY:
                start += 5
            side.block[:] = payload[start:stop]
            side.block_stream = stream_id if kind == HEADERS else -1
            side.block_end_stream = bool(flags & END_STREAM)
            if flags & END_HEADERS:
                self._header_block()
        elif kind == CONTINUATION:
            block = self.from_server.block
            block += payload
            if len(block) > MAX_KEPT_FRAME:  # a head that never ends: stop rather than hold it
                self._stop("header_block")
            elif flags & END_HEADERS:
                self._header_block()
        elif kind == RST_STREAM:
            if int.from_bytes(payload[:4], "big") == REFUSED_STREAM:
                self.streams.pop(stream_id, None)  # not processed: the client sends it again
            else:
                self._finish(stream_id)
        elif kind == GOAWAY:
            # Streams above the last one the server will process were never processed (a graceful
            # shutdown, a max connection age): the client retries them elsewhere; not exchanges.
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            for unprocessed in [s for s in self.streams if s > last]:
                del self.streams[unprocessed]

    def _header_block(self) -> None:
        side = self.from_server
        status, grpc, is_grpc = self._read_block(bytes(side.block))
        stream = self.streams.get(side.block_stream)
        if stream is None:
            return  # a push promise, or a stream we did not see open
        if status is not None:
            if status < 200:
                return  # informational: the final head is still to come
            stream.status = status
        if grpc is not None:
            stream.grpc = grpc
        stream.is_grpc = stream.is_grpc or is_grpc
        if side.block_end_stream:  # trailers, or a head that ends the stream: its first frame
            if stream.answered is None:
                stream.answered = self.clock()
            self._finish(side.block_stream)

    def _read_block(self, block: bytes) -> tuple[int | None, int | None, bool]:
        """`:status`, `grpc-status` and whether content-type is gRPC's, from one header block.

        Every block goes through the decoder (the dynamic table must follow the encoder's), except
        one made only of one-byte indexed fields (every byte 0x80-0xFE): that changes no table,
        so while the table stays as it is, the same bytes mean the same headers. Steady traffic's
        heads and trailers are such blocks (`\x88\xc0`), and then cost a dict lookup."""
        indexed_only = bool(block) and min(block) >= 0x80 and 0xFF not in block
        if indexed_only:
            known = self.seen.get(block)
            if known is not None:
                return known
        else:
            self.seen.clear()  # the table may change: what indexes meant may not hold
        status = grpc = None
        is_grpc = False
        for name, value in self.decoder.decode(block, raw=True):
            if name == b":status":
                # Three digits, as HTTP/1's status line: anything else is not HTTP (and would be
                # a label value of the peer's choosing).
                if len(value) != 3 or not value.isdigit() or not b"100" <= value <= b"599":
                    raise ValueError(f"invalid :status {value!r}")
                status = int(value)
            elif name == b"grpc-status":
                # gRPC's codes are 0-16; anything else is UNKNOWN, as a client would read it.
                code = int(value) if value.isdigit() and len(value) <= 2 else GRPC_UNKNOWN
                grpc = code if code <= 16 else GRPC_UNKNOWN
            elif name == b"content-type":
                is_grpc = value.startswith(b"application/grpc")
        meaning = (status, grpc, is_grpc)
        if indexed_only and len(self.seen) < 64 and len(block) <= MAX_CACHED_BLOCK:
            self.seen[block] = meaning
        return meaning

    def _finish(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.status == 0:
            self.sink.exchange(b"", 0, 0.0)
            return
        latency = (stream.answered if stream.answered is not None else self.clock()) - stream.started
        if stream.is_grpc or stream.grpc is not None:
            grpc = stream.grpc if stream.grpc is not None else GRPC_UNKNOWN
            self.sink.exchange(b"", stream.status, latency, grpc)
        else:
            self.sink.exchange(b"", stream.status, latency)

    def _stop(self, reason: str | None) -> None:
        """No more accounting for this connection (its bytes still flow); `reason`, unless the
        connection just ended, is counted in `STOPPED`."""
        if reason is not None and self.active:
            STOPPED[f"h2:{reason}"] += 1
        self.active = False
        self.streams.clear()
        self.seen.clear()
        self.from_client.buf.clear()
        self.from_server.buf.clear()
        self.from_server.block.clear()
        if self.legs is not None:
            for leg in self.legs:
                leg.tap = None
