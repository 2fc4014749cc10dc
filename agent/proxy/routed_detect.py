"""A routed destination's first bytes: HTTP/1 → H1Router, an HTTP/2 preface → H2Router,
anything else (or silence past `detect_timeout_s`) → today's L4 path with the bytes read.

`RoutedDetect` is a transport-less relay `Leg` paired with the app's leg: the app's bytes come in
through `send` (at most `MAX_PEEK`, 16 KiB, before it decides). Once decided, the app leg is
unpaired (its reading paused; a read already in flight lands in `app.early` and is taken along)
and handed on:

- to a router: `router = factory(RoutedConn(...))`, then `app.pair(router)`. The router is a `Leg`
  (transport-less, like orig_proto_io's gateway); **it gets the bytes already read in
  `RoutedConn.early` and must process them in its `start()`** (called by `pair`, after its
  `forward` to the app is set; later bytes come through `send`). Backpressure from the app's
  socket reaches the router as `router.transport.pause_reading()/resume_reading()` (give it a
  stand-in transport, as orig_proto_io's `_ClientFlow`); the router pauses the app's reading with
  `app.transport.pause_reading()` itself.
- to L4: `listeners._outbound(proxy, app, orig, action, pick, early=bytes)`, which writes them to
  the upstream first (and through the HTTP accounting tap, as any first bytes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from agent.logs import get_logger

from .detect import MAX_PEEK, NEED_DATA, Detected, Protocol, detect
from .relay import Leg

if TYPE_CHECKING:
    from .http_dispatch import RouterContext
    from .listeners import Proxy
    from .routes import ParentPolicy

log = get_logger("meshagent.proxy")

Address = tuple[str, int]
FallbackReason = Literal["opaque", "detect_timeout", "upgrade"]


@dataclass(frozen=True)
class RoutedConn:
    """What a router's constructor receives (H1Router and H2Router alike)."""

    proxy: Proxy
    ctx: RouterContext
    """The worker's router state (balancer, budgets, pools, metrics, rng, clock, services), as
    `proxy.router` was when the connection was accepted."""
    policy: ParentPolicy
    """The destination's policy, as `proxy.routes` held it at accept: a connection keeps it."""
    app: Leg
    """The app's leg (plaintext, tracked by the proxy), unpaired, its reading paused."""
    early: bytes
    """What the app sent before the decision (≤ 16 KiB + one read): process it in `start()`."""
    orig: Address
    """The address the app dialled (metrics' target_addr, logs)."""


RouterFactory = Callable[[RoutedConn], Leg]


class _Flow:
    """The detector's stand-in transport: nothing is written to the app while detecting, so
    there is nothing to pause; closing it ends the detection."""

    __slots__ = ("detect",)

    def __init__(self, detect: RoutedDetect) -> None:
        self.detect = detect

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.detect.closed

    def close(self) -> None:
        self.detect.close()

    def abort(self) -> None:
        self.detect.close()

    def can_write_eof(self) -> bool:
        return False


class RoutedDetect(Leg):
    """Reads the app's first bytes, then hands the app's leg on (see the module docstring).

    `on_l4(early)`: carry on as L4 (the caller's closure over `_outbound`), `routers`: the
    factory per detected protocol (a protocol without one goes L4), `on_fallback(reason)`: the
    fallback counter (`meshagent_http_routed_fallback_total`)."""

    def __init__(
        self,
        make_conn: Callable[[bytes], RoutedConn],
        routers: dict[Protocol, RouterFactory],
        on_l4: Callable[[Leg, bytes], None],
        timeout_s: float,
        on_fallback: Callable[[FallbackReason], None] | None = None,
    ) -> None:
        super().__init__()
        self.make_conn = make_conn
        self.routers = routers
        self.on_l4 = on_l4
        self.on_fallback = on_fallback
        self.buffer = bytearray()
        self.transport = _Flow(self)  # type: ignore[assignment]
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            timeout_s, self._timed_out
        )
        self.decided = False

    # --- Leg API: the app's bytes --------------------------------------------------------

    def sink(self) -> Callable[[bytes], object]:
        return self.send

    def send(self, data: bytes) -> None:
        if self.decided:
            return
        self.buffer += data
        result = detect(bytes(self.buffer[:MAX_PEEK]))
        if result is NEED_DATA and len(self.buffer) < MAX_PEEK:
            return
        protocol = result.protocol if isinstance(result, Detected) else Protocol.OPAQUE
        self._decide(protocol, None if protocol in self.routers else "opaque")

    def send_many(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.send(chunk)

    def send_eof(self) -> None:
        """The app finished writing before it said what it speaks: L4 with what it sent (the EOF
        follows: the app leg's `read_eof` is carried by the next pairing)."""
        if not self.decided:
            self._decide(Protocol.OPAQUE, "opaque")

    def start(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.decided = True
        self._cancel()
        app = self.peer
        self.peer = self.forward = None
        if app is not None and not app.closed:
            app.close()

    def abort(self) -> None:
        app = self.peer
        self.close()
        if app is not None:
            app.abort()

    # --- the decision --------------------------------------------------------------------

    def _timed_out(self) -> None:
        self.timer = None
        if not self.decided:
            self._decide(Protocol.OPAQUE, "detect_timeout")

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _decide(self, protocol: Protocol, fallback: FallbackReason | None) -> None:
        self.decided = True
        self._cancel()
        app = self.peer
        if app is None or app.closed:
            return
        # Unpair: the app's reading pauses; a read already in flight lands in app.early.
        app.peer = app.forward = None
        self.peer = self.forward = None
        if app.transport is not None:
            app.transport.pause_reading()
        early = bytes(self.buffer) + b"".join(app.early)
        app.early.clear()
        self.buffer = bytearray()
        factory = self.routers.get(protocol) if fallback is None else None
        if factory is None:
            if self.on_fallback is not None:
                self.on_fallback(fallback or "opaque")
            self.on_l4(app, early)
            return
        try:
            conn = self.make_conn(early)
            router = factory(conn)
        except Exception as exc:  # a router that cannot start must not cost the connection
            log.warning("http.router_failed", protocol=protocol.value, error=repr(exc))
            self.on_l4(app, early)
            return
        conn.ctx.connections += 1  # (/status routes.connections: routed app connections so far)
        app.pair(router)


ROUTED_PROTOCOLS: Final = (Protocol.HTTP1, Protocol.HTTP2)
