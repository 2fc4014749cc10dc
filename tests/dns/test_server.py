"""The stub's asyncio shell on loopback (agent/dns/server.py), against an in-process upstream:
local answers over UDP and TCP, forwarded answers returned as the upstream's exact bytes (a
stray datagram with another ID ignored), the next upstream tried when one refuses, our own
query coming back to us dropped (a redirect rule without its exclusion), in-flight and TCP
connection caps."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from agent.dns import message as m
from agent.dns.names import ServiceAddress, build_table
from agent.dns.server import DnsStub, StubSettings

TABLE = build_table([ServiceAddress("orders", "shop", ("10.96.0.10",))], (b"cluster", b"local"))


def upstream_answer(query: bytes) -> bytes:
    """What the fake upstream says: the query turned into a response, plus a marker record."""
    flags = struct.unpack_from("!H", query, 2)[0] | m.QR | m.RA
    return query[:2] + struct.pack("!H", flags) + query[4:] + b"UPSTREAM"


class FakeUpstream(asyncio.DatagramProtocol):
    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.seen: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.append(data)
        if not self.silent:
            self.transport.sendto(b"\xff\xff" + upstream_answer(data)[2:], addr)  # wrong ID first
            self.transport.sendto(upstream_answer(data), addr)


async def tcp_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    (length,) = struct.unpack("!H", await reader.readexactly(2))
    answer = upstream_answer(await reader.readexactly(length))
    writer.write(struct.pack("!H", len(answer)) + answer)
    await writer.drain()
    writer.close()


def run(body: Callable[..., Awaitable[None]], silent: bool = False, **settings: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fake = FakeUpstream(silent)
        for _ in range(20):  # a UDP port whose TCP twin is free (another connection may hold it)
            up_udp, _ = await loop.create_datagram_endpoint(lambda: fake, local_addr=("127.0.0.1", 0))
            port = up_udp.get_extra_info("sockname")[1]
            try:
                up_tcp = await asyncio.start_server(tcp_upstream, "127.0.0.1", port)
                break
            except OSError:
                up_udp.close()
        else:
            raise AssertionError("no port free for both UDP and TCP in 20 tries")
        conf = {"upstreams": ("127.0.0.1",), "listen": ("127.0.0.1",), "port": 0, "upstream_port": port}
        stub = DnsStub(StubSettings(**{**conf, **settings}), TABLE)
        (bound,) = await stub.start()
        try:
            await body(stub, bound, fake)
        finally:
            await stub.close()
            up_udp.close()
            up_tcp.close()

    asyncio.run(main())


async def udp(bound: tuple[str, int], data: bytes, wait: bool = True) -> bytes | None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(bound)
        await loop.sock_sendall(sock, data)
        return await asyncio.wait_for(loop.sock_recv(sock, 65535), 5) if wait else None


async def tcp(bound: tuple[str, int], *queries: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection(*bound)
    answers = []
    for data in queries:
        writer.write(struct.pack("!H", len(data)) + data)
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        answers.append(await reader.readexactly(length))
    writer.close()
    return answers


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not check():  # noqa: ASYNC110 - counters have no event to wait on
            await asyncio.sleep(0.01)


def test_local_and_forwarded_over_udp_and_tcp() -> None:
    async def body(stub: DnsStub, bound: tuple[str, int], fake: FakeUpstream) -> None:
        local = m.encode_query("orders.shop.svc.cluster.local", m.TYPE_A, ident=5)
        public = m.encode_query("www.example.com", m.TYPE_A, ident=6, edns_size=1232, do=True)
        answer = await udp(bound, local)
        assert answer is not None and answer[-4:] == bytes([10, 96, 0, 10])
        assert await udp(bound, public) == upstream_answer(public)
        assert fake.seen == [public]  # the query went up as it came in
        assert await tcp(bound, local, public) == [answer, upstream_answer(public)]
        assert stub.stats["answer"] == 2 and stub.stats["forward_answered"] == 2

    run(body)


def test_next_upstream_when_one_refuses() -> None:
    async def body(stub: DnsStub, bound: tuple[str, int], fake: FakeUpstream) -> None:
        public = m.encode_query("www.example.com", m.TYPE_A, ident=7)
        assert await udp(bound, public) == upstream_answer(public)
        assert await tcp(bound, public) == [upstream_answer(public)]

    run(body, upstreams=("127.0.0.2", "127.0.0.1"))  # nothing listens on 127.0.0.2: refused


def test_own_query_coming_back_is_dropped() -> None:
    async def body(stub: DnsStub, bound: tuple[str, int], fake: FakeUpstream) -> None:
        stub.settings = dataclasses.replace(stub.settings, upstream_port=bound[1], upstream_timeout_s=0.5)
        await udp(bound, m.encode_query("www.example.com", m.TYPE_A), wait=False)
        await until(lambda: stub.stats["forward_failed"] == 1)
        assert stub.stats["dropped_loop"] == 1 and stub.stats["forwarded"] == 1

    run(body)


def test_inflight_cap() -> None:
    async def body(stub: DnsStub, bound: tuple[str, int], fake: FakeUpstream) -> None:
        for i in range(5):
            await udp(bound, m.encode_query(f"q{i}.example.com", m.TYPE_A), wait=False)
        await until(lambda: stub.stats["queries_udp"] == 5)
        assert stub.stats["forwarded"] == 2 and stub.stats["dropped_inflight"] == 3
        assert stub.inflight <= 2
        answer = await udp(bound, m.encode_query("orders.shop.svc.cluster.local", m.TYPE_A))
        assert answer is not None  # local answers need no forward slot
        await until(lambda: stub.inflight == 0)
        assert stub.stats["forward_failed"] == 2

    run(body, silent=True, max_inflight=2, upstream_timeout_s=2.0)


def test_tcp_connection_cap() -> None:
    async def body(stub: DnsStub, bound: tuple[str, int], fake: FakeUpstream) -> None:
        _, first = await asyncio.open_connection(*bound)
        await until(lambda: stub._tcp_clients == 1)
        reader, second = await asyncio.open_connection(*bound)
        assert await reader.read() == b""  # closed at once
        assert stub.stats["tcp_refused"] == 1
        first.close()
        second.close()

    run(body, max_tcp_connections=1)


def test_rate_limit_drops_and_counts() -> None:
    async def body(stub: DnsStub, bound: tuple[str, int], fake: FakeUpstream) -> None:
        local = m.encode_query("orders.shop.svc.cluster.local", m.TYPE_A)
        for _ in range(3):
            await udp(bound, local)
        await udp(bound, local, wait=False)
        await until(lambda: stub.stats["queries_udp"] == 4)
        assert stub.stats["answer"] == 3 and stub.stats["dropped_rate"] == 1

    run(body, per_source_qps=0.001, per_source_burst=3.0)
