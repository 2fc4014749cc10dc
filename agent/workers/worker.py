"""One proxy worker: the data plane on its slot's SO_REUSEPORT sockets, driven by the supervisor.

A worker is forked by the agent at start (agent/workers/forker.py) and builds its own uvloop loop (an
inherited loop cannot survive a fork). It accepts nothing before the supervisor's `init`: the
kernel queues its slot's connections meanwhile. Then it loads its own `Credentials` (the same
files as the supervisor), starts a `Proxy` on the given sockets, and applies what the supervisor
broadcasts: directories, renewed credentials, ticket keys, log settings.

Stopping: EOF on the control channel (the supervisor is gone, or closed it), SIGTERM, or the
`drain` op: stop accepting, let open connections finish for up to the drain timeout (a `cut`
op, or a second SIGTERM, ends it), then exit 0. SIGINT and SIGHUP are ignored: Ctrl-C signals
the whole process group, and reloads are the supervisor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from agent.identity.store import IdentityStore
from agent.logs import configure, get_logger
from agent.proxy import http1
from agent.proxy.listeners import INBOUND_SRC, OUTBOUND_DST, Proxy
from agent.proxy.memory_return import return_memory_after_peaks
from agent.proxy.tls import Credentials
from agent.telemetry.process import own_memory, return_free_memory
from agent.telemetry.proxy_metrics import ProxyMetrics
from agent.workers.control import Channel
from agent.workers.settings import listener_settings, orig_dst

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.proxy.directory import Directory
    from agent.workers.forker import SlotSockets

log = get_logger("meshagent.worker")

OrigDst = Callable[[Any], tuple[str, int]]

# What only the supervisor may do: systemd accepts READY/WATCHDOG from the main pid only.
_SUPERVISOR_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _directory(value: Any) -> Directory:
    """A directory as broadcast: pickled once by the supervisor for every worker."""
    return pickle.loads(value) if isinstance(value, bytes) else value  # type: ignore[no-any-return]  # noqa: S301


class _SlotTag(logging.Filter):
    """Adds worker=<slot> to every record a worker logs."""

    def __init__(self, slot: int) -> None:
        super().__init__()
        self.slot = slot

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {"worker": self.slot, **getattr(record, "fields", {})}
        return True


def configure_logs(level: str, fmt: str, slot: int) -> None:
    configure(level, fmt)
    for handler in logging.getLogger("meshagent").handlers:
        handler.addFilter(_SlotTag(slot))


class Worker:
    def __init__(
        self, config: AgentConfig, slot: int, sockets: SlotSockets, orig_dst: OrigDst | None = None
    ) -> None:
        self.config = config
        self.orig_dst = orig_dst
        self.slot = slot
        self.sockets = sockets
        self.store = IdentityStore(config.identity.state_dir)
        self.metrics = ProxyMetrics() if config.telemetry.metrics else None
        self.credentials: Credentials | None = None
        self.proxy: Proxy | None = None
        self.stop = asyncio.Event()  # drain now (EOF, SIGTERM, drain op)
        self.cut = asyncio.Event()  # end the drain now (cut op, second SIGTERM)
        self.drain_timeout_s = config.proxy.drain_timeout_s
        self.memory: dict[str, Any] = {"trims": 0}
        self._tasks: set[asyncio.Task[None]] = set()
        # Broadcasts that come while `init` runs (a directory refresh, a new ticket key): newer
        # than what init carries, so init applies them instead of dropping them.
        self._later_directory: Directory | None = None
        self._later_key: bytes | None = None
        self._ready = asyncio.Event()  # init done: the proxy listens

    async def run(self, sock: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._sigterm)
        chan = await Channel.open(sock, self.handle, name="supervisor")
        eof = asyncio.ensure_future(chan.wait_closed())
        stop = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait((eof, stop), return_when=asyncio.FIRST_COMPLETED)
        if eof.done() and not self.stop.is_set():
            log.info("worker.supervisor_gone", action="drain")
            self.stop.set()
        stop.cancel()
        if self.proxy is not None:
            await self.proxy.stop(self.drain_timeout_s, cut=self.cut)
        for task in list(self._tasks):
            task.cancel()
        chan.close()
        log.info("worker.stopped")
        return 0

    def _sigterm(self) -> None:
        if not self.stop.is_set():
            log.info("worker.signal", signal="SIGTERM", action="drain")
            self.stop.set()
        else:
            self.cut.set()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- ops -----------------------------------------------------------------------------

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        if op == "init":
            return self._init(**args)
        if op == "ping":
            return self.ping()
        if op == "snapshot":
            return self.snapshot()
        if op == "directory":
            return self._use(_directory(args["blob"]))
        if op == "credentials":
            return self._credentials(args.get("ticket_key"))
        if op == "ticket_key":
            return self._ticket_key(args["key"])
        if op == "log":
            configure_logs(args["level"], args["format"], self.slot)
            return None
        if op == "drain":
            if "timeout_s" in args:
                self.drain_timeout_s = float(args["timeout_s"])
            self.stop.set()
            return None
        if op == "cut":
            self.stop.set()
            self.cut.set()
            return None
        raise ValueError(f"unknown op {op!r}")

    async def _init(self, directory: Any, ticket_key: bytes | None = None, **more: Any) -> dict[str, Any]:
        logs = more.get("log")
        if logs is not None:
            configure_logs(logs["level"], logs["format"], self.slot)
        # Every worker seals tickets with the supervisor's key: a ticket resumes on any worker.
        # On the loop, not in a thread: nothing else runs before init, and a thread (with its
        # stack, its malloc arena and the executor's pages it touches) would stay for good.
        proxy_config = self.config.proxy
        self.credentials = Credentials.load(
            self.store, ticket_key, proxy_config.tls_resumption, proxy_config.tls_verify_cache
        )
        if self._later_key is not None:  # broadcast while the files loaded: newer than init's
            self.credentials.rotate_ticket_key(self.store, self._later_key)
        d = self._later_directory or _directory(directory)
        settings = listener_settings(self.config)
        if more.get("max_handshakes"):  # this worker's share of the agent-wide limit
            settings = dataclasses.replace(settings, max_handshakes=int(more["max_handshakes"]))
        proxy = Proxy(
            settings, self.credentials, d.policy, d.catalog, self.orig_dst or orig_dst, self.metrics
        )
        proxy.apply(d)
        self.proxy = proxy
        await proxy.start(sockets=self.sockets)
        self._spawn(self._return_memory(), "memory-return")
        return_free_memory()  # what init allocated and freed: its free pages go back (~0.5 MB)
        self._ready.set()
        log.info("worker.ready", pid=os.getpid(), serial=self.credentials.identity.summary.serial)
        return {"pid": os.getpid(), "listening": dict(proxy.listening)}

    def _use(self, directory: Directory) -> None:
        if self.proxy is None:  # init still runs: it applies this one instead of its own
            self._later_directory = directory
            return
        self.proxy.apply(directory)

    async def _credentials(self, ticket_key: bytes | None) -> dict[str, Any]:
        """The supervisor renewed the certificate: load the same files, drop what the old
        identity resumed (sessions, the cached inbound context)."""
        await self._ready.wait()  # a renewal during init: init loaded the files before it
        assert self.credentials is not None and self.proxy is not None
        credentials, store = self.credentials, self.store
        await asyncio.to_thread(lambda: credentials.reload(store, store.load_info(), ticket_key))
        self.proxy.credentials_changed()
        return {"serial": credentials.identity.summary.serial}

    def _ticket_key(self, key: bytes) -> None:
        if self.credentials is None:  # init still loads the files: it applies this key after
            self._later_key = key
            return
        self.credentials.rotate_ticket_key(self.store, key)

    @property
    def ticket_key_name(self) -> str:
        return "" if self.credentials is None else self.credentials.ticket_key_name

    def _open(self) -> dict[str, int]:
        """Open connections by direction, counted on their peer-facing leg (what a kill loses).
        Read from the legs' metric labels: with telemetry.metrics = false both are 0."""
        inbound = outbound = 0
        if self.proxy is not None:
            for leg in self.proxy.live_legs():
                base = leg.metrics.base if leg.metrics is not None else None
                if base is None:
                    continue
                if base.startswith(INBOUND_SRC):
                    inbound += 1
                elif base.startswith(OUTBOUND_DST):
                    outbound += 1
        return {"inbound": inbound, "outbound": outbound}

    def _serial(self) -> str:
        return "" if self.credentials is None else self.credentials.identity.summary.serial

    def ping(self) -> dict[str, Any]:
        return {"open": self._open(), "serial": self._serial(), "ticket_key_name": self.ticket_key_name}

    def snapshot(self) -> dict[str, Any]:
        """This worker's metrics (`ProxyMetrics.dump`, None when metrics are off) and status."""
        proxy = self.proxy
        metrics = None
        if self.metrics is not None and proxy is not None:
            metrics = self.metrics.dump(proxy.live_legs())
        pss, rss = own_memory()
        status: dict[str, Any] = {
            "pid": os.getpid(),
            "serial": self._serial(),
            "ticket_key_name": self.ticket_key_name,
            "rss_mb": round(rss / 2**20, 1),
            "pss_mb": round(pss / 2**20, 1),
            "memory": dict(self.memory),
            "http_accounting_stopped": dict(http1.STOPPED),
        }
        if proxy is not None:
            server = None if self.credentials is None else self.credentials.server
            status.update(
                stats={
                    "opened": dict(proxy.stats.opened),
                    "refused": dict(proxy.stats.refused),
                    "failures": dict(proxy.stats.failures),
                    "last_errors": list(proxy.stats.last_errors),
                },
                handshakes=proxy.handshakes.status(),
                open=proxy.open_connections,
                open_by_direction=self._open(),
                listening=dict(proxy.listening),
                server_sessions=None if server is None else server.session_stats()["number"],
                session_cache=len(proxy.sessions),
                # The routed HTTP path's state lives in each worker: status.py merges them.
                routes=proxy.router.status() if proxy.router is not None else None,
            )
        return {"metrics": metrics, "status": status}

    # --- memory --------------------------------------------------------------------------

    async def _return_memory(self) -> None:
        assert self.proxy is not None
        await return_memory_after_peaks(self.proxy, self.memory, self.stop)


def main(
    config: AgentConfig, slot: int, sockets: SlotSockets, chan: socket.socket, orig_dst: OrigDst | None = None
) -> NoReturn:
    """A worker's whole life, in the process just forked (or started: agent/workers/fresh.py);
    ends in `os._exit`.
    `orig_dst` replaces SO_ORIGINAL_DST (loopback tests, where nothing is intercepted)."""
    code = 1
    try:
        for name in _SUPERVISOR_ENV:
            os.environ.pop(name, None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the loop's handler replaces it
        configure_logs(config.log.level, config.log.format, slot)
        worker = Worker(config, slot, sockets, orig_dst)
        try:
            import uvloop

            code = uvloop.run(worker.run(chan))
        except ImportError:
            code = asyncio.run(worker.run(chan))
    except BaseException as exc:  # logged, then the exit status says it
        log.error("worker.failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)
