"""Property tests of the HTTP/2 accounting (agent/proxy/http2.py): its frame walk and HPACK
handling take any bytes in any reads without raising, hold no more than their bounds, do not
depend on where reads were cut, and count real conversations (the `h2` library's, with HPACK's
dynamic table churning) exactly."""

from __future__ import annotations

from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hpack import Encoder
from hypothesis import given
from hypothesis import strategies as st

from agent.proxy import http2
from agent.proxy.http2 import Http2Accounting

from .strategies import cut_points, split_at

pytestmark = pytest.mark.timeout(120)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Sink:
    def __init__(self) -> None:
        self.exchanges: list[tuple[int, int | None]] = []

    def exchange(self, method: bytes, status: int, latency_s: float, grpc: int | None = None) -> None:
        assert latency_s >= 0
        assert status == 0 or 200 <= status <= 599
        assert grpc is None or 0 <= grpc <= 16
        self.exchanges.append((status, grpc))

    def add(self, status: int, count: int, buckets: list[int] | None, sum_ms: float) -> None:
        raise AssertionError("HTTP/2 accounting reports each exchange")


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def check_bounds(acct: Http2Accounting) -> None:
    assert len(acct.streams) <= http2.MAX_OPEN_STREAMS
    assert len(acct.seen) <= 64 and all(len(b) <= http2.MAX_CACHED_BLOCK for b in acct.seen)
    assert len(acct.from_client.buf) < 9  # a frame header's start, never a payload
    assert len(acct.from_server.buf) <= 9 + http2.MAX_KEPT_FRAME
    assert len(acct.from_server.block) <= http2.MAX_KEPT_FRAME


def run(reads: list[tuple[str, bytes]]) -> list[tuple[int, int | None]]:
    sink = Sink()
    acct = Http2Accounting(sink, clock=lambda: 0.0)
    for side, data in reads:
        getattr(acct, side)(data)  # the relay's call: returns whatever the bytes
        check_bounds(acct)
    acct.closed()
    acct.closed()
    assert not acct.active and acct.streams == {}
    return sorted(sink.exchanges, key=repr)


# Frames as hostile peers build them: any type, flags and stream, payloads that are HPACK (from
# a real encoder), near-HPACK or noise, lengths that lie.
_encoder = Encoder()
BLOCKS = [
    _encoder.encode([(b":status", b"200")]),
    _encoder.encode([(b":status", b"204"), (b"content-type", b"application/grpc"), (b"grpc-status", b"14")]),
    _encoder.encode([(b"grpc-status", b"99"), (b"x-a", b"b" * 40)]),
    _encoder.encode([(b":status", b"2000")]),
    _encoder.encode([(b":status", b"abc"), (b"grpc-status", b"-1")]),
    b"\x88", b"\x88\xc0", b"\xbe", b"\xff\xff\xff\xff\xff", b"\x3f\xe1\x1f", b"\x20", b"\x00\x01a\x01b",
]  # fmt: skip
payloads = st.sampled_from(BLOCKS) | st.binary(max_size=40)
frames = st.builds(
    frame,
    st.sampled_from([0x0, 0x1, 0x3, 0x4, 0x5, 0x6, 0x7, 0x8, 0x9, 0xA]) | st.integers(0, 255),
    st.sampled_from([0x0, 0x1, 0x4, 0x5, 0x8, 0x20, 0x2D]) | st.integers(0, 255),
    st.sampled_from([0, 1, 3, 5, 2, 0x7FFFFFFF, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF),
    payloads,
)
lying = st.builds(
    lambda n, rest: n.to_bytes(3, "big") + rest, st.integers(0, 1 << 24 - 1), st.binary(max_size=12)
)
stream_bytes = st.lists(frames | lying | st.binary(max_size=16), max_size=30).map(b"".join)


@given(st.lists(st.tuples(st.sampled_from(["client", "server"]), stream_bytes), max_size=8), cut_points)
def test_any_frames_in_any_reads_never_raise_and_stay_bounded(
    reads: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    feed = [("client", PREFACE)] + [(side, piece) for side, data in reads for piece in split_at(data, cuts)]
    exchanges = run(feed)
    # Each exchange is a client HEADERS frame on an odd stream (a loose bound: there are fewer).
    assert len(exchanges) <= sum(data.count(b"\x01") for side, data in reads if side == "client")


@given(st.binary(max_size=2048), st.binary(max_size=2048), cut_points)
def test_random_bytes_never_raise(client: bytes, server: bytes, cuts: list[int]) -> None:
    run([("client", c) for c in split_at(client, cuts)] + [("server", s) for s in split_at(server, cuts)])


@given(stream_bytes, stream_bytes, cut_points, cut_points)
def test_where_reads_are_cut_does_not_change_the_count(
    client: bytes, server: bytes, client_cuts: list[int], server_cuts: list[int]
) -> None:
    client = PREFACE + client
    whole = run([("client", client), ("server", server)])
    pieces = [("client", c) for c in split_at(client, client_cuts)]
    pieces += [("server", s) for s in split_at(server, server_cuts)]
    assert run(pieces) == whole


# --- real conversations ------------------------------------------------------------------

GRPC = [(b"content-type", b"application/grpc")]
header_values = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c not in (0, 10, 13)).strip())


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[tuple[str, bytes]], list[tuple[int, int | None]]]:
    """A client and a server (h2's state machines) talk: requests, answered in any order, with
    fresh header values (HPACK's table fills and evicts), bodies, gRPC trailers or resets.
    Returns the bytes each side sent, in order, and the exchanges to count."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    if draw(st.booleans()):  # a small table: evictions on every block
        client.update_settings({0x1: draw(st.sampled_from([0, 64, 256, 4096]))})
    wire: list[tuple[str, bytes]] = []

    def flush() -> None:
        while True:
            up, down = client.data_to_send(), server.data_to_send()
            if not up and not down:
                return
            if up:
                wire.append(("client", up))
                server.receive_data(up)
            if down:
                wire.append(("server", down))
                client.receive_data(down)

    flush()
    expected: list[tuple[int, int | None]] = []
    open_streams: list[int] = []
    for _ in range(draw(st.integers(1, 12))):
        if open_streams and draw(st.booleans()):
            stream = open_streams.pop(draw(st.integers(0, len(open_streams) - 1)))
            expected.append(answer(draw, server, stream))
        else:
            stream = client.get_next_available_stream_id()
            grpc = draw(st.booleans())
            head = [(b":method", b"POST"), (b":path", b"/" + draw(header_values).hex().encode())]
            head += [(b":scheme", b"http"), (b":authority", b"x"), *(GRPC if grpc else [])]
            client.send_headers(stream, head, end_stream=True)
            open_streams.append(stream)
        flush()
    for stream in open_streams:
        expected.append(answer(draw, server, stream))
        flush()
    return wire, sorted(expected, key=repr)


def answer(draw: st.DrawFn, server: H2Connection, stream: int) -> tuple[int, int | None]:
    kind = draw(st.sampled_from(["plain", "grpc", "trailers-only", "reset"]))
    extra = [
        (b"x-v", draw(header_values)),
        (b"x-" + draw(st.sampled_from([b"a", b"b", b"c"])), draw(header_values)),
    ]
    if kind == "reset":
        server.reset_stream(stream, error_code=2)  # INTERNAL_ERROR: no response
        return (0, None)
    if kind == "trailers-only":
        code = draw(st.integers(0, 16))
        server.send_headers(
            stream, [(b":status", b"200"), *GRPC, (b"grpc-status", b"%d" % code), *extra], end_stream=True
        )
        return (200, code)
    status = draw(st.sampled_from([200, 201, 204, 404, 500, 503]))
    if draw(st.booleans()):
        server.send_headers(stream, [(b":status", b"100")])
    grpc = kind == "grpc"
    server.send_headers(
        stream,
        [(b":status", b"%d" % status), *(GRPC if grpc else []), *extra],
        end_stream=status == 204 and not grpc,
    )
    if status == 204 and not grpc:
        return (status, None)
    body = draw(st.binary(max_size=200))
    if grpc:
        code = draw(st.integers(0, 16))
        server.send_data(stream, body)
        server.send_headers(stream, [(b"grpc-status", b"%d" % code), *extra], end_stream=True)
        return (status, code)
    server.send_data(stream, body, end_stream=True)
    return (status, None)


@given(conversations(), cut_points)
def test_real_conversations_in_any_reads_are_counted_exactly(
    conversation: tuple[list[tuple[str, bytes]], list[tuple[int, int | None]]], cuts: list[int]
) -> None:
    wire, expected = conversation
    reads = [(side, piece) for side, data in wire for piece in split_at(data, cuts)]
    assert run(reads) == expected
    assert run(wire) == expected


def test_attached_legs_are_untapped_when_accounting_stops() -> None:
    class Leg:
        tap: Any = None
        accounting: Any = None

    acct = Http2Accounting(Sink())
    client, server = Leg(), Leg()
    acct.attach(client, server)
    client.tap(PREFACE)
    server.tap(frame(0x1, 0x5, 1, b"\xff\xff\xff\xff"))  # not HPACK: stops
    assert client.tap is None and server.tap is None
