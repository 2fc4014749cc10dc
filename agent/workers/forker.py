"""The listening sockets of every worker slot, and how the workers are started.

`bind_listeners` binds, once and before anything else runs, one SO_REUSEPORT socket per slot,
direction and address family, all on the same port: the kernel hashes each SYN to one socket of
the group, and each socket has its own accept queue. The supervisor keeps every socket open for
its whole life (closing one would reset its queue), so a killed worker's queued connections
wait for its replacement, which is started on the same sockets.

`fork_workers` forks the first worker of every slot from the agent's own process, before any
thread or event loop exists: the workers and the supervisor share the pages of that image (the
supervisor has no helper process beside it). `Spawner` hands those workers to the pool, starts
replacements as new interpreters (the supervisor runs threads by then: no fork from it), and
reaps every worker (pidfd; os.wait4's status and CPU seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import gc
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from agent.errors import ListenError, MeshagentError, listen_error
from agent.logs import get_logger
from agent.proxy.listeners import ListenerSettings
from agent.telemetry.process import return_free_memory
from agent.workers.control import Channel

log = get_logger("meshagent.workers")

# linux/in.h and linux/in6.h (Python's socket module names neither).
IP_TRANSPARENT: Final = 19
IPV6_TRANSPARENT: Final = 75
BACKLOG: Final = 4096

# asm-generic/socket.h, linux/filter.h, linux/bpf_common.h
SO_ATTACH_REUSEPORT_CBPF: Final = 51
SO_DETACH_REUSEPORT_BPF: Final = 68
_SKF_AD_RANDOM: Final = (-0x1000 + 56) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_RANDOM
_LD_W_ABS, _ALU_MOD_K, _JEQ_K, _RET_K = 0x20, 0x94, 0x15, 0x06

Address = tuple[str, int]
SlotSockets = dict[str, list[socket.socket]]
"""One slot's listening sockets: {"inbound": [...], "outbound": [...]}, one per address family
(what `Proxy.start(sockets=...)` takes)."""

WorkerMain = Callable[[int, SlotSockets, socket.socket], object]
"""What runs in a new worker: `(slot, sockets, control socket)`; it must not return
(`worker.main` ends in `os._exit`), and a return or exception exits 1. Picklable: a replacement
unpickles it in a new interpreter (`functools.partial(worker.main, config)` is)."""


@dataclass
class Listeners:
    """Every slot's sockets, and the addresses they listen on."""

    slots: list[SlotSockets]
    listening: dict[str, Address] = field(default_factory=dict)
    detach_unsupported: bool = False
    """The kernel refused SO_DETACH_REUSEPORT_BPF (Linux < 5.3 answers ENOPROTOOPT): "every slot"
    is then a program over all slots, never a detach."""

    def steer(self, live: Sequence[int]) -> None:
        """New connections go to the `live` slots only (all slots: the kernel's own hash again,
        or, where the kernel cannot detach a program, a random pick over all slots). A down
        slot's socket stays open (its queued connections wait for the replacement), but gets no
        new ones meanwhile. Raises OSError if the kernel refuses the program."""
        everyone = len(live) == len(self.slots) or not live  # none live: nowhere better to send
        program = None if everyone else _steering_program(live)
        for name in self.slots[0]:
            # Each direction and family is one reuseport group; a slot's index in it is the
            # order its socket started listening (bind_listeners: slot order), and no socket
            # leaves a group while the agent runs, so the indices hold.
            for sock in self.slots[0][name]:
                if program is None and not self._detach(sock):
                    program = _steering_program(range(len(self.slots)))
                if program is not None:
                    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program.raw)

    def _detach(self, sock: socket.socket) -> bool:
        """Detach the group's program: False when the kernel cannot (the program that excluded
        a down slot would stay attached, and the slot's replacement would never get a new
        connection: the caller attaches one over all slots instead)."""
        if self.detach_unsupported:
            return False
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # no program attached: the kernel's hash already
                return True
            self.detach_unsupported = True
            log.warning(
                "workers.steer_detach_unsupported",
                error=str(exc),
                hint="this kernel cannot detach a reuseport program (Linux < 5.3): with every "
                "worker up, new connections are spread at random over all of them instead",
            )
            return False
        return True

    def close(self) -> None:
        for sockets in self.slots:
            for group in sockets.values():
                for sock in group:
                    sock.close()


class _Program:
    """A classic BPF program as `struct sock_fprog` bytes (`raw`), its instructions kept alive
    for the setsockopt that copies them."""

    def __init__(self, code: list[tuple[int, int, int, int]]) -> None:
        self.filters = (ctypes.c_uint64 * len(code))(
            *(op | jt << 16 | jf << 24 | k << 32 for op, jt, jf, k in code)
        )
        prog = struct.pack("HxxxxxxP", len(code), ctypes.addressof(self.filters))
        self.raw = prog


def _steering_program(live: Sequence[int]) -> _Program:
    """A reuseport program that picks one of `live` at random for each new connection (the
    kernel's hash would pick a down slot's socket 1/N of the time): A = random % n, then
    "A == i: return live[i]" for each i."""
    code = [(_LD_W_ABS, 0, 0, _SKF_AD_RANDOM), (_ALU_MOD_K, 0, 0, len(live))]
    for i, slot in enumerate(live[:-1]):
        code += [(_JEQ_K, 0, 1, i), (_RET_K, 0, 0, slot)]
    code.append((_RET_K, 0, 0, live[-1]))
    return _Program(code)


def _addresses(address: Address) -> list[tuple[socket.AddressFamily, Any]]:
    """The (family, sockaddr) pairs to listen on, as asyncio's create_server resolves them:
    "::" or "" means every family (one socket each, the IPv6 one V6ONLY)."""
    host = None if address[0] in ("::", "") else address[0]
    infos = socket.getaddrinfo(host, address[1], socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    seen: list[tuple[socket.AddressFamily, Any]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if (family, sockaddr) not in seen and family in (socket.AF_INET, socket.AF_INET6):
            seen.append((family, sockaddr))
    return seen


def _listen_socket(
    family: socket.AddressFamily, sockaddr: Any, port: int, transparent: bool
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            # TPROXY's listener lookup takes only transparent sockets, and every socket of the
            # reuseport group can be picked: set on each, before bind.
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((sockaddr[0], port, *sockaddr[2:]))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(settings: ListenerSettings, slots: int, transparent: bool) -> Listeners:
    """Bind `slots` SO_REUSEPORT sockets per direction and family on the settings' addresses
    (port 0: the first socket's port, then that port for all). `transparent` marks the inbound
    sockets IP_TRANSPARENT (tproxy; needs CAP_NET_ADMIN). A busy port or a refused option is a
    ListenError naming the setting, and nothing stays bound."""
    bound: list[SlotSockets] = [{} for _ in range(slots)]
    listeners = Listeners(bound)
    try:
        for name, address in (("inbound", settings.inbound), ("outbound", settings.outbound)):
            port = address[1]
            for family, sockaddr in _addresses(address):
                for slot in range(slots):
                    want = transparent and name == "inbound"
                    try:
                        sock = _listen_socket(family, sockaddr, port, want)
                    except OSError as exc:
                        raise _bind_error(name, address, want, exc) from None
                    bound[slot].setdefault(name, []).append(sock)
                    port = sock.getsockname()[1]
            first = bound[0][name][0].getsockname()
            listeners.listening[name] = (first[0], first[1])
    except BaseException:
        listeners.close()
        raise
    return listeners


def _bind_error(name: str, address: Address, transparent: bool, exc: OSError) -> ListenError:
    host = None if address[0] in ("::", "") else address[0]
    if transparent and exc.errno == errno.EPERM:
        return ListenError(
            f"cannot make the inbound proxy's listener on {host or '*'}:{address[1]} transparent "
            "(tproxy): operation not permitted",
            'inbound_mode = "tproxy" needs CAP_NET_ADMIN (the systemd unit grants it); '
            'run with it, or set intercept.inbound_mode = "redirect"',
            code="transparent_not_permitted",
        )
    return listen_error(f"{name} proxy", f"intercept.{name}_port", host, address[1], exc)


# --- starting workers ------------------------------------------------------------------------


UNKNOWN_STATUS: Final = -1
"""The wait status `Spawner.on_exit` reports for a worker that something else reaped first."""


def describe_exit(status: int) -> str:
    """A wait status as people read it: "exit 0", "killed by SIGKILL"."""
    if status == UNKNOWN_STATUS:
        return "exit not known (reaped elsewhere)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    if os.WIFEXITED(status):
        return f"exit {os.WEXITSTATUS(status)}"
    return f"status {status}"


def fork_workers(listeners: Listeners, main: WorkerMain, count: int) -> Spawner:
    """Fork the first `count` workers (slots 0..count-1) from this process, as it is now. Call
    before any thread or event loop exists: a fork copies no lock a thread holds, no epoll.

    Each worker shares every page of this process's image until one of them writes it (CPython
    writes an object's reference count whenever it touches it), so the agent pays one copy per
    process that touches a page. The collector's objects are frozen here and stay frozen in
    this process (the supervisor) too: a full collection would write every object's header
    and so copy every page that holds one. `main` must be picklable (a replacement runs it in
    a new interpreter: see `Spawner`)."""
    gc.collect()  # (before the freeze: nothing collectable is kept out of reach for good)
    gc.freeze()
    # Free heap pages that stay resident would be shared, then copied by each process that
    # allocates into them; given back now, each process's allocations take fresh pages instead
    # (measured: Σ PSS with 2 workers 41.3-41.5 -> 40.2 MB).
    return_free_memory()
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(count)]
    first: dict[int, tuple[int, socket.socket]] = {}
    try:
        for slot in range(count):
            pid = os.fork()
            if pid == 0:
                _first_worker(slot, pairs, listeners, main)  # never returns
            first[slot] = (pid, pairs[slot][0])
            pairs[slot][1].close()
    except BaseException:
        for pid, _ in first.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
        raise
    log.debug("workers.forked", pids=[pid for pid, _ in first.values()])
    return Spawner(listeners, main, first)


def _first_worker(
    slot: int,
    pairs: list[tuple[socket.socket, socket.socket]],
    listeners: Listeners,
    main: WorkerMain,
) -> NoReturn:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (worker.main sets these too; a signal
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # between the fork and it is handled alike)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # A worker holds only its own end of its own channel: a copy of the supervisor's end
        # (or another worker's) would keep that channel open after the supervisor died.
        for i, (ours, theirs) in enumerate(pairs):
            ours.close()
            if i != slot:
                theirs.close()
        _close_other_slots(listeners, slot)
        main(slot, listeners.slots[slot], pairs[slot][1])
    except BaseException:  # a worker never returns into the supervisor's code
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _close_other_slots(listeners: Listeners, slot: int) -> None:
    for other, sockets in enumerate(listeners.slots):
        if other != slot:  # a worker holds only its own slot's sockets
            for group in sockets.values():
                for s in group:
                    s.close()


class Spawner:
    """Starts workers for the supervisor and reports their exits. Use it from the supervisor's
    event loop.

    The first worker of each slot was forked at start (`fork_workers`). A replacement cannot
    be forked from the supervisor, which runs threads by then (a fork would copy a lock one of
    them holds), so it is a new interpreter (agent/workers/fresh.py, with the supervisor's
    interpreter flags), given its slot's listening sockets, its control socket and the pickled
    `main`. It shares no Python page with the others (it imports the proxy on its own: ~18 MB
    PSS idle, where a forked worker holds ~6.5 MB of its own, for as long as it runs). A slot
    that never dies costs nothing of it; keeping a second pre-fork image around for
    replacements (the "forker" of earlier releases) cost ~6 MB on every agent, always."""

    def __init__(
        self, listeners: Listeners, main: WorkerMain, first: dict[int, tuple[int, socket.socket]]
    ) -> None:
        self.pid = os.getpid()  # the process workers come from: this one (status sums it once)
        self._listeners = listeners
        self._main = main
        self._first = first
        self.on_exit: Callable[[int, int, float], None] = lambda _pid, _status, _cpu: None
        """Called as `on_exit(pid, status, cpu_s)` when a worker exits (wait status, user +
        system CPU seconds from its rusage; UNKNOWN_STATUS and 0.0 if something else reaped
        it first)."""
        self._reapers: set[asyncio.Task[None]] = set()
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self.replaced = 0  # replacements started as new interpreters

    async def spawn(self, slot: int) -> tuple[int, Channel]:
        """Start a worker for `slot`: the one forked at start if it is still unused, else a new
        interpreter. Returns its pid and the supervisor's end of its control channel. Raises
        MeshagentError when the process cannot be started (EAGAIN, ENOMEM, no interpreter) or
        exits before it has its spec."""
        if slot in self._first:
            pid, ours = self._first.pop(slot)
        else:
            pid, ours = self._exec(slot)
        self._reap_later(pid)
        try:
            return pid, await Channel.open(ours, name=f"worker-{slot}")
        except BaseException:
            ours.close()
            raise

    def _exec(self, slot: int) -> tuple[int, socket.socket]:
        """Start a replacement and hand it its spec. No await in here: nothing can cancel it
        halfway, and no other thread touches the spec pipe."""
        sockets = self._listeners.slots[slot]
        layout = {name: [s.fileno() for s in group] for name, group in sockets.items()}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pipe: list[int] = []  # the spec pipe's ends still open here
        proc: subprocess.Popen[bytes] | None = None
        try:
            payload = pickle.dumps((self._main, slot, layout, theirs.fileno()), protocol=5)
            pipe.extend(os.pipe())
            spec_r, spec_w = pipe
            _room_for(spec_w, len(payload))
            try:
                proc = _start_fresh(spec_r, [theirs.fileno(), *(fd for fds in layout.values() for fd in fds)])
            except OSError as exc:
                raise MeshagentError(
                    f"cannot start a proxy worker: {exc}",
                    "the host is out of processes or memory; the slot is retried",
                    code="worker_fork_failed",
                ) from None
            # Reaped by `_reap` (os.wait4, for the CPU seconds): keeping the Popen referenced
            # keeps subprocess's own cleanup from reaping it first (and losing its status).
            self._processes[proc.pid] = proc
            os.close(pipe.pop(0))  # (ours closed: a replacement that died makes the write EPIPE)
            theirs.close()
            try:
                # On the loop: the pipe holds the whole spec (_room_for), so this never blocks.
                _write_all(spec_w, payload)
            except OSError as exc:
                raise MeshagentError(
                    f"a new proxy worker exited before it got its spec ({exc})",
                    "its own error is in the agent's log just before this line; the slot is retried",
                    code="worker_exited_at_start",
                ) from None
        except BaseException:
            ours.close()
            if proc is not None:  # started, but it will never get its spec: end and reap it
                # os.kill, not proc.kill(): Popen.send_signal polls first, which would reap a
                # child that already died, and `_reap` would then never see its exit.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                self._reap_later(proc.pid)
            raise
        finally:
            theirs.close()
            for fd in pipe:
                os.close(fd)
        self.replaced += 1
        log.info("worker.exec", worker=slot, pid=proc.pid, hint="a replacement is a new interpreter")
        return proc.pid, ours

    def _reap_later(self, pid: int) -> None:
        task = asyncio.get_running_loop().create_task(self._reap(pid), name=f"reap-{pid}")
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _reap(self, pid: int) -> None:
        """Wait for `pid` to exit (its pidfd turns readable; without pidfds, Linux < 5.3, poll
        every 0.2 s), reap it and report it."""
        loop = asyncio.get_running_loop()
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except (OSError, AttributeError):
            pidfd = None
        try:
            while True:
                try:
                    exited = _try_reap(pid)
                except ChildProcessError:  # reaped elsewhere: report what is known of it
                    proc = self._processes.pop(pid, None)
                    code = proc.returncode if proc is not None else None
                    self.on_exit(pid, UNKNOWN_STATUS if code is None else _wait_status(code), 0.0)
                    return
                if exited is not None:
                    proc = self._processes.pop(pid, None)
                    if proc is not None:
                        proc.returncode = exited[0]  # (its own cleanup has nothing left to do)
                    self.on_exit(pid, *exited)
                    return
                if pidfd is None:
                    await asyncio.sleep(0.2)
                    continue
                readable: asyncio.Future[None] = loop.create_future()

                def wake(f: asyncio.Future[None] = readable) -> None:
                    if not f.done():
                        f.set_result(None)

                loop.add_reader(pidfd, wake)
                try:
                    await readable
                finally:
                    loop.remove_reader(pidfd)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def close(self) -> None:
        """Nothing more is started. Running workers are not touched (their exits are still
        reaped and reported while the loop runs); the first workers never handed out are
        killed and reaped (no zombie while this process lives)."""
        for pid, ours in self._first.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # (before the close: an EOF would have it log, drain)
            ours.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # (at once: SIGKILL ends even a stopped process)
        self._first.clear()


# A replacement's `-c` program: the supervisor's sys.path[0] first (argv[1], "" for none), then
# what the same interpreter flags give. -P keeps the working directory off sys.path (a
# checkout there named `agent` must not replace the installed code); an argument, not
# PYTHONPATH, so that -E/-I (which ignore the environment) start the same code.
_BOOTSTRAP: Final = (
    "import sys\nif sys.argv[1]: sys.path.insert(0, sys.argv[1])\n"
    "from agent.workers.fresh import run\nrun(int(sys.argv[2]))"
)


def fresh_argv(spec_fd: int) -> list[str]:
    """The command line of a replacement worker: this interpreter with this process's
    interpreter flags (-I/-E/-s/-O/-X/-W, as multiprocessing's spawn passes them), running
    agent/workers/fresh.py on the spec in `spec_fd`."""
    flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    if "-P" not in flags and "-I" not in flags:
        flags.append("-P")
    # sys.path[0] is the script's directory or the working directory, unless -P/-I left it out.
    first = os.path.abspath(sys.path[0]) if sys.path and not sys.flags.safe_path else ""
    return [sys.executable, *flags, "-c", _BOOTSTRAP, first, str(spec_fd)]


def _start_fresh(spec_fd: int, fds: list[int]) -> subprocess.Popen[bytes]:
    """A replacement worker (`fresh_argv`) with `fds` and the spec pipe inherited. Popen is a
    fork-exec that is safe with threads running; no other fd of the supervisor is inherited."""
    return subprocess.Popen(fresh_argv(spec_fd), pass_fds=[spec_fd, *fds])


def _try_reap(pid: int) -> tuple[int, float] | None:
    """`pid`'s (wait status, user + system CPU seconds) if it has exited (and reaps it), else
    None. Never blocks. Raises ChildProcessError if it is no child (any more)."""
    got, status, usage = os.wait4(pid, os.WNOHANG)
    return (status, usage.ru_utime + usage.ru_stime) if got else None


def _wait_status(returncode: int) -> int:
    """The wait status behind a Popen's returncode (-N: killed by signal N)."""
    return -returncode if returncode < 0 else returncode << 8


def _room_for(fd: int, size: int) -> None:
    """Make the pipe `fd` writes to hold `size` bytes with nobody reading (~2 KB, where a pipe
    holds 64 KiB: only a far larger spec grows it), and make a write to it never block."""
    os.set_blocking(fd, False)
    if size > fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
        except OSError as exc:
            raise MeshagentError(
                f"a proxy worker's spec ({size} bytes) does not fit a pipe: {exc}",
                "see /proc/sys/fs/pipe-max-size",
                code="worker_spec_too_large",
            ) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
