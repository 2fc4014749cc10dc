"""The fleet simulator's agents: their hosts (a key and CSR each) and their HTTP side.

`FleetClient` makes the calls an agent makes (enroll, report, renew, fetch or long poll its
directory), retried as an agent behind a load balancer must, and keeps each call's latency as
raw samples (`Calls`): a simulator spread over processes merges them exactly (bench/fleet.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from agent.identity.pki import PrivateKey, generate_key, make_csr, sign_possession

# httpcore imports sniffio on every request to learn the event loop; without sniffio installed
# each attempt searches sys.path again (a third of the simulator's CPU in a profile). A None
# entry makes the failed import instant, and httpcore then assumes asyncio, which is right.
with contextlib.suppress(ImportError):
    import sniffio  # type: ignore[import-not-found]  # noqa: F401
if "sniffio" not in sys.modules:
    sys.modules["sniffio"] = None  # type: ignore[assignment]
LONG_POLL_S = 30
KEEPALIVE_S = 60
RETRY_STATUSES = {502, 503, 504}
# An agent enrolls and renews from a short-lived process (agent/identity): its connection ends
# with it. Kept alive here, 10,000 enrollments' idle connections filled haproxy's maxconn (9,900
# under this machine's fixed file limit of 20,000) and enrollment crawled at the rate idle
# connections timed out (~51/s): the simulator's artefact, not the authority's.
ONE_SHOT = {"connection": "close"}


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

    def take(self) -> Calls:
        """What was counted since the last take (and start afresh): a shard's window."""
        taken = Calls(self.latency, self.failures, self.retries)
        self.latency, self.failures, self.retries = {}, Counter(), Counter()
        return taken

    def merge(self, other: Calls) -> None:
        """Add `other`'s samples: exact, as the raw latencies are kept (not their p99s)."""
        for kind, values in other.latency.items():
            self.latency.setdefault(kind, []).extend(values)
        self.failures.update(other.failures)
        self.retries.update(other.retries)

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
        self,
        url: str,
        ca_file: str,
        shards: int = 1,
        per_shard: int = 200,
        deadline_s: float = 60,
        stride: int = 1,
    ) -> None:
        """`shards` pools of `per_shard` connections; host i uses pool (i // stride) % shards
        (a fleet shard process holds every stride-th host: one pool per agent)."""
        self.url = url
        self.calls = Calls()
        self.deadline_s = deadline_s
        self.stride = stride
        ctx = tls_context(ca_file)
        # httpx's pool scans its connections on every request: many small pools, not one of 10,000.
        self._clients = [
            httpx.AsyncClient(
                base_url=url,
                verify=ctx,
                timeout=httpx.Timeout(10.0, read=LONG_POLL_S + 15),
                # An idle connection kept 60 s, as the agent's client (identity/client.py): under
                # the authority's idle timeout, so a request never races the server's close.
                limits=httpx.Limits(
                    max_connections=per_shard,
                    max_keepalive_connections=per_shard,
                    keepalive_expiry=KEEPALIVE_S,
                ),
            )
            for _ in range(shards)
        ]

    def client(self, host: SimHost) -> httpx.AsyncClient:
        return self._clients[(host.index // self.stride) % len(self._clients)]

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
            return await c.post("/v1/enroll", json=body, headers=ONE_SHOT)

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
        response = await self.call("renew", host, lambda c: c.post("/v1/renew", json=body, headers=ONE_SHOT))
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


def make_hosts(secrets: list[str], indices: list[int] | None = None) -> list[SimHost]:
    """A host (its key, CSR, name and address) per join token; `indices`: their numbers in the
    whole fleet (default 0, 1, ...), which name them and pick their addresses."""
    hosts = []
    for i, secret in zip(indices if indices is not None else range(len(secrets)), secrets, strict=True):
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


def raise_file_limit(want: int) -> None:
    """Up to `want` descriptors (one a connection) where root may raise the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, want) if os.geteuid() == 0 else hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
