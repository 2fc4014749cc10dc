"""HTTP/2 and gRPC accounting, fed the bytes of real HTTP/2 conversations: both ends are the
`h2` library's connection state machines (with HPACK's dynamic table, CONTINUATION frames and
SETTINGS as a real peer sends them), the accounting reads what crosses between them."""

from __future__ import annotations

import random
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection

from agent.proxy.http2 import Http2Accounting
from agent.telemetry.proxy_metrics import ProxyMetrics

Headers = list[tuple[bytes, bytes]]
GRPC: Headers = [(b"content-type", b"application/grpc")]


class Recorder:
    def __init__(self) -> None:
        self.exchanges: list[tuple[int, int | None, float]] = []  # status, grpc, latency (ms)

    def exchange(self, method: bytes, status: int, latency_s: float, grpc: int | None = None) -> None:
        self.exchanges.append((status, grpc, round(latency_s * 1000, 3)))

    def add(self, status: int, count: int, buckets: list[int] | None, sum_ms: float) -> None:
        raise AssertionError("HTTP/2 accounting reports each exchange")


class Conversation:
    """A client and a server talking HTTP/2 through the accounting, at the times tests set."""

    def __init__(self, sink: Any = None, chunk: int | None = None) -> None:
        self.sink = sink if sink is not None else Recorder()
        self.now = 0.0
        self.chunk = chunk  # feed the accounting this many bytes at a time (None: whole reads)
        self.acct = Http2Accounting(self.sink, clock=lambda: self.now)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.flush()

    def at(self, ms: float) -> Conversation:
        self.now = ms / 1000
        return self

    def _feed(self, feed: Any, data: bytes) -> None:
        step = self.chunk or len(data) or 1
        for i in range(0, len(data), step):
            feed(data[i : i + step])

    def flush(self) -> None:
        """Deliver what each side has to send (and what that provokes) until both are quiet."""
        while True:
            up, down = self.client.data_to_send(), self.server.data_to_send()
            if not up and not down:
                return
            if up:
                self._feed(self.acct.client, up)
                self.server.receive_data(up)
            if down:
                self._feed(self.acct.server, down)
                self.client.receive_data(down)

    def request(self, path: bytes = b"/", extra: Headers | None = None) -> int:
        stream = self.client.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":path", path), (b":scheme", b"http"), (b":authority", b"x")]
        self.client.send_headers(stream, headers + (extra or []), end_stream=True)
        self.flush()
        return stream

    def head(
        self, stream: int, status: int, extra: list[tuple[bytes, bytes]] | None = None, end: bool = False
    ) -> None:
        self.server.send_headers(stream, [(b":status", str(status).encode()), *(extra or [])], end_stream=end)
        self.flush()

    def data(self, stream: int, body: bytes, end: bool = False) -> None:
        self.server.send_data(stream, body, end_stream=end)
        self.flush()

    def trailers(self, stream: int, grpc_status: int) -> None:
        self.server.send_headers(stream, [(b"grpc-status", str(grpc_status).encode())], end_stream=True)
        self.flush()


def test_requests_statuses_and_latency_to_the_first_body_frame() -> None:
    c = Conversation()
    for status, body in ((200, b"ok"), (404, b"nope"), (503, b"later")):
        stream = c.at(0).request()
        c.at(5).head(stream, status)  # the head alone: latency does not end here
        c.at(10).data(stream, body[:1])  # the body's first frame: here
        c.at(90).data(stream, body[1:], end=True)
    assert c.sink.exchanges == [(200, None, 10.0), (404, None, 10.0), (503, None, 10.0)]


def test_grpc_is_classified_by_its_status_from_trailers_or_a_trailers_only_response() -> None:
    c = Conversation()
    s1 = c.at(0).request(extra=GRPC)
    c.at(2).head(s1, 200, GRPC)
    c.at(3).data(s1, b"\x00\x00\x00\x00\x00")
    c.at(9).trailers(s1, 0)
    s2 = c.at(10).request(extra=GRPC)
    c.at(12).head(s2, 200, GRPC)
    c.at(20).trailers(s2, 14)  # UNAVAILABLE, after no body: latency ends at the trailers
    s3 = c.at(30).request(extra=GRPC)
    c.at(31).head(s3, 200, [*GRPC, (b"grpc-status", b"5")], end=True)  # trailers-only NOT_FOUND
    s4 = c.at(40).request(extra=GRPC)
    c.at(41).head(s4, 200, GRPC)
    c.at(45).data(s4, b"x", end=True)  # no trailers at all: UNKNOWN, as linkerd says
    assert c.sink.exchanges == [(200, 0, 3.0), (200, 14, 10.0), (200, 5, 1.0), (200, 2, 5.0)]


def test_grpc_codes_become_linkerd_labels() -> None:
    pm = ProxyMetrics()
    c = Conversation(sink=pm.http('direction="outbound"'))
    for code in (0, 0, 5, 14):
        stream = c.request(extra=GRPC)
        c.head(stream, 200, [*GRPC, (b"grpc-status", str(code).encode())], end=True)
    text = "\n".join(pm.render([]))
    ok = 'status_code="200",classification="success",grpc_status="0",error=""} 2'
    not_found = 'classification="success",grpc_status="5",error=""} 1'  # not a failure code
    unavailable = 'classification="failure",grpc_status="14",error=""} 1'
    assert ok in text and not_found in text and unavailable in text, text
    assert 'request_total{direction="outbound"} 4' in text


def test_the_hpack_table_and_continuation_frames_are_followed() -> None:
    # Repeated custom headers go into the server encoder's dynamic table and come back as
    # indexes; a 40 KB header is split over CONTINUATION frames. Fed a byte at a time too.
    for chunk in (None, 1, 7):
        c = Conversation(chunk=chunk)
        statuses = [200, 201, 404, 200, 500, 200, 304, 200]
        for i, status in enumerate(statuses):
            stream = c.request()
            extra = [(b"x-served-by", b"legacy-%d" % (i % 2)), (b"cache", b"hit")]
            if i == 3:
                extra.append((b"x-big", b"v" * 40_000))
            c.head(stream, status, extra, end=status == 304)
            if status != 304:
                c.data(stream, b"body", end=True)
        assert [s for s, _, _ in c.sink.exchanges] == statuses, chunk


def test_concurrent_streams_answered_out_of_order() -> None:
    c = Conversation()
    streams = [c.at(i).request() for i in range(4)]
    for stream, status in zip(reversed(streams), (201, 202, 203, 204), strict=True):
        c.at(20).head(stream, status, end=status == 204)
        if status != 204:
            c.at(25).data(stream, b"x", end=True)
    # Each latency runs from its own request: streams 7, 5, 3 opened at 3, 2, 1 ms; 1 at 0.
    assert c.sink.exchanges == [(201, None, 22.0), (202, None, 23.0), (203, None, 24.0), (204, None, 20.0)]


def test_reset_and_unanswered_streams_count_as_no_response() -> None:
    c = Conversation()
    s1 = c.request()
    c.client.reset_stream(s1)
    c.flush()
    s2 = c.request()
    c.head(s2, 200)  # the head came, the body never finished: it counts with its status
    c.request()  # no answer at all
    c.acct.closed()
    assert [(s, g) for s, g, _ in c.sink.exchanges] == [(0, None), (200, None), (0, None)]


def test_informational_heads_are_not_the_response() -> None:
    c = Conversation()
    stream = c.request()
    c.server.send_headers(stream, [(b":status", b"103"), (b"link", b"</a.css>")])
    c.flush()
    c.head(stream, 200, end=True)
    assert [s for s, _, _ in c.sink.exchanges] == [200]


def test_bytes_that_are_not_hpack_stop_accounting_quietly() -> None:
    c = Conversation()
    c.request()
    frame = (7).to_bytes(3, "big") + bytes([0x1, 0x4 | 0x1]) + (1).to_bytes(4, "big")
    c.acct.server(frame + b"\xff\xff\xff\xff\xff\xff\xff")  # an index far past any table
    assert not c.acct.active
    c.acct.server(b"anything at all")  # no exception, nothing counted
    c.acct.closed()
    assert c.sink.exchanges == []


def test_random_splits_give_the_same_counts() -> None:
    rng = random.Random(7)
    for _ in range(20):
        whole, split = Conversation(), Conversation(chunk=rng.randint(1, 40))
        for c in (whole, split):
            rng_c = random.Random(11)
            for _ in range(15):
                stream = c.request(extra=GRPC if rng_c.random() < 0.5 else None)
                status = rng_c.choice([200, 204, 400, 500, 503])
                if status == 204:
                    c.head(stream, status, end=True)
                else:
                    c.head(stream, status, [(b"x-n", str(rng_c.random()).encode())])
                    c.data(stream, b"b" * rng_c.randint(0, 3000), end=True)
        assert whole.sink.exchanges == split.sink.exchanges


def test_attach_taps_the_relay_legs_and_stopping_untaps_them() -> None:
    class Leg:
        tap: Any = None
        accounting: Any = None

    sink = Recorder()
    acct = Http2Accounting(sink)
    client, server = Leg(), Leg()
    acct.attach(client, server)
    assert client.accounting is acct and server.accounting is acct
    peer = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    peer.initiate_connection()
    peer.send_headers(
        1, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"x")]
    )
    client.tap(peer.data_to_send())
    acct.closed()
    assert sink.exchanges == [(0, None, 0.0)]
    assert client.tap is None and server.tap is None  # the legs relay untapped from now


def test_repeated_header_blocks_follow_the_table_as_it_changes() -> None:
    # Trailers become one-byte dynamic-table indexes once seen; a new entry shifts what an index
    # means. Each call's code must still be its own.
    c = Conversation()
    codes = [0, 0, 14, 0, 14, 14, 4, 0, 4, 14, 0, 0]
    for code in codes:
        stream = c.request(extra=GRPC)
        c.head(stream, 200, GRPC)
        c.data(stream, b"\x00\x00\x00\x00\x00")
        c.server.send_headers(
            stream, [(b"grpc-status", str(code).encode()), (b"x-n", b"%d" % (code * 7))], end_stream=True
        )
        c.flush()
    assert [g for _, g, _ in c.sink.exchanges] == codes


def raw_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def test_priority_padding_push_promises_and_client_trailers() -> None:
    c = Conversation()
    # A request with priority and client trailers (gRPC client streaming ends like this).
    stream = c.client.get_next_available_stream_id()
    head = [(b":method", b"POST"), (b":path", b"/up"), (b":scheme", b"http"), (b":authority", b"x")]
    c.client.send_headers(stream, head, priority_weight=200)
    c.client.send_data(stream, b"chunk", pad_length=9)
    c.client.send_headers(stream, [(b"x-checksum", b"1")], end_stream=True)
    c.flush()
    # The server pushes a resource (its PUSH_PROMISE header block moves the HPACK table), then
    # answers with padded DATA.
    pushed = c.server.get_next_available_stream_id()
    c.server.push_stream(stream, pushed, [(b":method", b"GET"), (b":path", b"/style.css"), *head[2:]])
    c.head(stream, 200, [(b"x-custom", b"after-push")])
    c.server.send_data(stream, b"done", pad_length=20, end_stream=True)
    c.flush()
    c.head(pushed, 200, end=True)  # the pushed response: not a request of the client's
    stream2 = c.request()
    c.head(stream2, 201, [(b"x-custom", b"after-push")], end=True)  # indexed from the table
    assert [s for s, _, _ in c.sink.exchanges] == [200, 201]


def test_a_graceful_goaway_or_refused_stream_is_not_a_failure() -> None:
    c = Conversation()
    s1, _unprocessed, s3 = c.request(), c.request(), c.request()
    c.head(s1, 200)
    c.server.reset_stream(s3, error_code=7)  # REFUSED_STREAM: the client retries it
    c.server.close_connection(last_stream_id=s1)  # GOAWAY: the middle one was never processed
    c.flush()
    c.acct.server(raw_frame(0x0, 0x1, s1, b"end"))  # s1 still finishes
    c.acct.closed()
    assert c.sink.exchanges == [(200, None, 0.0)]


def test_statuses_and_codes_outside_the_protocol() -> None:
    from hpack import Encoder

    c = Conversation()
    s1, s2 = c.request(extra=GRPC), c.request()
    encoder = Encoder()
    trailers_only = encoder.encode([(b":status", b"200"), *GRPC, (b"grpc-status", b"99")])
    c.acct.server(raw_frame(0x1, 0x4 | 0x1, s1, trailers_only))
    assert c.sink.exchanges == [(200, 2, 0.0)]  # an unknown code is UNKNOWN, as clients read it
    c.acct.server(raw_frame(0x1, 0x4 | 0x1, s2, encoder.encode([(b":status", b"2000")])))
    assert not c.acct.active  # not HTTP: accounting stops rather than make a label of it


def test_a_header_block_that_never_ends_is_not_held() -> None:
    c = Conversation()
    stream = c.request()
    c.acct.server(raw_frame(0x1, 0, stream, b"\x88"))  # HEADERS without END_HEADERS
    for _ in range(80):
        c.acct.server(raw_frame(0x9, 0, stream, b"\x00" * 16_000))  # CONTINUATION, never ending
        if not c.acct.active:
            break
    assert not c.acct.active and len(c.acct.from_server.block) == 0


def test_a_million_unanswered_streams_stop_accounting_at_the_bound() -> None:
    # A plaintext client opening streams the app never answers (defect 1 of #15): the state
    # stays bounded, accounting stops (counted), and feeding it never raises: the relay goes on.
    import tracemalloc

    from agent.proxy import http2
    from agent.proxy.http1 import STOPPED

    class Leg:
        tap: Any = None
        accounting: Any = None

    # One client HEADERS frame per stream (ids 1, 3, 5...), a literal header block; sent in
    # 64 KiB reads as the relay reads them.
    block = b"\x82\x86\x84\x41\x01x"  # :method GET, :scheme http, :path /, :authority x
    frames = b"".join(raw_frame(0x1, 0x4, 2 * i + 1, block) for i in range(1_000_000))
    before = STOPPED["h2:streams"]
    sink = Recorder()
    acct = Http2Accounting(sink)
    client, server = Leg(), Leg()
    acct.attach(client, server)
    tracemalloc.start()
    try:
        acct.client(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        for i in range(0, len(frames), 65536):
            acct.client(frames[i : i + 65536])  # the relay's call: returns, never raises
            if client.tap is not None:
                assert len(acct.streams) <= http2.MAX_OPEN_STREAMS
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not acct.active and acct.streams == {}
    assert client.tap is None and server.tap is None  # the legs relay untapped from here
    assert STOPPED["h2:streams"] == before + 1
    assert peak < 2 * 1024 * 1024, peak  # a million streams held were ~150 MB
    acct.server(raw_frame(0x1, 0x5, 1, b"\x88"))  # a late answer: ignored, no exception
    acct.closed()
    assert sink.exchanges == []  # the streams it stopped on are not guessed at


def test_open_streams_below_the_bound_are_all_counted() -> None:
    from agent.proxy import http2

    c = Conversation()
    c.client.update_settings({4: 1 << 30})
    c.server.update_settings({3: 2 * http2.MAX_OPEN_STREAMS})
    c.flush()
    streams = [c.request() for _ in range(http2.MAX_OPEN_STREAMS)]
    assert c.acct.active and len(c.acct.streams) == http2.MAX_OPEN_STREAMS
    for stream in streams:
        c.head(stream, 200, end=True)
    assert c.acct.active and len(c.sink.exchanges) == http2.MAX_OPEN_STREAMS


def test_only_short_indexed_blocks_are_cached() -> None:
    from agent.proxy import http2

    acct = Http2Accounting(Recorder())
    long_block = b"\x88" * (http2.MAX_CACHED_BLOCK + 1)  # indexed-only, but long: not kept
    acct._read_block(long_block)
    acct._read_block(b"\x88")
    assert list(acct.seen) == [b"\x88"]
