"""Benchmark: enrollments per second ONE authority replica sustains (SQLite or PostgreSQL).

    .venv/bin/python -m bench.enroll_replica --database postgresql --enrollments 3000 --procs 2
    .venv/bin/python -m bench.enroll_replica --database sqlite --keep-alive

One `meshagent authority serve` replica (tests/authority/replicas.py, one uvicorn worker) on its
own address, on a throwaway PostgreSQL cluster (tests/pgcluster.py) or its directory's SQLite
file. The load comes from `--procs` other processes, each an asyncio loop with `--concurrency`
raw HTTP/1.1 clients; keys, CSRs, tokens and request bytes are made before the clock starts, so
a client's work per enrollment is a TLS handshake and a few socket calls. By default each
enrollment opens its own TLS connection (a host enrolls once: what a fleet costs the replica);
`--keep-alive` reuses connections (the API's cost without handshakes).

Reported: enrollments/s over the whole run, latency p50/p99, the replica's and the load
generator's CPU (% of one core: the replica is one process, so 100 % is its ceiling), the load
average at start. A JSON line goes to bench/results/enroll-replica.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).parent / "results"


def _request(host: str, body: bytes) -> bytes:
    head = (
        f"POST /v1/enroll HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def _drive(
    url: str, ca_file: str, requests: list[bytes], concurrency: int, keep_alive: bool
) -> dict[str, Any]:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    from tests.authority.replicas import client_context

    ctx = client_context(ca_file)  # (the API's certificate names 127.0.0.1, not the replica's .2)
    queue = iter(requests)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def client() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for request in queue:
            started = time.perf_counter()
            if conn is None:
                conn = await asyncio.open_connection(host, int(port), ssl=ctx)
            reader, writer = conn
            writer.write(request)
            status = await _response(reader)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            if not keep_alive:
                writer.close()
                conn = None
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"latencies": latencies, "statuses": statuses}


def _child(args: tuple[str, str, list[bytes], int, bool, Any, Any]) -> None:
    url, ca_file, requests, concurrency, keep_alive, start, out = args
    start.wait()
    started = time.process_time()
    result = asyncio.run(_drive(url, ca_file, requests, concurrency, keep_alive))
    result["cpu_s"] = time.process_time() - started
    out.put(result)


@contextlib.contextmanager
def _database(kind: str) -> Iterator[str | None]:
    if kind == "sqlite":
        yield None
        return
    from tests.pgcluster import pg_cluster

    with pg_cluster() as pg:
        yield pg.url


def _cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of the replica and its uvicorn workers (with --workers, the children work)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else 0.0


def run(
    database: str,
    enrollments: int,
    procs: int,
    concurrency: int,
    keep_alive: bool,
    profile: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    from agent.authority.service import Authority
    from agent.identity.pki import generate_key, make_csr
    from tests.authority.replicas import Replicas

    load = os.getloadavg()[0]
    with _database(database) as url, tempfile.TemporaryDirectory(prefix="meshagent-bench-") as tmp:
        fleet = Replicas(Path(tmp) / "authority", 1, url, workers=workers)
        with fleet:
            replica = fleet.replicas[0]
            authority = Authority.open(fleet.directory, url)
            tokens = authority.create_tokens("bench/host", replica.url, timedelta(hours=1), enrollments)
            authority.registry.close()
            hostport = replica.url.removeprefix("https://")
            requests = [
                _request(
                    hostport,
                    json.dumps(
                        {
                            "token_secret": t.secret,
                            "csr": make_csr(generate_key()).decode(),
                            "host_name": f"bench-{i}",
                            "addresses": [f"198.18.{i // 250}.{i % 250 + 1}"],
                        }
                    ).encode(),
                )
                for i, t in enumerate(tokens)
            ]
            ctx = mp.get_context("fork")
            start, out = ctx.Event(), ctx.Queue()
            children = [
                ctx.Process(
                    target=_child,
                    args=(
                        (replica.url, fleet.ca_file, requests[i::procs], concurrency, keep_alive, start, out),
                    ),
                )
                for i in range(procs)
            ]
            for child in children:
                child.start()
            server = psutil.Process(replica.pid)
            spy = None
            if profile:  # py-spy (not a project dependency: pip install py-spy to use this)
                spy = subprocess.Popen(
                    ["py-spy", "record", "-p", str(replica.pid), "-o", profile, "-f", "raw", "-r", "200"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
            server_cpu = _cpu_s(server)
            began = time.perf_counter()
            start.set()
            results = [out.get() for _ in children]
            elapsed = time.perf_counter() - began
            spent = _cpu_s(server)
            for child in children:
                child.join()
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
    latencies = [x for r in results for x in r["latencies"]]
    statuses: dict[str, int] = {}
    for r in results:
        for status, n in r["statuses"].items():
            statuses[str(status)] = statuses.get(str(status), 0) + n
    ok = statuses.get("200", 0)
    return {
        "database": database,
        "enrollments": enrollments,
        "procs": procs,
        "concurrency_per_proc": concurrency,
        "keep_alive": keep_alive,
        "replica_workers": workers,
        "statuses": statuses,
        "elapsed_s": round(elapsed, 2),
        "enrollments_per_s": round(ok / elapsed, 1),
        "p50_ms": round(_percentile(latencies, 50) * 1e3, 1),
        "p99_ms": round(_percentile(latencies, 99) * 1e3, 1),
        "replica_cpu_pct": round(100 * (spent - server_cpu) / elapsed, 1),
        "loadgen_cpu_pct": round(100 * sum(r["cpu_s"] for r in results) / elapsed, 1),
        "loadavg_at_start": round(load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--enrollments", type=int, default=3000)
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--concurrency", type=int, default=16, help="clients per process")
    parser.add_argument("--keep-alive", action="store_true", help="reuse connections (no handshake each)")
    parser.add_argument(
        "--py-spy", metavar="FILE", help="record the replica with py-spy (raw stacks) into FILE"
    )
    parser.add_argument("--workers", type=int, default=1, help="the replica's uvicorn worker processes")
    args = parser.parse_args()
    result = run(
        args.database,
        args.enrollments,
        args.procs,
        args.concurrency,
        args.keep_alive,
        profile=args.py_spy,
        workers=args.workers,
    )
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "enroll-replica.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
