"""The supervisor's side of `proxy.workers` >= 1: N worker processes that look like one `Proxy`.

The daemon holds a `WorkerPool` where it would hold a `Proxy` (agent/status.py reads the same
surface: `listening`, `catalog`, `services`, `revoked`, `stats`, `handshakes`, `open_connections`).
The pool takes each slot's worker from the spawner (agent/workers/forker.py: forked at start,
replacements as new interpreters), hands it the directory, the
ticket key and the log settings (`init`), broadcasts every later change, pulls metrics and status
(`snapshot`), pings every second and replaces a worker that died or stopped answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.errors import MeshagentError
from agent.logs import get_logger
from agent.proxy.catalog import Catalog
from agent.proxy.directory import Directory
from agent.proxy.listeners import Address, ProxyStats
from agent.proxy.policy import InboundPolicy
from agent.proxy.revocation import RevokedSet
from agent.proxy.routes import RouteTable
from agent.proxy.services import ServiceTable
from agent.telemetry.process import tree_memory
from agent.workers.forker import describe_exit

log = get_logger("meshagent.workers")

PING_INTERVAL_S = 1.0
HUNG_AFTER_S = 10.0  # a worker silent this long (stopped, spinning) is killed and replaced
DOWN_NOT_READY_S = 5.0  # a slot down this long makes /ready say so (a respawn takes ~0.5 s)
SNAPSHOT_TIMEOUT_S = 1.0
INIT_TIMEOUT_S = 15.0  # a first worker: forked from the loaded image, it only builds its proxy
# A replacement is a new interpreter that imports everything first: 2-13 s measured on a one-CPU
# TCG VM. A deadline it misses kills it and tries again, and with one worker that is the host's
# whole data plane: give it room.
REPLACEMENT_INIT_TIMEOUT_S = 60.0
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 10.0
EARLY_DEATH_S = 10.0  # dying within this of its start doubles the next respawn's delay
STOP_GRACE_S = 5.0  # past the drain: SIGKILL whatever has not exited


class WorkerDown(MeshagentError):
    code = "worker_down"


class ChannelLike(Protocol):
    """What the pool needs of agent/workers/control.Channel."""

    async def request(self, op: str, timeout: float = 5.0, **args: Any) -> Any: ...  # noqa: ASYNC109

    def notify(self, op: str, **args: Any) -> None: ...

    async def wait_closed(self) -> None: ...

    def close(self) -> None: ...


class ForkerLike(Protocol):
    """What the pool needs of agent/workers/forker.Spawner."""

    on_exit: Callable[[int, int, float], None]

    async def spawn(self, slot: int) -> tuple[int, ChannelLike]: ...

    def close(self) -> None: ...


class MergerLike(Protocol):
    """What the pool needs of agent/telemetry/merge.MetricsMerger."""

    def update(self, slot: int, dump: Any) -> None: ...

    def worker_gone(self, slot: int) -> None: ...


@dataclass
class Slot:
    """One worker slot: its socket set lives as long as the agent; its process may be replaced."""

    index: int
    pid: int | None = None
    chan: ChannelLike | None = None
    up: bool = False
    restarts: int = 0
    last_exit: str = ""
    started_at: float = 0.0  # monotonic
    down_since: float | None = 0.0  # monotonic; None while up
    backoff_s: float = 0.0
    last_answer: float = 0.0  # monotonic time of the last ping or snapshot reply
    ping: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    watch: asyncio.Task[None] | None = None

    def to_dict(self) -> dict[str, Any]:
        opened = self.ping.get("open", {})
        return {
            "slot": self.index,
            "pid": self.pid,
            "up": self.up,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "open": sum(opened.values()) if isinstance(opened, dict) else 0,
            "serial": self.ping.get("serial", ""),
            "ticket_key_name": self.ping.get("ticket_key_name", ""),
            "session_cache": self.status.get("session_cache", 0),
            "handshakes": self.status.get("handshakes") or {},
            "memory": self.status.get("memory") or {},
            "pss_mb": round(tree_memory([self.pid]).pss / 2**20, 1) if self.up and self.pid else None,
        }


def handshake_share(limit: int, workers: int, slot: int) -> int:
    """Slot `slot`'s part of the agent-wide `proxy.max_handshakes`: the limit split as evenly as
    it goes (128 over 3 workers: 43, 43, 42), so the workers together hold at most `limit`
    handshakes; at least 1 each (a limit below the worker count is exceeded by that much)."""
    return max(1, limit // workers + (1 if slot < limit % workers else 0))


class SummedGate:
    """`handshakes.status()` over every worker: `limit` is the agent-wide one (the sum of the
    workers' shares, whether or not each is up), the counts are the workers' latest, summed."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def status(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for slot in self.pool.slots:
            total.update(slot.status.get("handshakes") or {})
        total["limit"] = sum(self.pool.handshake_limit(slot.index) for slot in self.pool.slots)
        return dict(total)


class WorkerPool:
    """N workers behind the `Proxy` surface the daemon and agent/status.py use."""

    def __init__(
        self,
        count: int,
        forker: ForkerLike,
        merger: MergerLike | None,
        listening: dict[str, Address],
        directory: Directory,
        on_exit: Callable[[], None] | None = None,
        max_handshakes: int = 128,
        steer: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.forker = forker
        # Listeners.steer: new connections to the up slots only (a down slot's socket keeps
        # its queue for the replacement, but the kernel's hash would keep feeding it 1/N).
        self._steer_to = steer
        self._steered: list[int] | None = None
        self._started = False  # steering starts once every first worker is up (no rules before)
        self.max_handshakes = max_handshakes  # agent-wide: each worker gets its share
        self.merger = merger
        self.slots = [Slot(i) for i in range(count)]
        self.listening = dict(listening)
        # What status shows; the workers hold their own copies (the directory broadcast).
        self.catalog: Catalog = directory.catalog
        self.policy: InboundPolicy = directory.policy
        self.services: ServiceTable = directory.services
        self.revoked: RevokedSet = directory.revoked
        # (getattr: a Directory-like stand-in without routes, as the pool's tests pass, is none)
        self.routes: RouteTable = getattr(directory, "routes", None) or RouteTable.empty()
        self._blob = pickle.dumps(directory, protocol=5)
        self.ticket_key: bytes | None = None
        self.log_settings: dict[str, str] = {}
        self.credentials_generation = 0  # renewals so far: a worker whose init spans one reloads after
        self.handshakes = SummedGate(self)
        self.restarts_total = 0
        self.lost: Counter[str] = Counter()  # connections a dead worker took with it, by direction
        self.dead_cpu_s = 0.0
        self.stopping = False
        self.stale: set[int] = set()  # slots that did not answer the last pull in time
        self.on_change = on_exit
        self._respawns: set[asyncio.Task[None]] = set()
        self._exits: dict[int, tuple[int, float]] = {}  # pid -> (status, cpu_s) reported early
        forker.on_exit = self._exited

    def handshake_limit(self, slot: int) -> int:
        """The inbound handshakes worker `slot` may hold at once (its share of the agent's)."""
        return handshake_share(self.max_handshakes, len(self.slots), slot)

    # --- the Proxy surface ----------------------------------------------------------------

    @property
    def stats(self) -> ProxyStats:
        """The workers' counters summed, their last errors merged by time (latest snapshots)."""
        out = ProxyStats()
        errors: list[dict[str, Any]] = []
        for slot in self.slots:
            s = slot.status.get("stats") or {}
            out.opened.update(s.get("opened") or {})
            out.refused.update(s.get("refused") or {})
            out.failures.update(s.get("failures") or {})
            errors.extend({**e, "worker": slot.index} for e in s.get("last_errors") or [])
        for e in sorted(errors, key=lambda e: e.get("at", 0.0))[-20:]:
            out.last_errors.append(e)
        return out

    @property
    def open_connections(self) -> int:
        return sum(int(slot.status.get("open", 0)) for slot in self.slots if slot.up)

    @property
    def http_accounting_stopped(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for slot in self.slots:
            out.update(slot.status.get("http_accounting_stopped") or {})
        return out

    def live_legs(self) -> list[Any]:
        return []  # each worker settles its own legs before its dump

    def set_revoked(self, revoked: RevokedSet) -> int:
        self.revoked = revoked
        return 0  # the workers cut their own connections when the directory reaches them

    def apply(self, directory: Directory) -> None:
        """Route and authorize by `directory` from now on, in every worker."""
        self.catalog, self.policy = directory.catalog, directory.policy
        self.services, self.revoked = directory.services, directory.revoked
        self.routes = getattr(directory, "routes", None) or RouteTable.empty()  # (for /status)
        self._blob = pickle.dumps(directory, protocol=5)
        self.broadcast("directory", blob=self._blob)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, ticket_key: bytes | None, log_settings: dict[str, str]) -> None:
        """Fork every slot and wait for each to listen; a worker that cannot start stops the
        agent's start (with why), as a listener that cannot bind would."""
        self.ticket_key, self.log_settings = ticket_key, log_settings
        results = await asyncio.gather(*(self._spawn(slot) for slot in self.slots), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                await self.stop(0.0)
                if isinstance(result, MeshagentError):
                    raise result
                raise WorkerDown(
                    f"a proxy worker did not start: {result!r}",
                    "see the worker's log lines above; proxy.workers = 0 runs the proxy in the "
                    "agent's own process",
                )
        self._started = True
        self._steer()  # a first worker that died at once is being replaced: steer around it

    async def _spawn(self, slot: Slot) -> None:
        pid, chan = await self.forker.spawn(slot.index)
        slot.pid, slot.chan, slot.started_at = pid, chan, time.monotonic()
        sent = (self._blob, self.ticket_key, self.log_settings)
        generation = self.credentials_generation
        try:
            reply = await chan.request(
                "init",
                timeout=REPLACEMENT_INIT_TIMEOUT_S if slot.restarts else INIT_TIMEOUT_S,
                directory=sent[0],
                ticket_key=sent[1],
                log=sent[2],
                max_handshakes=self.handshake_limit(slot.index),
            )
        except BaseException:
            slot.pid, slot.chan = None, None  # its exit report must not schedule a second respawn
            chan.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise
        slot.up, slot.down_since, slot.last_answer = True, None, time.monotonic()
        self._steer()
        # Broadcasts skip a slot until it is up: what changed during its init follows now.
        if self._blob is not sent[0]:
            chan.notify("directory", blob=self._blob)
        if self.credentials_generation != generation:  # renewed while it loaded the old files
            chan.notify("credentials", ticket_key=self.ticket_key)
        elif self.ticket_key is not sent[1] and self.ticket_key is not None:
            chan.notify("ticket_key", key=self.ticket_key)
        if self.log_settings is not sent[2]:
            chan.notify("log", **self.log_settings)
        if isinstance(reply, dict) and reply.get("listening"):
            for name, address in reply["listening"].items():
                self.listening.setdefault(name, (str(address[0]), int(address[1])))
        slot.watch = asyncio.get_running_loop().create_task(
            self._watch(slot, chan, pid), name=f"worker-{slot.index}"
        )
        log.info("worker.started", worker=slot.index, pid=pid, restarts=slot.restarts)

    async def _watch(self, slot: Slot, chan: ChannelLike, pid: int) -> None:
        """EOF on a worker's channel is its death: mark the slot down and count what it took."""
        await chan.wait_closed()
        if slot.pid != pid:
            return
        slot.up, slot.chan, slot.down_since = False, None, time.monotonic()
        if self.merger is not None:
            self.merger.worker_gone(slot.index)
        if self.stopping:
            return
        self._steer()
        opened = slot.ping.get("open") or {}
        for direction, n in opened.items():
            self.lost[direction] += int(n)
        log.warning(
            "worker.lost",
            worker=slot.index,
            pid=pid,
            open_inbound=opened.get("inbound", 0),
            open_outbound=opened.get("outbound", 0),
            hint="its open connections were reset; a new worker takes the slot on the same sockets",
        )
        slot.ping, slot.status = {}, {}
        if pid in self._exits:  # the exit report came first
            self._respawn_later(slot, *self._exits.pop(pid))

    def _steer(self) -> None:
        live = [s.index for s in self.slots if s.up]
        if self._steer_to is None or not self._started or self.stopping or live == self._steered:
            return
        try:
            self._steer_to(live)
        except OSError as exc:  # the kernel's hash goes on: a down slot keeps its share meanwhile
            log.warning("workers.steer_failed", live=live, error=str(exc))
        else:
            self._steered = live
            if len(live) < len(self.slots):
                log.info("workers.steered", live=live, hint="new connections avoid the down workers' sockets")

    def _exited(self, pid: int, status: int, cpu_s: float) -> None:
        """The spawner reaped `pid` (every worker's exit, expected or not)."""
        self.dead_cpu_s += max(0.0, cpu_s)
        slot = next((s for s in self.slots if s.pid == pid), None)
        if slot is None or self.stopping:
            return
        if slot.chan is not None and not slot.up:
            return  # it died in init: _spawn's failure path respawns it (once)
        if slot.up:  # the EOF has not been seen yet: _watch respawns
            self._exits[pid] = (status, 0.0)
            return
        self._respawn_later(slot, status, 0.0)

    def _respawn_later(self, slot: Slot, status: int, _cpu_s: float) -> None:
        slot.last_exit = describe_exit(status)
        lived = time.monotonic() - slot.started_at
        if lived >= EARLY_DEATH_S or slot.restarts == 0:
            slot.backoff_s = 0.0  # replaced at once (its queue holds the SYNs meanwhile)
        else:  # a replacement that keeps dying: 0.5 s, doubling to 10 s
            slot.backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, slot.backoff_s * 2))
        self._later(slot, slot.backoff_s)

    def _later(self, slot: Slot, delay: float) -> None:
        task = asyncio.get_running_loop().create_task(self._respawn(slot, delay), name="worker-respawn")
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self, slot: Slot, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self.stopping:
            return
        slot.restarts += 1
        self.restarts_total += 1
        try:
            await self._spawn(slot)
        except Exception as exc:  # reported, and tried again later
            slot.backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, slot.backoff_s * 2))
            log.error("worker.respawn_failed", worker=slot.index, error=str(exc), retry_in_s=slot.backoff_s)
            self._later(slot, slot.backoff_s)

    async def stop(self, drain_timeout_s: float = 10.0, cut: asyncio.Event | None = None) -> None:
        """Every worker stops accepting and drains for up to `drain_timeout_s` (`cut` ends it),
        then exits; stragglers are killed `STOP_GRACE_S` later."""
        self.stopping = True
        for task in list(self._respawns):
            task.cancel()
        self.forker.close()  # nothing is started any more
        self.broadcast("drain", timeout_s=drain_timeout_s)
        waits = [s.watch for s in self.slots if s.watch is not None and not s.watch.done()]
        cutter: asyncio.Task[None] | None = None
        if cut is not None:

            async def on_cut() -> None:
                await cut.wait()
                self.broadcast("cut")

            cutter = asyncio.get_running_loop().create_task(on_cut())
        if waits:
            await asyncio.wait(waits, timeout=drain_timeout_s + STOP_GRACE_S)
        if cutter is not None:
            cutter.cancel()
        killed = 0
        for slot in self.slots:
            if slot.up and slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
                    killed += 1
            if slot.chan is not None:
                slot.chan.close()
        log.info("workers.stopped", workers=len(self.slots), killed=killed)

    # --- broadcasts and pulls ---------------------------------------------------------------

    def up_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.up and s.chan is not None]

    def broadcast(self, op: str, **args: Any) -> int:
        """`op` to every live worker (a replacement gets the current state in its `init`)."""
        sent = 0
        for slot in self.up_slots():
            assert slot.chan is not None
            try:
                slot.chan.notify(op, **args)
                sent += 1
            except (OSError, MeshagentError) as exc:
                log.warning("worker.send_failed", worker=slot.index, op=op, error=str(exc))
        return sent

    async def request_all(self, op: str, wait_s: float, **args: Any) -> dict[int, Any]:
        """`op` to every live worker at once; the replies of those that answered in time."""
        slots = self.up_slots()

        async def one(slot: Slot) -> Any:
            assert slot.chan is not None
            return await slot.chan.request(op, timeout=wait_s, **args)

        results = await asyncio.gather(*(one(s) for s in slots), return_exceptions=True)
        return {s.index: r for s, r in zip(slots, results, strict=True) if not isinstance(r, BaseException)}

    def set_log(self, level: str, fmt: str) -> None:
        self.log_settings = {"level": level, "format": fmt}
        self.broadcast("log", level=level, format=fmt)

    def set_ticket_key(self, key: bytes) -> None:
        self.ticket_key = key
        self.broadcast("ticket_key", key=key)

    async def credentials_changed(self, ticket_key: bytes | None) -> dict[int, Any]:
        """Every worker reloads the certificate (and takes `ticket_key`); the replies."""
        if ticket_key is not None:
            self.ticket_key = ticket_key
        self.credentials_generation += 1
        return await self.request_all("credentials", 10.0, ticket_key=self.ticket_key)

    async def refresh(self) -> dict[int, Any]:
        """Every worker's metrics and status now (1 s); a late one keeps its last."""
        asked = [s.index for s in self.up_slots()]
        replies = await self.request_all("snapshot", SNAPSHOT_TIMEOUT_S)
        now = time.monotonic()
        self.stale = {index for index in asked if index not in replies}  # their last dumps stand
        for index, reply in replies.items():
            slot = self.slots[index]
            slot.last_answer = now
            if isinstance(reply, dict):
                slot.status = reply.get("status") or {}
                if self.merger is not None and reply.get("metrics") is not None:
                    self.merger.update(index, reply["metrics"])
        return replies

    async def health(self, stop: asyncio.Event) -> None:
        """The `worker-health` task: ping each worker every second; one silent for
        HUNG_AFTER_S is SIGKILLed (then replaced like any dead worker)."""
        while not stop.is_set():
            replies = await self.request_all("ping", PING_INTERVAL_S)
            now = time.monotonic()
            for slot in self.up_slots():
                reply = replies.get(slot.index)
                if isinstance(reply, dict):
                    slot.ping, slot.last_answer = reply, now
                elif now - slot.last_answer >= HUNG_AFTER_S and slot.pid is not None:
                    log.error(
                        "worker.hung",
                        worker=slot.index,
                        pid=slot.pid,
                        silent_s=round(now - slot.last_answer, 1),
                        hint="killed and replaced; the other workers are untouched",
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PING_INTERVAL_S)

    # --- what the supervisor shows ------------------------------------------------------------

    def not_ready(self) -> list[str]:
        now = time.monotonic()
        out = []
        for slot in self.slots:
            if slot.down_since is not None and now - slot.down_since >= DOWN_NOT_READY_S:
                out.append(
                    f"proxy: worker {slot.index} down for {int(now - slot.down_since)} s"
                    + (" (restarting)" if not self.stopping else "")
                )
        return out

    def pids(self) -> list[int]:
        return [s.pid for s in self.slots if s.up and s.pid is not None]

    def worker_status(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.slots]

    def metrics_lines(self) -> Iterable[str]:
        """The pool's own families (the workers' proxy metrics are merged by MetricsMerger)."""
        up = sum(1 for s in self.slots if s.up)
        yield "# HELP meshagent_workers Proxy worker processes, by state."
        yield "# TYPE meshagent_workers gauge"
        yield f'meshagent_workers{{state="up"}} {up}'
        yield f'meshagent_workers{{state="down"}} {len(self.slots) - up}'
        yield "# HELP meshagent_worker_restarts_total Workers replaced after they died or hung."
        yield "# TYPE meshagent_worker_restarts_total counter"
        yield f"meshagent_worker_restarts_total {self.restarts_total}"
        yield "# HELP meshagent_worker_lost_connections_total Open connections a dead worker took with it."
        yield "# TYPE meshagent_worker_lost_connections_total counter"
        for direction in ("inbound", "outbound"):
            yield f'meshagent_worker_lost_connections_total{{direction="{direction}"}} {self.lost[direction]}'
        yield "# HELP meshagent_worker_snapshot_stale 1 when the worker did not answer the last pull in time."
        yield "# TYPE meshagent_worker_snapshot_stale gauge"
        for slot in self.slots:
            yield f'meshagent_worker_snapshot_stale{{worker="{slot.index}"}} {int(slot.index in self.stale)}'
