"""The l5d-orig-proto gateway: an HTTP/2 client written as linkerd2-proxy's `Upgrade` sends
(l5d-orig-proto set, transfer-encoding dropped; the `h2` library's client state machine) talks to
an `OrigProtoGateway` over a socketpair, the gateway talks HTTP/1 to a real asyncio app on
loopback (parsed with httptools, not h11, so the gateway's parser is not checked against itself),
and every body and status is compared with a direct HTTP/1 call to the same app (httpx)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest
import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from hpack import Encoder

from agent.identity.store import IdentityStore
from agent.proxy.detect import NEED_DATA
from agent.proxy.orig_proto import (
    MAX_DETECT,
    PREFACE,
    REFUSED,
    Http1Request,
    OrigProto,
    Refusal,
    detect_upgraded,
    downgrade_request,
    parse_orig_proto,
    upgrade_response,
)
from agent.proxy.orig_proto_io import GatewaySettings, OrigProtoGateway
from agent.proxy.relay import Leg, TlsLeg
from agent.proxy.tls import Credentials
from agent.telemetry.proxy_metrics import ProxyMetrics
from tests.support import issue_identity

Headers = list[tuple[bytes, bytes]]
BIG = bytes(range(256)) * (10 * 1024 * 1024 // 256)  # 10 MiB, every byte value
BASE = 'direction="inbound"'
AUTHZ = 'authz_kind="default"'
DB_NAME = "db.shop.serviceaccount.identity.linkerd.cluster.local"


# --- detection and translation, no sockets ----------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def block(fields: Headers) -> bytes:
    return Encoder().encode(fields)


REQUEST: Headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.b:80"), (b":path", b"/")]
UPGRADED = [*REQUEST, (b"l5d-orig-proto", b"HTTP/1.1")]
SETTINGS = frame(0x4, 0, 0, b"\x00\x03\x00\x00\x00\x64")
WINDOW = frame(0x8, 0, 0, b"\x00\x01\x00\x00")


def test_detect_upgraded_table() -> None:
    up, native = block(UPGRADED), block(REQUEST)
    whole_up = PREFACE + SETTINGS + WINDOW + frame(0x1, 0x5, 1, up)
    cases: list[tuple[str, bytes, object]] = [
        ("empty", b"", NEED_DATA),
        ("half the preface", PREFACE[:10], NEED_DATA),
        ("HTTP/1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
        ("TLS", b"\x16\x03\x01\x02\x00", False),
        ("preface only", PREFACE, NEED_DATA),
        ("preface + settings", PREFACE + SETTINGS, NEED_DATA),
        ("upgraded", whole_up, True),
        ("upgraded, headers cut", whole_up[:-3], NEED_DATA),
        ("native", PREFACE + SETTINGS + frame(0x1, 0x5, 1, native), False),
        ("upgraded over CONTINUATION", PREFACE + frame(0x1, 0, 1, up[:5]) + frame(0x9, 0x4, 1, up[5:]), True),
        ("CONTINUATION awaited", PREFACE + frame(0x1, 0, 1, up[:5]), NEED_DATA),
        (
            "CONTINUATION on another stream",
            PREFACE + frame(0x1, 0, 1, up[:5]) + frame(0x9, 4, 3, up[5:]),
            False,
        ),
        ("padded + priority", PREFACE + frame(0x1, 0x2C, 1, b"\x03" + b"\0" * 5 + up + b"\0\0\0"), True),
        ("padding longer than the frame", PREFACE + frame(0x1, 0x0C, 1, b"\xff" + up), False),
        ("headers on stream 0", PREFACE + frame(0x1, 0x5, 0, up), False),
        ("headers on an even stream", PREFACE + frame(0x1, 0x5, 2, up), False),
        ("not hpack", PREFACE + frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\xff"), False),
        ("garbage after the preface", PREFACE + b"\xff" * 40, False),
        ("a frame past the bound", PREFACE + b"\x10\x00\x00\x00\x00\x00\x00\x00\x01", False),
        ("settings padding up to the bound", PREFACE + frame(0x4, 0, 0, b"\0" * 6 * 11000), False),
    ]
    for name, data, expected in cases:
        assert detect_upgraded(data) is expected, name
    # every prefix of an upgraded connection's start is NEED_DATA, never a wrong answer
    for cut in range(len(whole_up)):
        assert detect_upgraded(whole_up[:cut]) is NEED_DATA, cut
    assert len(PREFACE + frame(0x4, 0, 0, b"\0" * 6 * 11000)) > MAX_DETECT


def test_orig_proto_values_as_linkerd_reads_them() -> None:
    assert parse_orig_proto(b"HTTP/1.1") == OrigProto(b"1.1", False)
    assert parse_orig_proto(b"HTTP/1.0") == OrigProto(b"1.0", False)
    assert parse_orig_proto(b"HTTP/1.1; absolute-form") == OrigProto(b"1.1", True)
    assert parse_orig_proto(b"HTTP/1.0; absolute-form") == OrigProto(b"1.0", True)
    for bad in (b"", b"HTTP/2", b"http/1.1", b"HTTP/1", b"h2c"):
        assert parse_orig_proto(bad) is None, bad


def test_downgrade_request_table() -> None:
    def down(extra: Headers, end: bool = True, base: Headers = REQUEST) -> Any:
        return downgrade_request([*base, *extra], end)

    assert down([]) is None  # native HTTP/2
    got = down([(b"l5d-orig-proto", b"HTTP/1.1"), (b"accept", b"*/*")])
    assert got == Http1Request(b"GET", b"/", b"1.1", [(b"host", b"a.b:80"), (b"accept", b"*/*")])
    got = down([(b"l5d-orig-proto", b"HTTP/1.0; absolute-form"), (b"host", b"h")])
    assert got == Http1Request(b"GET", b"http://a.b:80/", b"1.0", [(b"host", b"h")])
    # a body of unknown length (the client's chunked body) goes chunked, HTTP/1.1
    got = down([(b"l5d-orig-proto", b"HTTP/1.0")], end=False)
    assert got.version == b"1.1" and (b"transfer-encoding", b"chunked") in got.headers
    got = down([(b"l5d-orig-proto", b"HTTP/1.1"), (b"content-length", b"5")], end=False)
    assert (b"transfer-encoding", b"chunked") not in got.headers
    got = down(
        [(b"l5d-orig-proto", b"HTTP/1.1"), (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"te", b"trailers")]
    )
    assert (b"cookie", b"a=1; b=2") in got.headers and all(n != b"te" for n, _ in got.headers)
    assert down([(b"l5d-orig-proto", b"HTTP/2")]) == Refusal(
        "orig_proto_bad_value", "l5d-orig-proto b'HTTP/2'"
    )
    connect = [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"l5d-orig-proto", b"HTTP/1.1")]
    assert down([], base=connect).reason == "orig_proto_bad_request"


def test_upgrade_response_drops_connection_fields_and_names_the_version() -> None:
    fields = [
        (b"connection", b"keep-alive, x-hop"),
        (b"keep-alive", b"timeout=5"),
        (b"x-hop", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"content-type", b"text/plain"),
        (b"l5d-orig-proto", b"forged"),
    ]
    assert upgrade_response(200, b"1.1", fields) == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"l5d-orig-proto", b"HTTP/1.1"),
    ]
    assert upgrade_response(404, b"1.0", [])[-1] == (b"l5d-orig-proto", b"HTTP/1.0")


# --- the app: HTTP/1 over loopback, parsed by httptools -----------------------------------------


@dataclass
class Seen:
    connections: int = 0
    open: int = 0
    most_open: int = 0
    requests: list[tuple[bytes, bytes, bytes, dict[bytes, bytes], bytes]] = field(default_factory=list)
    wanted: int = 0  # `arrived` is set once this many requests came
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    none_open: asyncio.Event = field(default_factory=asyncio.Event)  # set when the last one closes


class App(asyncio.Protocol):
    """Routes: /get, /echo (POST), /chunked, /big (10 MiB), /close (HTTP/1.0, no length),
    /nobody (204), /slow (answers after `release` is set)."""

    def __init__(self, seen: Seen, release: asyncio.Event) -> None:
        self.seen, self.release = seen, release
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.seen.connections += 1
        self.seen.open += 1
        self.seen.most_open = max(self.seen.most_open, self.seen.open)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.seen.open -= 1
        if not self.seen.open:
            self.seen.none_open.set()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method, version = self.parser.get_method(), self.parser.get_http_version().encode()
        self.seen.requests.append((method, self.url, version, dict(self.headers), bytes(self.body)))
        if self.seen.wanted and len(self.seen.requests) >= self.seen.wanted:
            self.seen.arrived.set()
        path = self.url.split(b"?")[0]
        if path.startswith(b"http://"):
            path = b"/" + path.split(b"/", 3)[3]
        if path == b"/slow":
            body = bytes(self.body)
            asyncio.get_running_loop().create_task(self._slow(body))
            return
        self.respond(method, path, bytes(self.body))

    async def _slow(self, body: bytes) -> None:
        await self.release.wait()
        self.respond(b"GET", b"/get", body)

    def respond(self, method: bytes, path: bytes, body: bytes) -> None:
        w = self.transport.write
        if path == b"/echo":
            w(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Sum: %s\r\n\r\n" % (len(body), _sha(body)) + body)
        elif path == b"/chunked":
            w(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")
            for part in (b"hello ", b"chunked ", b"world" * 1000):
                w(b"%x\r\n%s\r\n" % (len(part), part))
            w(b"0\r\nX-Trailer: done\r\n\r\n")
        elif path == b"/big":
            w(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG))
            if method != b"HEAD":
                w(BIG)
        elif path == b"/close":
            w(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close")
            self.transport.close()
        elif path == b"/switch":
            w(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nraw")
        elif path == b"/nobody":
            w(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            text = b"got " + path
            w(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s"
                % (len(text), text)
            )


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode()


# --- the in-cluster side: h2 as linkerd2-proxy's Upgrade writes it ------------------------------


@dataclass
class Answer:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class UpgradeClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(8 * 1024 * 1024)
        self.answers: dict[int, Answer] = {}
        self.window = asyncio.Event()
        self.closed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read())
        self.flush()

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def _read(self) -> None:
        while True:
            data = await self.reader.read(65536)
            if not data:
                break
            for event in self.conn.receive_data(data):
                answer = self.answers.get(getattr(event, "stream_id", 0))
                if isinstance(event, ResponseReceived) and answer is not None:
                    answer.headers = dict(event.headers)
                    answer.status = int(answer.headers[b":status"])
                elif isinstance(event, DataReceived) and answer is not None:
                    answer.body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, TrailersReceived) and answer is not None:
                    answer.trailers = dict(event.headers)
                elif isinstance(event, StreamEnded) and answer is not None:
                    answer.done.set()
                elif isinstance(event, StreamReset) and answer is not None:
                    answer.reset = event.error_code
                    answer.done.set()
                elif isinstance(event, WindowUpdated):
                    self.window.set()
            self.flush()
        self.closed.set()
        for answer in self.answers.values():
            answer.done.set()

    def start(self, path: bytes, method: bytes = b"GET", body: bytes | None = None, **kw: Any) -> int:
        """Open a stream as linkerd's Upgrade does; returns its id (body sent by `send_body`)."""
        version = kw.get("orig", b"HTTP/1.1")
        headers: Headers = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", kw.get("authority", b"app.test:8080")),
            (b":path", path),
            *kw.get("headers", []),
        ]
        if body is not None and all(n != b"transfer-encoding" for n, _ in headers):
            headers.append((b"content-length", str(len(body)).encode()))  # the HTTP/1 client's
        headers = [(n, v) for n, v in headers if n != b"transfer-encoding"]  # illegal in HTTP/2
        if version is not None:
            headers.append((b"l5d-orig-proto", version))
        sid = self.conn.get_next_available_stream_id()
        self.answers[sid] = Answer()
        self.conn.send_headers(sid, headers, end_stream=body is None)
        self.flush()
        return sid

    async def send_body(self, sid: int, body: bytes) -> None:
        view = memoryview(body)
        answer = self.answers[sid]
        while view:
            if answer.done.is_set():
                return  # answered (or reset) before its body went: the rest is not wanted
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.window.clear()
                waits = [asyncio.ensure_future(e.wait()) for e in (self.window, answer.done)]
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for waiter in pending:
                    waiter.cancel()
                continue
            self.conn.send_data(sid, bytes(view[:window]))
            view = view[window:]
            self.flush()
            await self.writer.drain()
        self.conn.end_stream(sid)
        self.flush()

    async def request(
        self, path: bytes, method: bytes = b"GET", body: bytes | None = None, **kw: Any
    ) -> Answer:
        sid = self.start(path, method, body, **kw)
        if body is not None:
            await self.send_body(sid, body)
        answer = self.answers[sid]
        await asyncio.wait_for(answer.done.wait(), 30)
        return answer


@dataclass
class Rig:
    app: Address
    seen: Seen
    release: asyncio.Event
    client: UpgradeClient
    gateway: OrigProtoGateway
    client_leg: Leg
    metrics: ProxyMetrics
    refused: list[str]

    def requests(self) -> float:
        return float(self.metrics.request_total.child(BASE).value)

    def authorized(self) -> float:
        return float(self.metrics.http_authz_allow.child(AUTHZ).value)

    def responses(self, status: int) -> float:
        key = (
            f'{BASE},status_code="{status}",classification="{"failure" if status >= 500 else "success"}"'
            ',grpc_status="",error=""'
        )
        return float(self.metrics.response_total.child(key).value)


Address = tuple[str, int]
APP_CONN = 'direction="inbound",peer="dst"'  # the app legs' transport metric labels


async def rig(settings: GatewaySettings | None = None, app_port: int | None = None) -> Rig:
    loop = asyncio.get_running_loop()
    seen, release = Seen(), asyncio.Event()
    server = await loop.create_server(lambda: App(seen, release), "127.0.0.1", 0)
    app = ("127.0.0.1", app_port or server.sockets[0].getsockname()[1])

    async def connect(address: Address, leg: Leg) -> Leg:
        await loop.create_connection(lambda: leg, *address)
        return leg

    metrics, refused = ProxyMetrics(), []
    settings = settings or GatewaySettings()
    http = metrics.http(BASE, AUTHZ)

    def observe_app(leg: Leg) -> None:  # as Proxy.observe: the app leg's transport metrics
        leg.metrics = metrics.connection(APP_CONN)

    gateway = OrigProtoGateway(
        app, connect, http, settings, on_refused=refused.append, observe_app=observe_app
    )
    ours, theirs = socket.socketpair()
    client_leg = Leg()
    await loop.connect_accepted_socket(lambda: client_leg, ours)
    client_leg.pair(gateway)
    reader, writer = await asyncio.open_connection(sock=theirs)
    return Rig(app, seen, release, UpgradeClient(reader, writer), gateway, client_leg, metrics, refused)


async def direct(app: Address, path: str, method: str = "GET", body: bytes | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{app[0]}:{app[1]}") as client:
        return await client.request(method, path, content=body)


def run(test: Callable[[], Awaitable[None]]) -> None:
    """On uvloop, the agent's loop (its transports raise where asyncio's only warn)."""
    uvloop.run(asyncio.wait_for(test(), 60))


# --- end to end -------------------------------------------------------------------------------


def test_get_post_chunked_close_delimited_and_bodiless_match_a_direct_call() -> None:
    async def main() -> None:
        r = await rig()
        posted = bytes(range(256)) * 4096  # 1 MiB: more than one window each way
        for path, method, body in (
            (b"/get", b"GET", None),
            (b"/echo", b"POST", posted),
            (b"/echo", b"POST", b""),
            (b"/chunked", b"GET", None),
            (b"/close", b"GET", None),
            (b"/nobody", b"GET", None),
            (b"/big", b"HEAD", None),
        ):
            answer = await r.client.request(path, method, body)
            want = await direct(r.app, path.decode(), method.decode(), body)
            assert answer.reset is None, path
            assert (answer.status, bytes(answer.body)) == (want.status_code, want.content), path
            version = b"HTTP/1.0" if path == b"/close" else b"HTTP/1.1"
            assert answer.headers[b"l5d-orig-proto"] == version, path
            assert b"transfer-encoding" not in answer.headers and b"connection" not in answer.headers
        assert r.client.answers[7].trailers == {b"x-trailer": b"done"}  # /chunked's
        # what the app saw: HTTP/1.1, Host from :authority, no l5d-orig-proto, the body intact
        upgraded = [req for req in r.seen.requests if req[3].get(b"host") == b"app.test:8080"]
        assert len(upgraded) == 7
        for _method, _url, version, headers, _body in upgraded:
            assert version == b"1.1" and b"l5d-orig-proto" not in headers
        assert upgraded[1][4] == posted and upgraded[1][3][b"content-length"] == b"1048576"
        assert upgraded[1][3].get(b"transfer-encoding") is None
        # sequential requests reuse one keep-alive connection (the close-delimited one ended its own)
        assert r.seen.connections - 7 <= 2  # the direct calls opened 7 of them
        assert r.requests() == 7 and r.responses(200) == 5 and r.responses(201) == 1 and r.responses(204) == 1
        assert r.authorized() == 7  # inbound_http_authz_allow_total, per request as for HTTP/1

    run(main)


def test_a_chunked_upload_http10_and_absolute_form_reach_the_app_as_sent() -> None:
    async def main() -> None:
        r = await rig()
        # the client's app sent a chunked body: Upgrade dropped transfer-encoding, no length
        answer = await r.client.request(
            b"/echo", b"POST", b"x" * 100_000, headers=[(b"transfer-encoding", b"chunked")]
        )
        assert answer.status == 200 and bytes(answer.body) == b"x" * 100_000
        answer = await r.client.request(b"/get", orig=b"HTTP/1.0")
        assert (answer.status, bytes(answer.body)) == (200, b"got /get")
        answer = await r.client.request(b"/get?q=1", orig=b"HTTP/1.1; absolute-form")
        assert (answer.status, bytes(answer.body)) == (200, b"got /get")
        (m1, _u1, v1, h1, _b1), (_m2, _u2, v2, _h2, _b2), (_m3, u3, _v3, _h3, _b3) = r.seen.requests
        assert m1 == b"POST" and v1 == b"1.1" and h1[b"transfer-encoding"] == b"chunked"
        assert v2 == b"1.0"
        assert u3 == b"http://app.test:8080/get?q=1"

    run(main)


def test_a_10_mib_response_is_byte_identical_with_flow_control() -> None:
    async def main() -> None:
        r = await rig()
        answer = await r.client.request(b"/big")
        assert answer.status == 200 and len(answer.body) == len(BIG) and bytes(answer.body) == BIG
        assert r.requests() == 1 and r.responses(200) == 1

    run(main)


def test_100_concurrent_streams_use_a_bounded_pool_of_app_connections() -> None:
    async def main() -> None:
        r = await rig(GatewaySettings(max_app_connections=10, max_idle_app_connections=4))
        sids = [r.client.start(f"/get?n={i}".encode()) for i in range(100)]
        answers = [r.client.answers[sid] for sid in sids]
        await asyncio.wait_for(asyncio.gather(*(a.done.wait() for a in answers)), 30)
        for i, answer in enumerate(answers):
            assert (answer.status, bytes(answer.body), answer.reset) == (200, b"got /get", None), i
        assert r.seen.most_open <= 10 and r.seen.connections <= 10
        assert len(r.seen.requests) == 100 and r.requests() == 100 and r.responses(200) == 100
        await asyncio.sleep(0)
        assert len(r.gateway.idle) <= 4 and not r.refused

    run(main)


def test_concurrent_held_streams_each_get_their_own_app_connection() -> None:
    async def main() -> None:
        r = await rig(GatewaySettings(max_app_connections=8))
        sids = [r.client.start(b"/slow") for _ in range(20)]
        r.seen.wanted = 8
        await asyncio.wait_for(r.seen.arrived.wait(), 10)
        assert r.seen.most_open == 8  # at most N open; the other 12 wait for one
        r.release.set()
        for sid in sids:
            await asyncio.wait_for(r.client.answers[sid].done.wait(), 30)
            assert r.client.answers[sid].status == 200
        assert len(r.seen.requests) == 20

    run(main)


def test_a_stream_flood_past_the_limit_is_refused_and_counted() -> None:
    async def main() -> None:
        r = await rig(GatewaySettings(max_streams=100))
        # 150 streams written before the client reads our SETTINGS: it does not know the limit yet
        sids = [r.client.start(b"/slow") for _ in range(150)]
        for sid in sids[100:]:
            await asyncio.wait_for(r.client.answers[sid].done.wait(), 10)
            assert r.client.answers[sid].reset == 7  # REFUSED_STREAM: never processed, retry
        assert r.refused.count("h2_refused_stream") == 50
        r.release.set()
        for sid in sids[:100]:
            await asyncio.wait_for(r.client.answers[sid].done.wait(), 30)
            assert r.client.answers[sid].status == 200
        assert r.requests() == 100  # refused streams were never requests
        assert REFUSED["h2_refused_stream"] >= 50
        # the connection still serves
        assert (await r.client.request(b"/get")).status == 200

    run(main)


def test_a_bad_orig_proto_value_and_a_native_stream_are_refused_and_counted() -> None:
    async def main() -> None:
        r = await rig()
        answer = await r.client.request(b"/get", orig=b"HTTP/2")
        assert answer.status == 400 and answer.headers[b"l5d-proxy-error"] == b"orig_proto_bad_value"
        answer = await r.client.request(b"/echo", b"POST", b"x" * 200_000, orig=b"SPDY")
        assert answer.status == 400
        answer = await r.client.request(b"/get", orig=None)  # native HTTP/2 on an upgraded connection
        assert answer.reset == 7
        assert r.refused == ["orig_proto_bad_value", "orig_proto_bad_value", "orig_proto_mixed"]
        assert r.requests() == 2 and r.responses(400) == 2  # answered by the proxy: counted
        assert not r.seen.requests
        assert (await r.client.request(b"/get")).status == 200

    run(main)


def test_an_app_that_switches_protocols_or_breaks_http1_is_a_502() -> None:
    async def main() -> None:
        r = await rig()
        answer = await r.client.request(b"/switch")
        assert answer.status == 502 and bytes(answer.body) == b""
        assert (await r.client.request(b"/get")).status == 200  # on another app connection
        assert r.requests() == 2 and r.responses(502) == 1 and r.responses(200) == 1

    run(main)


def test_an_app_that_refuses_connections_is_a_502() -> None:
    async def main() -> None:
        spare = socket.socket()
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
        spare.close()  # nothing listens there now
        r = await rig(app_port=port)
        answer = await r.client.request(b"/get")
        assert answer.status == 502 and r.refused == ["app_connect_failed"]
        assert r.requests() == 1 and r.responses(502) == 1
        # A connection that never opened holds no open-connection count (it leaked one before).
        assert r.metrics.tcp_open_connections.child(APP_CONN).value == 0
        assert r.metrics.tcp_open_total.child(APP_CONN).value == 0

    run(main)


@pytest.mark.parametrize(
    "hostile",
    [
        b"\xff" * 64,  # garbage after the preface
        frame(0x1, 0x5, 1, b"\xff\xff\xff\xff"),  # HEADERS hpack cannot decode
        frame(0x0, 0x1, 1, b"data on an idle stream"),
        frame(0x4, 0, 0, b"\x00\x04\xff\xff\xff\xff"),  # window size past 2^31-1
        frame(0x1, 0x4, 1, block([(b":method", b"GET"), (b"x", b"y" * 70000)])),  # header list too large
    ],
)
def test_hostile_frames_end_the_connection_not_the_agent(hostile: bytes) -> None:
    async def main() -> None:
        r = await rig()
        r.client.writer.write(hostile)
        await asyncio.wait_for(r.client.closed.wait(), 10)  # GOAWAY, then the close
        assert r.gateway.closed and r.client_leg.closed
        assert "h2_protocol_error" in r.refused

    run(main)


def test_idle_app_connections_close_after_the_pool_timeout() -> None:
    async def main() -> None:
        r = await rig(GatewaySettings(idle_app_timeout_s=0.05))
        assert (await r.client.request(b"/get")).status == 200
        assert len(r.gateway.idle) == 1 and r.seen.open == 1
        await asyncio.wait_for(r.seen.none_open.wait(), 10)
        assert not r.gateway.idle and not r.gateway.conns
        assert (await r.client.request(b"/get")).status == 200  # a new one then
        assert r.seen.connections == 2

    run(main)


def test_a_client_gone_mid_request_closes_its_app_connections_and_counts_no_response() -> None:
    async def main() -> None:
        r = await rig()
        r.client.start(b"/slow")
        r.seen.wanted = 1
        await asyncio.wait_for(r.seen.arrived.wait(), 10)
        r.client.writer.close()
        await asyncio.wait_for(r.seen.none_open.wait(), 10)
        assert r.gateway.closed and r.client_leg.closed
        no_response = 'classification="failure",grpc_status="",error="unclassified"'
        assert r.metrics.response_total.child(f"{BASE},{no_response}").value == 1
        assert r.requests() == 1

    run(main)


def test_the_client_ending_its_side_ends_the_connection_as_h2_does() -> None:
    async def main() -> None:
        r = await rig()
        for _ in range(3):
            r.client.start(b"/slow")
        r.seen.wanted = 3
        await asyncio.wait_for(r.seen.arrived.wait(), 10)
        r.client.writer.write_eof()
        await asyncio.wait_for(r.client.closed.wait(), 10)
        await asyncio.wait_for(r.seen.none_open.wait(), 10)
        assert r.gateway.closed and r.requests() == 3
        no_response = 'classification="failure",grpc_status="",error="unclassified"'
        assert r.metrics.response_total.child(f"{BASE},{no_response}").value == 3

    run(main)


def test_uploads_waiting_for_an_app_connection_do_not_starve_the_ones_served() -> None:
    async def main() -> None:
        # Streams waiting for one of 2 app connections keep their DATA unacknowledged: the
        # connection's window must still let the 2 served uploads finish.
        r = await rig(GatewaySettings(max_app_connections=2))
        bodies = [bytes([i]) * 300_000 for i in range(8)]
        sids = [r.client.start(b"/echo", b"POST", body) for body in bodies]
        sent = dict.fromkeys(sids, 0)
        conn = r.client.conn
        for sid, body in zip(sids[2:], bodies[2:], strict=True):  # the waiting ones take the window
            while (size := min(conn.local_flow_control_window(sid), 16384, len(body) - sent[sid])) > 0:
                conn.send_data(sid, body[sent[sid] : sent[sid] + size])
                sent[sid] += size
        r.client.flush()
        assert sum(sent.values()) >= 65535  # the whole of a default connection window
        await asyncio.gather(
            *(r.client.send_body(sid, body) for sid, body in zip(sids[:2], bodies[:2], strict=True))
        )
        for sid in sids[:2]:
            await asyncio.wait_for(r.client.answers[sid].done.wait(), 10)
        for sid, body in zip(sids[2:], bodies[2:], strict=True):
            await r.client.send_body(sid, body[sent[sid] :])
        for sid, body in zip(sids, bodies, strict=True):
            answer = r.client.answers[sid]
            await asyncio.wait_for(answer.done.wait(), 20)
            assert (answer.status, bytes(answer.body)) == (200, body)
        assert r.seen.most_open <= 2

    run(main)


def test_over_mtls_with_the_relay_tls_leg(tmp_path: Path) -> None:
    """The gateway paired with the proxy's own TlsLeg (decrypted side), as the integrator wires it:
    a TLS 1.3 client with a mesh certificate, HTTP/2 with prior knowledge inside, no ALPN."""
    issue_identity(tmp_path / "authority", "shop/db", tmp_path / "b")
    issue_identity(tmp_path / "authority", "shop/web", tmp_path / "a")
    server = Credentials.load(IdentityStore(tmp_path / "b")).server
    client = Credentials.load(IdentityStore(tmp_path / "a")).client

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen, release = Seen(), asyncio.Event()
        app_server = await loop.create_server(lambda: App(seen, release), "127.0.0.1", 0)
        app = ("127.0.0.1", app_server.sockets[0].getsockname()[1])

        async def connect(address: Address, leg: Leg) -> Leg:
            await loop.create_connection(lambda: leg, *address)
            return leg

        metrics = ProxyMetrics()
        gateways: list[OrigProtoGateway] = []
        serving: list[asyncio.Task[None]] = []

        def accepted() -> TlsLeg:
            tls = TlsLeg(server, server_side=True)

            async def serve() -> None:
                await tls.handshake_waiter
                assert tls.handshake_error is None and tls.sslobj.getpeercert()
                gateway = OrigProtoGateway(app, connect, metrics.http(BASE))
                gateways.append(gateway)
                tls.pair(gateway)

            serving.append(loop.create_task(serve()))
            return tls

        listener = await loop.create_server(accepted, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=client,
            server_hostname="db.shop.serviceaccount.identity.linkerd.cluster.local",
        )
        h2 = UpgradeClient(reader, writer)
        answer = await h2.request(b"/big")
        assert answer.status == 200 and bytes(answer.body) == BIG
        posted = b"z" * 3_000_000
        answer = await h2.request(b"/echo", b"POST", posted)
        assert answer.status == 200 and bytes(answer.body) == posted
        sids = [h2.start(b"/get") for _ in range(100)]
        for sid in sids:
            await asyncio.wait_for(h2.answers[sid].done.wait(), 30)
            assert (h2.answers[sid].status, bytes(h2.answers[sid].body)) == (200, b"got /get")
        assert float(metrics.request_total.child(BASE).value) == 102
        writer.close()
        await asyncio.wait_for(seen.none_open.wait(), 10)
        assert gateways[0].closed and all(task.done() for task in serving)
        listener.close()
        app_server.close()

    run(main)
