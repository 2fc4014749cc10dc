"""HTTP/1 accounting replayed on byte streams, split at every possible point."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest

from agent.proxy.http1 import Http1Accounting


class Exchange(NamedTuple):
    method: str
    status: int
    latency_s: float


def run(client: list[bytes], server: list[bytes], close: bool = True) -> list[tuple[str, int]]:
    got: list[Exchange] = []
    acct = Http1Accounting(lambda *e: got.append(Exchange(e[0].decode(), e[1], e[2])), clock=lambda: 0.0)
    for c in client:
        acct.client(c)
    for s in server:
        acct.server(s)
    if close:
        acct.closed()
    return [(e.method, e.status) for e in got]


def split_everywhere(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(1, len(data))]


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
)
POST = b"POST /p HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
POST_CHUNKED = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"


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
    ],
)
def test_exchanges(client: list[bytes], server: list[bytes], expected: list[tuple[str, int]]) -> None:
    assert run(client, server) == expected


def test_every_split_point_gives_the_same_answer() -> None:
    for request in split_everywhere(GET + POST_CHUNKED):
        for response in split_everywhere(OK + CHUNKED):
            assert run(request, response) == [("GET", 200), ("POST", 200)], (request, response)


def test_head_behind_an_open_response_stops_counting_rather_than_guess() -> None:
    # The first response is still arriving when HEAD is sent: its framing cannot be taken over.
    acct_got: list[tuple[str, int]] = []
    acct = Http1Accounting(lambda *e: acct_got.append((e[0].decode(), e[1])), clock=lambda: 0.0)
    acct.client(GET)
    acct.server(OK[:-2])
    acct.client(b"HEAD / HTTP/1.1\r\n\r\n")
    acct.server(OK[-2:] + b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    acct.closed()
    assert acct_got == [("GET", 0), ("HEAD", 0)]  # never a made-up status
    assert not acct.active


def test_huge_head_stops_accounting_without_error() -> None:
    assert run([b"GET / HTTP/1.1\r\nX: " + b"a" * 70000], [OK]) == []


def test_latency_runs_from_request_head_to_response_end() -> None:
    now = [0.0]
    got: list[Exchange] = []
    acct = Http1Accounting(lambda *e: got.append(Exchange(e[0].decode(), e[1], e[2])), clock=lambda: now[0])
    acct.client(GET)
    now[0] = 0.25
    acct.server(OK[:-2])
    now[0] = 0.5
    acct.server(OK[-2:])
    assert got == [Exchange("GET", 200, 0.5)]


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


def test_attached_legs_feed_the_parsers_and_taps_follow_the_state() -> None:
    got: list[tuple[str, int]] = []
    acct = Http1Accounting(lambda *e: got.append((e[0].decode(), e[1])), clock=lambda: 0.0)
    client, server = FakeLeg(), FakeLeg()
    acct.attach(client, server)
    client.read(GET)
    server.read(OK)
    assert got == [("GET", 200)]
    client.read(GET)
    server.read(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")  # not HTTP: accounting stops, the taps go
    assert client.tap is None and server.tap is None
    client.read(GET)
    acct.closed()
    assert got == [("GET", 200), ("GET", 0)]


def test_after_head_the_server_tap_is_the_python_framer() -> None:
    got: list[tuple[str, int]] = []
    acct = Http1Accounting(lambda *e: got.append((e[0].decode(), e[1])), clock=lambda: 0.0)
    client, server = FakeLeg(), FakeLeg()
    acct.attach(client, server)
    parser_tap = server.tap
    client.read(b"HEAD / HTTP/1.1\r\n\r\n" + GET)
    assert server.tap is not parser_tap
    server.read(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n" + OK)
    assert got == [("HEAD", 200), ("GET", 200)]


def test_a_connect_through_attached_legs_stops_accounting() -> None:
    got: list[tuple[str, int]] = []
    acct = Http1Accounting(lambda *e: got.append((e[0].decode(), e[1])), clock=lambda: 0.0)
    client, server = FakeLeg(), FakeLeg()
    acct.attach(client, server)
    client.read(b"CONNECT db:5432 HTTP/1.1\r\n\r\n\x00\x01")
    assert client.tap is None and server.tap is None
    acct.closed()
    assert got == []
