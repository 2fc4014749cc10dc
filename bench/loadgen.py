"""Two small HTTP/1.1 clients for bench.dataplane, run inside a benchmark namespace.

    python -m bench.loadgen rate HOST PORT PATH --rate 1000 --duration 10 --connections 10
    python -m bench.loadgen hold HOST PORT PATH --connections 1000 [--max-hold 300]

`rate` is an open-loop, constant-rate client in the manner of wrk2: each keep-alive connection
owns an evenly spaced share of the schedule (request i of the whole run is due at t0 + i/rate).
A request whose connection is free at its due time is sent then, and its latency runs from the
send (timer jitter of this client is not the server's fault); a request that finds its
connection still waiting for the previous response is sent when that response arrives, and its
latency runs from its *due* time, so a stall of the server shows up in the percentiles instead of
silently lowering the rate (the "coordinated omission" correction). Prints one JSON object.

`hold` opens N keep-alive connections, completes one request on each (so every hop is
established), prints one JSON line, and keeps them open until stdin closes (or --max-hold).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import deque
from typing import Any, cast

_END = b"\r\n\r\n"


def percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Http(asyncio.Protocol):
    """One keep-alive connection; one request in flight; responses need Content-Length."""

    def __init__(self, request: bytes, on_response: Any, on_lost: Any) -> None:
        self.request = request
        self.on_response = on_response
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # total bytes of the response being read, once its head is complete
        self.status = 0
        self.busy = False
        self.start = 0.0
        self.pending: deque[float] = deque()  # due times of requests waiting for this connection
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, start: float) -> None:
        assert self.transport is not None
        self.busy, self.start = True, start
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need < 0:
                end = self.buffer.find(_END)
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).split(b"\r\n")
                self.status = int(head[0].split(b" ", 2)[1])
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.need = end + len(_END) + length
            if len(self.buffer) < self.need:
                return
            del self.buffer[: self.need]
            self.need = -1
            self.busy = False
            self.on_response(self, time.perf_counter())

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.on_lost(self)


def _request(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: meshagent-bench\r\n\r\n".encode()


async def _connect_all(
    host: str, port: int, n: int, request: bytes, on_response: Any, on_lost: Any
) -> list[Http]:
    loop = asyncio.get_running_loop()
    conns: list[Http] = []
    batch = 100  # a few at a time: the proxies' accept queues are not what is measured
    for first in range(0, n, batch):
        made = await asyncio.gather(
            *(
                loop.create_connection(lambda: Http(request, on_response, on_lost), host, port)
                for _ in range(first, min(n, first + batch))
            ),
            return_exceptions=True,
        )
        for item in made:
            if isinstance(item, BaseException):
                raise SystemExit(f"connect {host}:{port}: {item}")
            conns.append(cast(Http, item[1]))
    return conns


async def _warm(conns: list[Http], limit_s: float) -> int:
    """One request per connection, all at once; returns how many got a 200."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    remaining = len(conns)
    ok = 0

    def finished(conn: Http, _now: float) -> None:
        nonlocal remaining, ok
        ok += conn.status == 200
        remaining -= 1
        if remaining == 0 and not done.done():
            done.set_result(None)

    for conn in conns:
        conn.on_response = finished
        conn.send(time.perf_counter())
    with contextlib.suppress(TimeoutError):  # the caller reports how many answered
        await asyncio.wait_for(done, limit_s)
    return ok


async def rate_run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = _request(args.host, args.port, args.path)
    latencies: list[float] = []
    late: list[float] = []  # how late this client's timer fired (its own jitter)
    counts = {"sent": 0, "completed": 0, "non_200": 0, "lost": 0, "queued": 0}
    outstanding = 0
    all_done: asyncio.Future[None] | None = None
    measuring = [True]

    def on_lost(conn: Http) -> None:
        nonlocal outstanding
        counts["lost"] += 1
        if conn.busy:
            outstanding -= 1
        outstanding -= len(conn.pending)
        conn.pending.clear()
        if all_done is not None and outstanding <= 0 and not all_done.done():
            all_done.set_result(None)

    def on_response(conn: Http, now: float) -> None:
        nonlocal outstanding
        outstanding -= 1
        counts["completed"] += 1
        if conn.status != 200:
            counts["non_200"] += 1
        latencies.append(now - conn.start)
        if conn.pending:
            conn.send(conn.pending.popleft())  # latency from its due time
        elif all_done is not None and outstanding <= 0 and not all_done.done():
            all_done.set_result(None)

    conns = await _connect_all(args.host, args.port, args.connections, request, on_response, on_lost)
    warm = await _warm(conns, 30)
    if warm != len(conns):
        raise SystemExit(f"warm-up: {warm}/{len(conns)} connections answered 200")
    for conn in conns:
        conn.on_response = on_response

    interval = 1.0 / args.rate
    total = int(args.rate * args.duration)
    t0_perf = time.perf_counter() + 0.05
    t0_loop = loop.time() + 0.05

    def due(conn: Http, i: int) -> None:
        nonlocal outstanding
        if not measuring[0] or conn.lost:
            return
        now = time.perf_counter()
        at = t0_perf + i * interval
        late.append(max(0.0, now - at))
        nxt = i + len(conns)
        if nxt < total:
            loop.call_at(t0_loop + nxt * interval, due, conn, nxt)
        counts["sent"] += 1
        outstanding += 1
        if conn.busy:
            counts["queued"] += 1
            conn.pending.append(at)
        else:
            conn.send(now)

    for k, conn in enumerate(conns[:total]):
        loop.call_at(t0_loop + k * interval, due, conn, k)
    await asyncio.sleep(args.duration + 0.1)
    all_done = loop.create_future()
    if outstanding > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_done, 10)
    measuring[0] = False
    unfinished = max(0, outstanding)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()

    ordered = sorted(latencies)
    late.sort()
    ms = 1000.0
    return {
        "rate": args.rate,
        "connections": args.connections,
        "duration_s": args.duration,
        **counts,
        "unfinished": unfinished,
        "achieved_rps": round(counts["completed"] / args.duration, 1),
        "p50_ms": round(percentile(ordered, 50) * ms, 3),
        "p90_ms": round(percentile(ordered, 90) * ms, 3),
        "p99_ms": round(percentile(ordered, 99) * ms, 3),
        "p999_ms": round(percentile(ordered, 99.9) * ms, 3),
        "max_ms": round((ordered[-1] if ordered else float("nan")) * ms, 3),
        "client_timer_late_p99_ms": round(percentile(late, 99) * ms, 3),
    }


async def hold_run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    request = _request(args.host, args.port, args.path)
    lost = [0]

    def on_lost(_conn: Http) -> None:
        lost[0] += 1

    conns = await _connect_all(args.host, args.port, args.connections, request, lambda c, t: None, on_lost)
    ok = await _warm(conns, 60)
    print(json.dumps({"open": len(conns) - lost[0], "ok": ok}), flush=True)
    # Hold until the parent closes our stdin (or the bound runs out).
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.read(), args.max_hold)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("rate", "hold"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("path")
        p.add_argument("--connections", type=int, default=10 if name == "rate" else 1000)
        if name == "rate":
            p.add_argument("--rate", type=float, default=1000)
            p.add_argument("--duration", type=float, default=10)
        else:
            p.add_argument("--max-hold", type=float, default=300)
    args = parser.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.mode == "rate":
        print(json.dumps(runner(rate_run(args))))
    else:
        runner(hold_run(args))


if __name__ == "__main__":
    main()
