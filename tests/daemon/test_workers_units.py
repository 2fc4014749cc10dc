"""The parts of `proxy.workers` > 1 that need no network namespace: the control channel, the
SO_REUSEPORT listeners, starting workers (forked at start, replaced by a new interpreter), and a
real worker draining on loopback.

Workers here are real forked processes on real loopback sockets; only SO_ORIGINAL_DST (there is
no interception on loopback) is given by a fixed resolver, as in tests/proxy/test_mtls_loopback.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
import uvloop

from agent.config import AgentConfig, IdentitySettings, ProxySettings, worker_count
from agent.errors import ListenError, MeshagentError
from agent.proxy.catalog import Catalog
from agent.proxy.directory import Directory
from agent.proxy.listeners import ListenerSettings
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.ticket_keys import ticket_key_name
from agent.workers import forker, worker
from agent.workers.control import Channel, ChannelError, WorkerGone
from agent.workers.cpus import auto_workers, cpu_quota
from agent.workers.forker import (
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
    SO_DETACH_REUSEPORT_BPF,
    UNKNOWN_STATUS,
    Listeners,
    SlotSockets,
    Spawner,
    bind_listeners,
    describe_exit,
    fork_workers,
)
from tests.support import issue_identity

LOOPBACK = ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0))


def run(body: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    async def main() -> None:
        await asyncio.wait_for(body(), timeout)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def _hello_worker(slot: int, sockets: SlotSockets, chan: socket.socket) -> None:
    """A stand-in worker: greets every inbound connection with "<slot> <pid>" and closes it;
    answers `ping`; exits on EOF of its control channel."""

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            writer = cast(asyncio.WriteTransport, transport)  # uvloop's is no asyncio.Transport
            writer.write(f"{slot} {os.getpid()}\n".encode())
            writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets["inbound"]:
            await loop.create_server(Hello, sock=sock, backlog=4096)
        control = await Channel.open(chan, lambda op, _a: {"slot": slot, "pid": os.getpid(), "op": op})
        await control.wait_closed()

    uvloop.run(main())
    os._exit(0)


def _greeting(port: int) -> tuple[int, int]:
    """Connect, read the greeting to EOF: (slot, pid). A reset raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return _read_greeting(s)


def _read_greeting(s: socket.socket) -> tuple[int, int]:
    data = b""
    while chunk := s.recv(100):
        data += chunk
    slot, pid = data.split()
    return int(slot), int(pid)


def _reap(spawner: Spawner, *pids: int) -> None:
    """Nothing more is started; every worker still running is killed and reaped (none left)."""
    spawner.close()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


# --- the control channel ---------------------------------------------------------------------


def test_control_frames_roundtrip_and_concurrent_requests() -> None:
    async def body() -> None:
        a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        notes: list[int] = []

        async def slow(i: int) -> int:
            for _ in range((100 - i) % 7):  # replies come back out of order
                await asyncio.sleep(0)
            return i * i

        def handler(op: str, args: dict[str, Any]) -> Any:
            if op == "square":
                return slow(args["i"])
            if op == "note":
                notes.append(args["i"])
                return None
            if op == "echo":
                return args["blob"]
            raise ValueError(f"unknown op {op}")

        b = await Channel.open(b_sock, handler, name="b")
        a = await Channel.open(a_sock, name="a")
        replies = await asyncio.gather(*(a.request("square", i=i) for i in range(100)))
        assert replies == [i * i for i in range(100)]
        for i in range(50):
            a.notify("note", i=i)
        blob = os.urandom(3 * 2**20)  # a directory-sized frame, split over many reads
        assert await a.request("echo", blob=blob) == blob
        assert notes == list(range(50))  # notifications are applied in order
        with pytest.raises(ChannelError, match="unknown op nope"):
            await a.request("nope")

        # EOF is death: a request waiting on the other end fails, and so does every later one.
        never = asyncio.Event()
        b._handler = lambda _op, _args: never.wait()
        waiting = asyncio.ensure_future(a.request("stuck", timeout=30))
        await asyncio.sleep(0)
        b.close()
        with pytest.raises(WorkerGone):
            await waiting
        await a.wait_closed()
        assert a.closed
        with pytest.raises(WorkerGone):
            await a.request("square", i=1)
        with pytest.raises(WorkerGone):
            a.notify("note", i=1)

    run(body)


# --- listeners -------------------------------------------------------------------------------


def test_bind_listeners_reuseport_same_port() -> None:
    settings = ListenerSettings(inbound=("::", 0), outbound=("127.0.0.1", 0))
    listeners = bind_listeners(settings, 3, transparent=os.geteuid() == 0)
    try:
        assert len(listeners.slots) == 3
        for direction, families in (
            ("inbound", {socket.AF_INET, socket.AF_INET6}),
            ("outbound", {socket.AF_INET}),
        ):
            socks = [s for slot in listeners.slots for s in slot[direction]]
            assert len(socks) == 3 * len(families)
            for slot in listeners.slots:
                assert {s.family for s in slot[direction]} == families
            assert {s.getsockname()[1] for s in socks} == {listeners.listening[direction][1]}
            assert listeners.listening[direction][1] != 0
            for s in socks:
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                if os.geteuid() == 0:  # tproxy: inbound only, set on every family
                    level, option = (
                        (socket.SOL_IP, IP_TRANSPARENT)
                        if s.family == socket.AF_INET
                        else (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
                    )
                    assert s.getsockopt(level, option) == (direction == "inbound")
        busy_port = listeners.listening["outbound"][1]
    finally:
        listeners.close()

    # A port some other socket holds (without SO_REUSEPORT) is the daemon's usual error, and
    # nothing bound before it stays bound.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy_port))
        holder.listen()
        first = ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", busy_port))
        with pytest.raises(ListenError) as err:
            bind_listeners(first, 2, transparent=False)
        assert err.value.code == "port_in_use"
        assert "intercept.outbound_port" in err.value.hint


@pytest.mark.skipif(os.geteuid() == 0, reason="root may always set IP_TRANSPARENT")
def test_bind_listeners_transparent_needs_cap_net_admin() -> None:
    with pytest.raises(ListenError) as err:
        bind_listeners(LOOPBACK, 1, transparent=True)
    assert err.value.code == "transparent_not_permitted"


# --- starting workers ------------------------------------------------------------------------


def test_reuseport_spreads_and_a_killed_slot_keeps_its_queue() -> None:
    listeners = bind_listeners(LOOPBACK, 2, transparent=False)
    spawner = fork_workers(listeners, _hello_worker, 2)
    port = listeners.listening["inbound"][1]
    started: list[int] = []

    async def body() -> None:
        exits: asyncio.Queue[int] = asyncio.Queue()
        spawner.on_exit = lambda pid, _status, _cpu: exits.put_nowait(pid)
        workers = [await spawner.spawn(slot) for slot in (0, 1)]
        started.extend(pid for pid, _chan in workers)
        pids = {slot: pid for slot, (pid, _chan) in enumerate(workers)}
        for slot, (pid, chan) in enumerate(workers):
            assert await chan.request("ping") == {"slot": slot, "pid": pid, "op": "ping"}

        served = Counter(_greeting(port)[0] for _ in range(400))
        assert served[0] > 100 and served[1] > 100, served  # each slot's queue takes its share

        # Slot 0 stops accepting; connections hashed to its socket wait in its queue.
        os.kill(pids[0], signal.SIGSTOP)
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(WorkerGone):
            await workers[0][1].request("ping")
        new_pid, _chan = await spawner.spawn(0)  # on the same socket: the queue is still there
        started.append(new_pid)
        answers = []
        for s in held:
            with s:
                answers.append(_read_greeting(s))  # a reset raises here
        by_slot = Counter(slot for slot, _pid in answers)
        assert by_slot[0] > 0 and by_slot[1] > 0, by_slot
        assert {pid for slot, pid in answers if slot == 0} == {new_pid}
        assert await exits.get() == pids[0]

    try:
        run(body)
    finally:
        _reap(spawner, *started)
        listeners.close()


def test_each_worker_holds_only_its_own_channel() -> None:
    """Worker 1 is forked after worker 0's channel exists: it must not keep a copy of the
    supervisor's end, or worker 0 would never see EOF when the supervisor closes (or dies)."""
    listeners = bind_listeners(LOOPBACK, 2, transparent=False)
    spawner = fork_workers(listeners, _hello_worker, 2)
    started: list[int] = []

    async def body() -> None:
        exits: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        spawner.on_exit = lambda pid, status, _cpu: exits.put_nowait((pid, status))
        (pid0, chan0), (pid1, chan1) = [await spawner.spawn(slot) for slot in (0, 1)]
        started.extend((pid0, pid1))
        chan0.close()
        exited, status = await exits.get()
        assert exited == pid0 and describe_exit(status) == "exit 0"
        assert (await chan1.request("ping"))["pid"] == pid1  # the other worker is untouched
        chan1.close()
        assert (await exits.get()) == (pid1, 0)

    try:
        run(body)
    finally:
        _reap(spawner, *started)
        listeners.close()


def _queued(listeners: Listeners, direction: str, port: int, n: int) -> Counter[int]:
    """Open `n` connections to `port`; how many each slot's sockets got (accepted from their
    queues, nothing serving them)."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    got: Counter[int] = Counter()
    for slot, sockets in enumerate(listeners.slots):
        for sock in sockets[direction]:
            sock.setblocking(False)
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                got[slot] += 1
    for client in clients:
        client.close()
    return got


def test_steer_keeps_new_connections_off_a_down_slot() -> None:
    """While slot 0's worker is down its socket gets no new connection (the kernel's hash would
    give it about a third); with every slot up the hash spreads them over all three again."""
    listeners = bind_listeners(LOOPBACK, 3, transparent=False)
    try:
        for direction in ("inbound", "outbound"):
            port = listeners.listening[direction][1]
            listeners.steer([1, 2])
            got = _queued(listeners, direction, port, 300)
            assert got[0] == 0 and got[1] > 50 and got[2] > 50, got
            listeners.steer([2])
            assert _queued(listeners, direction, port, 50) == Counter({2: 50})
            listeners.steer([0, 1, 2])
            got = _queued(listeners, direction, port, 300)
            assert min(got[s] for s in (0, 1, 2)) > 30, got
    finally:
        listeners.close()


# seccomp_data's offsets (linux/seccomp.h) and the setsockopt syscall's number per arch.
_AUDIT_ARCH = {"x86_64": (0xC000003E, 54), "aarch64": (0xC00000B7, 208)}
_RET_ERRNO, _RET_ALLOW = 0x00050000, 0x7FFF0000


def _refuse_detach_as_linux_before_5_3() -> None:
    """From now on this process's kernel answers SO_DETACH_REUSEPORT_BPF with ENOPROTOOPT, as
    a kernel older than 5.3 does (a seccomp filter on setsockopt(SOL_SOCKET, 68)); every other
    call is untouched. Irreversible: call it in a forked child only."""
    arch, nr = _AUDIT_ARCH[os.uname().machine]
    ld, jeq, ret = 0x20, 0x15, 0x06
    code = [
        (ld, 0, 0, 4), (jeq, 0, 7, arch),  # seccomp_data.arch
        (ld, 0, 0, 0), (jeq, 0, 5, nr),  # .nr
        (ld, 0, 0, 24), (jeq, 0, 3, socket.SOL_SOCKET),  # .args[1] (level)
        (ld, 0, 0, 32), (jeq, 0, 1, SO_DETACH_REUSEPORT_BPF),  # .args[2] (optname)
        (ret, 0, 0, _RET_ERRNO | errno.ENOPROTOOPT), (ret, 0, 0, _RET_ALLOW),
    ]  # fmt: skip
    filters = (ctypes.c_uint64 * len(code))(*(op | jt << 16 | jf << 24 | k << 32 for op, jt, jf, k in code))
    prog = struct.pack("HxxxxxxP", len(code), ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) or libc.prctl(
        pr_set_seccomp, seccomp_mode_filter, ctypes.c_char_p(prog), 0, 0
    ):
        raise OSError(ctypes.get_errno(), "seccomp")


def _steer_on_a_kernel_without_detach() -> None:
    with socket.socket() as probe:  # the premise: the detach is refused as Linux 5.2 does
        try:
            probe.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
        except OSError as exc:
            assert exc.errno == errno.ENOPROTOOPT, exc
        else:
            raise AssertionError("the detach was not refused")
    events: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: events.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("meshagent.workers").addHandler(handler)
    listeners = bind_listeners(LOOPBACK, 3, transparent=False)
    try:
        for direction in ("inbound", "outbound"):
            port = listeners.listening[direction][1]
            listeners.steer([1, 2])  # slot 0's worker died
            assert _queued(listeners, direction, port, 100)[0] == 0
            listeners.steer([0, 1, 2])  # and is back: it gets its share again
            got = _queued(listeners, direction, port, 300)
            assert min(got[s] for s in (0, 1, 2)) > 30, got
    finally:
        listeners.close()
    assert listeners.detach_unsupported
    assert events.count("workers.steer_detach_unsupported") == 1, events  # once, not per steer


def test_steer_with_every_slot_up_reaches_every_slot_where_detach_is_refused() -> None:
    """A kernel before 5.3 cannot detach a reuseport program: "every worker up" must still reach
    the slot that was down (a program over all slots), not leave the one that excluded it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = b"ok"
        try:
            os.close(read_end)
            _refuse_detach_as_linux_before_5_3()
            _steer_on_a_kernel_without_detach()
        except BaseException:
            import traceback

            outcome = traceback.format_exc().encode()
        finally:
            os.write(write_end, outcome)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read()
    os.waitpid(pid, 0)
    assert outcome == b"ok", outcome.decode()


def test_spawner_reports_exit_status_and_cpu_and_replaces_with_a_new_interpreter() -> None:
    listeners = bind_listeners(LOOPBACK, 1, transparent=False)
    spawner = fork_workers(listeners, _hello_worker, 1)
    started: list[int] = []

    async def body() -> None:
        reported: asyncio.Queue[tuple[int, int, float]] = asyncio.Queue()
        spawner.on_exit = lambda pid, status, cpu: reported.put_nowait((pid, status, cpu))
        pid, chan = await spawner.spawn(0)
        started.append(pid)
        os.kill(pid, signal.SIGKILL)
        exited, status, cpu_s = await reported.get()
        assert exited == pid
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert describe_exit(status) == "killed by SIGKILL"
        assert cpu_s >= 0
        await chan.wait_closed()

        # The replacement is a new interpreter on the same socket, run by the same `main`.
        pid, chan = await spawner.spawn(0)
        started.append(pid)
        assert any("agent.workers.fresh" in arg for arg in psutil.Process(pid).cmdline())
        assert await chan.request("ping", timeout=30) == {"slot": 0, "pid": pid, "op": "ping"}
        assert _greeting(listeners.listening["inbound"][1]) == (0, pid)
        # A worker whose channel closes exits by itself: exit 0.
        chan.close()
        exited, status, _cpu = await reported.get()
        assert exited == pid and describe_exit(status) == "exit 0"
        assert spawner.replaced == 1

    try:
        run(body)
    finally:
        _reap(spawner, *started)
        listeners.close()


def _exits_at_once(spec_fd: int, fds: list[int]) -> subprocess.Popen[bytes]:
    """Stands in for forker._start_fresh: a "replacement" that exits 0 at once, returned only
    once it has exited (a zombie, not reaped), so the spec write finds no reader."""
    proc = subprocess.Popen(["true"], pass_fds=[spec_fd, *fds])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the stand-in did not exit"
        time.sleep(0.01)
    return proc


def test_a_replacement_dead_before_its_spec_is_reaped_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its spec cannot be written (EPIPE): spawn fails with why, and the process is still reaped
    and reported with its own exit status (its CPU counts, the pool keeps no Popen of it)."""
    monkeypatch.setattr(forker, "_start_fresh", _exits_at_once)
    listeners = bind_listeners(LOOPBACK, 1, transparent=False)
    spawner = Spawner(listeners, _hello_worker, {})  # no first worker: spawn starts a replacement
    exited: list[int] = []

    async def body() -> None:
        fds = len(os.listdir("/proc/self/fd"))
        reported: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        spawner.on_exit = lambda pid, status, _cpu: reported.put_nowait((pid, status))
        with pytest.raises(MeshagentError) as failed:
            await spawner.spawn(0)
        assert failed.value.code == "worker_exited_at_start"
        pid, status = await asyncio.wait_for(reported.get(), 10)
        exited.append(pid)
        assert describe_exit(status) == "exit 0"  # its own status: nothing reaped it before
        assert not spawner._processes and spawner.replaced == 0
        assert len(os.listdir("/proc/self/fd")) == fds  # the channel and spec pipe closed

    try:
        run(body)
        with pytest.raises(ChildProcessError):  # reaped
            os.waitpid(exited[0], os.WNOHANG)
    finally:
        spawner.close()
        listeners.close()


def test_a_worker_reaped_elsewhere_is_still_reported() -> None:
    """A replacement's Popen that reaped its process itself, and a worker some other code
    waited for: each exit is still reported (the pool replaces a slot only on that report), with
    the status the Popen kept, else UNKNOWN_STATUS, and the Popen is dropped."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    theirs.close()
    os.waitpid(pid, 0)  # "elsewhere"
    proc = subprocess.Popen([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    proc.wait()  # what Popen.kill() (it polls first) did to a replacement that had died
    listeners = bind_listeners(LOOPBACK, 1, transparent=False)
    spawner = Spawner(listeners, _hello_worker, {0: (pid, ours)})

    async def body() -> None:
        reported: asyncio.Queue[tuple[int, int, float]] = asyncio.Queue()
        spawner.on_exit = lambda pid, status, cpu: reported.put_nowait((pid, status, cpu))
        _, chan = await spawner.spawn(0)
        assert await asyncio.wait_for(reported.get(), 10) == (pid, UNKNOWN_STATUS, 0.0)
        assert describe_exit(UNKNOWN_STATUS) == "exit not known (reaped elsewhere)"
        chan.close()

        spawner._processes[proc.pid] = proc  # as _exec keeps it
        spawner._reap_later(proc.pid)
        exited, status, _cpu = await asyncio.wait_for(reported.get(), 10)
        assert exited == proc.pid and describe_exit(status) == "killed by SIGKILL"
        assert not spawner._processes

    try:
        run(body)
    finally:
        spawner.close()
        listeners.close()


class _NoThreads(concurrent.futures.ThreadPoolExecutor):
    def submit(self, *_args: Any, **_kwargs: Any) -> concurrent.futures.Future[Any]:
        raise AssertionError("the spawner handed work to a thread")


def _ballast_worker(ballast: bytes, slot: int, sockets: SlotSockets, chan: socket.socket) -> None:
    _hello_worker(slot, sockets, chan)


def test_a_replacements_spec_is_written_on_the_loop_even_past_a_pipes_size() -> None:
    """The spec goes into the pipe from the loop itself (no thread writes to an fd the loop
    closes on cancellation), and a spec larger than a pipe's default 64 KiB still arrives."""
    listeners = bind_listeners(LOOPBACK, 1, transparent=False)
    spawner = Spawner(listeners, functools.partial(_ballast_worker, os.urandom(300_000)), {})
    started: list[int] = []

    async def body() -> None:
        asyncio.get_running_loop().set_default_executor(_NoThreads())
        pid, chan = await spawner.spawn(0)
        started.append(pid)
        assert await chan.request("ping", timeout=30) == {"slot": 0, "pid": pid, "op": "ping"}
        chan.close()

    try:
        run(body)
    finally:
        _reap(spawner, *started)
        listeners.close()


def test_close_kills_and_reaps_the_first_workers_never_handed_out() -> None:
    listeners = bind_listeners(LOOPBACK, 3, transparent=False)
    before = {p.pid for p in psutil.Process().children()}
    spawner = fork_workers(listeners, _hello_worker, 3)
    forked = {p.pid for p in psutil.Process().children()} - before
    started: list[int] = []

    async def body() -> None:
        pid, chan = await spawner.spawn(1)
        started.append(pid)
        assert await chan.request("ping") == {"slot": 1, "pid": pid, "op": "ping"}

    try:
        run(body)
        assert len(forked) == 3 and started[0] in forked
        spawner.close()
        for pid in forked - set(started):
            with pytest.raises(ChildProcessError):  # killed and reaped: no zombie left
                os.waitpid(pid, os.WNOHANG)
    finally:
        _reap(spawner, *started)
        listeners.close()


_FLAGS = (
    "debug",
    "optimize",
    "dont_write_bytecode",
    "no_user_site",
    "no_site",
    "ignore_environment",
    "verbose",
    "bytes_warning",
    "quiet",
    "isolated",
    "dev_mode",
    "utf8_mode",
    "warn_default_encoding",
)


def _facts_worker(slot: int, sockets: SlotSockets, chan: socket.socket) -> None:
    """A stand-in worker that answers any request with how its interpreter runs and whether
    its inherited sockets would pass to a process it ran; exits on EOF of its channel."""
    held = [*(s for group in sockets.values() for s in group), chan]
    facts = {
        "flags": {name: getattr(sys.flags, name) for name in _FLAGS},
        "warnoptions": sys.warnoptions,
        "xoptions": {k: str(v) for k, v in sys._xoptions.items()},
        "path": [os.path.abspath(p) for p in sys.path],
        "inheritable": [s.get_inheritable() for s in held],
    }

    async def main() -> None:
        control = await Channel.open(chan, lambda _op, _a: facts)
        await control.wait_closed()

    asyncio.run(main())
    os._exit(0)


def _supervise_forked_then_replacement() -> None:
    """Run as a supervisor with interpreter flags: print the facts of its worker forked at
    start, then of a replacement, as JSON."""
    listeners = bind_listeners(LOOPBACK, 1, transparent=False)
    spawner = fork_workers(listeners, _facts_worker, 1)
    facts: list[Any] = []

    async def body() -> None:
        reported: asyncio.Queue[int] = asyncio.Queue()
        spawner.on_exit = lambda pid, _status, _cpu: reported.put_nowait(pid)
        for _ in range(2):  # the worker forked at start, then a new interpreter
            pid, chan = await spawner.spawn(0)
            facts.append(await chan.request("facts", timeout=30))
            chan.close()
            if await reported.get() != pid:
                raise RuntimeError("another exit reported")

    run(body, timeout=60)
    listeners.close()
    print(json.dumps(facts))


def test_a_replacement_runs_with_the_supervisors_interpreter_flags_and_keeps_no_fd_inheritable() -> None:
    """-s -E -O -X utf8 -W: a replacement runs as the worker forked at start does (same flags,
    warning and -X options, same sys.path: the working directory the supervisor started in,
    though -E ignores PYTHONPATH), and its inherited sockets are close-on-exec again."""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-s", "-E", "-O", "-X", "utf8", "-W", "ignore::ResourceWarning", "-c",
         "from tests.daemon.test_workers_units import _supervise_forked_then_replacement as s; s()"],
        cwd=repo, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    forked, replacement = json.loads(proc.stdout.splitlines()[-1])
    assert forked["flags"]["no_user_site"] == forked["flags"]["ignore_environment"] == 1
    assert forked["flags"]["optimize"] == 1 and forked["xoptions"] == {"utf8": "True"}
    assert forked["warnoptions"] == ["ignore::ResourceWarning"]
    assert forked["path"][0] == str(repo)
    assert replacement["flags"] == forked["flags"]
    assert replacement["warnoptions"] == forked["warnoptions"]
    assert replacement["xoptions"] == forked["xoptions"]
    assert replacement["path"] == forked["path"]
    assert forked["inheritable"] == replacement["inheritable"] == [False, False, False]


# --- a real worker ---------------------------------------------------------------------------


def _real_worker(tmp_path: Path) -> tuple[Listeners, Spawner, socket.socket, int]:
    """One real worker forked at once (identity shop/db, a long drain) in front of a listening
    app socket: (listeners, spawner, app, the worker's inbound port)."""
    issue_identity(tmp_path / "authority", "shop/db", tmp_path / "b")
    config = AgentConfig(
        identity=IdentitySettings(state_dir=tmp_path / "b"),
        proxy=ProxySettings(listen="127.0.0.1", drain_timeout_s=300),
    )
    listeners = bind_listeners(LOOPBACK, 1, transparent=False)
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen()
    app_port = app.getsockname()[1]
    main = functools.partial(worker.main, config, orig_dst=lambda _sock: ("127.0.0.1", app_port))
    spawner = fork_workers(listeners, main, 1)
    port = listeners.listening["inbound"][1]
    return listeners, spawner, app, port


def test_worker_drains_on_control_eof(tmp_path: Path) -> None:
    """EOF on the control channel (the supervisor is gone) drains: the worker accepts nothing
    more, but a relayed connection goes on until it ends, and only then does the worker exit."""
    listeners, spawner, app, port = _real_worker(tmp_path)
    started: list[int] = []

    async def body() -> None:
        loop = asyncio.get_running_loop()
        exits: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        spawner.on_exit = lambda pid, status, _cpu: exits.put_nowait((pid, status))
        pid, chan = await spawner.spawn(0)
        started.append(pid)
        deny = Directory(Catalog([]), InboundPolicy(PortPolicy(DefaultPolicy.DENY)))
        permissive = Directory(Catalog([]), InboundPolicy(PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED)))
        key, next_key = os.urandom(80), os.urandom(80)
        init = asyncio.ensure_future(
            chan.request(
                "init",
                timeout=20,
                directory=pickle.dumps(deny, protocol=5),
                ticket_key=key,
                log={"level": "info", "format": "logfmt"},
            )
        )
        await asyncio.sleep(0)  # init is sent; a refresh broadcast while it runs is newer: it wins
        chan.notify("directory", blob=pickle.dumps(permissive, protocol=5))
        reply = await init
        assert reply["pid"] == pid and reply["listening"]["inbound"][1] == port
        ping = await chan.request("ping")
        assert ping["serial"] and ping["open"] == {"inbound": 0, "outbound": 0}
        assert ping["ticket_key_name"] == ticket_key_name(key)
        chan.notify("ticket_key", key=next_key)  # applied in order, before the next request
        assert (await chan.request("ping"))["ticket_key_name"] == ticket_key_name(next_key)
        renewed = await chan.request("credentials", ticket_key=key)  # same files: same serial
        assert renewed == {"serial": ping["serial"]}
        status = (await chan.request("snapshot"))["status"]
        assert status["ticket_key_name"] == ticket_key_name(key)
        assert status["session_cache"] == 0 and status["server_sessions"] == 0  # stateless tickets

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        served, _ = await loop.sock_accept(app)  # the worker relayed it to the app
        with served:
            served.setblocking(False)
            assert await loop.sock_recv(served, 5) == b"hello"
            ping = await chan.request("ping")
            assert ping["open"]["inbound"] == 1
            dump = (await chan.request("snapshot"))["metrics"]
            opened = next(family for name, family in dump.items() if name.endswith("tcp_open_total"))
            inbound = 'direction="inbound",peer="src"'
            assert sum(value for key, value in opened["samples"] if key.startswith(inbound)) == 1

            chan.close()  # EOF: the supervisor is gone
            # Still relaying both ways after the EOF: the worker has not exited.
            await loop.sock_sendall(served, b"still here")
            assert await reader.readexactly(10) == b"still here"
            writer.write(b"more")
            assert await loop.sock_recv(served, 4) == b"more"
            assert exits.empty()
        # The app closes its side; the client reads EOF, closes: the last connection ends.
        assert await reader.read() == b""
        writer.close()
        exited, status = await exits.get()
        assert exited == pid and describe_exit(status) == "exit 0"

    try:
        run(body, timeout=60)
    finally:
        _reap(spawner, *started)
        listeners.close()
        app.close()


def test_worker_ignores_sigint_sighup_and_drains_on_sigterm(tmp_path: Path) -> None:
    """Ctrl-C and SIGHUP reach the whole process group: a worker ignores both. SIGTERM sent to
    a worker drains it (a relayed connection keeps going); a second SIGTERM cuts the drain."""
    listeners, spawner, app, port = _real_worker(tmp_path)
    started: list[int] = []

    async def body() -> None:
        loop = asyncio.get_running_loop()
        exits: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        spawner.on_exit = lambda pid, status, _cpu: exits.put_nowait((pid, status))
        pid, chan = await spawner.spawn(0)
        started.append(pid)
        directory = Directory(Catalog([]), InboundPolicy(PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED)))
        await chan.request("init", timeout=20, directory=pickle.dumps(directory), ticket_key=None)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        served, _ = await loop.sock_accept(app)
        with served:
            served.setblocking(False)
            assert await loop.sock_recv(served, 5) == b"hello"
            for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
                os.kill(pid, sig)  # ignored signals are dropped when sent: any other kills now
            await chan.request("ping")  # the SIGTERM is handled: the worker is draining
            writer.write(b"draining")
            assert await loop.sock_recv(served, 8) == b"draining"
            await loop.sock_sendall(served, b"back")
            assert await reader.readexactly(4) == b"back"
            assert exits.empty()
            os.kill(pid, signal.SIGTERM)  # the second: cut the drain, close what is open
            assert await reader.read() == b""
            exited, status = await exits.get()
            assert exited == pid and describe_exit(status) == "exit 0"
        writer.close()

    try:
        run(body, timeout=60)
    finally:
        _reap(spawner, *started)
        listeners.close()
        app.close()


# --- proxy.workers = "auto": the CPUs the agent may use ------------------------------------


def _cgroup_tree(root: Path, files: dict[str, str], own: str) -> Path:
    """`files` ({"system.slice/cpu.max": "..."}) under `root`, and a /proc/self/cgroup that
    names `own` (the agent's cgroup lines) next to it."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    proc = root.parent / f"{root.name}.proc-cgroup"
    proc.write_text(own + "\n")
    return proc


def test_cpu_quota_v2_cpu_max_own_and_ancestors(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    own = "0::/system.slice/meshagent.service"
    service = "system.slice/meshagent.service/cpu.max"
    proc = _cgroup_tree(root, {service: "150000 100000", "system.slice/cpu.max": "max 100000"}, own)
    assert cpu_quota(root, proc) == 2  # 1.5 CPUs, rounded up
    (root / service).write_text("max 100000\n")
    assert cpu_quota(root, proc) is None  # no quota anywhere: the affinity decides
    (root / "system.slice/cpu.max").write_text("250000 100000\n")
    assert cpu_quota(root, proc) == 3  # a slice's quota holds its services too
    (root / service).write_text("50000 100000\n")
    assert cpu_quota(root, proc) == 1  # the smallest applies; half a CPU is still one worker
    (root / service).write_text("garbage\n")
    assert cpu_quota(root, proc) == 3  # an unreadable file is no quota


def test_cpu_quota_in_a_container_and_on_cgroup_v1(tmp_path: Path) -> None:
    # A container's cgroup namespace-less view: /proc names the host's path, the mount is the
    # container's own cgroup.
    root = tmp_path / "container"
    proc = _cgroup_tree(root, {"cpu.max": "400000 200000"}, "0::/kubepods/pod1/abc")
    assert cpu_quota(root, proc) == 2
    v1 = tmp_path / "v1"
    proc = _cgroup_tree(
        v1,
        {
            "cpu,cpuacct/system.slice/meshagent.service/cpu.cfs_quota_us": "300000",
            "cpu,cpuacct/system.slice/meshagent.service/cpu.cfs_period_us": "100000",
        },
        "5:cpu,cpuacct:/system.slice/meshagent.service\n1:name=systemd:/system.slice\n0::/system.slice",
    )
    assert cpu_quota(v1, proc) == 3
    (v1 / "cpu,cpuacct/system.slice/meshagent.service/cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1, proc) is None
    assert cpu_quota(tmp_path / "absent", tmp_path / "absent.proc") is None


def test_auto_workers_is_the_affinity_under_a_quota_and_at_most_64(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    root = tmp_path / "cgroup"
    proc = _cgroup_tree(root, {"cpu.max": "50000 100000"}, "0::/")
    assert auto_workers(root, proc) == 1
    (root / "cpu.max").write_text(f"{(cpus + 7) * 100000} 100000\n")
    assert auto_workers(root, proc) == min(cpus, 64)  # a quota above the affinity changes nothing
    (root / "cpu.max").write_text("max 100000\n")
    assert auto_workers(root, proc) == min(cpus, 64)
    assert worker_count(ProxySettings(workers=3)) == 3


@pytest.mark.parametrize(("given", "count"), [(0, 0), ("0", 0), (1, 1), ("64", 64)])
def test_proxy_workers_zero_is_the_inline_proxy_and_64_the_most(given: int | str, count: int) -> None:
    assert worker_count(ProxySettings(workers=given)) == count


@pytest.mark.parametrize("given", [-1, 65, "two", True, 1.5])
def test_proxy_workers_out_of_range_says_what_is_allowed(given: object) -> None:
    with pytest.raises(MeshagentError) as refused:
        ProxySettings(workers=given)  # type: ignore[arg-type]
    assert "between 0 and 64" in refused.value.message and "workers = 0" in (refused.value.hint or "")


def _cpu_hierarchy() -> tuple[Path, str, str] | None:
    """Where this machine's cpu controller is: (parent cgroup, quota file, quota for half a
    CPU), cgroup v2 first."""
    v2 = Path("/sys/fs/cgroup")
    with contextlib.suppress(OSError):
        if "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
            return v2, "cpu.max", "50000 100000"
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists() and (v1 / "cpu.cfs_period_us").read_text().strip() == "100000":
        return v1, "cpu.cfs_quota_us", "50000"
    return None


def test_auto_workers_in_a_real_cgroup_with_half_a_cpu() -> None:
    """A real agent process moved into a cgroup limited to half a CPU picks 1 worker, where its
    affinity alone gives more."""
    hierarchy = _cpu_hierarchy()
    if hierarchy is None or os.geteuid() != 0:
        pytest.skip("no writable cgroup cpu controller here")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: a quota cannot lower the count")
    parent, quota_file, half = hierarchy
    group = parent / f"meshagent-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:  # a read-only cgroupfs (a container)
        pytest.skip(f"cannot create a cgroup: {exc}")
    try:
        (group / quota_file).write_text(half)
        code = "import sys; sys.stdin.readline(); from agent.config import ProxySettings, worker_count; "
        code += "print(worker_count(ProxySettings()))"
        root = Path(__file__).resolve().parents[2]
        with subprocess.Popen(
            [sys.executable, "-c", code], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as child:
            (group / "cgroup.procs").write_text(str(child.pid))
            out, _ = child.communicate("moved\n", timeout=60)
        assert child.returncode == 0
        assert out.strip() == "1"
    finally:
        for _ in range(50):  # the exited child leaves the cgroup as it is reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
