"""New TCP connections at a steady rate until a stop file appears; one line each way per connection.

    churn.py 198.18.3.2 8080 /tmp/stop [--rate 1000] [--in-flight 200]
                                        [--marker PLAINTEXT-WITNESS]

Each connection sends `GET /<marker> HTTP/1.0` and reads the status line back, then closes
(so a capture of the wire finds the marker in every request that crossed it in clear). Runs
until the stop file exists and prints one JSON line: {"ok": n, "refused": n, "error": n,
"seconds": s}. Stdlib only (asyncio), a bounded number of connections in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter


async def once(host: str, port: int, line: bytes, counts: Counter[str], slots: asyncio.Semaphore) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
        try:
            writer.write(line)
            await writer.drain()
            got = await asyncio.wait_for(reader.readline(), 3)
            counts["ok" if got else "error"] += 1
        finally:
            writer.close()
    except ConnectionRefusedError:
        counts["refused"] += 1
    except (TimeoutError, OSError):
        counts["error"] += 1
    finally:
        slots.release()


async def main(host: str, port: int, stop: str, rate: float, in_flight: int, line: bytes) -> dict[str, float]:
    counts: Counter[str] = Counter()
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    sent = 0
    print("started", flush=True)
    while not os.path.exists(stop):  # noqa: ASYNC240 - one stat per tick, cheap
        due = int((time.monotonic() - start) * rate) - sent
        for _ in range(max(0, due)):
            if slots.locked():
                counts["skipped"] += 1  # too many in flight: count it, never queue unboundedly
            else:
                await slots.acquire()
                task = asyncio.create_task(once(host, port, line, counts, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks, return_exceptions=True)
    return {**counts, "seconds": round(time.monotonic() - start, 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("stop")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--marker", default="PLAINTEXT-WITNESS")
    args = parser.parse_args()
    request = f"GET /{args.marker} HTTP/1.0\r\n\r\n".encode()
    result = asyncio.run(main(args.host, args.port, args.stop, args.rate, args.in_flight, request))
    print(json.dumps(result), flush=True)
