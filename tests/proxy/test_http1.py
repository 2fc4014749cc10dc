"""HTTP/1 accounting, both implementations (compiled and pure Python), replayed on byte streams
split at every possible point."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from agent.proxy import http1, http1_framer

IMPLEMENTATIONS = ["compiled", "python"]


class Recorder:
    """A sink (HttpMetrics' interface) that keeps the status code of every exchange it hears of."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.sum_ms = 0.0

    def exchange(self, method: bytes, status: int, latency_s: float) -> None:
        self.statuses.append(status)
        if status:
            self.sum_ms += latency_s * 1000

    def add(self, status: int, count: int, buckets: list[int] | None, sum_ms: float) -> None:
        assert (buckets is None) == (status == 0)
        assert buckets is None or sum(buckets) == count
        self.statuses.extend([status] * count)
        self.sum_ms += sum_ms


def make(impl: str, sink: Recorder, clock: Callable[[], float] = lambda: 0.0) -> Any:
    if impl == "compiled":
        return http1_framer.Http1Accounting(sink, clock)
    return http1.Http1Accounting(sink.exchange, clock)


def run(impl: str, client: list[bytes], server: list[bytes]) -> list[int]:
    """The status codes counted, sorted (the compiled accounting keeps totals, not an order)."""
    sink = Recorder()
    acct = make(impl, sink)
    for c in client:
        acct.client(c)
    for s in server:
        acct.server(s)
    acct.closed()
    return sorted(sink.statuses)


def statuses(expected: list[tuple[str, int]]) -> list[int]:
    return sorted(status for _method, status in expected)


def split_everywhere(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(1, len(data))]


def test_the_compiled_accounting_is_the_one_in_use() -> None:
    # scripts/bootstrap builds it: a build that silently fell back to Python fails here.
    assert http1.IMPLEMENTATION == "compiled"
    assert isinstance(http1.new_accounting(Recorder()), http1_framer.Http1Accounting)


def test_without_the_extension_the_python_accounting_reports_each_exchange(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http1, "_compiled", None)
    sink = Recorder()
    acct = http1.new_accounting(sink)
    assert isinstance(acct, http1.Http1Accounting)
    acct.client(GET)
    acct.server(OK)
    assert sink.statuses == [200]  # at once: nothing waits for a drain


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
)
POST = b"POST /p HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
POST_CHUNKED = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("client", "server", "expected"),
    [
        ([GET], [OK], [("GET", 200)]),
        ([GET], [CHUNKED], [("GET", 200)]),
        ([POST], [b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"], [("POST", 201)]),
        ([POST_CHUNKED], [b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\nno"], [("POST", 500)]),
        (
            [GET + GET + b"HEAD / HTTP/1.1\r\n\r\n"],
            [OK + CHUNKED + b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"],
            [("GET", 200), ("GET", 200), ("HEAD", 200)],
        ),
        ([GET], [b"HTTP/1.1 100 Continue\r\n\r\n" + OK], [("GET", 200)]),
        ([b"HEAD / HTTP/1.1\r\n\r\n"], [b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"], [("HEAD", 200)]),
        ([GET], [OK[:-1]], [("GET", 0)]),  # truncated: no complete response
        ([GET], [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"], [("GET", 304)]),
        ([GET], [b"HTTP/1.0 200 OK\r\n\r\nbody until close"], [("GET", 200)]),
        ([GET], [], [("GET", 0)]),
        (
            [b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"],
            [b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x05hello"],
            [("GET", 101)],
        ),
        (
            [b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello" + GET],
            [b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n" + OK],
            [("GET", 101)],
        ),
        ([b"CONNECT db:5432 HTTP/1.1\r\n\r\n\x00\x01"], [b"HTTP/1.1 200 OK\r\n\r\n\x00\x02"], []),
        (
            [b"HEAD / HTTP/1.1\r\n\r\n" + GET + POST_CHUNKED],
            [b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n" + CHUNKED + b"HTTP/1.1 204 No\r\n\r\n"],
            [("HEAD", 200), ("GET", 200), ("POST", 204)],
        ),
        ([GET], [b"SSH-2.0-OpenSSH_9.2\r\n"], [("GET", 0)]),
        ([b"\r\n" + GET], [b"HTTP/1.1 404 Not Found\r\ncontent-length:  3 \r\n\r\nno\n"], [("GET", 404)]),
        (
            [GET, b"GET /b HTTP/1.1\r\n\r\n"],
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nuntil close"],
            [("GET", 200), ("GET", 0)],
        ),
        ([GET], [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"], [("GET", 0)]),
    ],
    ids=[
        "content-length",
        "chunked-with-trailers",
        "post",
        "chunked-request",
        "pipelined-with-head",
        "100-continue",
        "head-has-no-body",
        "body-short-at-close",
        "304-no-body",
        "body-until-close",
        "no-response",
        "upgrade-stops",
        "upgrade-request-stops",
        "connect-is-a-tunnel",
        "keep-alive-after-head",
        "not-http-stops",
        "empty-line-before-request-and-lowercase-field",
        "other-transfer-coding-runs-to-close",
        "conflicting-lengths-stop",
    ],
)
def test_exchanges(
    impl: str, client: list[bytes], server: list[bytes], expected: list[tuple[str, int]]
) -> None:
    assert run(impl, client, server) == statuses(expected)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_split_point_gives_the_same_answer(impl: str) -> None:
    for request in split_everywhere(GET + POST_CHUNKED):
        for response in split_everywhere(OK + CHUNKED):
            assert run(impl, request, response) == [200, 200], (request, response)


def test_byte_by_byte_reads_give_the_same_answer() -> None:
    stream = GET + b"HEAD / HTTP/1.1\r\n\r\n" + POST_CHUNKED
    answers = OK + b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n" + CHUNKED
    one_at_a_time = [stream[i : i + 1] for i in range(len(stream))]
    assert run("compiled", one_at_a_time, [answers[i : i + 1] for i in range(len(answers))]) == [200] * 3


@pytest.mark.parametrize(("impl", "expected"), [("compiled", [200, 200]), ("python", [0, 0])])
def test_head_behind_an_open_response(impl: str, expected: list[int]) -> None:
    # The first response is still arriving when HEAD is sent. The compiled accounting frames each
    # response by its own request; llhttp cannot be told about HEAD midway, so the Python one
    # stops counting rather than guess (never a made-up status).
    sink = Recorder()
    acct = make(impl, sink)
    acct.client(GET)
    acct.server(OK[:-2])
    acct.client(b"HEAD / HTTP/1.1\r\n\r\n")
    acct.server(OK[-2:] + b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    acct.closed()
    assert sorted(sink.statuses) == expected


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_huge_head_stops_accounting_without_error(impl: str) -> None:
    assert run(impl, [b"GET / HTTP/1.1\r\nX: " + b"a" * 70000], [OK]) == []


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_latency_runs_from_request_head_to_response_end(impl: str) -> None:
    now = [0.0]
    sink = Recorder()
    acct = make(impl, sink, clock=lambda: now[0])
    acct.client(GET)
    now[0] = 0.25
    acct.server(OK[:-2])
    now[0] = 0.5
    acct.server(OK[-2:])
    acct.drain()
    assert sink.statuses == [200]
    assert sink.sum_ms == 500.0


def test_compiled_totals_bucket_latency_as_linkerd_does_and_drain_once() -> None:
    now = [0.0]
    added: list[tuple[int, int, list[int] | None, float]] = []

    class Sink(Recorder):
        def add(self, status: int, count: int, buckets: list[int] | None, sum_ms: float) -> None:
            added.append((status, count, buckets, sum_ms))

    acct = make("compiled", Sink(), clock=lambda: now[0])
    for latency_ms in (0.5, 1.0, 7.0, 60000.0):  # <= 1 ms twice, then (5, 10], then +Inf
        acct.client(GET)
        now[0] += latency_ms / 1000
        acct.server(OK)
    acct.drain()
    acct.drain()  # nothing new: nothing added
    buckets = [0] * 26
    buckets[0], buckets[5], buckets[25] = 2, 1, 1
    assert len(added) == 1
    status, count, got_buckets, sum_ms = added[0]
    assert (status, count, got_buckets) == (200, 4, buckets)
    assert sum_ms == pytest.approx(60008.5)


def test_compiled_makes_room_for_a_fifth_status_code() -> None:
    sink = Recorder()
    acct = make("compiled", sink)
    for code in (200, 201, 202, 203, 500, 200):
        acct.client(GET)
        acct.server(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % code)
    assert sorted(sink.statuses) == [200, 201, 202, 203]  # drained when the fifth came
    acct.closed()
    assert sorted(sink.statuses) == [200, 200, 201, 202, 203, 500]


class FakeLeg:
    """A relay leg as `attach` sees it, feeding its tap the way Leg.data_received does."""

    def __init__(self) -> None:
        self.tap: Any = None
        self.accounting: Any = None

    def read(self, data: bytes) -> None:
        if self.tap is not None:
            try:
                self.tap(data)
            except Exception as exc:
                self.accounting.failed(self, exc)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_attached_legs_feed_the_accounting_and_taps_follow_the_state(impl: str) -> None:
    sink = Recorder()
    acct = make(impl, sink)
    client, server = FakeLeg(), FakeLeg()
    acct.attach(client, server)
    client.read(GET)
    server.read(OK)
    acct.drain()
    assert sink.statuses == [200]
    client.read(GET)
    server.read(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")  # not HTTP: accounting stops, the taps go
    assert client.tap is None and server.tap is None
    assert not acct.active
    client.read(GET)
    acct.closed()
    assert sink.statuses == [200, 0]


def test_after_head_the_python_server_tap_is_the_python_framer() -> None:
    sink = Recorder()
    acct = make("python", sink)
    client, server = FakeLeg(), FakeLeg()
    acct.attach(client, server)
    parser_tap = server.tap
    client.read(b"HEAD / HTTP/1.1\r\n\r\n" + GET)
    assert server.tap is not parser_tap
    server.read(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n" + OK)
    assert sink.statuses == [200, 200]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_connect_through_attached_legs_stops_accounting(impl: str) -> None:
    sink = Recorder()
    acct = make(impl, sink)
    client, server = FakeLeg(), FakeLeg()
    acct.attach(client, server)
    client.read(b"CONNECT db:5432 HTTP/1.1\r\n\r\n\x00\x01")
    assert client.tap is None and server.tap is None
    acct.closed()
    assert sink.statuses == []


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_upgrade_request_leaves_only_the_response_side_read(impl: str) -> None:
    sink = Recorder()
    acct = make(impl, sink)
    client, server = FakeLeg(), FakeLeg()
    acct.attach(client, server)
    client.read(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert client.tap is None and server.tap is not None
    server.read(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert server.tap is None
    acct.closed()
    assert sink.statuses == [101]


def _conversation(rng: random.Random) -> tuple[bytes, bytes, list[int]]:
    """Random keep-alive traffic: requests with and without bodies, responses of every framing."""
    requests, responses, expected = [], [], []
    for _ in range(rng.randint(1, 6)):
        method = rng.choice([b"GET", b"HEAD", b"POST", b"DELETE"])
        body = b"x" * rng.choice([0, rng.randint(1, 40)])
        if method == b"POST" and body and rng.random() < 0.5:
            chunks = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            requests.append(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        else:
            head = b"%s /r HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (method, len(body))
            requests.append(head + body)
        status = rng.choice([200, 201, 204, 304, 404, 500, 503])
        interim = b"HTTP/1.1 100 Continue\r\n\r\n" if rng.random() < 0.2 else b""
        payload = b"" if status in (204, 304) else b"z" * rng.randint(0, 50)
        if status not in (204, 304) and rng.random() < 0.5:
            fields = b"Transfer-Encoding: chunked\r\n\r\n"
            sent = (b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b"") + b"0\r\n\r\n"
        else:
            fields, sent = b"Content-Length: %d\r\n\r\n" % len(payload), payload
        if method == b"HEAD":
            sent = b""  # the fields describe the body a GET would get
        responses.append(interim + b"HTTP/1.1 %d X\r\nServer: t\r\n" % status + fields + sent)
        expected.append(status)
    return b"".join(requests), b"".join(responses), sorted(expected)


def _chop(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_both_implementations_agree_on_random_traffic_read_in_random_pieces() -> None:
    rng = random.Random(20261125)
    for _ in range(400):
        requests, responses, expected = _conversation(rng)
        for impl in IMPLEMENTATIONS:
            got = run(impl, _chop(rng, requests), _chop(rng, responses))
            assert got == expected, (impl, requests, responses)


EMPTY_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("client", "server", "expected"),
    [
        ([GET], [b"HTTP/1.1 2000 X\r\nContent-Length: 0\r\n\r\n"], [0]),
        ([GET], [b"HTTP/1.1 200X\r\nContent-Length: 0\r\n\r\n"], [0]),
        ([GET], [b"HTTP/1.x 200 OK\r\nContent-Length: 0\r\n\r\n"], [0]),
        ([GET], [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5zz\r\nhello\r\n0\r\n\r\n"], [0]),
        ([GET], [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"], [0]),
        (
            [GET],
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"0" * 17
                + b"5\r\nhello\r\n0\r\n\r\n"
            ],
            [200],
        ),
        (
            [b"HEAD / HTTP/1.1\r\n\r\n" + GET],
            [EMPTY_OK + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"],
            [0, 200],
        ),
        ([GET], [b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n"], [0]),
        (
            [b"GET / HTTP/1.1\r\nConnection: noupgrade\r\nUpgrade: x\r\n\r\n" + GET],
            [EMPTY_OK + EMPTY_OK],
            [200, 200],
        ),
        ([b"M-SEARCH * HTTP/1.1\r\nHost: h\r\n\r\n"], [EMPTY_OK], [200]),
    ],
    ids=[
        "four-digit-status",
        "status-run-on",
        "not-a-version",
        "junk-after-chunk-size",
        "0x-chunk-size",
        "leading-zeros-in-chunk-size",
        "negative-chunk-size-after-head",
        "space-before-colon",
        "upgrade-only-as-a-whole-token",
        "method-with-a-dash",
    ],
)
def test_odd_or_hostile_framing(
    impl: str, client: list[bytes], server: list[bytes], expected: list[int]
) -> None:
    assert run(impl, client, server) == expected


def test_compiled_ends_heads_at_a_bare_lf_empty_line() -> None:
    # llhttp (the Python accounting) rejects bare LF; the compiled one frames it as servers do,
    # and must not run the next message's head into this one.
    lf_ok = b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"
    got = run("compiled", [GET + GET], [lf_ok + b"HTTP/1.1 500 X\r\nContent-Length: 0\r\n\r\n"])
    assert got == [200, 500]
    got = run("compiled", [b"POST / HTTP/1.1\nContent-Length: 2\n\nab" + GET], [EMPTY_OK + EMPTY_OK])
    assert got == [200, 200]
