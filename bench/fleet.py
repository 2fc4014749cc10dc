"""Fleet simulator: N simulated agents against real authority replicas, through the HTTP API.

    .venv/bin/python -m bench.fleet --hosts 10000 --procs 2 --replicas 3 --database postgresql
    .venv/bin/python -m bench.fleet --hosts 1000 --abuse     # a second window with bad clients

The agents are spread over --procs shard processes (bench/fleet_shard.py: each its own asyncio
loop and httpx pools; their latencies merged as raw samples). Each agent enrolls with a real
CSR (one P-256 key per host, made up front: the authority's cost is what is measured), fetches
its whole directory once, then long polls it (GET /v1/host/config?wait=30 with If-None-Match)
and reports (POST /v1/host/report) every --heartbeat seconds, its report reusing a kept-alive
connection; --steady seconds are measured (and as many again with bench/fleet_abuse.py's bad
clients at every replica, with --abuse); then --renewals hosts renew (real proof of
possession) while the fleet keeps polling; then one host is revoked and the simulator times
until every other agent's long poll has returned a directory without the revoked host.

The authority is `--replicas` real `meshagent authority serve` processes (tests/authority/
replicas.py) behind haproxy in TCP mode, on a throwaway PostgreSQL cluster (tests/pgcluster.py)
or on the directory's SQLite file. Everything shares this machine's cores: each process's CPU
(the replicas, haproxy, PostgreSQL's backends, each shard) is reported per phase, to say which
was the limit.

Results: bench/results/fleet-<database>-r<R>-n<N>.json and a markdown row appended to
bench/results/fleet.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from agent.authority.httpguard import Limits
from agent.identity.pki import generate_key, make_csr
from bench.fleet_abuse import running_abuse
from bench.fleet_agents import make_hosts, percentile, raise_file_limit
from bench.fleet_reaper import Reaper, die_with_parent
from bench.fleet_shard import AgentSettings, ShardPool, merged, shard_pool, split

RESULTS = Path(__file__).parent / "results"


# --- the authority's processes -------------------------------------------------------------


def _memory_mb(procs: list[psutil.Process]) -> float:
    """A process's RSS; a group's (PostgreSQL) summed USS, with its root's RSS: each backend's
    RSS counts the shared buffers again."""
    total = 0
    for i, p in enumerate(procs):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss if i == 0 else p.memory_full_info().uss
    return round(total / 2**20, 1)


class Meter:
    """CPU (% of one core) and RSS of each process over a phase: the replicas, haproxy,
    PostgreSQL (its postmaster and every backend, summed), the shards and this process. On a
    shared 2-core machine this says which process was the limit. `runq_wait_pct`: how much of
    the phase the process's main thread (the event loop) spent runnable but waiting for a CPU
    (/proc/PID/schedstat): a process at 15 % CPU may be idle, or starved by the machine's run
    queue (a 10,000-host run at load 10: shards 15 % CPU, 88 % waiting)."""

    def __init__(self, pids: dict[str, int], groups: dict[str, int] | None = None) -> None:
        self.procs: dict[str, list[psutil.Process]] = {}
        for name, pid in {**pids, "parent": os.getpid()}.items():
            with contextlib.suppress(psutil.Error):
                self.procs[name] = [psutil.Process(pid)]
        for name, pid in (groups or {}).items():  # a process and all its children
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                self.procs[name] = [root, *root.children(recursive=True)]
        self._start = {name: self._cpu(procs) for name, procs in self.procs.items()}
        self._waited = {name: _runq_wait_s(procs[0].pid) for name, procs in self.procs.items()}
        self._t = time.monotonic()

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
        out = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                out[p.pid] = times.user + times.system
        return out

    def read(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t
        out: dict[str, Any] = {}
        for name, procs in self.procs.items():
            now = self._cpu(procs)
            used = sum(now[pid] - self._start[name][pid] for pid in now if pid in self._start[name])
            waited = _runq_wait_s(procs[0].pid) - self._waited[name]
            out[name] = {
                "cpu_pct": round(100 * used / max(wall, 1e-9), 1),
                "runq_wait_pct": round(100 * waited / max(wall, 1e-9), 1),
                "rss_mb": _memory_mb(procs),
            }
        return out


def _runq_wait_s(pid: int) -> float:
    """Seconds the process's main thread has waited on a run queue (schedstat's second field)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Setup:
    url: str
    ca_file: str
    directory: Path
    database: str | None
    pids: dict[str, int]  # replicas, haproxy
    groups: dict[str, int]  # PostgreSQL's postmaster (its backends are counted with it)
    replica_addresses: list[tuple[str, int]]
    idle_timeout_s: int


def connections_per_process(hosts: int, replicas: int, workers: int) -> int:
    """What each replica process holds in steady state: two connections an agent (its long
    poll's and its reports'), spread evenly; the enrollments' own are closed after each."""
    return -(-2 * hosts // (replicas * workers))


def haproxies_for(hosts: int, per_haproxy: int) -> int:
    """haproxy processes for the fleet's connections (two an agent, 10 % slack for the
    kernel's uneven spread over SO_REUSEPORT sockets and the enrollments in flight)."""
    return max(1, -(-(2 * hosts * 11 // 10 + 512) // per_haproxy))


@contextlib.contextmanager
def authority_setup(
    root: Path,
    replicas: int,
    database: str,
    idle_timeout: int | None,
    reaper: Reaper,
    hosts: int,
    workers: int = 1,
) -> Iterator[Setup]:
    from tests.authority.replicas import Replicas, _haproxy_maxconn

    with contextlib.ExitStack() as stack:
        url: str | None = None
        groups: dict[str, int] = {}
        if database == "postgresql":
            from tests.pgcluster import PG_BIN, pg_cluster

            # Each replica's pool plus the simulator's own connection.
            pg = stack.enter_context(pg_cluster(max_connections=max(100, 25 * replicas * workers + 20)))
            # pg_ctl daemonizes the postmaster: no parent-death signal reaches it, the reaper does.
            stop = [str(PG_BIN / "pg_ctl"), "-D", str(pg.data), "-m", "immediate", "stop"]
            reaper.run_command(["runuser", "-u", pg.user, "--", *stop] if pg.user else stop)
            reaper.remove(pg.dir)
            url = pg.url
            groups["postgresql"] = pg.postmaster_pid() or 0
        # The connection cap above what the fleet holds (two connections an agent): the
        # default's shedding is what --abuse and tests/authority/test_abuse.py exercise.
        serve_args = ["--max-connections", "30000"]
        if idle_timeout is not None:
            serve_args += ["--idle-timeout", str(idle_timeout)]
        fleet = Replicas(
            root / "authority",
            replicas,
            url,
            workers=workers,
            serve_args=tuple(serve_args),
            haproxies=haproxies_for(hosts, _haproxy_maxconn()),
            on_spawn=reaper.kill_group,
        )
        stack.callback(fleet.stop)
        fleet.start()
        pids: dict[str, int] = {}
        for r in fleet.replicas:  # with --workers, a replica is its supervisor and the workers
            (groups if workers > 1 else pids)[r.name] = r.pid
        for i, proc in enumerate(fleet.haproxy_procs):
            pids["haproxy" if i == 0 else f"haproxy{i}"] = proc.pid
        pids["reaper"] = reaper.pid
        yield Setup(
            fleet.url,
            fleet.ca_file,
            fleet.directory,
            url,
            pids,
            groups,
            [(r.host, r.port) for r in fleet.replicas],
            idle_timeout if idle_timeout is not None else Limits().idle_timeout,
        )


def open_authority(directory: Path, database: str | None) -> Any:
    """The authority in this process, on the replicas' database: tokens and the revocation."""
    from agent.authority.ca import load_authority
    from agent.authority.service import Authority

    try:
        from agent.authority.registry import open_registry
    except ImportError:  # before the PostgreSQL registry existed
        from agent.authority.service import open_registry as sqlite_registry

        return Authority(load_authority(directory), sqlite_registry(directory))
    return Authority(load_authority(directory), open_registry(directory, database))


def run(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """The phases, each asked of every shard at once; the merged samples of each."""
    authority = open_authority(setup.directory, setup.database)
    n, k = args.hosts, args.procs
    t = time.monotonic()
    secrets = [tok.secret for tok in authority.create_tokens("fleet/sim", setup.url, timedelta(hours=2), n)]
    tokens_s = time.monotonic() - t
    result: dict[str, Any] = {
        "hosts": n,
        "replicas": args.replicas,
        "database": args.database,
        "heartbeat_s": args.heartbeat,
        "procs": k,
        "idle_timeout_s": setup.idle_timeout_s,
        # The machine's load when the run began (the replicas, PostgreSQL, haproxy and the
        # simulator share its cores with whatever else runs): read the rates with it.
        "loadavg_at_start": os.getloadavg(),
    }
    victim = n - 1  # the host revoked at the end
    victim_entry = f'"{make_hosts([""], [victim])[0].address}/32"'.encode()
    settings = AgentSettings(setup.url, setup.ca_file, args.heartbeat, args.long_polls, victim_entry, k)
    with shard_pool(k, settings) as pool:
        pids = {**setup.pids, **pool.pids}
        # Every process this run started, by pid: what to look at (py-spy, top) while it runs.
        print(f"processes: {json.dumps({**pids, **setup.groups})}", flush=True)
        parts = [
            {"indices": i, "secrets": s}
            for i, s in zip(split(list(range(n)), k), split(secrets, k), strict=True)
        ]
        keys_s = max(r["keys_s"] for r in pool.ask("make", parts))
        result["setup"] = {"tokens_s": round(tokens_s, 2), "keys_and_csrs_s": round(keys_s, 2)}
        per_shard = max(1, args.concurrency // k)

        # 1. The enrollment storm.
        replies, elapsed, used = _phase(pool, pids, setup.groups, "enroll", concurrency=per_shard)
        enrolled = sum(r["enrolled"] for r in replies)
        ids: dict[int, tuple[str, str]] = {}
        for r in replies:
            ids.update(r["ids"])
        result["enroll"] = {
            "enrolled": enrolled,
            "elapsed_s": round(elapsed, 2),
            "per_s": round(enrolled / elapsed, 1),
            "concurrency": per_shard * k,
            **merged(replies).summary("enroll"),
            "resources": used,
        }
        _say("enroll", result)

        # 2. The directory at N hosts: size and fetch time (one client, one at a time), render
        # time in this process.
        sample = pool.ask_one(0, "fetch_sample", index=0, rounds=10)
        record = authority.authenticate(ids[0][1])
        render_times = []
        for _ in range(10):
            t = time.perf_counter()
            authority.render_host_config(record)
            render_times.append(time.perf_counter() - t)
        result["host_config"] = {
            "bytes": len(sample["body"]),
            "fetch_median_ms": round(percentile(sample["times"], 50) * 1000, 1),
            "render_in_process_median_ms": round(percentile(render_times, 50) * 1000, 1),
        }
        _say("host_config", result)
        assert victim_entry in sample["body"]

        # 3. The agents start: each fetches its whole directory (a few at a time, as agents
        # that come up do, not a restart storm), then long polls and reports every interval.
        concurrency = max(1, args.prime_concurrency // k)
        replies, elapsed, used = _phase(pool, pids, setup.groups, "prime", concurrency=concurrency)
        parsed = {how: sum(r[how] for r in replies) for how in ("whole", "after_catalog", "gunzip_reused")}
        result["prime"] = {
            "primed": sum(r["primed"] for r in replies),
            "elapsed_s": round(elapsed, 1),
            "parsed": parsed,
            **merged(replies).summary("host_config"),
            "retries": dict(merged(replies).retries),
            "resources": used,
        }
        _say("prime", result)

        # 4. The fleet in steady state: every agent holds a long poll and reports every interval.
        time.sleep(args.heartbeat)  # the last agents started: their polls parked, their reports sent
        result["steady"] = _steady(pool, pids, setup.groups, args.steady)
        _say("steady", result)
        if args.abuse:
            with running_abuse(setup.replica_addresses, setup.ca_file, args.abuse_scale) as abuse:
                pids_with = {**pids, "abuse": abuse.pid}
                time.sleep(min(args.heartbeat, 10))  # the floods at full strength first
                result["steady_abuse"] = _steady(pool, pids_with, setup.groups, args.steady)
                result["steady_abuse"]["abuse"] = abuse.counts()
            _say("steady_abuse", result)
            time.sleep(args.heartbeat)
            pool.ask("window")

        # 5. Renewals while the fleet polls and reports.
        renewing = random.sample(range(n - 1), min(args.renewals, n - 1))
        replies, elapsed, used = _phase(
            pool,
            pids,
            setup.groups,
            "renew",
            [{"indices": [i for i in renewing if i % k == shard]} for shard in range(k)],
            concurrency=per_shard,
        )
        calls = merged(replies)
        renewed = sum(r["renewed"] for r in replies)
        result["renew"] = {
            "renewed": renewed,
            "elapsed_s": round(elapsed, 2),
            "per_s": round(renewed / elapsed, 1),
            **calls.summary("renew"),
            "heartbeat_during": calls.summary("heartbeat"),
            "resources": used,
        }
        _say("renew", result)

        # 6. Revocation: until every other agent's long poll returned a directory without it.
        time.sleep(2)  # let the renewals' wake-ups settle
        pool.ask("window")
        meter = Meter(pids, setup.groups)
        revoked_at = time.monotonic()
        if args.long_polls:
            pool.ask("watch", revoked_at=revoked_at)
            authority.registry.revoke(ids[victim][0], datetime.now(UTC))
            replies = pool.ask("told", deadline=revoked_at + args.revoke_timeout, victim=victim)
            delays = sorted(d for r in replies for d in r["delays"])
            result["revoke"] = {
                "agents_told": len(delays),
                "agents": n - 1,
                "all_within_s": round(delays[-1], 2) if len(delays) == n - 1 else None,
                "p50_s": round(percentile(delays, 50), 2),
                "p99_s": round(percentile(delays, 99), 2),
                **_during(pool.ask("window")),
                "resources": meter.read(),
            }
            _say("revoke", result)
        final = merged(pool.ask("finish"))
    result["retries"] = dict(final.retries)
    result["failures"] = dict(final.failures)
    return result


def _during(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """The reports' latency and the long polls' answers (by status) in a window."""
    answers: Counter[str] = Counter()
    for r in replies:
        answers.update(r["long_poll_answers"])
    return {"heartbeat_during": merged(replies).summary("heartbeat"), "long_poll_answers": dict(answers)}


def _say(phase: str, result: dict[str, Any]) -> None:
    print(f"{phase}: {json.dumps(result[phase])}", flush=True)


def _phase(
    pool: ShardPool,
    pids: dict[str, int],
    groups: dict[str, int],
    command: str,
    per_shard: list[dict[str, Any]] | None = None,
    **same: Any,
) -> tuple[list[Any], float, dict[str, Any]]:
    """`command` asked of every shard: the replies, the wall time, each process's CPU and RSS."""
    meter = Meter(pids, groups)
    t = time.monotonic()
    replies = pool.ask(command, per_shard, **same)
    return replies, time.monotonic() - t, meter.read()


def _steady(pool: ShardPool, pids: dict[str, int], groups: dict[str, int], seconds: float) -> dict[str, Any]:
    """`seconds` of the fleet as it is: every report's latency in it, merged over the shards."""
    pool.ask("window")  # (what came before is not this window's)
    meter = Meter(pids, groups)
    t = time.monotonic()
    time.sleep(seconds)
    replies = pool.ask("window")
    elapsed = time.monotonic() - t
    calls = merged(replies)
    beats = calls.summary("heartbeat")
    return {
        "seconds": round(elapsed, 1),
        "heartbeats_per_s": round(beats["count"] / elapsed, 1),
        "heartbeat": beats,
        "long_poll_answers": _during(replies)["long_poll_answers"],
        "failures": dict(calls.failures),
        "retries": dict(calls.retries),
        "resources": meter.read(),
    }


def render_cost(n: int, database: str) -> dict[str, Any]:
    """What one host's directory costs the authority at N hosts, in CPU time (this process, not
    the wall clock: the machine is shared), and what a catalog cached per registry version would
    cost instead: the figures behind the proposal in docs/bench.md."""
    import gzip
    import hashlib

    from agent.authority.service import canonical_json

    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshagent-render-")))
        url = None
        if database == "postgresql":
            from tests.pgcluster import pg_cluster

            url = stack.enter_context(pg_cluster()).url
        from tests.support import init_authority

        init_authority(root / "authority")
        authority = open_authority(root / "authority", url)
        secrets = [
            t.secret
            for t in authority.create_tokens("fleet/sim", "https://127.0.0.1:1", timedelta(hours=1), n)
        ]
        key = generate_key()
        csr = make_csr(key).decode()  # one key for every host: only the registry's size matters here
        t = time.process_time()
        for i, secret in enumerate(secrets):
            authority.enroll(secret, csr, f"sim-{i}", [f"198.18.{i // 250}.{i % 250 + 1}"])
        enroll_cpu = time.process_time() - t
        host = authority.registry.list_hosts()[0]

        def cpu_ms(fn: Callable[[], object], rounds: int = 5) -> float:
            t = time.process_time()
            for _ in range(rounds):
                fn()
            return round((time.process_time() - t) / rounds * 1000, 2)

        body = authority.render_host_config(host).body
        catalog = canonical_json(authority.catalog())
        return {
            "hosts": n,
            "database": database,
            "enroll_cpu_ms_in_process": round(enroll_cpu / n * 1000, 3),
            "list_hosts_cpu_ms": cpu_ms(authority.registry.list_hosts),
            "catalog_cpu_ms": cpu_ms(authority.catalog),
            "render_cpu_ms": cpu_ms(lambda: authority.render_host_config(host)),
            "body_bytes": len(body),
            "body_gzip_bytes": len(gzip.compress(body, 6)),
            "gzip_cpu_ms": cpu_ms(lambda: gzip.compress(body, 6)),
            "sha256_body_cpu_ms": cpu_ms(lambda: hashlib.sha256(body).digest(), 20),
            # With the catalog's canonical JSON and digest kept per registry version, a host's
            # render is its own small parts (policy query, host id) plus a join of the bytes.
            "cached_render_cpu_ms": cpu_ms(
                lambda: (
                    authority.registry.policies(host.identity),
                    hashlib.sha256(b"catalog-digest" + canonical_json(host.id)).digest(),
                    b"".join([b"{", catalog, b"}"]),
                ),
                20,
            ),
        }


def markdown_row(r: dict[str, Any]) -> str:
    def g(*path: str) -> Any:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return "-" if v is None else v

    used = (r.get("steady", {}).get("resources") or {}).items()
    authority = [v for name, v in used if name[0] == "r" and name[1:].isdigit()]  # the replicas
    cpu = sum(v["cpu_pct"] for v in authority)
    rss = sum(v["rss_mb"] for v in authority)
    return (
        f"| {r['database']} | {r['replicas']} | {r['hosts']} "
        f"| {g('enroll', 'per_s')} | {g('enroll', 'p99_ms')} "
        f"| {g('steady', 'heartbeats_per_s')} | {g('steady', 'heartbeat', 'p99_ms')} | {g('renew', 'per_s')} "
        f"| {g('renew', 'p99_ms')} | {g('host_config', 'bytes')} | {g('host_config', 'fetch_median_ms')} "
        f"| {g('revoke', 'all_within_s')} ({g('revoke', 'agents_told')}/{g('revoke', 'agents')}) "
        f"| {cpu:.0f} | {rss:.0f} |"
    )


HEADER = (
    "| db | replicas | hosts | enroll/s | enroll p99 ms | heartbeats/s | heartbeat p99 ms | renew/s "
    "| renew p99 ms | host config bytes | fetch ms | revocation fleet-wide s (told) | authority CPU % "
    "| authority RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, `timeout`, a closed terminal, a CI job cancelled)
    unwind: the context managers stop the replicas, haproxy, PostgreSQL and the shards. Without
    this, Python dies at once on SIGTERM and everything it started keeps running; and asyncio's
    own SIGINT handling only cancels the running task, which a cleanup path can absorb: a run
    once went on after a SIGINT, its processes with it."""

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, unwind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds between an agent's reports")
    parser.add_argument("--concurrency", type=int, default=64, help="enrollments/renewals in flight")
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of steady state measured")
    parser.add_argument("--renewals", type=int, default=200)
    parser.add_argument(
        "--no-long-polls",
        dest="long_polls",
        action="store_false",
        help="agents only report (no directory fetch, no revocation timing): the reports' own limit",
    )
    parser.add_argument("--prime-concurrency", type=int, default=4, help="first directory fetches in flight")
    parser.add_argument("--revoke-timeout", type=float, default=60.0)
    parser.add_argument(
        "--procs", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="simulator processes (shards)"
    )
    parser.add_argument("--idle-timeout", type=int, help="the replicas' --idle-timeout [default: theirs]")
    parser.add_argument(
        "--workers", type=int, default=1, help="each replica's --workers (processes: each its own file limit)"
    )
    parser.add_argument(
        "--abuse",
        action="store_true",
        help="a second steady window with bad clients at every replica (bench/fleet_abuse.py)",
    )
    parser.add_argument(
        "--abuse-scale", type=float, default=1.0, help="the bad clients' numbers and rates, times"
    )
    parser.add_argument("--tag", default="", help="added to the result file's name")
    parser.add_argument("--workdir", help="a new directory to run in and keep (default: a temp dir, removed)")
    parser.add_argument(
        "--render-cost",
        action="store_true",
        help="only measure one directory's render at --hosts (in process)",
    )
    args = parser.parse_args()
    die_with_parent(signal.SIGTERM)  # a closed terminal, a killed `timeout`: unwind, as on SIGTERM
    stop_on_signals()
    if args.render_cost:
        cost = render_cost(args.hosts, args.database)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"render-{args.database}-n{args.hosts}.json").write_text(json.dumps(cost, indent=2) + "\n")
        print(json.dumps(cost))
        return

    # Two descriptors per agent in haproxy (its own limit is raised by replicas.py), one per
    # connection in each replica (the replicas inherit this limit).
    raise_file_limit(4 * args.hosts + 4096)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = connections_per_process(args.hosts, args.replicas, args.workers) + 512
    if soft != resource.RLIM_INFINITY and need > soft:
        # Past it the replica's accept() fails (EMFILE) and agents wait on connects: a crawl
        # that looks like a slow authority. The hard limit is this machine's to raise.
        raise SystemExit(
            f"each replica process would hold ~{need} descriptors, the file limit is {soft} "
            f"(hard, not raisable here): use --workers {-(-need // (soft - 512)) + args.workers - 1} "
            "or more --replicas"
        )

    reaper = Reaper()
    with contextlib.ExitStack() as stack:
        if args.workdir:  # kept: the replicas' and haproxy's logs
            root = Path(args.workdir)
            root.mkdir(parents=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshagent-fleet-")))
            reaper.remove(root)
        with authority_setup(
            root, args.replicas, args.database, args.idle_timeout, reaper, args.hosts, args.workers
        ) as setup:
            result = run(args, setup)
    reaper.close()  # everything stopped: nothing for it to do
    RESULTS.mkdir(exist_ok=True)
    name = f"fleet-{args.database}-r{args.replicas}-n{args.hosts}{'-' + args.tag if args.tag else ''}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = RESULTS / "fleet.md"
    if not table.exists():
        table.write_text(HEADER + "\n")
    with table.open("a") as f:
        f.write(markdown_row(result) + "\n")
    print(HEADER)
    print(markdown_row(result))


if __name__ == "__main__":
    main()
