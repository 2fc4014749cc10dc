"""`meshagent run`: the host daemon. Wires identity, interception, the proxy and rotation.

Start: load the identity (refuse to start without one), start the listeners, apply the
interception rules (so redirected traffic always finds a listener), tell systemd READY.
Run: renew the certificate and swap the TLS contexts; refresh the catalog and policy from the
authority and cache them on disk (a restart works with the authority down).
Stop (SIGTERM/SIGINT): remove the rules first when `proxy.on_stop = "remove-rules"` (the
default: fail open, the app keeps working without the mesh while the agent is down), then drain
open connections for up to `proxy.drain_timeout_s`, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import pwd
import random
import resource
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from agent.config import AgentConfig, load_config, worker_count
from agent.errors import ConfigError, MeshagentError, StateError, listen_error
from agent.fsutil import write_atomic
from agent.health.probes import ProbeRunner
from agent.health.report import Reporter
from agent.identity.client import AuthorityClient, HostConfigFetch
from agent.identity.names import WorkloadIdentity
from agent.identity.renew import run_renewal
from agent.identity.rotation import Rotator
from agent.identity.store import IdentityInfo, IdentityStore
from agent.identity.transport import resolve_proxy
from agent.intercept.apply import AppliedState, apply_plan, detect_backend, remove_all, stop_capture
from agent.intercept.authority import enrolled as enrolled_authority
from agent.intercept.conntrack import clear_stale
from agent.intercept.plan import Plan, build_plan
from agent.logs import configure, get_logger
from agent.proxy.catalog import CatalogEntry
from agent.proxy.directory import Directory, Rejected, merge
from agent.proxy.listeners import Proxy
from agent.proxy.memory_return import return_memory_after_peaks
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.relay import relay_implementation
from agent.proxy.ticket_keys import new_ticket_key
from agent.proxy.tls import Credentials
from agent.sdnotify import notify, watchdog_interval_s
from agent.status import daemon_status, health_report, http_accounting, not_ready
from agent.tasks import Supervisor
from agent.telemetry.admin import AdminLimits, AdminServer, Handler, Reply, json_reply, start_admin
from agent.telemetry.agent_metrics import render_agent
from agent.telemetry.merge import MetricsMerger
from agent.telemetry.process import render_process, return_free_memory
from agent.telemetry.proxy_metrics import ProxyMetrics
from agent.telemetry.stat import StatWindow
from agent.workers.pool import WorkerPool
from agent.workers.settings import listener_settings, orig_dst

if TYPE_CHECKING:
    from agent.dns.service import DnsService
    from agent.workers.forker import Listeners, Spawner

log = get_logger("meshagent.daemon")

HOST_CONFIG_CACHE = "host-config.json"
LONG_POLL_MAX_S = 60.0  # the authority's bound on ?wait=

_T = TypeVar("_T")


async def in_daemon_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(*args)` in a daemon thread: unlike asyncio.to_thread, a long poll still parked in it never
    holds the agent's exit (the default executor is joined at loop close)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="meshagent-poll", daemon=True).start()
    return await future


# Members an authority may leave out to mean "keep what you have": `services` (its discovery has
# not answered yet, just restarted), `routes` (a replica older than #21 during a rolling upgrade).
CARRIED: Final = ("services", "routes")
# The least time between two directory requests that both returned a changed document.
CHANGED_FLOOR_S: Final = 1.0


def carry_services(doc: dict[str, Any], last: dict[str, Any] | None) -> dict[str, Any]:
    """`doc`, with the Services and routes of `last` where it has none (see CARRIED); `[]` in
    `doc` means none, and is kept."""
    if last is None:
        return doc
    missing = {key: last.get(key, []) for key in CARRIED if key not in doc}
    return {**doc, **missing} if missing else doc


def newest(cached: dict[str, Any] | None, fetched: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a reload applies: the cache file (an operator may have put one there), unless the
    document last fetched is newer (the cache's write failed, or is still under way)."""

    def generated(doc: dict[str, Any]) -> float:
        value = doc.get("generated_at")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else -1.0

    if cached is None or (fetched is not None and generated(fetched) > generated(cached)):
        return fetched
    return cached


def poll_pause(fetch: HostConfigFetch, interval: float) -> float:
    """Seconds to wait before the next directory request: none while long polling works; the
    authority's Retry-After when its waiters are full (or it stops); an interval when the answer
    has no ETag (an older authority, or a proxy that strips it): no long poll, no tight loop."""
    if fetch.not_modified or fetch.retry_after_s:
        return fetch.retry_after_s
    return 0.0 if fetch.etag else interval


@dataclass
class DaemonState:
    """Everything `status` and the admin server show about the running daemon."""

    rules: AppliedState | None = None
    directory_source: str = "local"
    directory_updated_at: float | None = None
    # Entries of the authority's document left out (the latest document's), and every distinct
    # one seen since start: each is logged once, not on every refresh.
    rejected: tuple[Rejected, ...] = ()
    rejected_seen: set[Rejected] = field(default_factory=set)
    last_errors: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=lambda: {"trims": 0})
    # The authority refused this host as revoked: {"at", "by", "message"} (None: not revoked).
    revoked: dict[str, Any] | None = None

    def error(self, kind: str, message: str) -> None:
        self.last_errors = [*self.last_errors[-19:], {"kind": kind, "message": message}]


def local_directory(config: AgentConfig) -> tuple[list[CatalogEntry], InboundPolicy]:
    entries = []
    for e in config.outbound.catalog:
        workload = WorkloadIdentity.from_spiffe_id(e.identity)
        doc: dict[str, object] = {
            "cidr": e.cidr,
            "ports": list(e.ports),
            "identity": e.identity,
            "server_name": workload.dns_name,
        }
        if e.opaque_port is not None:  # the endpoint expects Linkerd's transport header there
            doc["opaque_port"] = e.opaque_port
        entries.append(CatalogEntry.from_doc(doc))
    default = PortPolicy(DefaultPolicy(config.inbound.default_policy))
    ports = {p.port: PortPolicy(DefaultPolicy(p.policy), p.allow) for p in config.inbound.ports}
    return entries, InboundPolicy(default, ports)


def raise_nofile_limit() -> int:
    """Raise the soft limit on open files to the hard one (systemd's soft default is 1,024,
    its hard 512K): every proxied connection takes two descriptors. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("daemon.nofile_not_raised", soft=soft, hard=hard, error=str(exc))
    return soft


def admin_limits(config: AgentConfig, nofile: int) -> AdminLimits:
    """The configured admin limits, with the connection cap kept to at most a quarter of the
    file limit: the admin port never takes the data plane's descriptors."""
    t = config.telemetry
    cap = min(t.admin_max_connections, max(8, nofile // 4))
    return AdminLimits(max_connections=cap, timeout_s=t.admin_timeout_s)


def _lookup_user(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


@dataclass
class Workers:
    """`proxy.workers` >= 1: the listening sockets and the first workers, made before any thread
    or loop (see `run_daemon`)."""

    count: int
    listeners: Listeners
    forker: Spawner
    """Starts the workers and replacements (named for the pool's `forker`; no helper process:
    its `pid` is this process's)."""


class Daemon:
    def __init__(self, config: AgentConfig, workers: Workers | None = None) -> None:
        self.config = config
        self.workers = workers
        self.store = IdentityStore(config.identity.state_dir)
        # How the authority is reached ([authority] https_proxy / no_proxy, else the environment).
        self.authority_proxy = resolve_proxy(config.authority.https_proxy, config.authority.no_proxy)
        self.state = DaemonState()
        self.stop_event = asyncio.Event()
        self.credentials: Credentials | None = None
        # The pool of worker processes, or (proxy.workers = 0) one Proxy in this process.
        self.proxy: Proxy | WorkerPool | None = None
        self.metrics = ProxyMetrics() if config.telemetry.metrics else None
        # With workers, the metrics are the workers' merged (each settles its own legs).
        self.merger = MetricsMerger(self.metrics) if self.metrics is not None and workers else None
        self.stat = (
            StatWindow(self.metrics, settle=None if workers else self._settle)
            if self.metrics is not None
            else None
        )
        self.rotator: Rotator | None = None
        self.admin: AdminServer | None = None
        self.tasks = Supervisor(
            self.stop_event,
            cap_s=max(1.0, min(30.0, config.proxy.refresh_interval_s)),
            on_failure=self.state.error,
        )
        self.started_at = time.time()
        self.started = False  # True once ready: SIGHUP reloads only then
        # The app's probes and the report that tells the authority (and so the cluster's Ready)
        # how this host is; a probe's flip is reported at once.
        self._last_doc: dict[str, Any] | None = None  # the directory document last applied
        self.probes = ProbeRunner(config.health.probes)
        self.reporter = Reporter(self._health_report, self._report, config.proxy.refresh_interval_s)
        self.probes.on_change = self.reporter.poke
        self.drain_cut = asyncio.Event()  # a second stop signal: end the drain now
        # Cluster names on the host ([dns], off by default): the stub and its fail-open redirect.
        self.dns: DnsService | None = None
        if config.dns.enabled:
            from agent.dns.service import DnsService  # loaded only when on: the daemon stays lean

            self.dns = DnsService(config.dns, config.intercept.proxy_mark)

    # --- directory (catalog + policy) ----------------------------------------------------

    def _cached_directory_doc(self) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.store.state_dir / HOST_CONFIG_CACHE).read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def _directory(self, remote: dict[str, Any] | None) -> Directory:
        entries, policy = local_directory(self.config)
        directory = merge(entries, policy, remote)
        self.state.rejected = directory.rejected
        for bad in directory.rejected:
            if bad not in self.state.rejected_seen:
                self.state.rejected_seen.add(bad)
                log.warning(
                    "directory.entry_rejected",
                    where=bad.where,
                    entry=bad.entry,
                    reason=bad.reason,
                    hint="every other entry applies; fix this one at the authority",
                )
        return directory

    def _fetch_directory(self, etag: str | None, wait_s: float) -> HostConfigFetch:
        """The directory, or with `etag` a long poll: the authority answers when it changes (or
        not_modified after `wait_s`)."""
        with AuthorityClient(self.store.load_authority(), self.authority_proxy) as client:
            try:
                return client.fetch_host_config(self.store.api_token(), etag, wait_s)
            except MeshagentError as exc:
                if exc.code != "unauthenticated":
                    raise
                # A renewal replaced the token between our read and the request: read it again.
                return client.fetch_host_config(self.store.api_token(), etag, wait_s)

    def _health_report(self) -> dict[str, Any]:
        return health_report(self)

    def _send_report(self, doc: dict[str, Any]) -> None:
        with AuthorityClient(self.store.load_authority(), self.authority_proxy) as client:
            try:
                client.send_report(self.store.api_token(), doc)
            except MeshagentError as exc:
                if exc.code != "unauthenticated":
                    raise
                client.send_report(self.store.api_token(), doc)  # the token was just renewed

    def _report(self, doc: dict[str, Any]) -> None:
        try:
            self._send_report(doc)
        except MeshagentError as exc:
            if exc.code == "host_revoked":  # (in the reporter's thread: a dict assignment and a log)
                self._revoked("report", exc)
            raise

    def _revoked(self, by: str, exc: MeshagentError, logged: bool = False) -> None:
        """The authority refused us as revoked (host_revoked): say so once, in the log and in
        status; renewal stops (Rotator), the directory and reports go on at their interval (a
        revocation is final: only `meshagent enroll` again and a restart bring the host back)."""
        if self.state.revoked is not None:
            return
        self.state.revoked = {"at": time.time(), "by": by, "message": exc.message}
        if logged:  # (the Rotator logs its own identity.revoked)
            return
        log.error(
            "identity.revoked",
            source=by,
            reason=exc.message,
            hint="this host was revoked at the authority: its peers refuse it; enroll it again "
            "with a new join token (meshagent enroll --force) and restart the agent",
        )

    def _write_cache(self, doc: dict[str, Any]) -> None:
        path = self.store.state_dir / HOST_CONFIG_CACHE
        try:
            write_atomic(path, json.dumps(doc).encode(), 0o600)
        except OSError as exc:
            raise StateError(
                f"cannot write the directory cache {path}: {exc.strerror or exc}",
                "free space in (or make writable) the state directory's filesystem; the agent "
                "serves the fresh catalog and policy meanwhile and retries",
                code="state_unwritable",
            ) from exc

    async def _refresh_loop(self) -> None:
        """Long poll, apply, then cache. The first fetch takes the directory and its ETag; each
        next one waits at the authority (up to one refresh interval, at most 60 s) and returns
        as soon as the directory changes, so a change reaches the host within about a second; a
        304 confirms the directory is current. An authority that cannot be reached is not a
        failure of this task (the agent keeps what it has, retries after an interval); a cache
        that cannot be written is: it raises, and the supervisor logs it, shows it and retries."""
        interval = self.config.proxy.refresh_interval_s
        wait_s = min(interval, LONG_POLL_MAX_S)
        etag: str | None = None
        base: tuple[float, float] | None = None  # (the document's generated_at, monotonic then)
        last_changed = -CHANGED_FLOOR_S  # monotonic time of the last changed document
        while not self.stop_event.is_set():
            assert self.credentials is not None and self.proxy is not None
            pause = 0.0
            try:
                fetch = await in_daemon_thread(self._fetch_directory, etag, wait_s if etag else 0.0)
                if fetch.not_modified:
                    # Confirmed current: on the authority's clock (its generated_at, advanced by
                    # our monotonic time since), which is the clock the authority judges it by.
                    if base is not None:
                        self.state.directory_updated_at = base[0] + (time.monotonic() - base[1])
                    self.tasks.ok("directory-refresh")
                    pause = poll_pause(fetch, interval)
                else:
                    doc = carry_services(fetch.doc or {}, self._last_doc)
                    # Off the loop: 5,000 endpoints take ~130 ms to parse (bench/discovery.py).
                    directory = await asyncio.to_thread(self._directory, doc)
                    self._use(directory)
                    self.state.directory_source, self.state.directory_updated_at = (
                        "authority",
                        doc.get("generated_at"),
                    )
                    self._last_doc = doc
                    generated_at = doc.get("generated_at")
                    base = None
                    if isinstance(generated_at, int | float) and not isinstance(generated_at, bool):
                        base = (float(generated_at), time.monotonic())
                    await asyncio.to_thread(self._write_cache, doc)
                    etag = fetch.etag
                    pause = poll_pause(fetch, interval)
                    now = time.monotonic()
                    if now - last_changed < CHANGED_FLOOR_S:
                        # Changed twice within a second: replicas that disagree (a rolling upgrade:
                        # one serves `routes`, one does not) would be long-polled in a tight loop,
                        # each answering "changed". A single change is applied at once.
                        pause = max(pause, CHANGED_FLOOR_S)
                    last_changed = now
                    self.tasks.ok("directory-refresh")
                    self.reporter.poke()
                    log.debug(
                        "directory.refreshed",
                        catalog=len(directory.catalog),
                        services=len(directory.services),
                    )
            except StateError:
                raise
            except MeshagentError as exc:
                if exc.code == "host_revoked":
                    self._revoked("directory", exc)
                self.state.error("directory_refresh", f"{exc.code}: {exc.message}")
                log.warning(
                    "directory.refresh_failed",
                    code=exc.code,
                    reason=exc.message,
                    using=self.state.directory_source,
                )
                etag, pause = None, interval
            if pause:
                jitter = random.uniform(0.9, 1.1)  # noqa: S311 - spread a fleet's retries
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), pause * jitter)

    def _use(self, directory: Directory) -> None:
        """The data plane routes and authorizes by `directory` from now on."""
        assert self.proxy is not None
        self.proxy.apply(directory)  # (with workers: every worker, as one pickled document)
        if self.dns is not None:
            self.dns.set_services(directory.services.addresses())

    # --- interception --------------------------------------------------------------------

    def _plan(self) -> Plan:
        authority = enrolled_authority(self.config.identity.state_dir, self.authority_proxy)
        plan = build_plan(self.config.intercept, authority=authority, lookup_user=_lookup_user)
        if not isinstance(plan, Plan):
            raise ConfigError(plan.message, plan.hint)
        return plan

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn_reload())
        if _EARLY_STOP:  # a SIGTERM/SIGINT that came before the loop's handlers
            self._stop_signal(_EARLY_STOP[0])

        nofile = raise_nofile_limit()
        # Session tickets are sealed with our own key (every worker's, with workers), replaced
        # every proxy.ticket_key_rotation_s and at each renewal: a ticket lives one period at most.
        proxy_config = self.config.proxy
        self.credentials = await asyncio.to_thread(
            Credentials.load,
            self.store,
            new_ticket_key(),
            proxy_config.tls_resumption,
            proxy_config.tls_verify_cache,
        )
        cached = self._last_doc = self._cached_directory_doc()
        directory = self._directory(cached)
        if cached is not None:
            self.state.directory_source = "cache"
        self._identity_changed(self.credentials.identity)
        if self.workers is None:
            proxy = self.proxy = Proxy(
                listener_settings(self.config),
                self.credentials,
                directory.policy,
                directory.catalog,
                lambda sock: orig_dst(sock),
                self.metrics,
            )
            # Peers revoked in the cache are refused before the first fetch (a restart while cut off).
            proxy.apply(directory)
            await proxy.start()
        else:
            await self._start_workers(directory)
        listen = self.config.telemetry.admin_listen
        admin_host = None if listen in ("::", "") else listen
        admin_port = self.config.intercept.admin_port
        try:
            self.admin = await start_admin(
                admin_host, admin_port, self._routes(), admin_limits(self.config, nofile)
            )
        except OSError as exc:
            await self._stop_proxy(0)
            raise listen_error("admin server", "intercept.admin_port", admin_host, admin_port, exc) from None
        if self.dns is not None and not self.stop_event.is_set():
            # Before the TCP rules: a DNS start that fails leaves nothing installed behind it.
            try:
                await self.dns.start(directory.services.addresses())
            except BaseException:
                self.admin.close()
                await self._stop_proxy(0)
                raise
            dns = self.dns
            self.tasks.start("dns-heartbeat", lambda: dns.heartbeat(self.stop_event))

        intercept = self.config.intercept
        if self.stop_event.is_set():  # asked to stop while starting: no rules to apply, then remove
            log.info("daemon.stopping_before_ready", stage="before intercept rules")
        elif intercept.enabled:
            plan = self._plan()
            backend = detect_backend(intercept.backend)
            # Stale conntrack entries are deleted once we are ready (below): the guard rules
            # refuse those flows until then, and the start does not wait for a child process.
            self.state.rules = await asyncio.to_thread(apply_plan, plan, backend, False)
            log.info("intercept.applied", backend=backend.name, rules=len(plan.rules))
            self.tasks.once("conntrack-cleanup", self._clear_conntrack(plan))

        self.rotator = rotator = Rotator(self.store, on_renewed=self._renewed, renew_fn=self._renew)
        self.tasks.start("rotation", lambda: rotator.run(self.stop_event))
        if self.config.proxy.tls_resumption:
            self.tasks.start("ticket-keys", self._rotate_ticket_keys)
        self.tasks.start("directory-refresh", self._refresh_loop)
        if self.config.health.probes:
            self.tasks.start("health-probes", lambda: self.probes.run(self.stop_event))
        self.tasks.start("health-report", lambda: self.reporter.run(self.stop_event))
        if self.stat is not None:
            self.tasks.start("stat-snapshots", self._snapshots)
        if isinstance(self.proxy, WorkerPool):
            pool = self.proxy
            self.tasks.start("worker-health", lambda: pool.health(self.stop_event))
        else:
            self.tasks.start("memory-return", self._return_memory)  # (each worker runs its own)
        watchdog = watchdog_interval_s()
        if watchdog:
            self.tasks.start("watchdog", lambda: self._watchdog(watchdog))
        ident = self.credentials.identity
        assert self.proxy is not None
        # The start allocates and frees more than the agent then holds (the config, the
        # identity files, the directory's pickle): give the free heap pages back (~1 MB).
        return_free_memory()
        self.started = True
        notify("READY=1", f"STATUS=serving as {ident.workload.spiffe_id}")
        log.info(
            "daemon.ready",
            spiffe_id=ident.workload.spiffe_id,
            inbound=self.proxy.listening.get("inbound"),
            outbound=self.proxy.listening.get("outbound"),
            http_accounting=self._http_accounting(),
            relay=relay_implementation(self.config.proxy.native_relay),
            nofile=nofile,
            workers=0 if self.workers is None else self.workers.count,
        )

        await self.stop_event.wait()
        notify("STOPPING=1", "STATUS=draining")
        log.info("daemon.stopping", on_stop=self.config.proxy.on_stop)
        if self.dns is not None:  # DNS fails open first, whatever on_stop says
            await self.dns.stop()
        remove = intercept.enabled and self.config.proxy.on_stop == "remove-rules"
        try:
            if remove:  # nothing new is captured; redirected connections keep their NAT while they drain
                await asyncio.to_thread(stop_capture)
            await self._stop_proxy(self.config.proxy.drain_timeout_s, cut=self.drain_cut)
        finally:
            if remove:  # (also when the drain failed: no holding table left behind)
                await asyncio.to_thread(remove_all)
        if self.admin is not None:
            self.admin.close()
        await self.tasks.stop()
        log.info("daemon.stopped")
        return 0

    async def _start_workers(self, directory: Directory) -> None:
        """Hand every worker (forked at start) its state and wait until each listens."""
        assert self.workers is not None
        w = self.workers
        pool = self.proxy = WorkerPool(
            w.count,
            w.forker,
            self.merger,
            w.listeners.listening,
            directory,
            max_handshakes=self.config.proxy.max_handshakes,
            steer=w.listeners.steer,
        )
        assert self.credentials is not None
        log_settings = {"level": self.config.log.level, "format": self.config.log.format}
        await pool.start(self.credentials.ticket_key, log_settings)

    async def _stop_proxy(self, drain_timeout_s: float, cut: asyncio.Event | None = None) -> None:
        if self.proxy is not None:
            await self.proxy.stop(drain_timeout_s, cut=cut)
        if self.workers is not None:
            self.workers.listeners.close()  # the supervisor's copies: the slots' queues go with them

    # --- SIGHUP: reload the config without dropping a connection ------------------------

    def _stop_signal(self, sig: int) -> None:
        """The first SIGTERM/SIGINT stops the agent (rules, then a drain); one more while it
        stops cuts the drain short: open connections are closed and the agent exits at once."""
        name = signal.Signals(sig).name
        if not self.stop_event.is_set():
            log.info("daemon.signal", signal=name, action="stop")
            self.stop_event.set()
        elif not self.drain_cut.is_set():
            log.warning("daemon.signal", signal=name, action="cut the drain short, close open connections")
            self.drain_cut.set()

    def spawn_reload(self) -> None:
        """SIGHUP: reload, once the agent is up and until it stops (a reload while stopping
        could apply rules again after they were removed; one while starting has nothing to
        reload yet: the config was just read)."""
        if self.stop_event.is_set() or not self.started:
            log.warning(
                "reload.ignored",
                reason="the agent is stopping" if self.stop_event.is_set() else "the agent is still starting",
                hint="send SIGHUP again once the agent is ready",
            )
            return
        self.tasks.once("reload", self.reload())

    async def reload(self) -> None:
        """Re-read the config file: policy, local catalog, log settings and the interception plan
        take effect at once; listener ports and the state directory need a restart."""
        assert self.proxy is not None
        try:
            fresh = await asyncio.to_thread(load_config, self.config.source, self.config.source is not None)
        except MeshagentError as exc:
            self.state.error("reload", f"{exc.code}: {exc.message}")
            log.error("reload.refused", code=exc.code, reason=exc.message, hint=exc.hint)
            return
        needs_restart = [
            key
            for key, old, new in (
                ("intercept.inbound_port", self.config.intercept.inbound_port, fresh.intercept.inbound_port),
                (
                    "intercept.outbound_port",
                    self.config.intercept.outbound_port,
                    fresh.intercept.outbound_port,
                ),
                ("intercept.admin_port", self.config.intercept.admin_port, fresh.intercept.admin_port),
                ("identity.state_dir", self.config.identity.state_dir, fresh.identity.state_dir),
                ("dns", self.config.dns, fresh.dns),
                # The long poll's wait and the report's interval are set at start.
                (
                    "proxy.refresh_interval_s",
                    self.config.proxy.refresh_interval_s,
                    fresh.proxy.refresh_interval_s,
                ),
                ("health.probes", self.config.health.probes, fresh.health.probes),
                ("proxy.workers", self.config.proxy.workers, fresh.proxy.workers),
            )
            if old != new
        ]
        old_intercept = self.config.intercept
        self.config = fresh
        # The next authority call (each opens its own client) and the next renewal use it.
        self.authority_proxy = resolve_proxy(fresh.authority.https_proxy, fresh.authority.no_proxy)
        configure(fresh.log.level, fresh.log.format)
        if isinstance(self.proxy, WorkerPool):
            self.proxy.set_log(fresh.log.level, fresh.log.format)
        directory = self._directory(newest(self._cached_directory_doc(), self._last_doc))
        self._use(directory)
        if fresh.intercept != old_intercept and fresh.intercept.enabled:
            plan = self._plan()
            self.state.rules = await asyncio.to_thread(
                apply_plan, plan, detect_backend(fresh.intercept.backend)
            )
        log.info(
            "reload.done",
            catalog=len(directory.catalog),
            rules_reapplied=fresh.intercept != old_intercept,
            needs_restart=",".join(needs_restart),
        )
        notify(
            "STATUS=config reloaded"
            + (f"; restart needed for {', '.join(needs_restart)}" if needs_restart else "")
        )

    async def _clear_conntrack(self, plan: Plan) -> None:
        """Delete the stale conntrack entries of captured flows (see `conntrack.clear_stale`)."""
        cleared = await asyncio.to_thread(clear_stale, plan)
        if self.state.rules is not None:
            self.state.rules = self.state.rules.with_cleared(cleared)

    def _renew(self, store: IdentityStore) -> IdentityInfo:
        """One renewal, through the identity package's own process (agent/identity/renew.py)."""
        try:
            return run_renewal(store, self.authority_proxy)
        except MeshagentError as exc:
            if exc.code == "host_revoked":
                self._revoked("renewal", exc, logged=True)
            raise

    async def _renewed(self, identity: IdentityInfo) -> None:
        assert self.credentials is not None
        # A new ticket key too: no ticket of the old identity or bundle resumes.
        key = new_ticket_key() if self.credentials.ticket_key is not None else None
        await asyncio.to_thread(self.credentials.reload, self.store, identity, key)
        self._identity_changed(identity)
        if isinstance(self.proxy, Proxy):
            self.proxy.credentials_changed()  # the client sessions belong to the old contexts
        elif isinstance(self.proxy, WorkerPool):
            # Each worker loads the same files; new connections take the new contexts.
            replies = await self.proxy.credentials_changed(key)
            log.info(
                "tls.reloaded",
                workers=len(replies),
                of=len(self.proxy.slots),
                serial=identity.summary.serial,
            )

    async def _rotate_ticket_keys(self) -> None:
        """A new session-ticket key every proxy.ticket_key_rotation_s (in every worker): only
        the current key opens a ticket, so one lives at most a period."""
        period = self.config.proxy.ticket_key_rotation_s
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), period)
            if self.stop_event.is_set() or self.credentials is None:
                return
            key = new_ticket_key()
            await asyncio.to_thread(self.credentials.rotate_ticket_key, self.store, key)
            if isinstance(self.proxy, WorkerPool):
                self.proxy.set_ticket_key(key)
            self.tasks.ok("ticket-keys")

    def _identity_changed(self, identity: IdentityInfo) -> None:
        if self.metrics is not None:
            self.metrics.set_cert_expiry(identity.summary.not_after.timestamp())

    def _settle(self) -> None:
        if self.metrics is not None and self.proxy is not None:
            self.metrics.settle(self.proxy.live_legs())

    async def _return_memory(self) -> None:
        assert isinstance(self.proxy, Proxy)
        await return_memory_after_peaks(self.proxy, self.state.memory, self.stop_event)

    async def _snapshots(self) -> None:
        assert self.stat is not None
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), 5.0)
            if isinstance(self.proxy, WorkerPool):
                await self.proxy.refresh()  # the window reads the workers' merged counts
            self.stat.snapshot()

    # --- admin endpoints -----------------------------------------------------------------

    def _routes(self) -> dict[str, Handler]:
        return {
            "/metrics": self._metrics,
            "/live": lambda _q: Reply(200, b"live\n"),
            "/ready": self._ready,
            "/status": self._status,
            "/stat": self._stat,
        }

    def _metrics(self, query: dict[str, list[str]]) -> Reply | Awaitable[Reply]:
        if isinstance(self.proxy, WorkerPool):
            return self._pool_metrics(self.proxy, query)
        lines: list[str] = []
        if self.metrics is not None and self.proxy is not None:
            lines.extend(self.metrics.render(self.proxy.live_legs()))
        lines.extend(render_agent(self.status()))
        if self.dns is not None:
            lines.extend(self.dns.metrics())
        lines.extend(render_process())
        return _prometheus(lines)

    async def _pool_metrics(self, pool: WorkerPool, query: dict[str, list[str]]) -> Reply:
        """Every worker's metrics pulled now and merged exactly; `?worker=N`: that worker alone."""
        await pool.refresh()
        lines: list[str] = []
        if "worker" in query:
            one = None
            with contextlib.suppress(ValueError):
                one = self.merger.render_worker(int(query["worker"][0])) if self.merger else None
            if one is None:
                return Reply(404, b"no such worker (or metrics are off)\n")
            return _prometheus(one)
        if self.metrics is not None and self.merger is not None:
            lines.extend(self.metrics.render(()))
        lines.extend(render_agent(self.status()))
        if self.dns is not None:
            lines.extend(self.dns.metrics())
        lines.extend(pool.metrics_lines())
        lines.extend(render_process(pool.pids(), pool.dead_cpu_s))
        return _prometheus(lines)

    def not_ready(self) -> list[str]:
        """Why the agent cannot serve mTLS right now (empty: ready): agent/status.py."""
        return not_ready(self)

    def _ready(self, _query: dict[str, list[str]]) -> Reply:
        reasons = self.not_ready()
        return (
            Reply(503, ("not ready: " + "; ".join(reasons) + "\n").encode())
            if reasons
            else Reply(200, b"ready\n")
        )

    async def _stat(self, query: dict[str, list[str]]) -> Reply:
        if isinstance(self.proxy, WorkerPool) and self.stat is not None:
            await self.proxy.refresh()
            self.stat.snapshot()  # the window's newest end is now
        if self.stat is None:
            return json_reply({"error": "metrics are off (telemetry.metrics = false)"}, 503)
        try:
            window = float(query.get("window", ["60"])[0])
        except ValueError:
            window = 60.0
        return json_reply(
            {"window_s": window, "rows": self.stat.query(window), "routes": self.stat.query_routes(window)}
        )

    def status(self) -> dict[str, Any]:
        """The `/status` document (agent/status.py owns it)."""
        return daemon_status(self)

    def _status(self, _query: dict[str, list[str]]) -> Reply | Awaitable[Reply]:
        if isinstance(self.proxy, WorkerPool):
            return self._pool_status(self.proxy)
        return json_reply(self.status())

    async def _pool_status(self, pool: WorkerPool) -> Reply:
        await pool.refresh()  # counters, errors and memory as of now
        return json_reply(self.status())

    def _http_accounting(self) -> str:
        return http_accounting(self)

    async def _watchdog(self, interval: float) -> None:
        while not self.stop_event.is_set():
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _prometheus(lines: Iterable[str]) -> Reply:
    return Reply(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4; charset=utf-8")


# SIGTERM/SIGINT that arrive after run_daemon starts but before the loop's handlers exist.
_EARLY_STOP: list[int] = []


def _early_signal(sig: int, _frame: object) -> None:
    if sig != signal.SIGHUP:  # SIGHUP this early: nothing to reload yet
        _EARLY_STOP.append(sig)


def start_workers(config: AgentConfig, count: int) -> Workers:
    """Bind every slot's listening sockets and fork the first workers, while this process has
    one thread and no loop (a fork with threads or a loop about inherits their locks and epoll).
    A busy port fails here, as the inline proxy's start would (listen_error)."""
    # Imported only with workers, and before the fork: every worker shares these pages.
    from agent.workers import worker
    from agent.workers.forker import bind_listeners, fork_workers

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401 - the workers' loop: imported once here, shared by every child

    raise_nofile_limit()  # inherited by every worker
    settings = listener_settings(config)
    listeners = bind_listeners(settings, count, settings.transparent)
    # OpenSSL fills its provider and algorithm caches on a first load: filled here, once, they
    # are shared by every worker (~2 MB less each). A missing identity fails later, as inline.
    with contextlib.suppress(MeshagentError, OSError, ValueError):
        Credentials.load(IdentityStore(config.identity.state_dir))
    # (fork_workers freezes the collector's objects so the pages stay shared.)
    spawner = fork_workers(listeners, functools.partial(worker.main, config), count)
    return Workers(count, listeners, spawner)


def run_daemon(config: AgentConfig) -> int:
    """Run until SIGTERM on uvloop; returns the exit code."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _early_signal)
    count = worker_count(config.proxy)
    # Workers even with one CPU: the same process model on every host (a dead proxy is replaced
    # while identity, rules and admin stay up), and an extra worker costs ~7 MB, not the ~19 MB
    # that a first step out of the inline mode costs. 0: the proxy runs in this process.
    workers = start_workers(config, count) if count >= 1 else None
    try:
        try:
            import uvloop

            return uvloop.run(Daemon(config, workers).run())
        except ImportError:
            return asyncio.run(Daemon(config, workers).run())
    finally:
        if workers is not None:
            # A start that failed before the pool took the workers forked at start (no
            # identity, a busy admin port): they end now, silently, not after this exits.
            workers.forker.close()
