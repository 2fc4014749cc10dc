"""The asyncio shell of the proxy: accept, decide, connect, pair. All I/O of the data plane.

Inbound (peers -> this host's app): the first bytes decide. A TLS ClientHello naming this
host's identity is terminated (client certificate required), the client's identity is read
and authorized for the port, and the connection goes on to the app at its original
destination. Anything else (plaintext, or the app's own TLS) is a client without a mesh
identity: the port's policy admits or refuses it.

Outbound (the app -> elsewhere): the original destination is looked up in the catalog, then
among the cluster's Services (a cluster IP:port goes to an endpoint the balancer picks; a pod
address gets that pod's identity). Meshed destinations get mTLS with the expected identity as
SNI and a verified server certificate; others pass through untouched, or are refused, by config.

Revocation (`set_revoked`): a peer the authority revoked is refused when its handshake ends,
either way, and its open mTLS connections are cut (see agent/proxy/revocation.py).

The upstream sockets carry the proxy's SO_MARK so interception never captures them again.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, cast

from agent.errors import ListenError, listen_error
from agent.logs import Throttled, get_logger
from agent.telemetry.metrics import join, labels
from agent.telemetry.proxy_metrics import LOOPBACK, ProxyMetrics, target

from .catalog import Catalog
from .decisions import (
    Admit,
    Client,
    InboundContext,
    Originate,
    Passthrough,
    ReadHeader,
    Refuse,
    ServedPorts,
    Stream,
    TerminateMtls,
    accept_inbound,
    accept_outbound,
    after_tls,
    first_bytes,
    outbound_destination,
    route_detected,
    route_endpoint,
    route_header,
    route_mtls,
    route_outbound,
    route_service,
)
from .detect import NEED_DATA, Detected, Protocol, detect
from .directory import Directory
from .http1 import Accounting, new_accounting
from .http_dispatch import RouterContext
from .originate import Failed, originate
from .originate import handshake as _handshake
from .originate import tls_reason as _tls_reason
from .peer_certs import PeerCert, PeerCertCache
from .policy import InboundPolicy
from .relay import Leg, TlsLeg, relay_pair
from .revocation import PeerConnection, PeerConnections, RevokedSet
from .routed_detect import FallbackReason, RoutedConn, RoutedDetect, RouterFactory
from .routes import ParentPolicy, RouteTable
from .services import Balancer, EndpointPort, Pick, ServicePort, ServiceTable
from .sessions import SessionCache
from .tls import Credentials
from .transport_header import HeaderReader, HeaderRefused, TransportHeader

log = get_logger("meshagent.proxy")

Address = tuple[str, int]
OrigDstFn = Callable[[socket.socket], Address]
Direction = Literal["inbound", "outbound"]


@dataclass(frozen=True)
class ListenerSettings:
    inbound: Address = ("::", 4143)
    outbound: Address = ("::", 4140)
    mark: int = 0
    transparent: bool = False
    """Set IP_TRANSPARENT / IPV6_TRANSPARENT on the inbound listener: TPROXY (inbound_mode =
    "tproxy") hands a captured connection only to a transparent socket. Needs CAP_NET_ADMIN."""
    connect_timeout_s: float = 5.0
    handshake_timeout_s: float = 10.0
    detect_timeout_s: float = 1.0
    """How long an inbound client may stay silent before it is taken as a server-speaks-first
    protocol (SMTP, MySQL): plaintext, without a mesh identity."""
    skip_detect_ports: frozenset[int] = frozenset({25, 587, 3306})
    unmeshed_outbound: Literal["pass", "refuse"] = "pass"
    idle_timeout_s: float = 3600.0
    """A connection that moves no byte either way for this long is closed (0: never)."""
    http_accounting: bool = True
    """Detect HTTP/1 and HTTP/2 on connections and count requests (metrics); off: bytes and
    connections only."""
    max_handshakes: int = 128
    """Inbound mTLS handshakes in progress at once; more wait for a slot (see HandshakeGate)."""
    direct: bool = False
    """Accept direct connections to the inbound port (mTLS, ALPN transport.l5d.io/v1, then
    Linkerd's transport header naming the app's port); off: refused as a loop."""
    served_ports: ServedPorts = field(default_factory=ServedPorts)
    """The app ports a transport header may name (the proxy's own ports never)."""
    tls_resumption: bool = True
    """Outbound: offer a kept TLS session to a server seen before (proxy.tls_resumption; the
    server side is `Credentials.load(tickets=...)`)."""
    native_relay: bool = True
    """Relay paired plaintext/TLS legs in compiled code (relay.relay_pair, native_relay.pyx)."""
    http_routes: bool = True
    """Route HTTP per request to destinations with a policy (the directory's `routes`); off:
    every outbound connection takes the L4 path."""
    http_pool_idle_s: float = 3.0
    http_pool_max_idle: int = 100
    http_retry_buffer_total: int = 32 * 1024 * 1024


@dataclass
class ProxyStats:
    """What `status` shows of the data plane; metrics proper are the telemetry plane's."""

    opened: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    last_errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    active: int = 0
    # queued (waited for a slot), refused_over_limit (the wait line was full), timed_out_waiting,
    # resumed_inbound / resumed_outbound (TLS sessions resumed)
    handshakes: Counter[str] = field(default_factory=Counter)

    def error(self, kind: str, **fields: Any) -> None:
        self.failures[kind] += 1
        self.last_errors.append({"at": time.time(), "kind": kind, **fields})


# How many connections may wait for a handshake slot, per slot: past that the wait could not
# end within a handshake deadline anyway, and each waiter holds a descriptor.
WAITERS_PER_SLOT: Final = 8


class HandshakeGate:
    """At most `limit` inbound TLS handshakes at once.

    A server-side handshake holds OpenSSL state (key share, buffers, ~130 KB) until the client
    finishes or the deadline passes: 1,000 silent ClientHellos at once held 130 MB, which glibc
    then kept. Over the limit a connection waits, FIFO, with its reading paused and its
    ClientHello already read: a legitimate burst (clients reconnecting after a restart)
    finishes its handshakes in milliseconds, so waiting gets it through where a refusal would
    fail it. The wait counts toward the handshake deadline (from accept), and the line is
    bounded (`WAITERS_PER_SLOT` per slot); a connection that finds it full is refused at once.
    """

    def __init__(
        self, limit: int, counts: Counter[str], chain_checks: Callable[[], dict[str, int]] = dict
    ) -> None:
        self.limit = limit
        self.active = 0
        self.counts = counts
        self.chain_checks = chain_checks  # the TLS contexts' verification caches (tls.py)
        self.waiting: deque[_InboundDetect] = deque()
        self.closed = False

    def try_enter(self) -> bool:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            return True
        return False

    def wait(self, waiter: _InboundDetect) -> bool:
        """Queue `waiter`; False when the line is full (the caller refuses the connection)."""
        if len(self.waiting) >= self.limit * WAITERS_PER_SLOT:
            self.counts["refused_over_limit"] += 1
            return False
        self.counts["queued"] += 1
        self.waiting.append(waiter)
        return True

    def leave(self) -> None:
        """A handshake ended: its slot goes to the first waiter still connected and in time."""
        self.active -= 1
        while self.waiting and not self.closed:
            waiter = self.waiting.popleft()
            if waiter.waiting:
                self.active += 1
                waiter.admitted()
                return

    def close(self) -> None:
        """The proxy stops: waiters never get a slot."""
        self.closed = True
        while self.waiting:
            self.waiting.popleft().expire(count=False)

    def status(self) -> dict[str, int]:
        waiting = sum(1 for w in self.waiting if w.waiting)
        counts = {**self.counts, **self.chain_checks()}
        return {"limit": self.limit, "active": self.active, "waiting": waiting, **counts}


def _set_mark(sock: socket.socket, mark: int) -> None:
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


async def _connected(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: Address, timeout_s: float
) -> None:
    """Connect the non-blocking `sock`: one writer callback and one timer on the loop. (uvloop's
    sock_connect with asyncio.timeout cost twice the CPU: an address lookup, a future of its
    own and a Timeout object that cancels the task.)"""
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EINTR):
        done: asyncio.Future[bool] = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _settle, done, True)
        timer = loop.call_later(timeout_s, _settle, done, False)
        try:
            in_time = await done
        finally:
            loop.remove_writer(fd)
            timer.cancel()
        if not in_time:
            raise TimeoutError(f"connect to {address[0]}:{address[1]} timed out")
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {os.strerror(err)}")


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


# linux/in.h and linux/in6.h (Python's socket module names neither).
IP_TRANSPARENT: Final = 19
IPV6_TRANSPARENT: Final = 75


def _set_transparent(server: asyncio.Server, address: Address) -> None:
    """Mark each of the listener's sockets transparent, or say why it cannot be (EPERM: the
    agent lacks CAP_NET_ADMIN)."""
    for sock in server.sockets:
        if sock.family == socket.AF_INET6:
            level, option = socket.IPPROTO_IPV6, IPV6_TRANSPARENT
        else:
            level, option = socket.SOL_IP, IP_TRANSPARENT
        try:
            sock.setsockopt(level, option, 1)
        except OSError as exc:
            where = f"{sock.getsockname()[0]}:{address[1]}"
            if exc.errno == errno.EPERM:
                raise ListenError(
                    f"cannot make the inbound proxy's listener on {where} transparent (tproxy): "
                    "operation not permitted",
                    'inbound_mode = "tproxy" needs CAP_NET_ADMIN (the systemd unit grants it); '
                    'run with it, or set intercept.inbound_mode = "redirect"',
                    code="transparent_not_permitted",
                ) from None
            raise listen_error(
                "inbound proxy (transparent)", "intercept.inbound_mode", None, address[1], exc
            ) from None


class Proxy:
    def __init__(
        self,
        settings: ListenerSettings,
        credentials: Credentials,
        policy: InboundPolicy,
        catalog: Catalog,
        orig_dst: OrigDstFn,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.credentials = credentials
        self.policy = policy
        self.catalog = catalog
        # The cluster's Services (the daemon assigns it on each directory refresh, next to
        # `catalog` and `policy`); the balancer keeps per-endpoint state across refreshes.
        self.services = ServiceTable.empty()
        self.balancer = Balancer()
        # HTTP route policies (issue #21): the destinations routed per request, and what their
        # requests share (balancer, budgets, breakers), kept across directory changes. Empty:
        # the outbound path does no lookup at all.
        self.routes = RouteTable.empty()
        self.router: RouterContext | None = None
        # Called when the proxy stops accepting: the routers' pools close their idle upstream
        # connections (else they would hold the drain until its timeout) and keep no more.
        self.stop_hooks: list[Callable[[], None]] = []
        self.orig_dst = orig_dst
        # Revoked peers (the daemon calls set_revoked on each directory refresh), and each open
        # mTLS connection's peer so a revocation can find the ones to cut.
        self.revoked = RevokedSet.empty()
        self.peers = PeerConnections()
        # Outbound TLS sessions for resumption (only verified, unrevoked servers'): emptied when
        # the revoked set or our credentials change.
        self.sessions = SessionCache()
        # Verified peer certificates' facts (identity, serial, notAfter), read once per certificate.
        self.peer_certs = PeerCertCache()
        self.revoked_log = Throttled(log, "connection.revoked")
        self.stats = ProxyStats()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._legs: set[Leg] = set()
        self._drained = asyncio.Event()  # set when the last connection closes
        self.listening: dict[str, Address] = {}
        self.handshakes = HandshakeGate(
            settings.max_handshakes, self.stats.handshakes, lambda: self.credentials.chain_checks()
        )
        # Refusals and failed handshakes are a client's to cause: each counted, logged throttled.
        self.refusal_log = Throttled(log, "connection.refused")
        self.handshake_log = Throttled(log, "tls.handshake_failed")
        # `audit` ports admit whom they would refuse: said (throttled: any client can cause it).
        self.audit_log = Throttled(log, "connection.audited")
        self._peak_legs = 0  # most legs open at once since take_peak(): see the memory task
        self._context: InboundContext | None = None
        self._context_listeners = 0  # how many listeners the cached context knew
        self._context_workload: object = None  # the identity it was built for (compared by `is`)

    def inbound_context(self) -> InboundContext:
        """What inbound decisions read, rebuilt when the policy or the identity is replaced
        (the daemon assigns `policy` on a directory refresh, `credentials` change on rotation)."""
        ctx, workload = self._context, self.credentials.identity.workload
        # Rebuilt too once more listeners are up: a connection accepted while they still start
        # must not leave a context that lacks a listener's port among those a header may not name.
        if (
            ctx is None
            or ctx.policy is not self.policy
            or self._context_workload is not workload  # (dns_name would format a string per call)
            or self._context_listeners != len(self.listening)
        ):
            self._context_listeners = len(self.listening)
            self._context_workload = workload
            own = tuple((port, port) for _, port in self.listening.values())
            served = self.settings.served_ports
            ctx = self._context = InboundContext(
                our_name=workload.dns_name,
                trust_domain=workload.trust_domain,
                policy=self.policy,
                proxy_port=self.listening.get("inbound", ("", -1))[1],
                skip_detect_ports=self.settings.skip_detect_ports,
                served=ServedPorts(served.included, served.excluded + own),
                direct=self.settings.direct,
            )
        return ctx

    def credentials_changed(self) -> None:
        """Our credentials were reloaded (`Credentials.reload`): kept sessions belong to the old
        client contexts and were made under the old identity, so none is offered again; the
        inbound decisions' context is rebuilt."""
        dropped = self.sessions.clear()
        self._context = None
        log.info("tls.sessions_cleared", reason="credentials", sessions=dropped)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, sockets: Mapping[str, Sequence[socket.socket]] | None = None) -> None:
        """Listen: bind the settings' addresses, or, given `sockets` ({"inbound": [...],
        "outbound": [...]}, bound and listening, one per family), serve on those. A worker is
        given the supervisor's SO_REUSEPORT sockets, already transparent in tproxy mode (set
        before bind, where it must be); it never binds."""
        if sockets is not None:
            await self._start_on(sockets)
        else:
            await self._bind_and_start()
        if self.settings.idle_timeout_s > 0:
            self.spawn(self._close_idle(), "idle-sweep")

    def _factories(self) -> tuple[tuple[str, Address, Callable[[], asyncio.BaseProtocol]], ...]:
        return (
            ("inbound", self.settings.inbound, lambda: _InboundDetect(self)),
            ("outbound", self.settings.outbound, lambda: _OutboundAccept(self)),
        )

    async def _start_on(self, sockets: Mapping[str, Sequence[socket.socket]]) -> None:
        loop = asyncio.get_running_loop()
        missing = [name for name in ("inbound", "outbound") if not sockets.get(name)]
        if missing:
            raise ValueError(f"Proxy.start: no {' or '.join(missing)} socket given")
        for name, _address, factory in self._factories():
            given = sockets[name]
            for sock in given:
                server = await loop.create_server(factory, sock=sock, backlog=4096)
                self._servers.append(server)
            bound = given[0].getsockname()
            self.listening[name] = (bound[0], bound[1])
            log.info("proxy.listening", direction=name, address=f"{bound[0]}:{bound[1]}", sockets=len(given))

    async def _bind_and_start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, address, factory in self._factories():
            # "::" means every address of both families: asyncio makes one socket per family
            # (its IPv6 sockets are V6ONLY), which host=None asks for.
            host = None if address[0] in ("::", "") else address[0]
            try:
                server = await loop.create_server(
                    factory, host=host, port=address[1], reuse_address=True, backlog=4096
                )
            except OSError as exc:
                for started in self._servers:
                    started.close()
                setting = f"intercept.{name}_port"
                raise listen_error(f"{name} proxy", setting, host, address[1], exc) from None
            self._servers.append(server)
            if name == "inbound" and self.settings.transparent:
                try:
                    _set_transparent(server, address)
                except ListenError:
                    for started in self._servers:
                        started.close()
                    raise
            bound = server.sockets[0].getsockname()
            self.listening[name] = (bound[0], bound[1])
            log.info("proxy.listening", direction=name, address=f"{bound[0]}:{bound[1]}")

    async def _close_idle(self) -> None:
        """Close connections idle past the timeout. A sweep compares byte counters the relay keeps
        anyway, so the hot path pays nothing for it."""
        timeout = self.settings.idle_timeout_s
        interval = min(30.0, max(0.5, timeout / 4))
        last: dict[Leg, tuple[int, int, float]] = {}
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            seen: dict[Leg, tuple[int, int, float]] = {}
            for leg in list(self._legs):
                rx, tx, since = last.get(leg, (-1, -1, now))
                if (leg.rx, leg.tx) != (rx, tx):
                    since = now
                elif now - since >= timeout and leg.peer is not None:
                    log.info("connection.idle_closed", idle_s=round(now - since, 1))
                    leg.close()
                    leg.peer.close()
                    continue
                seen[leg] = (leg.rx, leg.tx, since)
            last = seen

    async def stop(self, drain_timeout_s: float = 10.0, cut: asyncio.Event | None = None) -> None:
        """Stop accepting, let open connections finish for up to `drain_timeout_s` (or until
        `cut` is set), then close."""
        for server in self._servers:
            server.close()
        self.handshakes.close()
        for hook in self.stop_hooks:
            try:
                hook()
            except Exception as exc:  # a pool's trouble must not keep the proxy from stopping
                log.warning("proxy.stop_hook_failed", error=repr(exc))
        if self._legs:
            self._drained.clear()
            waits = [asyncio.ensure_future(self._drained.wait())]
            if cut is not None:
                waits.append(asyncio.ensure_future(cut.wait()))
            _done, pending = await asyncio.wait(waits, timeout=drain_timeout_s, return_when="FIRST_COMPLETED")
            for waiter in pending:
                waiter.cancel()
        for leg in list(self._legs):
            leg.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("proxy.stopped", dropped=len(self._legs))

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- connection bookkeeping ----------------------------------------------------------

    def track(self, leg: Leg) -> None:
        self._legs.add(leg)
        leg.on_closed = self._closed
        if len(self._legs) > self._peak_legs:
            self._peak_legs = len(self._legs)

    def take_peak(self) -> int:
        """Sockets (legs) open at once at the most since the last call; then starts again."""
        peak, self._peak_legs = max(self._peak_legs, len(self._legs)), len(self._legs)
        return peak

    @property
    def open_legs(self) -> int:
        return len(self._legs)

    def _closed(self, leg: Leg, exc: BaseException | None) -> None:
        self._legs.discard(leg)
        self.peers.discard(leg)
        if not self._legs:
            self._drained.set()

    @property
    def open_connections(self) -> int:
        return len(self._legs) // 2

    async def connect(self, address: Address, leg: Leg) -> Leg:
        """Connect to `address` (an IP address: an original destination or an endpoint's) with
        our mark; `leg` becomes the socket's protocol. OSError when the connection is refused
        or fails, TimeoutError past the connect timeout."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            _set_mark(sock, self.settings.mark)  # before connect: the SYN must carry it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _connected(loop, sock, address, self.settings.connect_timeout_s)
            await loop.create_connection(lambda: leg, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.track(leg)
        return leg

    def live_legs(self) -> list[Leg]:
        return list(self._legs)

    def observe(self, leg: Leg, base: str) -> None:
        """Give `leg` its transport metrics (labels `base`), if metrics are on."""
        if self.metrics is not None:
            leg.metrics = self.metrics.connection(base)

    def tls_resumed(self, direction: Direction) -> None:
        self.stats.handshakes[f"resumed_{direction}"] += 1  # /status handshakes
        if self.metrics is not None:
            self.metrics.tls_resumed.child(RESUMED[direction]).value += 1

    def tls_failed(self, direction: Direction, exc: BaseException) -> None:
        if self.metrics is not None:
            reason = (
                "timeout" if isinstance(exc, TimeoutError) else str(getattr(exc, "reason", None) or "error")
            )
            self.metrics.tls_failures.child(labels(("direction", direction), ("reason", reason))).value += 1

    def watch_http(
        self,
        client: Leg,
        server: Leg,
        base: str,
        known: Protocol | None,
        early: bytes = b"",
        authz: tuple[str, str] | None = None,
    ) -> None:
        """Count requests on this connection if its client speaks HTTP/1 or HTTP/2 (detected from
        the first bytes unless `known`). Opaque connections keep no tap at all after the first read.
        `authz` (inbound): the connection's tcp and http authorization label sets; as linkerd, an
        HTTP connection's requests are counted as authorized, any other connection once."""
        metrics = self.metrics
        if metrics is None:
            return
        tcp_authz, http_authz = authz if authz is not None else (None, None)

        def opaque() -> None:
            if tcp_authz is not None:
                metrics.authz_allow.child(tcp_authz).value += 1

        if not self.settings.http_accounting:
            opaque()  # requests are not counted: the connection is the unit
            return

        def counted(protocol: Protocol, first: bytes) -> None:
            http = metrics.http(base, http_authz)
            try:
                if protocol is Protocol.HTTP1:
                    acct: Accounting = new_accounting(http)
                else:  # imported on first use: a host that never sees HTTP/2 never loads hpack
                    from .http2 import Http2Accounting

                    acct = Http2Accounting(http)
                acct.attach(client, server)
                if first:
                    acct.client(first)
            except Exception as exc:  # accounting must never cost the connection
                log.warning("http_accounting.failed", protocol=protocol.value, error=repr(exc))
                client.tap = server.tap = client.accounting = server.accounting = None
                opaque()  # admitted all the same: counted once, as a connection
                return
            if client.metrics is not None:
                client.metrics.http = http  # held while the connection is open

        if known is not None:
            if known in COUNTED:
                counted(known, early)
            else:
                opaque()
            return
        seen = bytearray()
        undetected = _Undetected(opaque)

        def first_bytes(data: bytes) -> None:
            seen.extend(data)
            result = detect(bytes(seen))
            if result is NEED_DATA and len(seen) < 64:
                return
            client.tap = client.accounting = None
            if isinstance(result, Detected) and result.protocol in COUNTED:
                counted(result.protocol, bytes(seen))
            else:
                undetected.closed()  # decided: opaque

        client.tap = first_bytes
        client.accounting = undetected  # a connection that ends before it says is opaque

    def apply(self, directory: Directory) -> None:
        """Route and authorize by `directory` from now on (the daemon's directory refresh, or a
        worker's broadcast); revoked peers' open connections are cut."""
        self.catalog, self.policy = directory.catalog, directory.policy
        self.services = directory.services
        self.set_revoked(directory.revoked)
        self.apply_routes(directory.routes)

    def apply_routes(self, table: RouteTable | None) -> None:
        """Route HTTP per request to `table`'s destinations (None or proxy.http_routes off:
        none). The router's state (EWMA, breakers, budgets) is kept for what is still routed."""
        if table is None or not self.settings.http_routes:
            table = RouteTable.empty()
        if self.router is not None:
            self.router.apply(table, self.services)
        elif table:
            from agent.telemetry.route_metrics import RouteMetrics

            metrics = self.metrics.routes if self.metrics is not None else RouteMetrics()
            self.router = RouterContext(table, self.services, metrics)
        self.routes = table

    # --- revocation ----------------------------------------------------------------------

    def set_revoked(self, revoked: RevokedSet) -> int:
        """Refuse `revoked` peers from now on and close their open connections; returns how
        many were closed. Called on the event loop (the daemon's directory refresh)."""
        if revoked == self.revoked:
            return 0
        self.revoked = revoked
        # A kept session would skip nothing (identity and revocation are checked on resumption
        # too), but a changed set is when to stop offering any: it costs one full handshake each.
        dropped = self.sessions.clear()
        log.info(
            "revocation.updated",
            identities=len(revoked.identities),
            serials=len(revoked.serials),
            addresses=len(revoked.addresses),
            sessions_cleared=dropped,
        )
        closed: Counter[str] = Counter()
        for leg, conn, reason in self.peers.revoked(revoked):
            self.peers.discard(leg)
            peer = leg.peer
            leg.abort()  # a reset, now: the revoked side gets no further byte
            if peer is not None:
                peer.close()  # our app's side: a clean end of stream
            closed[conn.direction] += 1
            self.stats.refused[f"{conn.direction}:revoked_closed"] += 1
            if self.metrics is not None:
                self.metrics.revoked_closed.child(labels(("direction", conn.direction))).value += 1
            if sum(closed.values()) <= MAX_CUT_LINES:
                log.warning(
                    "connection.revoked",
                    action="closed",
                    direction=conn.direction,
                    peer_id=conn.label,
                    serial=conn.serial or "",
                    remote=conn.remote,
                    matched=reason,
                )
        if closed:
            log.warning(
                "revocation.connections_closed",
                inbound=closed["inbound"],
                outbound=closed["outbound"],
                logged=min(MAX_CUT_LINES, sum(closed.values())),
            )
        return sum(closed.values())

    def refuse_revoked(self, direction: Direction, matched: str, **fields: Any) -> None:
        """A new connection from or to a revoked peer: counted as a refusal (`peer_revoked`),
        logged as `connection.revoked` (throttled: the revoked host may retry in a loop)."""
        self.stats.refused[f"{direction}:peer_revoked"] += 1
        if self.metrics is not None:
            self.metrics.refused.child(
                labels(("direction", direction), ("reason", "peer_revoked"))
            ).value += 1
        self.revoked_log.warning(
            f"refused:{direction}:{matched}", action="refused", direction=direction, matched=matched, **fields
        )

    def refuse(self, direction: Direction, reason: str, **fields: Any) -> None:
        kind = f"{direction}:{reason}"
        self.stats.refused[kind] += 1
        if self.metrics is not None:
            self.metrics.refused.child(labels(("direction", direction), ("reason", reason))).value += 1
        self.refusal_log.warning(kind, direction=direction, reason=reason, **fields)


RESUMED: Final = {d: labels(("direction", d)) for d in ("inbound", "outbound")}

# `connection.revoked` lines per revocation: a host with thousands of connections to the revoked
# peer logs the first ones and a summary with the counts.
MAX_CUT_LINES: Final = 100

# Protocols whose requests are counted; the others are connections and bytes only.
COUNTED: Final = (Protocol.HTTP1, Protocol.HTTP2)


class _Undetected:
    """A connection's accounting until its first bytes say what it speaks. If it ends first (or
    detection fails), it was an opaque connection, as when linkerd's detection times out."""

    __slots__ = ("on_opaque",)
    active = False

    def __init__(self, on_opaque: Callable[[], None]) -> None:
        self.on_opaque: Callable[[], None] | None = on_opaque

    def closed(self) -> None:
        on_opaque, self.on_opaque = self.on_opaque, None
        if on_opaque is not None:
            on_opaque()

    def drain(self) -> None:
        """Nothing counted yet."""

    def failed(self, leg: Leg, exc: Exception) -> None:
        leg.tap = None
        self.closed()


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _bytes_waiting(sock: Any) -> bool:
    """Whether the kernel holds unread bytes for this socket (a non-blocking peek on a duplicate
    descriptor: the event loop's socket object does not offer recv)."""
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            return bool(dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing there; anything else: treat as silent
        return False


def _unmap(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class _InboundDetect(asyncio.Protocol):
    """The first protocol of an inbound connection: reads until the first bytes tell what it is,
    then carries out what `decisions` says."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.orig: Address = ("", 0)
        self.done = False
        self.waiting = False  # for a handshake slot
        self.direct = False  # straight to the listener's port: mTLS and a transport header
        self.accepted_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's, not a subclass
        self.accepted_at = asyncio.get_running_loop().time()
        sock = transport.get_extra_info("socket")
        try:
            host, port = self.proxy.orig_dst(sock)
        except OSError as exc:
            self.proxy.refuse("inbound", "no_original_destination", peer=_peer(transport), error=str(exc))
            transport.abort()
            return
        self.orig = (_unmap(host), port)
        action = accept_inbound(self.proxy.inbound_context(), self.orig)
        if isinstance(action, Refuse):
            self.proxy.refuse("inbound", action.reason, peer=_peer(transport))
            transport.abort()
        elif isinstance(action, Detected):
            self._dispatch(action)
        else:
            self.direct = action.direct
            self.timer = asyncio.get_running_loop().call_later(
                self.proxy.settings.detect_timeout_s, self._timed_out
            )

    def _timed_out(self) -> None:
        """The client stayed silent — or the loop was too busy to read what it sent: an event
        loop runs due timers before it polls sockets, so under a burst a ClientHello can sit
        unread in the socket when the timer fires. Bytes waiting there are read first."""
        self.timer = None
        if self.done or self.transport is None:
            return
        if _bytes_waiting(self.transport.get_extra_info("socket")):
            # The loop reads them next (data_received decides); a client that stops mid-way
            # still gets only one more period.
            self.timer = asyncio.get_running_loop().call_later(
                self.proxy.settings.detect_timeout_s, self._dispatch, Detected(Protocol.OPAQUE)
            )
            return
        self._dispatch(Detected(Protocol.OPAQUE))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        detected = first_bytes(self.buffer)
        if detected is not None:
            self._dispatch(detected)

    def eof_received(self) -> bool:
        if self.waiting:  # the client left while it waited for a handshake slot
            self.proxy.stats.handshakes["left_waiting"] += 1
            self.expire(count=False)
            return False
        if not self.done:
            self._dispatch(Detected(Protocol.OPAQUE))
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.done = True
        self.waiting = False  # the gate skips it

    def admitted(self) -> None:
        """A handshake slot is ours: start the handshake in what is left of the deadline."""
        self.waiting = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        assert self.transport is not None
        self.transport.resume_reading()
        self._start_mtls()

    def expire(self, count: bool = True) -> None:
        """No slot within the handshake deadline (or the proxy stops): close the connection."""
        if not self.waiting:
            return
        self.waiting = False
        self.timer = None
        if count:
            self.proxy.stats.handshakes["timed_out_waiting"] += 1
        if self.transport is not None:
            self.transport.abort()

    def _start_mtls(self) -> None:
        proxy, transport = self.proxy, self.transport
        assert transport is not None
        waited = asyncio.get_running_loop().time() - self.accepted_at
        timeout = max(0.1, proxy.settings.handshake_timeout_s - waited)
        tls = TlsLeg(proxy.credentials.server, server_side=True)
        proxy.track(tls)
        transport.set_protocol(tls)
        tls.connection_made(transport)
        tls.data_received(self.buffer)
        self.buffer = b""
        mtls = _inbound_mtls(proxy, tls, self.orig, _peer(transport), timeout, self.direct)
        proxy.spawn(mtls, "inbound-mtls")

    def _dispatch(self, detected: Detected) -> None:
        if self.done or self.transport is None:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        proxy, transport = self.proxy, self.transport
        action = route_detected(proxy.inbound_context(), self.orig, detected, self.direct)
        if isinstance(action, TerminateMtls):
            if proxy.handshakes.try_enter():
                self._start_mtls()
            elif proxy.handshakes.wait(self):
                self.waiting = True
                transport.pause_reading()
                left = proxy.settings.handshake_timeout_s - (
                    asyncio.get_running_loop().time() - self.accepted_at
                )
                self.timer = asyncio.get_running_loop().call_later(max(0.0, left), self.expire)
            else:
                proxy.refuse("inbound", "handshakes_over_limit", peer=_peer(transport), port=self.orig[1])
                transport.abort()
            return
        if isinstance(action, Refuse):
            _denied(proxy, action.deny)
            proxy.refuse(
                "inbound",
                action.reason,
                peer=_peer(transport),
                port=action.port,
                protocol=detected.protocol.value,
            )
            transport.close()
            return
        leg = Leg()
        proxy.track(leg)
        transport.set_protocol(leg)
        leg.connection_made(transport)
        proxy.spawn(_to_app(proxy, leg, action, self.buffer), "inbound-plain")


INBOUND_SRC = labels(("direction", "inbound"), ("peer", "src"))
INBOUND_DST = join(labels(("direction", "inbound"), ("peer", "dst")), LOOPBACK)
OUTBOUND_SRC = labels(("direction", "outbound"), ("peer", "src"))
OUTBOUND_DST = labels(("direction", "outbound"), ("peer", "dst"))
INBOUND = labels(("direction", "inbound"))
OUTBOUND = labels(("direction", "outbound"))


def _denied(proxy: Proxy, key: str) -> None:
    """Denials are per connection (a refused client gets no bytes through at all)."""
    if key and proxy.metrics is not None:
        proxy.metrics.authz_deny.child(key).value += 1


def _client(cert: PeerCert) -> Client:
    peer = cert.identity
    if peer is None:
        return Client(None, None)
    # Linkerd's identity controller issues the DNS SAN alone: such a client may upgrade HTTP/1.
    return Client(peer.spiffe_id, peer.label, may_upgrade=not cert.has_uri)


async def _inbound_mtls(
    proxy: Proxy, tls: TlsLeg, orig: Address, peer: str, deadline_s: float, direct: bool = False
) -> None:
    try:
        failure = await _handshake(tls, deadline_s)
    finally:
        proxy.handshakes.leave()
    if failure is not None:
        reason = _tls_reason(failure)
        proxy.stats.error("inbound_tls_handshake", peer=peer, reason=reason)
        proxy.tls_failed("inbound", failure)
        proxy.handshake_log.warning(f"inbound:{reason}", direction="inbound", peer=peer, reason=reason)
        tls.abort()
        return
    ctx = proxy.inbound_context()
    cert = proxy.peer_certs.lookup(tls.sslobj)
    client = _client(cert)
    serial = cert.serial
    resumed = tls.sslobj.session_reused
    # OpenSSL does not re-check the certificate a resumed session carries: its expiry is ours
    # to check, against the clock now (identity and revocation are checked as on a full handshake).
    if resumed and cert.expired(time.time()):
        proxy.refuse(
            "inbound",
            "resumed_identity_expired",
            peer=peer,
            port=orig[1],
            client_id=client.name or "",
            serial=serial or "",
        )
        tls.abort()
        return
    matched = proxy.revoked.match(client.spiffe_id, serial) if proxy.revoked else None
    if matched is not None:
        proxy.refuse_revoked(
            "inbound", matched, peer_id=client.name or "", serial=serial or "", remote=peer, port=orig[1]
        )
        tls.abort()
        return
    if resumed:
        proxy.tls_resumed("inbound")
    if not tls.closed:  # (else nothing would ever take it out again)
        proxy.peers.add(tls, PeerConnection("inbound", client.spiffe_id, serial, client.name or "", peer))
    action = route_mtls(ctx, orig, client, tls.sslobj.selected_alpn_protocol(), direct)
    if isinstance(action, ReadHeader):
        header = await _read_header(tls, proxy.settings.detect_timeout_s)
        action = route_header(ctx, orig, client, header)
    if isinstance(action, Refuse):
        _denied(proxy, action.deny)
        proxy.refuse(
            "inbound",
            action.reason,
            peer=peer,
            port=action.port,
            client_id=client.name or "",  # the DNS form, as the metrics' client_id label
            spiffe_id=client.spiffe_id or "",
        )
        tls.send_eof()
        tls.close()
        return
    if action.peek:
        stream = await _peek(tls, action.known, proxy.settings.detect_timeout_s)
        if tls.closed:
            return
        if stream.upgraded:
            _to_gateway(proxy, tls, action, peer)
            return
        action = replace(action, known=stream.protocol)
    await _to_app(proxy, tls, action)


def _to_gateway(proxy: Proxy, tls: TlsLeg, admitted: Admit, peer: str) -> None:
    """HTTP/2 a linkerd2-proxy upgraded from HTTP/1 (l5d-orig-proto): the gateway answers it in
    HTTP/2 and sends each request to the app as HTTP/1, counted per request."""
    from .orig_proto_io import OrigProtoGateway  # h2 and h11: loaded for these connections only

    where, tls_labels = admitted.where, admitted.tls_labels
    _audited(proxy, admitted)
    proxy.observe(tls, join(INBOUND_SRC, where, tls_labels))
    metrics = proxy.metrics
    http = None
    if metrics is not None:
        http = metrics.http(join(INBOUND, where, tls_labels), admitted.authz_keys()[1])
        if tls.metrics is not None:
            tls.metrics.http = http  # held while the connection is open

    def refused(reason: str) -> None:
        proxy.refuse("inbound", reason, peer=peer, port=admitted.target[1])

    gateway = OrigProtoGateway(
        admitted.target,
        proxy.connect,
        http,
        on_refused=refused,
        observe_app=lambda leg: proxy.observe(leg, INBOUND_DST),
    )
    proxy.track(gateway)
    proxy.stats.opened[f"inbound:{admitted.kind}_orig_proto"] += 1
    tls.pair(gateway)  # the bytes already read wait in tls.early: pairing hands them over


class _Prefix(Leg):
    """Stands in for the app while a TLS client's first decrypted bytes are read: the TLS leg,
    paired with it, hands it what it decrypts; `step` sees each chunk and returns True once it
    has decided. Chunks after that are kept in `after`."""

    def __init__(self, step: Callable[[bytes], bool], on_end: Callable[[], object]) -> None:
        super().__init__()
        self.step = step
        self.on_end = on_end
        self.decided = False
        self.after: list[bytes] = []

    def sink(self) -> Callable[[bytes], object]:
        return self.send

    def send(self, data: bytes) -> None:
        if self.decided:
            self.after.append(data)  # records decrypted in the same read as the deciding one
        elif self.step(data):
            self.decided = True

    def send_many(self, chunks: list[bytes]) -> None:
        # One step for all the records one read decrypted: a client that sends one byte per
        # record must not make `step` re-read its buffer once per byte.
        self.send(b"".join(chunks))

    def send_eof(self) -> None:
        if not self.decided:
            self.decided = True
            self.on_end()

    def close(self) -> None:  # the TLS leg closed (reset, TLS error)
        self.send_eof()


async def _read_prefix(tls: TlsLeg, prefix: _Prefix, done: asyncio.Future[None], deadline_s: float) -> bool:
    """Run `prefix` on `tls` until it decides, the client ends, or `deadline_s` passes (False).
    The TLS leg is left unpaired with reading paused."""
    tls.pair(prefix)
    try:
        await asyncio.wait_for(asyncio.shield(done), deadline_s)
        in_time = True
    except TimeoutError:
        in_time = False
    if tls.transport is not None and not tls.closed:
        tls.transport.pause_reading()
    tls.peer = tls.forward = None  # unpaired: the app's leg takes the prefix's place
    return in_time


async def _read_header(tls: TlsLeg, deadline_s: float) -> TransportHeader | HeaderRefused | None:
    """Read a transport header from `tls` within `deadline_s` (None: not in time). On a header,
    what followed it waits in `tls.early` (already counted in `tls.rx`)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    reader = HeaderReader()
    result: list[TransportHeader | HeaderRefused] = []

    def finish(outcome: TransportHeader | HeaderRefused) -> bool:
        result.append(outcome)
        if not done.done():
            done.set_result(None)
        return True

    def step(data: bytes) -> bool:
        outcome = reader.feed(data)
        return finish(outcome) if isinstance(outcome, TransportHeader | HeaderRefused) else False

    prefix = _Prefix(step, lambda: finish(reader.eof()))
    if not await _read_prefix(tls, prefix, done, deadline_s):
        return None
    header = result[0]
    if isinstance(header, TransportHeader):
        tls.early = [chunk for chunk in (reader.rest, *prefix.after) if chunk]
    return header


# Reads of a client's first decrypted bytes before `_peek` decides with what it has: a
# linkerd2-proxy's preface, SETTINGS and first HEADERS come in one or two.
MAX_PEEK_READS: Final = 8


async def _peek(tls: TlsLeg, known: Protocol | None, deadline_s: float) -> Stream:
    """What the client's first decrypted bytes carry (`after_tls`), read within `deadline_s`;
    the bytes wait in `tls.early` for the app or the gateway (already counted in `tls.rx`)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen = bytearray()
    result: list[Stream] = []

    def decide(ended: bool) -> bool:
        stream = after_tls(bytes(seen), known, ended)
        if stream is None:
            return False
        result.append(stream)
        if not done.done():
            done.set_result(None)
        return True

    reads = 0

    def step(data: bytes) -> bool:
        nonlocal reads
        seen.extend(data)
        reads += 1
        # Each look re-reads the buffer from its start: after a few reads, decide with what is
        # there (a client dribbling frames must not buy quadratic work on the loop).
        return decide(reads >= MAX_PEEK_READS)

    prefix = _Prefix(step, lambda: decide(True))
    await _read_prefix(tls, prefix, done, deadline_s)
    if not result:  # the deadline passed: decide with what is there
        decide(True)
    tls.early = [chunk for chunk in (bytes(seen), *prefix.after) if chunk]
    return result[0]


async def _to_app(proxy: Proxy, client: Leg, admitted: Admit, early: bytes = b"") -> None:
    """An admitted inbound connection's last step: connect to the app at the target and relay
    (`early`: bytes already read by detection)."""
    where, tls_labels = admitted.where, admitted.tls_labels
    dst = admitted.target
    _audited(proxy, admitted)
    proxy.observe(client, join(INBOUND_SRC, where, tls_labels))
    try:
        upstream = await proxy.connect(dst, Leg())
    except (OSError, TimeoutError) as exc:
        proxy.stats.error("inbound_connect", dst=f"{dst[0]}:{dst[1]}", reason=str(exc) or "timeout")
        if proxy.metrics is not None:  # authorized all the same: counted once, as a connection
            proxy.metrics.authz_allow.child(admitted.authz_keys()[0]).value += 1
        client.close()
        return
    if client.closed:  # the client left while we dialled: nothing to pair the app with
        upstream.close()
        return
    proxy.observe(upstream, INBOUND_DST)
    # A header's leftovers wait in client.early: pairing hands them to the taps and the app.
    authz = admitted.authz_keys()
    proxy.watch_http(client, upstream, join(INBOUND, where, tls_labels), admitted.known, early, authz)
    proxy.stats.opened[f"inbound:{admitted.kind}"] += 1
    if early:
        upstream.send(early)
        client.rx += len(early)
    relay_pair(client, upstream, proxy.settings.native_relay)


def _audited(proxy: Proxy, admitted: Admit) -> None:
    """An `audit` port admitted a client its rules would refuse: log it (as linkerd2-proxy, the
    connection is counted as allowed with `authz_name="audit"`)."""
    if admitted.decision.audit:
        port = admitted.target[1]
        proxy.audit_log.warning(
            f"{port}:{admitted.decision.audit}",
            port=port,
            would_refuse=admitted.decision.audit,
            via=admitted.kind,
        )


class _OutboundAccept(Leg):
    """The app's side of an outbound connection."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # paused until paired
        proxy = self.proxy
        proxy.track(self)
        sock = transport.get_extra_info("socket")
        try:
            host, port = proxy.orig_dst(sock)
        except OSError as exc:
            proxy.refuse("outbound", "no_original_destination", error=str(exc))
            self.abort()
            return
        orig = (_unmap(host), port)
        refused = accept_outbound(orig, proxy.listening.get("outbound", ("", -1))[1])
        if refused is not None:
            proxy.refuse("outbound", refused.reason)
            self.abort()
            return
        routes = proxy.routes
        if routes:  # (empty: no lookup at all, the L4 path as before #21)
            policy = routes.lookup(*orig)
            if policy is not None:
                _routed(proxy, self, orig, policy)
                return
        _l4(proxy, self, orig)


def _l4(proxy: Proxy, app: Leg, orig: Address, early: bytes = b"") -> None:
    """Today's outbound path: the destination's action (catalog, Service, endpoint), then
    `_outbound` connects and pairs. `early`: bytes a routed destination's detection read."""
    unmeshed = proxy.settings.unmeshed_outbound
    services = proxy.services
    found = outbound_destination(orig, proxy.catalog, services)
    pick: Pick | None = None
    if isinstance(found, ServicePort):
        pick = proxy.balancer.pick(services, found)
        action = route_service(found, pick.endpoint if pick else None, unmeshed)
    elif isinstance(found, EndpointPort):
        action = route_endpoint(found, orig[1], unmeshed)
    else:
        if found is None and orig[0] in proxy.revoked.addresses:
            # A revoked host (the authority took it out of the catalog): refused, not
            # passed through as an unmeshed destination.
            proxy.refuse_revoked("outbound", "address", dst=f"{orig[0]}:{orig[1]}")
            app.abort()
            return
        action = route_outbound(orig, found, unmeshed)
    proxy.spawn(_outbound(proxy, app, orig, action, pick, early), "outbound")


def _routed(proxy: Proxy, app: Leg, orig: Address, policy: ParentPolicy) -> None:
    """A destination with an HTTP policy: detect what the app speaks, then route per request
    (HTTP/1, HTTP/2) or carry on as L4 with the bytes read."""
    ctx = proxy.router
    if ctx is None:  # (apply builds it with the table: a table without it is a bug, not a drop)
        _l4(proxy, app, orig)
        return
    metrics = proxy.metrics
    proxy.observe(app, join(OUTBOUND_SRC, target(*orig), LOOPBACK))

    def make_conn(early: bytes) -> RoutedConn:
        return RoutedConn(proxy, ctx, policy, app, early, orig)

    def fallback(reason: FallbackReason) -> None:
        if metrics is not None:
            metrics.routes.routed_fallback(reason)

    detector = RoutedDetect(
        make_conn,
        _router_factories(),
        lambda leg, early: _l4(proxy, leg, orig, early),
        proxy.settings.detect_timeout_s,
        fallback,
    )
    proxy.stats.opened["outbound:routed"] += 1
    app.pair(detector)


def _router_factories() -> dict[Protocol, RouterFactory]:
    """The routers per detected protocol (imported on first use: a proxy without routes never
    loads them)."""
    global _FACTORIES
    if _FACTORIES is None:
        from .h1_router import H1Router
        from .h2_router import H2Router

        _FACTORIES = {Protocol.HTTP1: H1Router, Protocol.HTTP2: H2Router}
    return _FACTORIES


_FACTORIES: dict[Protocol, RouterFactory] | None = None


def _released(proxy: Proxy, pick: Pick) -> Callable[[Leg, BaseException | None], None]:
    """The upstream leg's close callback: the proxy's bookkeeping, then the balancer's."""

    def closed(leg: Leg, exc: BaseException | None) -> None:
        proxy._closed(leg, exc)
        proxy.balancer.released(pick)

    return closed


async def _outbound(
    proxy: Proxy,
    app: Leg,
    orig: Address,
    action: Passthrough | Originate | Refuse,
    pick: Pick | None = None,
    early: bytes = b"",
) -> None:
    """The L4 path: originate the upstream for `action` and pair the app with it. `early`: bytes
    the app already sent (read by a routed destination's detection), written first."""
    dst = f"{orig[0]}:{orig[1]}"
    where = target(*orig)
    if app.metrics is None:  # (a routed destination's fallback: observed since its accept)
        proxy.observe(app, join(OUTBOUND_SRC, where, LOOPBACK))
    if isinstance(action, Refuse):
        if pick is not None:
            proxy.balancer.released(pick)
        proxy.refuse("outbound", action.reason, dst=dst)
        app.close()
        return
    on_closed = _released(proxy, pick) if pick is not None else None
    got = await originate(proxy, action, dst, on_closed=on_closed)
    if pick is not None:
        # A refused connect, a failed handshake, a wrong or revoked identity: this endpoint is
        # no good for now; the next connections go to the others while it backs off.
        if isinstance(got, Failed):
            proxy.balancer.failed(pick)
        else:
            proxy.balancer.connected(pick)
    if isinstance(got, Failed):
        app.abort()
        return
    upstream = got.leg
    proxy.observe(upstream, join(OUTBOUND_DST, where, got.tls_labels))
    proxy.watch_http(app, upstream, join(OUTBOUND, where, got.tls_labels), None, early)
    proxy.stats.opened[f"outbound:{got.kind}"] += 1
    if early:  # (already counted in app.rx): pairing replays them through the tap, then upstream
        app.early.insert(0, early)
    relay_pair(app, upstream, proxy.settings.native_relay)
