"""The admin server (port 4191, as linkerd-proxy's): /metrics, /ready, /live, /status, /stat.

A deliberately small HTTP/1.1 responder on the daemon's own event loop: a handful of GET
endpoints read by Prometheus, health checks and `meshagent status|stat` need no framework, and
this keeps the agent's memory and dependencies down. One request per connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
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


Handler = Callable[[dict[str, list[str]]], Reply]

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
    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer and b"\n\n" not in self.buffer:
            if len(self.buffer) > MAX_REQUEST:
                self._send(Reply(400, b"request too large\n"))
            return
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
            self._send(reply, head_only=method == "HEAD")

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


async def start_admin(host: str | None, port: int, routes: dict[str, Handler]) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _AdminProtocol(routes), host=host, port=port, reuse_address=True
    )
    log.info("admin.listening", port=port, endpoints=",".join(sorted(routes)))
    return server
