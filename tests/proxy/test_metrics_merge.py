"""One /metrics over many workers (issue #19): the merge is exact, and merged counters never go
down when a worker forgets an idle series or dies. Plus the async admin handler and the process
tree's memory and CPU."""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import random
import re
import signal
from typing import Any

import pytest

from agent.telemetry import metrics as m
from agent.telemetry.admin import AdminLimits, Reply, start_admin
from agent.telemetry.merge import MetricsMerger
from agent.telemetry.metrics import join, labels
from agent.telemetry.process import render_process, tree_memory
from agent.telemetry.proxy_metrics import ProxyMetrics
from agent.telemetry.stat import StatWindow

_SAMPLE = re.compile(r"^(\S+?)(\{.*\})? (\S+)$")


def samples(lines: Any) -> dict[str, float]:
    """Exposition lines -> {name{labels}: value}, comments left out."""
    out: dict[str, float] = {}
    for line in lines:
        if line.startswith("#") or not line:
            continue
        match = _SAMPLE.match(line)
        assert match, line
        out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def expiry_free(d: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in d.items() if "cert_expiration" not in k}


class Leg:
    """An open connection's leg, as the relay exposes it to a scrape."""

    accounting: Any = None

    def __init__(self, metrics: Any, rx: int, tx: int) -> None:
        self.metrics, self.rx, self.tx = metrics, rx, tx


PEERS = [f"spiffe://td/ns/ns{i}/sa/app" for i in range(4)]


def traffic(rng: random.Random, into: list[ProxyMetrics], n: int) -> list[tuple[ProxyMetrics, Leg]]:
    """`n` random connections, each recorded identically in every ProxyMetrics of `into`; some
    stay open (returned as live legs). Statuses, latencies, bytes, errnos and peers vary."""
    open_legs: list[tuple[ProxyMetrics, Leg]] = []
    for _ in range(n):
        direction = rng.choice(["inbound", "outbound"])
        peer = rng.choice(PEERS)
        base = labels(("direction", direction), ("peer", "src"), ("tls", "true"), ("client_id", peer))
        rx, tx = rng.randrange(10_000), rng.randrange(10_000)
        errno = rng.choice(["", "", "ECONNRESET"])
        keep_open = rng.random() < 0.2
        exchanges = [
            (rng.choice([200, 200, 204, 404, 503, 0]), rng.random() * rng.choice([0.001, 0.05, 3.0]))
            for _ in range(rng.randrange(4))
        ]
        duration = rng.random()
        denied = rng.random() < 0.1
        for pm in into:
            conn = pm.connection(base)
            http = pm.http(join(base, labels(("authority", "x"))), labels(("authz_name", peer)))
            for status, latency in exchanges:
                http.exchange(b"GET", status, latency)
            if denied:
                pm.authz_deny.child(base).value += 1
            if direction == "inbound":
                pm.tls_resumed.child(labels(("direction", direction))).value += 1
            if keep_open:
                open_legs.append((pm, Leg(conn, rx, tx)))
            else:
                conn.opened_at -= duration
                conn.closed(rx, tx, errno)
    return open_legs


def assert_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        # float sums of connection durations are added in another order: equal up to rounding
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-9), key


def test_merged_render_equals_sum_of_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m.time, "monotonic", lambda: 1000.0)  # connection durations: exact
    rng = random.Random(19)
    w0, w1, both = ProxyMetrics(), ProxyMetrics(), ProxyMetrics()
    first, second = traffic(rng, [w0, both], 300), traffic(rng, [w1, both], 200)
    legs0 = [leg for pm, leg in first if pm is w0]
    legs1 = [leg for pm, leg in second if pm is w1]
    legs_both = [leg for pm, leg in first + second if pm is both]

    target = ProxyMetrics()
    merger = MetricsMerger(target)
    # Through pickle, as the control channel carries it.
    merger.update(0, pickle.loads(pickle.dumps(w0.dump(legs0), protocol=5)))  # noqa: S301
    merger.update(1, pickle.loads(pickle.dumps(w1.dump(legs1), protocol=5)))  # noqa: S301

    merged = expiry_free(samples(target.render(())))
    one = samples(merger.render_worker(0) or ())
    two = samples(merger.render_worker(1) or ())
    # Every counter, gauge, bucket, sum and count of the merge is w0 + w1 ...
    summed = {k: one.get(k, 0.0) + two.get(k, 0.0) for k in set(one) | set(two)}
    assert_equal(merged, expiry_free(summed))
    # ... and equals one process that saw all the traffic (open legs' live bytes included).
    assert_equal(merged, expiry_free(samples(both.render(legs_both))))
    assert any(k.startswith("tcp_open_connections") and v > 0 for k, v in merged.items())
    assert merged['meshagent_tls_resumed_total{direction="inbound"}'] > 0
    assert merger.render_worker(7) is None


def test_live_bytes_of_open_connections_are_in_the_merge() -> None:
    w0, w1 = ProxyMetrics(), ProxyMetrics()
    base = labels(("direction", "inbound"), ("peer", "src"))
    c0, c1 = w0.connection(base), w1.connection(base)
    c1.closed(5, 6, "")
    target = ProxyMetrics()
    merger = MetricsMerger(target)
    merger.update(0, w0.dump([Leg(c0, 100, 40)]))
    merger.update(1, w1.dump([]))
    got = samples(target.render(()))
    assert got[f"tcp_read_bytes_total{{{base}}}"] == 105
    assert got[f"tcp_write_bytes_total{{{base}}}"] == 46
    assert got[f"tcp_open_connections{{{base}}}"] == 1
    assert got[f"tcp_open_total{{{base}}}"] == 2
    # The open connection closes with more bytes: settled, the merge only grows.
    c0.closed(150, 60, "")
    merger.update(0, w0.dump([]))
    got = samples(target.render(()))
    assert got[f"tcp_read_bytes_total{{{base}}}"] == 155
    assert got[f"tcp_open_connections{{{base}}}"] == 0


def test_worker_gone_keeps_counters_drops_gauges() -> None:
    rng = random.Random(7)
    w0, w1 = ProxyMetrics(), ProxyMetrics()
    legs0 = [leg for _, leg in traffic(rng, [w0], 200)]
    legs1 = [leg for _, leg in traffic(rng, [w1], 200)]
    assert legs0 and legs1
    target = ProxyMetrics()
    merger = MetricsMerger(target)
    merger.update(0, w0.dump(legs0))
    merger.update(1, w1.dump(legs1))
    before = samples(target.render(()))
    only1 = samples(w1.render(legs1))

    merger.worker_gone(0)  # killed: its open connections are gone with it
    after = samples(target.render(()))
    for key, value in before.items():
        if key.startswith("tcp_open_connections"):
            assert after.get(key, 0.0) == only1.get(key, 0.0), key
        elif "cert_expiration" not in key:
            assert after[key] == pytest.approx(value), key  # counters, buckets, sums: kept
    assert sum(v for k, v in after.items() if k.startswith("tcp_open_connections")) == sum(
        v for k, v in only1.items() if k.startswith("tcp_open_connections")
    )

    # Its replacement starts from zero in the same slot: the merge adds, never restarts.
    fresh = ProxyMetrics()
    base = labels(("direction", "inbound"), ("peer", "src"))
    fresh.connection(base).closed(1, 1, "")
    merger.update(0, fresh.dump([]))
    again = samples(target.render(()))
    key = f"tcp_open_total{{{base}}}"
    assert again[key] == before.get(key, 0.0) + 1
    for k, value in before.items():
        if k.endswith("_total") or "_total{" in k:
            assert again.get(k, 0.0) >= value, k


def test_idle_drop_in_a_worker_never_lowers_a_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(m.time, "monotonic", lambda: now[0])
    w0, w1 = ProxyMetrics(), ProxyMetrics()
    target = ProxyMetrics()
    stat = StatWindow(target, clock=lambda: now[0])  # the supervisor's, built before the merger
    merger = MetricsMerger(target)
    base = labels(("direction", "inbound"), ("tls", "true"), ("client_id", PEERS[0]))
    key = f"request_total{{{base}}}"

    def requests(worker: ProxyMetrics, n: int) -> None:
        http = worker.http(base)
        for _ in range(n):
            http.exchange(b"GET", 200, 0.002)

    def scrape() -> dict[str, float]:
        merger.update(0, w0.dump([]))
        merger.update(1, w1.dump([]))
        return samples(target.render(()))

    requests(w0, 3)
    requests(w1, 1)
    assert scrape()[key] == 4

    # Ten minutes with no request on worker 0 (worker 1 still busy): worker 0's sweep drops the
    # series and says so; the merge keeps its 3.
    now[0] += 700
    requests(w1, 1)
    dump = w0.dump([])
    assert [s[0] for s in dump["request_total"]["dropped"]] == [base]
    assert not dump["request_total"]["samples"]
    merger.update(0, dump)
    merger.update(1, w1.dump([]))
    assert samples(target.render(()))[key] == 5

    # The peer comes back to worker 0: a new child there starts at 0; the merge goes on.
    requests(w0, 2)
    assert scrape()[key] == 7

    # A drop whose dump the supervisor never saw (a late reply), the series re-created at 1,
    # below the last value seen (2): that last value retires, and the merge still only grows.
    now[0] += 700
    requests(w1, 1)
    w0.dump([])  # lost
    requests(w0, 1)
    got = scrape()
    assert got[key] == 9
    assert stat.query(3600)[0]["requests"] == 9

    # Nobody reports it any more, for ten minutes: the supervisor drops it, retired count and
    # all (memory stays bounded); StatWindow, whose on_drop the merger chained, keeps its total.
    now[0] += 700
    scrape()  # the workers drop it
    now[0] += 700
    got = scrape()
    assert key not in got
    assert base not in merger.retired["request_total"]
    assert stat.retired.success[("inbound", PEERS[0])] == 9


def test_async_admin_handler() -> None:
    async def main() -> None:
        release = asyncio.Event()
        hung_cancelled = asyncio.Event()

        async def slow(_q: dict[str, list[str]]) -> Reply:
            await release.wait()
            return Reply(200, b"merged\n")

        async def broken(_q: dict[str, list[str]]) -> Reply:
            raise RuntimeError("worker pull failed")

        async def hung(_q: dict[str, list[str]]) -> Reply:
            try:
                await asyncio.Event().wait()
            finally:
                hung_cancelled.set()
            return Reply(200, b"never\n")

        routes: dict[str, Any] = {
            "/sync": lambda _q: Reply(200, b"sync\n"),
            "/slow": slow,
            "/broken": broken,
            "/hung": hung,
        }
        admin = await start_admin("127.0.0.1", 0, routes, AdminLimits(max_connections=10, timeout_s=0.5))
        port = admin.server.sockets[0].getsockname()[1]

        async def get(path: str, method: str = "GET") -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            return data

        assert (await get("/sync")).endswith(b"\r\n\r\nsync\n")
        pending = asyncio.ensure_future(get("/slow"))
        await asyncio.sleep(0)
        other = await get("/sync")  # the loop is not blocked while /slow waits
        assert other.endswith(b"sync\n")
        assert not pending.done()
        release.set()
        reply = await pending
        assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"\r\n\r\nmerged\n")
        head = await get("/slow", "HEAD")
        assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
        assert (await get("/broken")).startswith(b"HTTP/1.1 500")
        # A handler that never answers: the connection's timeout closes it and cancels the wait.
        assert await get("/hung") == b""
        await asyncio.wait_for(hung_cancelled.wait(), 5)
        assert admin.stats()["timed_out"] == 1 and admin.stats()["open"] == 0
        admin.close()

    asyncio.run(main())


def test_process_tree_memory_and_cpu() -> None:
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker stand-in: shares the parent's pages, touches 8 MB of its own
        own = bytearray(8 << 20)
        for i in range(0, len(own), 4096):
            own[i] = 1
        os.write(ready_w, b"x")
        signal.pause()
        os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        mine = tree_memory([os.getpid()])
        tree = tree_memory([os.getpid(), pid])
        assert tree.rss - mine.rss > 8 << 20
        assert 0 < tree.pss < tree.rss  # shared pages counted once in PSS, twice in RSS
        assert tree_memory([pid, 2**22 + 12345]).rss == tree_memory([pid]).rss  # a gone pid counts 0
        got = samples(render_process([pid], dead_cpu_s=1000.0))
        assert got["process_cpu_seconds_total"] >= 1000.0
        alone = samples(render_process())
        assert got["process_open_fds"] > alone["process_open_fds"]
        assert (
            got['meshagent_memory_bytes{kind="pss_total"}'] < got['meshagent_memory_bytes{kind="rss_total"}']
        )
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
