"""The compiled relay (agent/proxy/native_relay.pyx) on loopback: real sockets, real TLS.

Once an L4 mTLS connection is paired, `proxy.native_relay` hands its bytes to NativePair on
both hosts (the outbound app/TLS pair on A, the inbound TLS/app pair on B). These prove it
takes them, and that it keeps what the Python legs do: exact byte counts, half-close both
ways, bounded buffering under backpressure, a reset reported with its errno, the HTTP
accounting tap, and the idle sweep's close, leaving no descriptor behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from pathlib import Path

import pytest

from agent.proxy import native_relay
from agent.proxy.listeners import Proxy
from agent.proxy.relay import Leg
from agent.telemetry.proxy_metrics import ProxyMetrics
from tests.proxy.test_mtls_loopback import World, echo_server, run


def natives(*proxies: Proxy) -> list[native_relay.NativePair]:
    """The compiled relays of the proxies' open legs, one per connection."""
    found = {id(leg.native): leg.native for p in proxies for leg in p.live_legs() if leg.native is not None}
    return list(found.values())


async def until(check: object, what: str, within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_the_l4_pair_is_relayed_natively_on_both_hosts(tmp_path: Path, native: bool) -> None:
    async def body(world: World) -> None:
        got = asyncio.Queue[bytes]()

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                got.put_nowait(data)
                writer.write(data.upper())
            writer.close()

        server = await asyncio.start_server(app, "127.0.0.1", 0)
        a, b = await world.start(server.sockets[0].getsockname()[1], native_relay=native)
        reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        writer.write(b"x" * 1000)
        assert await reader.readexactly(1000) == b"X" * 1000
        relays = natives(a, b)
        assert len(relays) == (2 if native else 0)  # one on each host, or none
        # Every leg counted what it read: the app's 1000 bytes up, the answer's 1000 down.
        for proxy in (a, b):
            assert sorted(leg.rx for leg in proxy.live_legs()) == [1000, 1000]
            assert sorted(leg.tx for leg in proxy.live_legs()) == [1000, 1000]
        writer.close()
        await until(lambda: not a.live_legs() and not b.live_legs(), "both connections closed")
        assert all(r.done for r in relays)
        server.close()

    run(tmp_path, body, on_uvloop=True)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_half_close_either_way_first(tmp_path: Path, native: bool) -> None:
    """The app's server speaks first and ends its side; the client still sends after that EOF,
    and then ends its own: each end arrives after all the bytes before it."""

    async def body(world: World) -> None:
        heard = asyncio.get_running_loop().create_future()

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"greeting")
            writer.write_eof()  # our side is done; the client's still open
            heard.set_result(await reader.read())  # up to the client's EOF
            writer.close()

        server = await asyncio.start_server(app, "127.0.0.1", 0)
        a, b = await world.start(server.sockets[0].getsockname()[1], native_relay=native)
        reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        assert await reader.read() == b"greeting"  # all of it, then EOF
        assert len(natives(a, b)) == (2 if native else 0)
        writer.write(b"still talking")
        writer.write_eof()
        assert await asyncio.wait_for(heard, 5) == b"still talking"
        writer.close()
        await until(lambda: not a.live_legs() and not b.live_legs(), "both connections closed")
        server.close()

    run(tmp_path, body, on_uvloop=True)


def test_a_slow_reader_gets_every_byte_while_the_relay_holds_one_read_at_most(tmp_path: Path) -> None:
    size = 24 * 1024 * 1024
    blob = os.urandom(1024 * 1024) * 24

    async def body(world: World) -> None:
        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(blob)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(app, "127.0.0.1", 0)
        a, b = await world.start(server.sockets[0].getsockname()[1], native_relay=True)
        sock = socket.create_connection(("127.0.0.1", a.listening["outbound"][1]))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        digest, received, most_held = hashlib.sha256(), 0, 0
        await asyncio.sleep(0.5)  # the reader is away: every buffer on the way fills up
        relays = natives(a, b)
        assert len(relays) == 2
        while received < size:
            chunk = await loop.sock_recv(sock, 256 * 1024)
            assert chunk, f"EOF after {received} bytes"
            digest.update(chunk)
            received += len(chunk)
            most_held = max(most_held, *(r.held for r in relays))
            await asyncio.sleep(0.001)  # slow: the relays must stop reading, not buffer
        assert digest.digest() == hashlib.sha256(blob).digest()
        # A read is 64 KiB of records or their plaintext, plus a record begun in an earlier read
        # and the records' framing: past that the relay would be buffering without bound.
        assert most_held <= 96 * 1024, most_held
        sock.close()
        server.close()

    run(tmp_path, body, on_uvloop=True)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_an_app_reset_is_reported_with_its_errno_and_ends_the_client(tmp_path: Path, native: bool) -> None:
    async def body(world: World) -> None:
        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(5)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # an RST, not a FIN

        server = await asyncio.start_server(app, "127.0.0.1", 0)
        a, b = await world.start(server.sockets[0].getsockname()[1], native_relay=native)
        lost: list[tuple[Leg, BaseException | None]] = []
        closed = b._closed

        def record(leg: Leg, exc: BaseException | None) -> None:
            lost.append((leg, exc))
            closed(leg, exc)

        b._closed = record  # type: ignore[method-assign]
        reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # ended, nothing answered
        await until(lambda: len(lost) == 2, "B's two legs closed")
        errnos = sorted(getattr(exc, "errno", None) or 0 for _leg, exc in lost)
        assert errnos == [0, 104], lost  # the app's leg: ECONNRESET; the mesh leg: a clean close
        writer.close()
        server.close()

    run(tmp_path, body, on_uvloop=True)


def test_http_accounting_counts_every_request_through_the_compiled_relay(tmp_path: Path) -> None:
    request = b"GET /x HTTP/1.1\r\nHost: db\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def body(world: World) -> None:
        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(response)

        server = await asyncio.start_server(app, "127.0.0.1", 0)
        metrics = ProxyMetrics()
        a, b = await world.start(server.sockets[0].getsockname()[1], native_relay=True, metrics_b=metrics)
        reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        for _ in range(50):
            writer.write(request)
            assert await reader.readexactly(len(response)) == response
        assert len(natives(b)) == 1
        writer.close()
        await until(lambda: not b.live_legs(), "B's connection closed")
        lines = [line for line in metrics.render([]) if line.startswith("response_total{")]
        assert len(lines) == 1 and 'status_code="200"' in lines[0], lines
        assert lines[0].endswith(" 50"), lines
        server.close()

    run(tmp_path, body, on_uvloop=True)


def test_the_idle_sweep_closes_a_native_connection_and_no_descriptor_is_left(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await world.start(app_port, idle_timeout_s=1.0, native_relay=True)
        before = len(os.listdir("/proc/self/fd"))
        reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        writer.write(b"ping")
        await until(lambda: len(natives(a, b)) == 2, "both relays")
        relays = natives(a, b)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # idle: closed, no answer
        await until(lambda: not a.live_legs() and not b.live_legs(), "every leg closed")
        assert all(r.done for r in relays)
        writer.close()
        await asyncio.sleep(0.1)
        # The client's socket and the app's are gone too: what is left is what was open before.
        assert len(os.listdir("/proc/self/fd")) <= before
        server.close()

    run(tmp_path, body, on_uvloop=True)


def test_a_failing_tap_aborts_the_connection_and_relays_nothing_after_it(tmp_path: Path) -> None:
    """A tap that raises (no accounting to decide what that means) ends the connection, as a
    Python leg's callback error does: never a chunk dropped and the next one relayed."""

    async def body(world: World) -> None:
        received = bytearray()
        ended = asyncio.get_running_loop().create_future()

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                received.extend(data)
            ended.set_result(None)
            writer.close()

        server = await asyncio.start_server(app, "127.0.0.1", 0)
        a, _b = await world.start(server.sockets[0].getsockname()[1], native_relay=True)
        errors: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        _reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        writer.write(b"one|")
        await until(lambda: bytes(received) == b"one|", "the first chunk at the app")
        (relay,) = natives(a)

        def broken(data: bytes) -> None:
            raise RuntimeError("a parser bug")

        relay.plain.tap = broken
        writer.write(b"two|")
        await asyncio.wait_for(ended, 5)  # the app's connection ended
        writer.write(b"three|")
        await asyncio.sleep(0.2)
        assert bytes(received) == b"one|"
        assert relay.done
        assert any(isinstance(e.get("exception"), RuntimeError) for e in errors), errors
        writer.close()
        server.close()

    run(tmp_path, body, on_uvloop=True)


def test_out_of_descriptors_the_connection_is_relayed_in_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled relay needs two more descriptors per connection; when dup fails, the legs
    are paired in Python (which needs none) and the connection works."""

    class NoDup:
        @staticmethod
        def dup(fd: int) -> int:
            raise OSError(24, "Too many open files")

        strerror = staticmethod(os.strerror)

    monkeypatch.setattr(native_relay, "os", NoDup)

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await world.start(app_port, native_relay=True)
        reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        writer.write(b"hello")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"echo:hello"
        assert natives(a, b) == []
        writer.close()
        server.close()

    run(tmp_path, body, on_uvloop=True)


def test_abort_stops_the_compiled_relay_at_once(tmp_path: Path) -> None:
    """An abort (a revocation's cut, the drain's end) stops the relay before the transport goes:
    nothing is read or written for the pair after it, not even in the same loop iteration."""

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await world.start(app_port, native_relay=True)
        reader, writer = await asyncio.open_connection("127.0.0.1", a.listening["outbound"][1])
        writer.write(b"hello")
        await until(lambda: len(natives(a, b)) == 2, "both relays")
        relay = natives(b)[0]
        relay.tls.abort()
        assert relay.done  # at once, not when connection_lost runs
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        server.close()

    run(tmp_path, body, on_uvloop=True)
