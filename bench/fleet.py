"""Fleet simulator: N simulated agents against real authority replicas, through the HTTP API.

    .venv/bin/python -m bench.fleet --hosts 1000 --replicas 3 --database postgresql --heartbeat 10

One asyncio process plays every agent: it enrolls each with a real CSR (one P-256 key per host,
made up front: the authority's cost is what is measured), then every agent long polls its
directory (GET /v1/host/config?wait=30 with If-None-Match) and reports (POST /v1/host/report)
every --heartbeat seconds for --steady seconds; then --renewals hosts renew (real proof of
possession) while the fleet keeps polling; then one host is revoked and the simulator times
until every other agent's long poll has returned a directory without the revoked host.

The authority is `--replicas` real `meshagent authority serve` processes (tests/authority/
replicas.py) behind haproxy in TCP mode, on a throwaway PostgreSQL cluster (tests/pgcluster.py)
or on the directory's SQLite file. Everything shares this machine's cores: the simulator's own
CPU is reported beside the authority's, so read the rates as lower bounds.

Results: bench/results/fleet-<database>-r<R>-n<N>.json and a markdown row appended to
bench/results/fleet.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from agent.identity.pki import PrivateKey, generate_key, make_csr, sign_possession

RESULTS = Path(__file__).parent / "results"

# httpcore imports sniffio on every request to learn the event loop; without sniffio installed
# each attempt searches sys.path again (a third of the simulator's CPU in a profile). A None
# entry makes the failed import instant, and httpcore then assumes asyncio, which is right.
with contextlib.suppress(ImportError):
    import sniffio  # type: ignore[import-not-found]  # noqa: F401
if "sniffio" not in sys.modules:
    sys.modules["sniffio"] = None  # type: ignore[assignment]
LONG_POLL_S = 30
RETRY_STATUSES = {502, 503, 504}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class SimHost:
    index: int
    token: str  # the join token's secret
    key: PrivateKey
    csr: str
    name: str
    address: str
    host_id: str = ""
    chain: str = ""
    api_token: str = ""
    etag: str = ""
    enroll_attempts: int = 0


@dataclass
class Calls:
    """Latency (s) of each successful call by kind, and the failures by kind and reason."""

    latency: dict[str, list[float]] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)

    def ok(self, kind: str, seconds: float) -> None:
        self.latency.setdefault(kind, []).append(seconds)

    def summary(self, kind: str) -> dict[str, float]:
        values = self.latency.get(kind, [])
        return {
            "count": len(values),
            "p50_ms": round(percentile(values, 50) * 1000, 1),
            "p99_ms": round(percentile(values, 99) * 1000, 1),
            "max_ms": round(max(values, default=float("nan")) * 1000, 1),
        }


class Refused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


def tls_context(ca_file: str) -> ssl.SSLContext:
    """As agent/identity/client.py: the pinned CA, no name check."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.check_hostname = False
    return ctx


class FleetClient:
    """The simulated agents' HTTP side. Calls are retried, like an agent behind a load
    balancer must: on a transport error (a replica killed mid-request) and on 502/503/504 (the
    registry away: Retry-After honoured), with a capped back-off, up to `deadline_s`. An
    enrollment retried with the same token and key gets the same host back (storage.enroll):
    that is what makes the retry safe."""

    def __init__(
        self, url: str, ca_file: str, shards: int = 1, per_shard: int = 200, deadline_s: float = 60
    ) -> None:
        self.url = url
        self.calls = Calls()
        self.deadline_s = deadline_s
        ctx = tls_context(ca_file)
        # httpx's pool scans its connections on every request: many small pools, not one of 10,000.
        self._clients = [
            httpx.AsyncClient(
                base_url=url,
                verify=ctx,
                timeout=httpx.Timeout(10.0, read=LONG_POLL_S + 15),
                limits=httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard),
            )
            for _ in range(shards)
        ]

    def client(self, host: SimHost) -> httpx.AsyncClient:
        return self._clients[host.index % len(self._clients)]

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients))

    async def call(
        self, kind: str, host: SimHost, send: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        started = time.monotonic()
        delay = 0.05
        while True:
            attempt = time.monotonic()
            try:
                response = await send(self.client(host))
            except httpx.TransportError as exc:
                reason = type(exc).__name__
            else:
                if response.status_code not in RETRY_STATUSES:
                    self.calls.ok(kind, time.monotonic() - attempt)
                    return response
                reason = f"http_{response.status_code}"
                after = response.headers.get("retry-after", "")
                delay = max(delay, float(after)) if after.isdigit() else delay
            self.calls.retries[f"{kind}:{reason}"] += 1
            if time.monotonic() - started > self.deadline_s:
                self.calls.failures[f"{kind}:{reason}"] += 1
                raise Refused(0, reason.encode())
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)

    # --- the API calls -------------------------------------------------------------------

    async def enroll(self, host: SimHost) -> None:
        body = {
            "token_secret": host.token,
            "csr": host.csr,
            "host_name": host.name,
            "addresses": [host.address],
        }

        async def send(c: httpx.AsyncClient) -> httpx.Response:
            host.enroll_attempts += 1
            return await c.post("/v1/enroll", json=body)

        response = await self.call("enroll", host, send)
        if response.status_code != 200:
            self.calls.failures[f"enroll:{response.status_code}"] += 1
            raise Refused(response.status_code, response.content)
        self._issued(host, response.json())

    def _issued(self, host: SimHost, doc: dict[str, Any]) -> None:
        host.host_id, host.chain, host.api_token = doc["host_id"], doc["certificate_chain"], doc["api_token"]

    async def report(self, host: SimHost, interval_s: float) -> None:
        body = {
            "agent_version": "fleet-sim",
            "ready": True,
            "reason": "",
            "directory_updated_at": time.time(),
            "refresh_interval_s": interval_s,
            "probes": [],
        }
        response = await self.call(
            "heartbeat",
            host,
            # (the token read per attempt: a renewal in between replaces it)
            lambda c: c.post(
                "/v1/host/report", json=body, headers={"authorization": f"Bearer {host.api_token}"}
            ),
        )
        if response.status_code != 204:
            self.calls.failures[f"heartbeat:{response.status_code}"] += 1

    async def renew(self, host: SimHost) -> None:
        key = generate_key()
        csr = make_csr(key)
        timestamp = int(time.time())
        body = {
            "certificate_chain": host.chain,
            "csr": csr.decode(),
            "timestamp": timestamp,
            "signature": sign_possession(host.key, csr, timestamp),
        }
        response = await self.call("renew", host, lambda c: c.post("/v1/renew", json=body))
        if response.status_code != 200:
            self.calls.failures[f"renew:{response.status_code}"] += 1
            raise Refused(response.status_code, response.content)
        host.key = key
        self._issued(host, response.json())

    async def host_config(self, host: SimHost, wait_s: float = 0) -> httpx.Response:
        headers = {"authorization": f"Bearer {host.api_token}"}
        if host.etag:
            headers["if-none-match"] = host.etag
        path = f"/v1/host/config?wait={wait_s:g}" if wait_s else "/v1/host/config"
        kind = "long_poll" if wait_s else "host_config"
        response = await self.call(kind, host, lambda c: c.get(path, headers=headers))
        if response.status_code == 200:
            host.etag = response.headers.get("etag", "")
        return response


def make_hosts(secrets: list[str]) -> list[SimHost]:
    hosts = []
    for i, secret in enumerate(secrets):
        key = generate_key()
        # 198.18.0.0/15, one address per host (a /16 holds 65,536).
        address = f"198.18.{i // 250}.{i % 250 + 1}"
        hosts.append(SimHost(i, secret, key, make_csr(key).decode(), f"sim-{i}", address))
    return hosts


async def bounded(concurrency: int, jobs: list[Callable[[], Awaitable[None]]]) -> list[BaseException | None]:
    """Run `jobs` with at most `concurrency` at once; the exception of each (None: done)."""
    gate = asyncio.Semaphore(concurrency)
    outcomes: list[BaseException | None] = []

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            try:
                await job()
                outcomes.append(None)
            except Exception as exc:
                outcomes.append(exc)

    await asyncio.gather(*(one(j) for j in jobs))
    return outcomes


# --- the authority's processes -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Meter:
    """CPU seconds and RSS of the authority's processes (and this one) over a phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {**pids, "simulator": os.getpid()}
        self._start = self._cpu()
        self._t = time.monotonic()

    def _cpu(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                out[name] = cpu_seconds(pid)
        return out

    def read(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t
        now = self._cpu()
        out: dict[str, Any] = {}
        for name, pid in self.pids.items():
            if name in now and name in self._start:
                rss = 0.0
                with contextlib.suppress(OSError):
                    rss = rss_mb(pid)
                out[name] = {
                    "cpu_pct": round(100 * (now[name] - self._start[name]) / max(wall, 1e-9), 1),
                    "rss_mb": round(rss, 1),
                }
        return out


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Setup:
    url: str
    ca_file: str
    directory: Path
    database: str | None
    pids: dict[str, int]


@contextlib.contextmanager
def authority_setup(root: Path, replicas: int, database: str) -> Iterator[Setup]:
    from tests.authority.replicas import Replicas

    with contextlib.ExitStack() as stack:
        url: str | None = None
        if database == "postgresql":
            from tests.pgcluster import pg_cluster

            # Each replica's pool plus the simulator's own connection.
            pg = stack.enter_context(pg_cluster(max_connections=max(100, 25 * replicas + 20)))
            url = pg.url
        fleet = Replicas(root / "authority", replicas, url, serve_args=("--max-connections", "30000"))
        fleet.start()
        stack.callback(fleet.stop)
        pids = {r.name: r.pid for r in fleet.replicas}
        assert fleet.haproxy is not None
        pids["haproxy"] = fleet.haproxy.pid
        yield Setup(fleet.url, fleet.ca_file, fleet.directory, url, pids)


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


async def run(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    authority = open_authority(setup.directory, setup.database)
    n = args.hosts
    t = time.monotonic()
    secrets = [tok.secret for tok in authority.create_tokens("fleet/sim", setup.url, timedelta(hours=2), n)]
    tokens_s = time.monotonic() - t
    t = time.monotonic()
    hosts = make_hosts(secrets)
    keys_s = time.monotonic() - t
    # ~50 agents a pool: each holds up to two connections (its long poll and a report).
    client = FleetClient(setup.url, setup.ca_file, shards=max(1, n // 50), per_shard=110)
    result: dict[str, Any] = {
        "hosts": n,
        "replicas": args.replicas,
        "database": args.database,
        "heartbeat_s": args.heartbeat,
        "setup": {"tokens_s": round(tokens_s, 2), "keys_and_csrs_s": round(keys_s, 2)},
        # The machine's load when the run began (the replicas, PostgreSQL, haproxy and this
        # simulator share its cores with whatever else runs): read the rates with it.
        "loadavg_at_start": os.getloadavg(),
    }
    try:
        # 1. The enrollment storm.
        meter = Meter(setup.pids)
        t = time.monotonic()
        outcomes = await bounded(args.concurrency, [partial(client.enroll, h) for h in hosts])
        elapsed = time.monotonic() - t
        enrolled = sum(1 for o in outcomes if o is None)
        result["enroll"] = {
            "enrolled": enrolled,
            "elapsed_s": round(elapsed, 2),
            "per_s": round(enrolled / elapsed, 1),
            "concurrency": args.concurrency,
            **client.calls.summary("enroll"),
            "resources": meter.read(),
        }
        print(f"enroll: {result['enroll']}", flush=True)

        # 2. The directory at N hosts: size, time (one client, one at a time).
        sample = hosts[0]
        times = []
        size = 0
        for _ in range(10):
            t = time.monotonic()
            response = await client.host_config(
                SimHost(-1, "", sample.key, "", "", "", api_token=sample.api_token)
            )
            times.append(time.monotonic() - t)
            size = len(response.content)
        doc_bytes = response.content
        render_times = []
        record = authority.authenticate(sample.api_token)
        for _ in range(10):
            t = time.perf_counter()
            authority.render_host_config(record)
            render_times.append(time.perf_counter() - t)
        result["host_config"] = {
            "bytes": size,
            "fetch_median_ms": round(percentile(times, 50) * 1000, 1),
            "render_in_process_median_ms": round(percentile(render_times, 50) * 1000, 1),
        }
        print(f"host_config: {result['host_config']}", flush=True)

        # 3. The fleet in steady state: every agent holds a long poll and reports every interval.
        stop = asyncio.Event()
        victim = hosts[-1]
        victim_entry = f'"{victim.address}/32"'.encode()
        assert victim_entry in doc_bytes
        seen_without: dict[int, float] = {}
        revoked_at: list[float] = []
        all_told = asyncio.Event()
        primed = 0

        async def prime(host: SimHost) -> None:
            nonlocal primed
            await client.host_config(host)
            primed += 1

        # The first fetch of each agent's whole directory, a few at a time: agents fetch it once
        # enrolled, spread over the enrollments; all at once would measure a restart storm.
        t = time.monotonic()
        polling = hosts if args.long_polls else []
        outcomes = await bounded(args.prime_concurrency, [partial(prime, h) for h in polling])
        assert all(o is None or isinstance(o, Refused) for o in outcomes), outcomes

        async def agent(host: SimHost) -> None:
            await asyncio.sleep(random.uniform(0, args.heartbeat))
            beat = asyncio.create_task(heartbeats(host))
            try:
                if not args.long_polls:
                    await stop.wait()  # reports only
                while not stop.is_set():
                    response = await client.host_config(host, wait_s=LONG_POLL_S)
                    if response.status_code == 403:
                        return  # the revoked host: told so
                    told = response.status_code == 200 and revoked_at and host.index not in seen_without
                    if told and victim_entry not in response.content:
                        seen_without[host.index] = time.monotonic()
                        if len(seen_without) == n - 1:
                            all_told.set()
            except Refused:
                return
            finally:
                beat.cancel()

        async def heartbeats(host: SimHost) -> None:
            while True:
                with contextlib.suppress(Refused):
                    await client.report(host, args.heartbeat)
                await asyncio.sleep(args.heartbeat)

        result["prime"] = {
            "primed": primed,
            "elapsed_s": round(time.monotonic() - t, 1),
            "concurrency": args.prime_concurrency,
        }
        print(f"prime: {result['prime']}", flush=True)
        agents = [asyncio.create_task(agent(h)) for h in hosts]
        await asyncio.sleep(args.heartbeat)  # every agent started: its poll parked, its first report sent
        client.calls.latency.pop("heartbeat", None)
        client.calls.latency.pop("long_poll", None)
        meter = Meter(setup.pids)
        t = time.monotonic()
        await asyncio.sleep(args.steady)
        elapsed = time.monotonic() - t
        beats = client.calls.summary("heartbeat")
        result["steady"] = {
            "seconds": round(elapsed, 1),
            "heartbeats_per_s": round(beats["count"] / elapsed, 1),
            "heartbeat": beats,
            "long_poll_answers": client.calls.summary("long_poll")["count"],
            "resources": meter.read(),
        }
        print(f"steady: {result['steady']}", flush=True)

        # 4. Renewals while the fleet polls and reports.
        renewing = random.sample(hosts[:-1], min(args.renewals, n - 1))
        meter = Meter(setup.pids)
        t = time.monotonic()
        outcomes = await bounded(args.concurrency, [partial(client.renew, h) for h in renewing])
        elapsed = time.monotonic() - t
        renewed = sum(1 for o in outcomes if o is None)
        result["renew"] = {
            "renewed": renewed,
            "elapsed_s": round(elapsed, 2),
            "per_s": round(renewed / elapsed, 1),
            **client.calls.summary("renew"),
            "heartbeat_during": client.calls.summary("heartbeat"),
            "resources": meter.read(),
        }
        print(f"renew: {result['renew']}", flush=True)

        # 5. Revocation: until every other agent's long poll returned a directory without it.
        await asyncio.sleep(2)  # let the renewals' wake-ups settle
        meter = Meter(setup.pids)
        revoked_at.append(time.monotonic())
        if not args.long_polls:
            all_told.set()  # nobody polls: nothing to time
        await asyncio.to_thread(authority.registry.revoke, victim.host_id, datetime.now(UTC))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_told.wait(), args.revoke_timeout)
        delays = sorted(v - revoked_at[0] for v in seen_without.values())
        result["revoke"] = {
            "agents_told": len(seen_without),
            "agents": n - 1,
            "all_within_s": round(delays[-1], 2) if len(delays) == n - 1 else None,
            "p50_s": round(percentile(delays, 50), 2),
            "p99_s": round(percentile(delays, 99), 2),
            "resources": meter.read(),
        }
        print(f"revoke: {result['revoke']}", flush=True)
        stop.set()
        for a in agents:
            a.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
    finally:
        await client.aclose()
    result["calls"] = {kind: client.calls.summary(kind) for kind in client.calls.latency}
    result["retries"] = dict(client.calls.retries)
    result["failures"] = dict(client.calls.failures)
    return result


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
    cpu = sum(v["cpu_pct"] for k, v in used if k not in ("simulator", "haproxy"))
    rss = sum(v["rss_mb"] for k, v in used if k not in ("simulator", "haproxy"))
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
    parser.add_argument("--workdir", help="a new directory to run in and keep (default: a temp dir, removed)")
    parser.add_argument(
        "--render-cost",
        action="store_true",
        help="only measure one directory's render at --hosts (in process)",
    )
    args = parser.parse_args()
    if args.render_cost:
        cost = render_cost(args.hosts, args.database)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"render-{args.database}-n{args.hosts}.json").write_text(json.dumps(cost, indent=2) + "\n")
        print(json.dumps(cost))
        return

    # Two descriptors per agent here and in haproxy, one per connection in each replica.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 4 * args.hosts + 4096) if os.geteuid() == 0 else hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))

    with contextlib.ExitStack() as stack:
        if args.workdir:  # kept: the replicas' and haproxy's logs
            root = Path(args.workdir)
            root.mkdir(parents=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshagent-fleet-")))
        with authority_setup(root, args.replicas, args.database) as setup:
            result = asyncio.run(run(args, setup))
    RESULTS.mkdir(exist_ok=True)
    name = f"fleet-{args.database}-r{args.replicas}-n{args.hosts}"
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
