"""A loopback world for the routed HTTP/1 path: the app's connection goes through a real Proxy's
outbound listener (its original destination a routed parent address), RoutedDetect, H1Router and
dispatch, to small HTTP/1 servers written here (plain TCP endpoints, or behind a second proxy's
inbound mTLS). Shared by tests/proxy/test_h1_router*.py."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import httptools

from agent.identity.store import IdentityStore
from agent.proxy.catalog import Catalog
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import InboundPolicy
from agent.proxy.routes import (
    MATCH_ALL,
    NO_TIMEOUTS,
    Backend,
    BudgetSpec,
    EndpointRef,
    ParentPolicy,
    Ref,
    RetryPolicy,
    RouteTable,
    Rule,
    Timeouts,
)
from agent.proxy.tls import Credentials
from agent.telemetry.proxy_metrics import ProxyMetrics
from tests.support import issue_identity

PARENT_IP = "198.18.0.10"
PARENT = Ref("", "Service", "shop", "web", 8080)
ROUTE = Ref("", "default", "", "http")


class HttpServer:
    """A small HTTP/1.1 server. Paths: `/who` (its name), `/status/N` (N, empty body),
    `/chunked` (chunked body), `/close` (close-delimited body), `/nobody` (204), `/hang` (never
    answers), `/echo` (the request body back), `/big/N` (N bytes); HEAD answers the head of GET
    with Content-Length. `fail_first`: that many requests answer 503 first."""

    live: ClassVar[set[_ServerConn]] = set()

    def __init__(self, name: str, fail_first: int = 0, max_requests: int = 0) -> None:
        self.name = name
        self.fail_first = fail_first
        self.max_requests = (
            max_requests  # per connection, then `connection: close` (nginx's keepalive_requests)
        )
        self.requests: collections.Counter[str] = collections.Counter()
        self.methods: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.heads: list[bytes] = []

    async def start(self) -> HttpServer:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _ServerConn(self), "127.0.0.1", 0
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def endpoint(self, port: int | None = None) -> EndpointRef:
        return EndpointRef("127.0.0.1", port or self.port, None, None)

    def backend(self, weight: int = 1) -> Backend:
        return Backend(Ref("", "Service", "shop", self.name, 8080), weight, None, (self.endpoint(),))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(HttpServer.live):
            if conn.owner is self and conn.transport is not None:
                conn.transport.abort()


class _ServerConn(asyncio.Protocol):
    def __init__(self, owner: HttpServer) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.served = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections += 1
        HttpServer.live.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        HttpServer.live.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body, self.headers = b"", bytearray(), []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        owner, transport = self.owner, self.transport
        assert transport is not None
        method = self.parser.get_method()
        path = self.url.decode()
        owner.requests[path] += 1
        owner.methods.append(method)
        owner.heads.append(b"\n".join(b"%s: %s" % h for h in self.headers))
        head = method == b"HEAD"
        if owner.fail_first > 0:
            owner.fail_first -= 1
            self._send(503, b"failing", head)
        elif path == "/who":
            self._send(200, owner.name.encode(), head)
        elif path.startswith("/status/"):
            self._send(int(path.split("/")[2]), b"", head)
        elif path == "/chunked":
            transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            if not head:
                transport.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        elif path == "/not-modified":
            transport.write(b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n")
        elif path == "/close":
            transport.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
            transport.close()
        elif path == "/stall":  # the head and 3 of 100 bytes, then nothing
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
        elif path == "/nobody":
            transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif path.endswith("/hang"):
            pass
        elif path == "/echo":
            self._send(200, bytes(self.body), head)
        elif path.startswith("/big/"):
            self._send(200, bytes(i % 251 for i in range(int(path.split("/")[2]))), head)
        else:
            self._send(404, b"", head)

    def _send(self, status: int, body: bytes, head: bool) -> None:
        assert self.transport is not None
        self.served += 1
        last = self.owner.max_requests and self.served >= self.owner.max_requests
        self.transport.write(
            b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nx-server: %s\r\n%s\r\n"
            % (status, len(body), self.owner.name.encode(), b"connection: close\r\n" if last else b"")
        )
        if not head:
            self.transport.write(body)
        if last:
            self.transport.close()


def policy(
    *backends: Backend,
    timeouts: Timeouts = NO_TIMEOUTS,
    retry: RetryPolicy | None = None,
    at: tuple[str, int] = (PARENT_IP, 8080),
) -> ParentPolicy:
    """One default rule over `backends`, for the parent dialled at `at`."""
    rule = Rule(ROUTE, tuple(backends), timeouts, retry)
    parent = Ref(PARENT.group, PARENT.kind, PARENT.namespace, PARENT.name, at[1])
    return ParentPolicy(parent, BudgetSpec(), ("test",), (rule,), ((MATCH_ALL, rule),), (at[0],))


class World:
    """Proxy A: outbound listener whose accepted connections' original destination is the routed
    parent (PARENT_IP:8080); optionally proxy B (inbound mTLS, identity shop/db) in front of an app."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        issue_identity(tmp / "authority", "shop/web", tmp / "a")
        self.proxies: list[Proxy] = []
        self.servers: list[HttpServer] = []
        self.a: Proxy | None = None

    async def proxy(
        self, table: RouteTable, orig: tuple[str, int] = (PARENT_IP, 8080), **settings: Any
    ) -> Proxy:
        a = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0), **settings),
            Credentials.load(IdentityStore(self.tmp / "a")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: orig,
            ProxyMetrics(),
        )
        a.apply_routes(table)
        await a.start()
        self.proxies.append(a)
        self.a = a
        return a

    async def inbound_b(self, app_port: int) -> Proxy:
        """A second proxy (identity shop/db) whose inbound listener leads to `app_port`."""
        issue_identity(self.tmp / "authority", "shop/db", self.tmp / "b")
        b = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0)),
            Credentials.load(IdentityStore(self.tmp / "b")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", app_port),
        )
        await b.start()
        self.proxies.append(b)
        return b

    async def server(self, name: str, fail_first: int = 0, max_requests: int = 0) -> HttpServer:
        s = await HttpServer(name, fail_first, max_requests).start()
        self.servers.append(s)
        return s

    @property
    def port(self) -> int:
        assert self.a is not None
        return self.a.listening["outbound"][1]

    async def stop(self) -> None:
        for s in self.servers:
            await s.stop()
        for p in self.proxies:
            await p.stop(0.2)


def run(tmp: Path, body: Callable[[World], Awaitable[None]], timeout: float = 30) -> None:
    async def main() -> None:
        world = World(tmp)
        try:
            await asyncio.wait_for(body(world), timeout)
        finally:
            await world.stop()

    asyncio.run(main())


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, raw_head: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_head = raw_head


class Client:
    """One app connection, reading responses by their framing (HEAD: the head alone)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def request(self, method: str, path: str, body: bytes = b"", extra: str = "") -> Response:
        length = f"content-length: {len(body)}\r\n" if body or method in ("POST", "PUT") else ""
        self.send(f"{method} {path} HTTP/1.1\r\nhost: web\r\n{length}{extra}\r\n".encode() + body)
        return await self.response(head_only=method == "HEAD")

    async def response(self, head_only: bool = False) -> Response:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        if head_only or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b"", raw)
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await self.reader.read()
        return Response(status, headers, body, raw)

    async def closed(self) -> bool:
        """Whether the proxy closed the connection (EOF, or a reset)."""
        try:
            return await asyncio.wait_for(self.reader.read(1), 5) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.writer.close()
