"""Proxy.connect: the upstream socket carries our mark and TCP_NODELAY from before its SYN,
a refused or silent destination is an error value the callers already handle (OSError,
TimeoutError), and no failure or cancellation leaves a descriptor or a loop callback behind.
On asyncio's loop and on uvloop (the workers' loop)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from agent.identity.store import IdentityStore
from agent.proxy.catalog import Catalog
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import InboundPolicy
from agent.proxy.relay import Leg
from agent.proxy.tls import Credentials
from tests.support import issue_identity

MARK = 0x539

LOOPS = pytest.mark.parametrize("on_uvloop", [False, True], ids=["asyncio", "uvloop"])


def _open_fds() -> set[int]:
    """This process's open descriptors, once garbage from earlier tests is collected (its
    sockets would otherwise close at any moment and look like ours)."""
    gc.collect()
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _run(
    tmp: Path, on_uvloop: bool, body: Callable[[Proxy], Awaitable[None]], connect_timeout_s: float = 5.0
) -> None:
    issue_identity(tmp / "authority", "shop/web", tmp / "a")

    async def main() -> None:
        proxy = Proxy(
            ListenerSettings(
                inbound=("127.0.0.1", 0),
                outbound=("127.0.0.1", 0),
                mark=MARK,
                connect_timeout_s=connect_timeout_s,
            ),
            Credentials.load(IdentityStore(tmp / "a")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", 1),
        )
        try:
            await asyncio.wait_for(body(proxy), 20)
        finally:
            await proxy.stop(0.1)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if on_uvloop else None) as runner:
        runner.run(main())


@LOOPS
def test_connects_with_mark_and_nodelay(tmp_path: Path, on_uvloop: bool) -> None:
    async def body(proxy: Proxy) -> None:
        accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

        async def handle(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put(writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        leg = await proxy.connect(("127.0.0.1", port), Leg())
        assert leg.transport is not None and proxy.open_legs == 1
        sock = leg.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == MARK
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getpeername() == ("127.0.0.1", port)
        writer = await accepted.get()
        leg.close()
        writer.close()
        server.close()

    if os.geteuid() != 0:
        pytest.skip("SO_MARK needs CAP_NET_ADMIN")
    _run(tmp_path, on_uvloop, body)


@LOOPS
def test_a_refused_connect_is_an_oserror_and_leaves_nothing_open(tmp_path: Path, on_uvloop: bool) -> None:
    async def body(proxy: Proxy) -> None:
        with socket.socket() as closed_port:  # bound, not listening: connections are refused
            closed_port.bind(("127.0.0.1", 0))
            port = closed_port.getsockname()[1]
            before = _open_fds()
            with pytest.raises(OSError) as raised:
                await proxy.connect(("127.0.0.1", port), Leg())
            assert raised.value.errno == errno.ECONNREFUSED
            assert f"127.0.0.1:{port}" in str(raised.value)
            assert not _open_fds() - before
            assert proxy.open_legs == 0

    _run(tmp_path, on_uvloop, body)


def _full_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so a connect there
    neither succeeds nor fails until its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    filling: list[socket.socket] = []
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(address)
        filling.append(sock)
    return listener, filling


@LOOPS
def test_a_silent_destination_times_out_and_leaves_nothing_open(tmp_path: Path, on_uvloop: bool) -> None:
    async def body(proxy: Proxy) -> None:
        listener, filling = _full_listener()
        try:
            await asyncio.sleep(0.05)  # the queue fills
            before = _open_fds()
            with pytest.raises(TimeoutError):
                await proxy.connect(listener.getsockname(), Leg())
            assert not _open_fds() - before
            assert proxy.open_legs == 0
        finally:
            for sock in (listener, *filling):
                sock.close()

    _run(tmp_path, on_uvloop, body, connect_timeout_s=0.3)


@LOOPS
def test_a_cancelled_connect_closes_its_socket(tmp_path: Path, on_uvloop: bool) -> None:
    async def body(proxy: Proxy) -> None:
        listener, filling = _full_listener()
        try:
            await asyncio.sleep(0.05)
            before = _open_fds()
            task = asyncio.ensure_future(proxy.connect(listener.getsockname(), Leg()))
            await asyncio.sleep(0.05)  # waiting for the SYN's answer
            assert len(_open_fds() - before) == 1  # the connecting socket
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not _open_fds() - before
            assert proxy.open_legs == 0
        finally:
            for sock in (listener, *filling):
                sock.close()

    _run(tmp_path, on_uvloop, body, connect_timeout_s=10.0)
