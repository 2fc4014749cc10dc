"""The DNS stub's asyncio shell: UDP and TCP listeners that answer what `stub.decide` says and
forward the rest, byte for byte, to the host's own resolvers.

Forwarding keeps the message whole: same ID, flags, EDNS and DNSSEC bits, question case. A UDP
query goes upstream over UDP from a fresh connected socket (a new source port each time) and
the first datagram that matches it (`message.response_matches`) goes back as it came, TC bit
included, so a truncated answer makes the client retry over TCP, which the stub forwards over
TCP in turn. Upstreams are tried in resolv.conf order, each for `upstream_timeout_s`; when none
answers, the client hears nothing, as it would have from dead resolvers.

Bounds: at most `max_inflight` forwards at once, `per_source_qps` (burst `per_source_burst`)
per source address, `max_tcp_connections` TCP clients each idle at most `tcp_idle_s`; what
exceeds them is dropped and counted in `stats` (closed key set, see `STAT_KEYS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from agent.dns import message as m
from agent.dns.names import NameTable
from agent.dns.stub import FORWARD, Answer, Drop, Forward, RateLimiter, decide
from agent.logs import Throttled, get_logger

log = get_logger("meshagent.dns")

STAT_KEYS = (
    "queries_udp",
    "queries_tcp",
    "answer",
    "nodata",
    "nxdomain",
    "truncated",
    "badvers",
    "forwarded",
    "forward_answered",
    "forward_failed",
    "dropped_short",
    "dropped_not_query",
    "dropped_rate",
    "dropped_inflight",
    "dropped_loop",
    "tcp_refused",
)


@dataclass(frozen=True)
class StubSettings:
    upstreams: tuple[str, ...]
    listen: tuple[str, ...] = ("127.0.0.1", "::1")
    port: int = 15053
    upstream_port: int = 53
    ttl_s: int = 5
    max_inflight: int = 256  # one socket each: keep well under the unit's 1024 soft fd limit
    per_source_qps: float = 2000.0  # every local app shares one source address: generous
    per_source_burst: float = 4000.0
    upstream_timeout_s: float = 2.0
    max_tcp_connections: int = 64
    tcp_idle_s: float = 10.0
    upstream_mark: int = 0
    """SO_MARK on upstream sockets (needs CAP_NET_ADMIN; 0: none). The redirect rule also
    skips the agent's uid, so the mark is a second key, not the only one."""


_PICK_ATTEMPTS = 20  # with port 0, UDP ports tried until the same TCP port is free


class DnsStub:
    def __init__(
        self, settings: StubSettings, table: NameTable, clock: Callable[[], float] | None = None
    ) -> None:
        self.settings = settings
        self.table = table
        self.stats: Counter[str] = Counter()
        self._limiter = RateLimiter(settings.per_source_qps, settings.per_source_burst)
        self._clock = clock
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._own_sources: set[tuple[str, int]] = set()
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._tcp_clients = 0
        self._warn = Throttled(log, "dns.dropped")
        self._mark_failed = False

    def set_table(self, table: NameTable) -> None:
        """Swap in a new table (the catalog moved); queries in flight keep the old one."""
        self.table = table

    @property
    def inflight(self) -> int:
        return self._inflight

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listen address (UDP and TCP); returns the bound (host, port) pairs."""
        loop = asyncio.get_running_loop()
        bound: list[tuple[str, int]] = []
        for host in self.settings.listen:
            for attempt in range(_PICK_ATTEMPTS):
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpListener(self), local_addr=(host, self.settings.port)
                )
                port = transport.get_extra_info("sockname")[1]
                try:
                    server = await asyncio.start_server(self._serve_tcp, host, port, limit=m.TCP_MAX + 2)
                except OSError as exc:
                    transport.close()
                    # Port 0: the kernel picked a UDP port whose TCP twin is taken (by another
                    # connection's ephemeral port): pick again.
                    if (
                        self.settings.port != 0
                        or exc.errno != errno.EADDRINUSE
                        or attempt == _PICK_ATTEMPTS - 1
                    ):
                        raise
                    continue
                self._udp.append(transport)
                self._tcp.append(server)
                bound.append((host, port))
                break
        log.info(
            "dns.listening",
            addresses=",".join(f"{h}:{p}" for h, p in bound),
            upstreams=",".join(self.settings.upstreams),
        )
        return bound

    async def close(self) -> None:
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._tcp:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._udp.clear()
        self._tcp.clear()

    # -- the shared front: rate, loop guard, decision

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _admit(self, data: bytes, source: tuple[str, int], over_tcp: bool) -> Answer | Forward | None:
        """An answer to send, FORWARD, or None when dropped (counted)."""
        self.stats["queries_tcp" if over_tcp else "queries_udp"] += 1
        if (source[0], source[1]) in self._own_sources:
            self._drop("loop", source)
            return None  # our own upstream query came back: a rule is wrong
        if not self._limiter.allow(source[0], self._now()):
            self._drop("rate", source)
            return None
        decision = decide(data, self.table, self.settings.ttl_s, over_tcp)
        if isinstance(decision, Answer):
            self.stats[decision.outcome] += 1
            return decision
        if isinstance(decision, Drop):
            self._drop(decision.reason, source)
            return None
        if self._inflight >= self.settings.max_inflight:
            self._drop("inflight", source)
            return None
        return FORWARD

    def _drop(self, reason: str, source: tuple[str, int]) -> None:
        """Count and (throttled) log a dropped message."""
        self.stats[f"dropped_{reason}"] += 1
        self._warn.warning(reason, reason=reason, source=source[0])
        return None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- UDP

    def on_datagram(self, data: bytes, source: tuple[str, int], transport: asyncio.DatagramTransport) -> None:
        admitted = self._admit(data, source, over_tcp=False)
        if isinstance(admitted, Answer):
            transport.sendto(admitted.data, source)
        elif admitted is FORWARD:
            self._inflight += 1
            self._spawn(self._forward_udp(data, source, transport))

    async def _forward_udp(
        self, data: bytes, source: tuple[str, int], transport: asyncio.DatagramTransport
    ) -> None:
        self.stats["forwarded"] += 1
        try:
            for upstream in self.settings.upstreams:
                response = await self._exchange_udp(data, upstream)
                if response is not None:
                    if not transport.is_closing():
                        transport.sendto(response, source)
                    self.stats["forward_answered"] += 1
                    return
            self.stats["forward_failed"] += 1
        finally:
            self._inflight -= 1

    async def _exchange_udp(self, data: bytes, upstream: str) -> bytes | None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in upstream else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        own: tuple[str, int] | None = None
        try:
            sock.setblocking(False)
            self._mark(sock)
            sock.connect((upstream, self.settings.upstream_port))
            own = sock.getsockname()[:2]
            self._own_sources.add(own)
            await loop.sock_sendall(sock, data)
            async with asyncio.timeout(self.settings.upstream_timeout_s):
                while True:
                    response = await loop.sock_recv(sock, 65535)
                    if m.response_matches(data, response):
                        return response
        except (TimeoutError, OSError):
            return None
        finally:
            if own is not None:
                self._own_sources.discard(own)
            sock.close()

    def _mark(self, sock: socket.socket) -> None:
        if not self.settings.upstream_mark or self._mark_failed:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.settings.upstream_mark)
        except OSError as exc:
            self._mark_failed = True
            log.warning("dns.mark_failed", mark=hex(self.settings.upstream_mark), reason=exc.strerror)

    # -- TCP

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        if self._tcp_clients >= self.settings.max_tcp_connections:
            self.stats["tcp_refused"] += 1
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                try:
                    async with asyncio.timeout(self.settings.tcp_idle_s):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        data = await reader.readexactly(length)
                except (TimeoutError, asyncio.IncompleteReadError, OSError):
                    return
                admitted = self._admit(data, peer, over_tcp=True)
                if isinstance(admitted, Answer):
                    response: bytes | None = admitted.data
                elif admitted is FORWARD:
                    response = await self._forward_tcp(data)
                else:
                    response = None
                if response is None:
                    return  # dropped or no upstream answered: closing tells the client at once
                writer.write(struct.pack("!H", len(response)) + response)
                await writer.drain()
        except OSError:
            return
        finally:
            self._tcp_clients -= 1
            writer.close()

    async def _forward_tcp(self, data: bytes) -> bytes | None:
        self._inflight += 1
        self.stats["forwarded"] += 1
        try:
            for upstream in self.settings.upstreams:
                response = await self._exchange_tcp(data, upstream)
                if response is not None:
                    self.stats["forward_answered"] += 1
                    return response
            self.stats["forward_failed"] += 1
            return None
        finally:
            self._inflight -= 1

    async def _exchange_tcp(self, data: bytes, upstream: str) -> bytes | None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in upstream else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        writer: asyncio.StreamWriter | None = None
        try:
            sock.setblocking(False)
            self._mark(sock)
            async with asyncio.timeout(self.settings.upstream_timeout_s):
                await loop.sock_connect(sock, (upstream, self.settings.upstream_port))
                reader, writer = await asyncio.open_connection(sock=sock, limit=m.TCP_MAX + 2)
                writer.write(struct.pack("!H", len(data)) + data)
                await writer.drain()
                while True:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    response = await reader.readexactly(length)
                    if m.response_matches(data, response):
                        return response
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            return None
        finally:
            if writer is not None:
                writer.close()
            else:
                sock.close()


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, stub: DnsStub) -> None:
        self.stub = stub
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(
            asyncio.DatagramTransport, transport
        )  # not every loop's transport subclasses it

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        if self.transport is not None:
            self.stub.on_datagram(data, (str(addr[0]), int(addr[1])), self.transport)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for a client that left: nothing to do, the next datagram is unaffected
