"""The fleet simulator spread over processes: each shard plays every K-th agent on its own
asyncio loop with its own httpx pools, driven phase by phase by bench/fleet.py.

One Python process cannot be 10,000 agents (measured: at ~1,000 reports a second it is the
limit, at 83 % of a core, not the authority), so `ShardPool` starts K processes (spawned:
they inherit none of the parent's database connections or threads) and asks all of them the
same command over a pipe, in lockstep: make your hosts, enroll them, prime, start the agents,
give me your window's samples, renew these, watch for the revocation... Each reply carries
raw latency samples (`Calls`), so the merged p99 is the p99 of every sample, not an average of
p99s. Times that cross processes (a revocation's delay) are CLOCK_MONOTONIC, which Linux keeps
one for the whole machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import httpx

from agent.identity import delta as wire
from bench.fleet_agents import (
    LONG_POLL_S,
    Calls,
    FleetClient,
    Refused,
    SimHost,
    bounded,
    make_hosts,
    raise_file_limit,
)
from bench.fleet_directory import Directories, Gunzip, Held
from bench.fleet_reaper import die_with_parent


@dataclass
class AgentSettings:
    url: str
    ca_file: str
    heartbeat_s: float
    long_polls: bool
    victim_entry: bytes  # the catalog entry of the host that will be revoked
    procs: int  # shards: this one holds every procs-th host


@dataclass
class Shard:
    """One process's agents (host indices `index`, `index + K`, ...) and their tasks."""

    settings: AgentSettings
    hosts: list[SimHost] = field(default_factory=list)
    client: FleetClient | None = None
    agents: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    revoked_at: float | None = None
    seen_without: dict[int, float] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)  # long polls' answers by status
    directories: Directories = field(init=False)
    held: dict[int, Held] = field(default_factory=dict)
    gunzip: Gunzip = field(default_factory=Gunzip)

    def __post_init__(self) -> None:
        self.directories = Directories(self.settings.victim_entry)

    @property
    def api(self) -> FleetClient:
        assert self.client is not None
        return self.client

    # --- commands (each returns its reply) ---------------------------------------------------

    async def make(self, indices: list[int], secrets: list[str]) -> dict[str, Any]:
        t = time.monotonic()
        self.hosts = make_hosts(secrets, indices)
        # A pool per agent, of two connections: its long poll's and its reports' (as the
        # agent's client keeps them), so the authority holds as many connections as a real fleet.
        self.client = FleetClient(
            self.settings.url,
            self.settings.ca_file,
            shards=len(self.hosts),
            per_shard=2,
            stride=self.settings.procs,
        )
        return {"keys_s": time.monotonic() - t}

    async def enroll(self, concurrency: int) -> dict[str, Any]:
        t = time.monotonic()
        outcomes = await bounded(concurrency, [partial(self.api.enroll, h) for h in self.hosts])
        return {
            "elapsed_s": time.monotonic() - t,
            "enrolled": sum(1 for o in outcomes if o is None),
            "calls": self.api.calls.take(),
            "ids": {h.index: (h.host_id, h.api_token) for h in self.hosts},
        }

    async def fetch_sample(self, index: int, rounds: int) -> dict[str, Any]:
        """One host's whole directory `rounds` times, one at a time: its size and fetch time."""
        host = next(h for h in self.hosts if h.index == index)
        times, body = [], b""
        for _ in range(rounds):
            t = time.monotonic()
            response = await self.api.host_config(
                SimHost(-1, "", host.key, "", "", "", api_token=host.api_token)
            )
            times.append(time.monotonic() - t)
            body = response.content
        self.api.calls.take()
        return {"times": times, "body": body}

    async def prime(self, concurrency: int) -> dict[str, Any]:
        """Start the agents: each fetches its whole directory (`concurrency` at a time) and
        from then on reports and long polls, as a fleet that comes up does. All at once, the
        agents' thousands of new connections overflowed the accept queues (SYNs dropped,
        connect timeouts, retries: a storm of the simulator's own making); started after a
        slow prime, their connections had gone idle past the client's keep-alive. Without
        long polls an agent's first report is what the gate lets through (10,000 agents'
        first reports at once: 9,200 connect timeouts in a 10,000-host run, no report
        answered)."""
        gate = asyncio.Semaphore(concurrency)
        fetched = [0, 0]  # done, refused
        all_fetched = asyncio.Event()
        starting = len(self.hosts)

        async def first_fetch(host: SimHost) -> None:
            async with gate:
                try:
                    if self.settings.long_polls:
                        await self._fetch(host)
                    else:
                        await self.api.report(host, self.settings.heartbeat_s)
                except Refused:
                    fetched[1] += 1
                fetched[0] += 1
                if fetched[0] == starting:
                    all_fetched.set()

        self.agents = [asyncio.create_task(self._agent(h, first_fetch)) for h in self.hosts]
        if starting:
            await all_fetched.wait()
        return {
            "primed": starting - fetched[1],
            "calls": self.api.calls.take(),
            "gunzip_reused": self.gunzip.reused,
            **self.directories.parsed,
        }

    async def _fetch(self, host: SimHost) -> None:
        """The whole document (no If-None-Match, no A-IM), as an agent's first fetch."""
        held = self.held.setdefault(host.index, Held())
        raw = [b""]

        async def get(c: httpx.AsyncClient) -> httpx.Response:
            # The body as sent (gzip), inflated here reusing the shared pieces (Gunzip).
            response = await c.send(
                c.build_request("GET", "/v1/host/config", headers=self._auth(host)), stream=True
            )
            try:
                raw[0] = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
            return response

        response = await self.api.call("host_config", host, get)
        if response.status_code == 200:
            body = raw[0]
            if response.headers.get("content-encoding") == "gzip":
                body = self.gunzip.decode(body)
            version = response.headers.get(wire.VERSION_HEADER, "")
            self.directories.full(held, body, response.headers.get("etag", ""), version)

    def _auth(self, host: SimHost) -> dict[str, str]:
        return {"authorization": f"Bearer {host.api_token}"}

    async def _long_poll(self, host: SimHost) -> int:
        """One long poll as the agent makes it (agent/identity/client.py): its ETag, and a
        delta asked for from the version it holds. The answer's status."""
        held = self.held.setdefault(host.index, Held())
        headers = self._auth(host)
        if held.etag:
            headers["if-none-match"] = held.etag
        if wire.is_version(held.version):
            headers["a-im"] = wire.DELTA_IM
            headers[wire.BASE_HEADER] = held.version
        path = f"/v1/host/config?wait={LONG_POLL_S}"
        response = await self.api.call("long_poll", host, lambda c: c.get(path, headers=headers))
        status = response.status_code
        self.answers[str(status)] += 1
        if status == 226:
            if not self.directories.apply(held, response.content, response.headers.get("etag", "")):
                self.answers["delta_rejected"] += 1
                await self._fetch(host)
        elif status == 200:
            version = response.headers.get(wire.VERSION_HEADER, "")
            self.directories.full(held, response.content, response.headers.get("etag", ""), version)
        return status

    async def window(self) -> dict[str, Any]:
        """The samples since the last window (the first one: since the agents started)."""
        answers, self.answers = self.answers, Counter()
        answers["delta_rejected"] = self.directories.rejected
        return {"calls": self.api.calls.take(), "long_poll_answers": dict(answers)}

    async def renew(self, indices: list[int], concurrency: int) -> dict[str, Any]:
        renewing = [h for h in self.hosts if h.index in set(indices)]
        t = time.monotonic()
        outcomes = await bounded(concurrency, [partial(self.api.renew, h) for h in renewing])
        return {
            "elapsed_s": time.monotonic() - t,
            "renewed": sum(1 for o in outcomes if o is None),
            "calls": self.api.calls.take(),
        }

    async def watch(self, revoked_at: float) -> dict[str, Any]:
        self.revoked_at = revoked_at
        return {}

    async def told(self, deadline: float, victim: int) -> dict[str, Any]:
        """Until every agent of this shard but the victim saw a directory without it (or the
        deadline, CLOCK_MONOTONIC): each one's delay since the revocation."""
        expected = sum(1 for h in self.hosts if h.index != victim)
        while len(self.seen_without) < expected and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # (a poll of a counter: the agents' hot path stays a dict write)
        assert self.revoked_at is not None
        return {"delays": [t - self.revoked_at for t in self.seen_without.values()], "expected": expected}

    async def finish(self) -> dict[str, Any]:
        self.stop.set()
        for task in self.agents:
            task.cancel()
        await asyncio.gather(*self.agents, return_exceptions=True)
        calls = self.api.calls.take()
        await self.api.aclose()
        return {"calls": calls}

    # --- an agent ------------------------------------------------------------------------------

    async def _agent(self, host: SimHost, first_fetch: Callable[[SimHost], Awaitable[None]]) -> None:
        await first_fetch(host)
        beat = asyncio.create_task(self._heartbeats(host, reported=not self.settings.long_polls))
        try:
            if not self.settings.long_polls:
                await self.stop.wait()  # reports only
            while not self.stop.is_set():
                status = await self._long_poll(host)
                if status == 403:
                    return  # the revoked host: told so
                told = status in (200, 226) and self.revoked_at is not None
                told = told and host.index not in self.seen_without
                if told and not self.directories.names_victim(self.held[host.index]):
                    self.seen_without[host.index] = time.monotonic()
        except Refused:
            return
        finally:
            beat.cancel()

    async def _heartbeats(self, host: SimHost, reported: bool) -> None:
        if reported:  # (the first report was the agent's start)
            await asyncio.sleep(self.settings.heartbeat_s)
        while True:
            with contextlib.suppress(Refused):
                await self.api.report(host, self.settings.heartbeat_s)
            await asyncio.sleep(self.settings.heartbeat_s)


async def _serve(conn: Connection, settings: AgentSettings) -> None:
    shard = Shard(settings)
    while True:
        command, kwargs = await asyncio.to_thread(conn.recv)
        try:
            reply = await getattr(shard, command)(**kwargs)
        except Exception as exc:  # reported to the parent, which stops the run
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("ok", reply))
        if command == "finish":
            return


def shard_main(conn: Connection, settings: AgentSettings) -> None:
    """A shard process's entry point."""
    die_with_parent(signal.SIGKILL)  # the run killed -9: nothing of ours to flush here
    raise_file_limit(20_000)
    # Thousands of agents' clients and a parsed 10,000-host catalog per version are millions of
    # objects that live for the whole run: the cyclic GC walking them again and again was a
    # third of a shard's CPU (perf), and the prime crawled at ~5 fetches a second. Collections
    # rarely, and what exists after each interned version is frozen (Directories).
    gc.set_threshold(200_000, 50, 1000)
    asyncio.run(_serve(conn, settings))


class ShardError(Exception):
    pass


class ShardPool:
    """K shard processes; `ask` sends one command to each (its own arguments) and returns
    every reply, in shard order."""

    def __init__(self, procs: int, settings: AgentSettings) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=shard_main, args=(child, settings), name=f"fleet-shard-{i}", daemon=True
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> dict[str, int]:
        return {f"shard{i}": p.pid for i, p in enumerate(self.procs) if p.pid is not None}

    def ask(self, command: str, per_shard: list[dict[str, Any]] | None = None, **same: Any) -> list[Any]:
        for i, conn in enumerate(self.conns):
            conn.send((command, {**same, **(per_shard[i] if per_shard else {})}))
        replies = []
        for i, conn in enumerate(self.conns):
            status, reply = conn.recv()
            if status != "ok":
                raise ShardError(f"shard {i}: {command}: {reply}")
            replies.append(reply)
        return replies

    def ask_one(self, shard: int, command: str, **kwargs: Any) -> Any:
        self.conns[shard].send((command, kwargs))
        status, reply = self.conns[shard].recv()
        if status != "ok":
            raise ShardError(f"shard {shard}: {command}: {reply}")
        return reply

    def close(self, finished: bool = True) -> None:
        """Wait for the shards (they exit after "finish"); a run that did not finish (an error,
        a signal) stops them at once: they are mid-command and read no more."""
        for proc in self.procs:
            if not finished:
                proc.terminate()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


@contextlib.contextmanager
def shard_pool(procs: int, settings: AgentSettings) -> Iterator[ShardPool]:
    pool = ShardPool(procs, settings)
    finished = False
    try:
        yield pool
        finished = True
    finally:
        pool.close(finished)


def merged(replies: list[dict[str, Any]]) -> Calls:
    calls = Calls()
    for reply in replies:
        calls.merge(reply["calls"])
    return calls


def split(items: list[Any], parts: int) -> list[list[Any]]:
    """Item i goes to part i % parts (the shards' hosts: every K-th)."""
    return [items[i::parts] for i in range(parts)]
