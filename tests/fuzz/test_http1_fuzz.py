"""Property tests of the HTTP/1 accounting, both implementations (compiled and pure Python): any
bytes in any reads never raise, never hold more than their bounds, do not depend on where the
reads were cut, and on well-formed traffic the two implementations count the same exchanges."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proxy import http1, http1_framer

from .strategies import cut_points, split_at

pytestmark = pytest.mark.timeout(120)  # a framer that loops fails here, not at the suite's limit

IMPLEMENTATIONS = ["compiled", "python"]


class Sink:
    def __init__(self) -> None:
        self.statuses: list[int] = []

    def exchange(self, method: bytes, status: int, latency_s: float, grpc: int | None = None) -> None:
        assert latency_s >= 0
        self.statuses.append(status)

    def add(self, status: int, count: int, buckets: list[int] | None, sum_ms: float) -> None:
        assert count > 0 and sum_ms >= 0
        assert (buckets is None) == (status == 0)
        assert buckets is None or sum(buckets) == count
        self.statuses.extend([status] * count)


def make(impl: str, sink: Sink) -> Any:
    if impl == "compiled":
        return http1_framer.Http1Accounting(sink, lambda: 0.0)
    return http1.Http1Accounting(sink.exchange, lambda: 0.0)


def run(impl: str, client: list[bytes], server: list[bytes], interleave: bool = False) -> list[int]:
    sink = Sink()
    acct = make(impl, sink)
    reads = [(acct.client, c) for c in client] + [(acct.server, s) for s in server]
    if interleave:  # client and server reads alternate (a request, its answer, the next...)
        reads = [
            r
            for pair in zip(client, server, strict=False)
            for r in ((acct.client, pair[0]), (acct.server, pair[1]))
        ]
        reads += [(acct.client, c) for c in client[len(server) :]]
        reads += [(acct.server, s) for s in server[len(client) :]]
    for feed, data in reads:
        feed(data)  # the relay's call: whatever the bytes, it returns
        if impl == "python":
            assert len(acct.pending) <= http1.PIPELINE
            framer = acct.head_framer
            assert framer is None or len(framer.buf) <= http1.MAX_HEAD + len(data)
    acct.closed()
    acct.closed()  # either side may report the end: idempotent
    acct.drain()
    return sorted(sink.statuses)


# Pieces of HTTP/1 and near-misses: what hostile or broken peers send, glued in any order.
REQUEST_BITS = [
    b"GET / HTTP/1.1\r\n",
    b"HEAD / HTTP/1.1\r\n",
    b"POST /p HTTP/1.1\r\n",
    b"CONNECT h:1 HTTP/1.1\r\n",
    b"M-SEARCH * HTTP/1.1\r\n",
    b"GET / HTTP/1.0\r\n",
    b"GET / HTTP/2.0\r\n",
    b"G\x00T / HTTP/1.1\r\n",
    b"Host: h\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length : 2\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Upgrade: websocket\r\n",
    b"Connection: upgrade\r\n",
    b"Connection: close\r\n",
    b"\r\n",
    b"\n",
    b"abc",
    b"3\r\nabc\r\n",
    b"0\r\n\r\n",
    b"ffffffffffffffffff\r\n",
    b"-5\r\n",
    b"5;ext=1\r\n",
    b"X: " + b"a" * 300,
]
RESPONSE_BITS = [
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 204 No\r\n", b"HTTP/1.1 304 N\r\n", b"HTTP/1.1 100 Continue\r\n",
    b"HTTP/1.1 101 Switching\r\n", b"HTTP/1.1 500 E\r\n", b"HTTP/1.0 200 OK\r\n", b"HTTP/1.1 2000 X\r\n",
    b"HTTP/1.1 20 X\r\n", b"HTTP/1.x 200 OK\r\n", b"Content-Length: 3\r\n", b"Content-Length: 0\r\n",
    b"Content-Length: 1x\r\n", b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked, gzip\r\n",
    b"Connection: close\r\n", b"\r\n", b"\n", b"abc", b"3\r\nabc\r\n", b"0\r\n\r\n", b"0x3\r\n", b"-3\r\n",
    b"00000000000000000003\r\n", b"3 ; x\r\n", b"T: 1\r\n", b"\xff\xfe", b"B" * 500,
]  # fmt: skip


def hostile(bits: list[bytes]) -> st.SearchStrategy[bytes]:
    piece = st.sampled_from(bits) | st.binary(max_size=24)
    return st.lists(piece, max_size=40).map(b"".join)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(client=hostile(REQUEST_BITS), server=hostile(RESPONSE_BITS), cuts=cut_points, interleave=st.booleans())
def test_any_bytes_in_any_reads_never_raise(
    impl: str, client: bytes, server: bytes, cuts: list[int], interleave: bool
) -> None:
    statuses = run(impl, split_at(client, cuts), split_at(server, cuts[::-1]), interleave)
    # Each exchange is a request line the client sent, and a status is three digits or 0.
    assert len(statuses) <= client.count(b"HTTP/1.")
    assert all(s == 0 or 100 <= s <= 999 for s in statuses)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(client=hostile(REQUEST_BITS), server=hostile(RESPONSE_BITS), cuts=cut_points)
def test_where_reads_are_cut_does_not_change_the_count(
    impl: str, client: bytes, server: bytes, cuts: list[int]
) -> None:
    whole = run(impl, [client] if client else [], [server] if server else [])
    assert run(impl, split_at(client, cuts), split_at(server, cuts)) == whole


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(st.binary(min_size=1, max_size=4096), cut_points)
def test_random_bytes_never_raise(impl: str, data: bytes, cuts: list[int]) -> None:
    run(impl, split_at(data, cuts), split_at(data[::-1], cuts))


# --- well-formed traffic: both implementations must agree -----------------------------------


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[bytes, bytes, list[int]]:
    """Keep-alive traffic that follows RFC 9112 (CRLF line ends, no HEAD behind an open response
    (see test_http1's test_head_behind_an_open_response), at most 64 pipelined requests)."""
    requests, responses, expected = [], [], []
    name_case = draw(st.sampled_from([str.lower, str.title, str.upper]))

    def field(name: str, value: bytes) -> bytes:
        return name_case(name).encode() + b":" + draw(st.sampled_from([b"", b" ", b"  \t"])) + value + b"\r\n"

    for _ in range(draw(st.integers(1, 8))):
        method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]))
        body = draw(st.binary(max_size=60))
        target = draw(st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/x"]))
        head = method + b" " + target + b" HTTP/1.1\r\n" + field("host", b"h")
        if body and draw(st.booleans()):
            requests.append(head + field("transfer-encoding", b"chunked") + b"\r\n" + chunked(draw, body))
        else:
            requests.append(head + field("content-length", b"%d" % len(body)) + b"\r\n" + body)
        status = draw(st.sampled_from([200, 201, 204, 206, 301, 304, 404, 418, 500, 503, 599]))
        interim = b"".join(
            draw(
                st.lists(
                    st.sampled_from(
                        [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early\r\nLink: x\r\n\r\n"]
                    ),
                    max_size=2,
                )
            )
        )
        payload = b"" if status in (204, 304) else draw(st.binary(max_size=80))
        line = b"HTTP/1.1 %d %s\r\n" % (status, draw(st.sampled_from([b"OK", b"", b"Some Reason"])))
        if status not in (204, 304) and draw(st.booleans()):
            fields, sent = field("transfer-encoding", b"chunked") + b"\r\n", chunked(draw, payload)
        else:
            fields, sent = field("content-length", b"%d" % len(payload)) + b"\r\n", payload
        if method == b"HEAD":
            sent = b""
        responses.append(interim + line + field("server", b"t") + fields + sent)
        expected.append(status)
    return b"".join(requests), b"".join(responses), sorted(expected)


def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    out, pos = b"", 0
    while pos < len(body):
        size = draw(st.integers(1, len(body) - pos))
        zeros = b"0" * draw(st.integers(0, 2))
        ext = draw(st.sampled_from([b"", b";a=b", b";x"]))  # (llhttp refuses space before ';')
        out += zeros + b"%x" % size + ext + b"\r\n" + body[pos : pos + size] + b"\r\n"
        pos += size
    trailers = draw(st.sampled_from([b"", b"Trailer-A: 1\r\n"]))
    return out + b"0\r\n" + trailers + b"\r\n"


@given(exchanges(), cut_points, cut_points)
def test_both_implementations_agree_on_well_formed_traffic(
    conversation: tuple[bytes, bytes, list[int]], client_cuts: list[int], server_cuts: list[int]
) -> None:
    requests, responses, expected = conversation
    client, server = split_at(requests, client_cuts), split_at(responses, server_cuts)
    for impl in IMPLEMENTATIONS:
        assert run(impl, client, server) == expected, impl
