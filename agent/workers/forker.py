"""The listening sockets of every worker slot, and the forker that forks the workers.

`bind_listeners` binds, once and before anything else runs, one SO_REUSEPORT socket per slot,
direction and address family, all on the same port: the kernel hashes each SYN to one socket of
the group, and each socket has its own accept queue. The supervisor keeps every socket open for
its whole life (closing one would reset its queue), so a killed worker's queued connections
wait for its replacement, which is forked onto the same sockets.

`start_forker` forks, before any thread or event loop exists, a single-threaded blocking process
(the forker). It forks every worker, the first ones and the replacements: forking from the
supervisor later would copy locks held by its threads and its loop's epoll instance. The
supervisor talks to it over a SOCK_SEQPACKET socketpair:

    supervisor -> forker   ("spawn", seq, slot) with the worker's control socket attached
    forker -> supervisor   ("spawned", seq, pid) | ("spawn_failed", seq, error)
                           ("exit", pid, status, cpu_s)   os.wait4's status and rusage
EOF on that socket ends the forker (its workers then see EOF on their own channels).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import os
import pickle
import select
import signal
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from agent.errors import ListenError, MeshagentError, listen_error
from agent.logs import get_logger
from agent.proxy.listeners import ListenerSettings
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
"""What the forker runs in a new worker: `(slot, sockets, control socket)`; it must not
return (`worker.main` ends in `os._exit`), and a return or exception exits 1."""


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


# --- the forker process --------------------------------------------------------------------


class ForkerGone(MeshagentError):
    """The forker process is gone: no worker can be forked any more."""

    code = "forker_gone"


def describe_exit(status: int) -> str:
    """A wait status as people read it: "exit 0", "killed by SIGKILL"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    if os.WIFEXITED(status):
        return f"exit {os.WEXITSTATUS(status)}"
    return f"status {status}"


class Forker:
    """The supervisor's handle on the forker. Use it from the supervisor's event loop."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self.on_exit: Callable[[int, int, float], None] = lambda _pid, _status, _cpu: None
        """Called as `on_exit(pid, status, cpu_s)` when a worker exits (wait status, user +
        system CPU seconds from its rusage)."""
        self.on_gone: Callable[[], None] = lambda: None
        """Called once if the forker itself goes away while the supervisor runs."""
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._gone = False
        self._closing = False

    @property
    def alive(self) -> bool:
        return not self._gone

    async def spawn(self, slot: int) -> tuple[int, Channel]:
        """Fork a worker for `slot`: returns its pid and the supervisor's end of its control
        channel. Raises ForkerGone, or MeshagentError when the fork failed (EAGAIN, ENOMEM)."""
        self._start_reader()
        if self._gone:
            raise ForkerGone("the forker process is gone", "restart the agent")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._seq += 1
        seq = self._seq
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = future
        try:
            try:
                socket.send_fds(self._sock, [pickle.dumps(("spawn", seq, slot))], [theirs.fileno()])
            except OSError as exc:
                raise ForkerGone(f"the forker process is gone ({exc})", "restart the agent") from None
            finally:
                theirs.close()
            pid = await future
        except BaseException:
            ours.close()
            raise
        finally:
            self._waiting.pop(seq, None)
        return pid, await Channel.open(ours, name=f"worker-{slot}")

    def close(self) -> None:
        """End the forker (EOF on its socket). Running workers are not touched."""
        self._closing = True
        if self._reader is None or self._reader.done():
            self._sock.close()
            return
        # The reader is waiting on the socket: shut it down (the forker reads EOF now, the
        # reader reads EOF next and closes it) rather than close an fd the loop still polls.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _start_reader(self) -> None:
        if self._reader is None:
            self._sock.setblocking(False)
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="forker-reader")

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self._sock, 65536)
                if not data:
                    break
                self._message(pickle.loads(data))  # noqa: S301 - our own process
        except OSError as exc:
            log.error("forker.channel_failed", error=str(exc))
        self._gone = True
        self._sock.close()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ForkerGone("the forker process is gone", "restart the agent"))
        if not self._closing:
            log.error("forker.gone", pid=self.pid, hint="no worker can be replaced: restart the agent")
            self.on_gone()

    def _message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "exit":
            _, pid, status, cpu_s = message
            self.on_exit(pid, status, cpu_s)
            return
        future = self._waiting.get(message[1])
        if future is None or future.done():
            return
        if kind == "spawned":
            future.set_result(message[2])
        else:
            future.set_exception(
                MeshagentError(
                    f"cannot fork a proxy worker: {message[2]}",
                    "the host is out of processes or memory; the slot is retried",
                    code="worker_fork_failed",
                )
            )


def start_forker(listeners: Listeners, main: WorkerMain) -> Forker:
    """Fork the forker. Call before any thread or event loop exists: the forker and every
    worker are copies of this process as it is now. `main` runs in each worker (the agent passes
    `functools.partial(worker.main, config)`)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Objects that exist now stay out of the collector's reach in every child: a collection
    # would touch (and so copy) every page they live on. The Python docs' advice for fork.
    gc.collect()
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            _forker(theirs, listeners, main)
            code = 0
        except BaseException:  # never return into the supervisor's code
            code = 1
        finally:
            os._exit(code)
    gc.unfreeze()
    theirs.close()
    log.debug("forker.started", pid=pid)
    return Forker(pid, ours)


def _forker(sock: socket.socket, listeners: Listeners, main: WorkerMain) -> None:
    """The forker's loop: fork on request, report every child's exit; return on EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C signals the whole group
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)  # only to wake poll (wakeup fd)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _events in poller.poll():
            if fd == wake_r:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
                continue
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
            except OSError:
                return
            if not data:
                return
            _, seq, slot = pickle.loads(data)  # noqa: S301 - our own process
            if not fds:
                continue
            try:
                pid = _fork_worker(slot, fds[0], (sock, wake_r, wake_w), listeners, main)
            except OSError as exc:
                sock.send(pickle.dumps(("spawn_failed", seq, str(exc))))
            else:
                sock.send(pickle.dumps(("spawned", seq, pid)))
            finally:
                for fd_ in fds:
                    os.close(fd_)
        _reap(sock)


def _fork_worker(
    slot: int,
    control_fd: int,
    forker_fds: tuple[socket.socket, int, int],
    listeners: Listeners,
    main: WorkerMain,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock, wake_r, wake_w = forker_fds
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        for other, sockets in enumerate(listeners.slots):
            if other != slot:  # a worker holds only its own slot's sockets
                for group in sockets.values():
                    for s in group:
                        s.close()
        main(slot, listeners.slots[slot], socket.socket(fileno=control_fd))
    except BaseException:  # a worker never returns into the forker's loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        try:
            sock.send(pickle.dumps(("exit", pid, status, usage.ru_utime + usage.ru_stime)))
        except OSError:
            return  # the supervisor is gone; the loop sees the EOF next
