"""The admin server (port 4191, as linkerd-proxy's): /metrics, /ready, /live, /status, /stat.

A deliberately small HTTP/1.1 responder on the daemon's own event loop: a handful of GET
endpoints read by Prometheus, health checks and `meshagent status|stat` need no framework, and
this keeps the agent's memory and dependencies down. One request per connection.

Bounded, so the admin port can never take the data plane's file descriptors: at most
`max_connections` open at once, and a connection must have sent its request and read its reply
within `timeout_s` (idle and slowloris clients are closed, and counted). At the cap a new
connection evicts the oldest one still waiting for its request (so idle connections cannot lock
Prometheus and health checks out); if none is waiting, the new one is closed at once. Both are
counted.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.logs import get_logger

log = get_logger("meshagent.admin")

MAX_REQUEST = 8192


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


# A handler answers at once, or returns an awaitable (a supervisor's /metrics asks its workers
# first); the connection's timeout covers the wait.
Handler = Callable[[dict[str, list[str]]], Reply | Awaitable[Reply]]


@dataclass(frozen=True)
class AdminLimits:
    max_connections: int = 100
    timeout_s: float = 10.0


@dataclass
class AdminStats:
    open: int = 0
    accepted: int = 0
    evicted_idle: int = 0
    refused_over_limit: int = 0
    timed_out: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    400: "Bad Request",
    503: "Service Unavailable",
}


def json_reply(doc: Any, status: int = 200) -> Reply:
    return Reply(status, (json.dumps(doc, indent=2, default=str) + "\n").encode(), "application/json")


class _AdminProtocol(asyncio.Protocol):
    def __init__(
        self,
        routes: dict[str, Handler],
        limits: AdminLimits,
        stats: AdminStats,
        waiting: dict[_AdminProtocol, None],
    ) -> None:
        self.routes = routes
        self.limits, self.stats = limits, stats
        self.waiting = waiting  # the server's connections still waiting for a request, oldest first
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False
        self.pending: asyncio.Task[None] | None = None  # an async handler's reply, under way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        stats = self.stats
        if stats.open >= self.limits.max_connections:
            if self.waiting:
                next(iter(self.waiting))._drop()
                stats.evicted_idle += 1
                event, n = "admin.connection_evicted", stats.evicted_idle
            else:
                stats.refused_over_limit += 1
                event, n = "admin.connection_refused", stats.refused_over_limit
            if math.log10(n).is_integer():  # 1, 10, 100, ...: visible, never a flood
                log.warning(event, reason="over_limit", max_connections=self.limits.max_connections, total=n)
            if event == "admin.connection_refused":
                transport.abort()  # type: ignore[attr-defined]
                return
        self.counted = True
        stats.open += 1
        stats.accepted += 1
        self.waiting[self] = None
        self.timer = asyncio.get_running_loop().call_later(self.limits.timeout_s, self._timed_out)

    def _drop(self) -> None:
        """Close at once, and stop counting this connection now (its fd is freed by abort)."""
        self.waiting.pop(self, None)
        if self.counted:
            self.counted = False
            self.stats.open -= 1
        if self.timer is not None:
            self.timer.cancel()
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        if self.transport is not None:
            self.transport.abort()

    def _timed_out(self) -> None:
        self.stats.timed_out += 1
        self._drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop()

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer and b"\n\n" not in self.buffer:
            if len(self.buffer) > MAX_REQUEST:
                self._send(Reply(400, b"request too large\n"))
            return
        self.waiting.pop(self, None)  # answered now: no longer an idle connection to evict
        line = self.buffer.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split(" ")
        if len(parts) < 2:
            self._send(Reply(400, b"bad request\n"))
            return
        method, target = parts[0], parts[1]
        url = urlsplit(target)
        handler = self.routes.get(url.path)
        if handler is None:
            self._send(Reply(404, f"no such endpoint; try {', '.join(sorted(self.routes))}\n".encode()))
        elif method not in ("GET", "HEAD"):
            self._send(Reply(405, b"GET only\n"))
        else:
            try:
                reply = handler(parse_qs(url.query))
            except Exception as exc:  # an admin bug must not take the proxy down
                log.error("admin.handler_failed", path=url.path, error=repr(exc))
                reply = Reply(500, b"internal error\n")
            if inspect.isawaitable(reply):
                self.buffer = b""
                self.pending = asyncio.ensure_future(self._answer(reply, url.path, method == "HEAD"))
                return
            self._send(reply, head_only=method == "HEAD")

    async def _answer(self, pending: Awaitable[Reply], path: str, head_only: bool) -> None:
        try:
            reply = await pending
        except asyncio.CancelledError:
            raise  # the connection went away or timed out: nothing to send
        except Exception as exc:
            log.error("admin.handler_failed", path=path, error=repr(exc))
            reply = Reply(500, b"internal error\n")
        self.pending = None
        if self.transport is not None and not self.transport.is_closing():
            self._send(reply, head_only=head_only)

    def _send(self, reply: Reply, head_only: bool = False) -> None:
        assert self.transport is not None
        head = (
            f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Error')}\r\n"
            f"Content-Type: {reply.content_type}\r\nContent-Length: {len(reply.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        self.transport.write(head if head_only else head + reply.body)
        self.transport.close()
        self.buffer = b""


class AdminServer:
    """The listening admin server and its connection counters."""

    def __init__(self, server: asyncio.AbstractServer, limits: AdminLimits, stats: AdminStats) -> None:
        self.server, self.limits, self.counters = server, limits, stats

    def stats(self) -> dict[str, int | float]:
        return {
            **self.counters.to_dict(),
            "max_connections": self.limits.max_connections,
            "timeout_s": self.limits.timeout_s,
        }

    def close(self) -> None:
        self.server.close()


async def start_admin(
    host: str | None, port: int, routes: dict[str, Handler], limits: AdminLimits | None = None
) -> AdminServer:
    loop = asyncio.get_running_loop()
    limits = limits or AdminLimits()
    stats = AdminStats()
    waiting: dict[_AdminProtocol, None] = {}
    server = await loop.create_server(
        lambda: _AdminProtocol(routes, limits, stats, waiting), host=host, port=port, reuse_address=True
    )
    log.info(
        "admin.listening",
        host=host or "*",
        port=port,
        endpoints=",".join(sorted(routes)),
        max_connections=limits.max_connections,
        timeout_s=limits.timeout_s,
    )
    return AdminServer(server, limits, stats)
