"""Idle upstream connections per endpoint, for the HTTP routers (design §4.5).

A connection is busy while one request uses it (the router holds it, the pool does not see
it) and idle here between requests: `get` takes the most recently used one (LIFO: the warm one,
and the cold ones age out), `put` returns it, `discard` forgets and closes it. An idle
connection older than `idle_s` (Linkerd's 3 s) is closed by one sweep timer per pool; more
than `max_idle` idle ones per endpoint: the oldest is closed. Busy connections are not capped
(each is an app's request in flight).

The key is the endpoint as the router reaches it: (address, port, identity, header port), so
an endpoint whose identity changed never gets a connection made for the old one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

PoolKey = tuple[str, int, str | None, int | None]
"""(address, port dialled, identity expected (None: plaintext), transport header port)."""


class Pooled(Protocol):
    """What the pool needs of a connection."""

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Pooled)


class HttpPool(Generic[C]):
    """Idle connections per endpoint key (see the module docstring). Event-loop only."""

    def __init__(
        self, idle_s: float = 3.0, max_idle: int = 100, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.idle_s = idle_s
        self.max_idle = max_idle
        self.clock = clock
        self._idle: dict[PoolKey, list[tuple[float, C]]] = {}  # oldest first
        self._timer: asyncio.TimerHandle | None = None
        self.reused = 0  # connections handed out again (a test's and /status's view)
        self.expired = 0

    def get(self, key: PoolKey) -> C | None:
        """An idle connection to `key` (the most recently returned), or None: open one."""
        idle = self._idle.get(key)
        while idle:
            _since, conn = idle.pop()
            if not conn.closed:
                if not idle:
                    del self._idle[key]
                self.reused += 1
                return conn
        self._idle.pop(key, None)
        return None

    def put(self, key: PoolKey, conn: C) -> None:
        """`conn` finished a request cleanly and may carry the next one."""
        if conn.closed:
            return
        if self.max_idle <= 0 or self.idle_s <= 0:
            conn.close()
            return
        idle = self._idle.setdefault(key, [])
        idle.append((self.clock(), conn))
        if len(idle) > self.max_idle:
            _since, oldest = idle.pop(0)
            oldest.close()
        self._arm()

    def discard(self, key: PoolKey, conn: C) -> None:
        """`conn` may not carry another request (closed, or its response was not read to the end)."""
        idle = self._idle.get(key)
        if idle:
            self._idle[key] = [(since, c) for since, c in idle if c is not conn]
            if not self._idle[key]:
                del self._idle[key]
        conn.close()

    def idle_count(self, key: PoolKey | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(idle) for idle in self._idle.values())

    def retain(self, keep: Callable[[PoolKey], bool]) -> int:
        """Close the idle connections of endpoints no longer wanted (a directory change);
        returns how many were closed."""
        closed = 0
        for key in [key for key in self._idle if not keep(key)]:
            for _since, conn in self._idle.pop(key):
                conn.close()
                closed += 1
        return closed

    def close_all(self) -> None:
        for idle in self._idle.values():
            for _since, conn in idle:
                conn.close()
        self._idle.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def sweep(self) -> int:
        """Close the connections idle for `idle_s` or more (and forget closed ones)."""
        self._timer = None
        limit = self.clock() - self.idle_s
        closed = 0
        for key in list(self._idle):
            idle = self._idle[key]
            keep = [(since, conn) for since, conn in idle if since > limit and not conn.closed]
            for since, conn in idle:
                if since <= limit and not conn.closed:
                    conn.close()
                    closed += 1
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        self.expired += closed
        if self._idle:
            self._arm()
        return closed

    def _arm(self) -> None:
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # (a unit test without a loop: sweep() by hand)
                return
            self._timer = loop.call_later(self.idle_s / 2 if self.idle_s > 0 else 1.0, self.sweep)
