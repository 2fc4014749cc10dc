"""Bounds on slow and hostile HTTP clients of the authority, below the app.

uvicorn has a keep-alive idle timeout but no timeout for a request's head or body and no cap
that a crowd of silent connections cannot fill. `GuardedProtocol` (uvicorn's httptools protocol
plus two per-connection timers and a head size limit) and `_Loop` (the TLS handshake timeout)
add them; `Limits` holds the numbers. It overrides uvicorn internals: pyproject.toml pins the
uvicorn range the tests ran against.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from agent.logs import Throttled, get_logger

log = get_logger("meshagent.authority")

# How the limits reach uvicorn's worker processes (spawned: they share no memory with us).
LIMITS_ENV = "MESHAGENT_AUTHORITY_LIMITS"


# Every agent holds two connections to the authority: its long poll's and its reports' (kept
# alive, identity/client.py). 10,000 hosts on 3 replicas, one of them lost: 10,000 a replica.
# An idle kept-alive TLS connection costs a replica ~53 KiB (measured: 2,000 of them, +103 MB
# RSS), so the cap bounds that memory too: ~850 MB at 16,384.
MAX_CONNECTIONS = 16384


def default_max_connections() -> int:
    """MAX_CONNECTIONS, or fewer when the file limit is lower: the cap must bind before accept()
    fails for want of descriptors (64 left for the registry, TLS files and logs)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - 64))


@dataclass(frozen=True)
class Limits:
    """Per worker process. The timeouts suit hosts on a data-centre network."""

    header_timeout: float = 10.0  # TLS handshake, then a request's head (kept alive: from its first byte)
    body_timeout: float = 10.0  # a request's whole body once its head is in (then 408)
    # An idle keep-alive connection between requests: above the agents' report interval (30 s
    # by default) so a report reuses its connection instead of a TLS handshake each time (at
    # 10,000 hosts that was 1,000 handshakes a second), and above the agent's own 60 s bound
    # so that the client, not the server, closes an idle connection (no request races a
    # close). Idle connections stay bounded: they count against max_connections and are the
    # first shed past it (they wait for a request head).
    idle_timeout: int = 75
    # Past it the connection waiting longest for a request head is closed.
    max_connections: int = field(default_factory=default_max_connections)


@cache
def current_limits() -> Limits:
    raw = os.environ.get(LIMITS_ENV)
    return Limits(**json.loads(raw)) if raw else Limits()


def limits_with(
    header_timeout: float | None = None,
    body_timeout: float | None = None,
    idle_timeout: int | None = None,
    max_connections: int | None = None,
) -> Limits:
    """The limits in force (defaults, or what a parent `serve` passed on) with the options the
    command line gives (None: not given)."""
    given: dict[str, Any] = {
        "header_timeout": header_timeout,
        "body_timeout": body_timeout,
        "idle_timeout": idle_timeout,
        "max_connections": max_connections,
    }
    return replace(current_limits(), **{name: value for name, value in given.items() if value is not None})


class _Loop(uvloop.Loop):
    """uvloop with the TLS handshake bounded by the header timeout (uvicorn passes no timeout,
    so uvloop's 60 s applied: a client that never says hello held its socket that long), and
    the TLS shutdown by at most 5 s."""

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.AbstractServer:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", current_limits().header_timeout)
            # A close waits for the peer's close_notify: 30 s by default, for a peer that
            # never reads. (Shed and timed-out connections are aborted, without it.)
            kwargs.setdefault("ssl_shutdown_timeout", min(current_limits().header_timeout, 5.0))
        return await super().create_server(*args, **kwargs)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's loop factory (`loop="agent.authority.server:new_loop"`)."""
    return _Loop()


# Warnings a client can cause at will: the first at once, then one per 10 s with a count.
_shed = Throttled(log, "connections.shed")
_malformed = Throttled(log, "requests.malformed")

# uvicorn's own messages (its parser warnings would be one unstructured line per bad request):
# errors only, through meshagent's log format.
_uvicorn_log = logging.getLogger("meshagent.authority.http")
_uvicorn_log.setLevel(logging.ERROR)

MAX_HEAD = 32 * 1024  # a request line and headers; the API's own need a few hundred bytes


class _HeadTooLarge(Exception):
    pass


def _json_refusal(status: bytes, code: str, message: str, hint: str) -> bytes:
    body = json.dumps({"code": code, "message": message, "hint": hint}).encode()
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, len(body), body)
    )


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's head and body and a
    connection cap that sheds the connection waiting longest for a head.

    A subclass rather than a wrapper: the parser callbacks are the only place that knows when a
    head or a body is complete, and uvicorn takes a protocol class as its `http` setting. The
    cap closes a waiting connection rather than refusing the newest, so silent connections
    cannot hold the slots against real clients (which send their head at once)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _uvicorn_log
        self.limits = current_limits()
        self.deadline: asyncio.TimerHandle | None = None
        self.waiting_since: float | None = None  # loop time since it waits for a request head
        self.head_bytes = 0
        self.head_too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()
        if len(self.connections) > self.limits.max_connections:
            self._shed()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.waiting_since = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        # Parked long polls (api.py) answer 304 + Connection: close now, instead of holding the
        # stop for the graceful timeout and then being cut with a 500 (measured: 10.2 s -> 0.2 s).
        from .api import release_long_polls  # api imports this module

        release_long_polls()
        super().shutdown()

    def on_message_begin(self) -> None:
        self.head_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, n: int) -> None:
        # (httptools sets no bound of its own: a head could grow for as long as it is sent)
        self.head_bytes += n
        if self.head_bytes > MAX_HEAD:
            self.head_too_large = True
            raise _HeadTooLarge  # the parser stops; uvicorn calls send_400_response

    def send_400_response(self, msg: str) -> None:
        """The parser's refusals, as JSON like every other error (uvicorn's are text)."""
        if self.head_too_large:
            answer = _json_refusal(
                b"431 Request Header Fields Too Large",
                "head_too_large",
                f"the request line and headers are over {MAX_HEAD} bytes",
                "the API's requests need a few hundred bytes of headers",
            )
        else:
            answer = _json_refusal(
                b"400 Bad Request",
                "invalid_request",
                "not a valid HTTP/1.1 request",
                "speak HTTPS (HTTP/1.1) to this port; see /v1/openapi.json for the API",
            )
        _malformed.warning("malformed", self.loop.time(), client=self.client[0] if self.client else "")
        if not self.transport.is_closing():
            self.transport.write(answer)
        self.transport.close()

    def on_headers_complete(self) -> None:
        self.waiting_since = None
        self._arm(self.limits.body_timeout, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        idle = self.cycle is None or self.cycle.response_complete  # (not a pipelined next one)
        if idle and not self.transport.is_closing():
            # Kept alive: uvicorn's idle timer runs until the next request's first byte, the
            # head's deadline from then (data_received).
            self._disarm()
            self.waiting_since = self.loop.time()

    def data_received(self, data: bytes) -> None:
        if self.waiting_since is not None and self.deadline is None:
            self._arm(self.limits.header_timeout, self._head_timed_out)
        super().data_received(data)

    def _await_head(self) -> None:
        self.waiting_since = self.loop.time()
        self._arm(self.limits.header_timeout, self._head_timed_out)

    def _arm(self, seconds: float, then: Any) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, then)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _head_timed_out(self) -> None:
        self.deadline = None
        if self.waiting_since is not None:
            self.transport.abort()  # (as nginx: no answer to half a request; no TLS goodbye)

    def _body_timed_out(self) -> None:
        self.deadline = None
        if self.cycle is not None and not self.cycle.response_started and not self.transport.is_closing():
            self.transport.write(
                _json_refusal(
                    b"408 Request Timeout",
                    "request_timeout",
                    f"the request body did not arrive within {self.limits.body_timeout:g} s",
                    "send the whole body with the request",
                )
            )
        self.transport.close()  # the app's pending read then sees a disconnect

    def _shed(self) -> None:
        waiting = [
            c for c in self.connections if isinstance(c, GuardedProtocol) and c.waiting_since is not None
        ]
        victim = min(waiting, key=lambda c: c.waiting_since or 0.0) if waiting else self
        victim.transport.abort()  # now: a TLS close would wait for a peer that does not read
        _shed.warning("shed", self.loop.time(), max_connections=self.limits.max_connections)
