"""Keep-alive HTTP/1.1 load for the traffic-policy proofs: CONCURRENCY connections, each sending
requests back to back (or paced to RATE requests/s in total) on one kept-alive connection until
COUNT requests were sent or DURATION seconds passed. A connection the far side closed is
reopened (counted in `reconnects`). Prints one JSON document:

    {"sent": n, "statuses": {"200": n, ...}, "bodies": {"b1": n, ...}, "errors": {"...": n},
     "reconnects": n, "seq": [[t, status, body, elapsed], ...]}   (seq: with --seq, in send order)

    python -m tests.mesh.tools.policy_load HOST PORT PATH [--count N] [--duration S]
        [--concurrency C] [--rate R] [--method GET] [--seq] [--timeout S]
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from collections import Counter
from typing import Any


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.sent = 0
        self.statuses: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.reconnects = 0
        self.seq: list[list[Any]] = []
        self.start = time.monotonic()
        self.end = self.start + args.duration if args.duration else None

    def take(self) -> int | None:
        """The next request's number, or None when done."""
        with self.lock:
            if self.args.count and self.sent >= self.args.count:
                return None
            if self.end is not None and time.monotonic() >= self.end:
                return None
            self.sent += 1
            return self.sent

    def worker(self) -> None:
        a = self.args
        conn: http.client.HTTPConnection | None = None
        while (n := self.take()) is not None:
            if a.rate:
                wait = self.start + n / a.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            if conn is None:
                conn = http.client.HTTPConnection(a.host, a.port, timeout=a.timeout)
            t0 = time.monotonic()
            body = b"x" * 16 if a.method in ("POST", "PUT") else None
            try:
                conn.request(a.method, a.path, body=body)
                response = conn.getresponse()
                data = response.read().decode(errors="replace").strip()
                status = str(response.status)
                if response.will_close:
                    conn.close()
                    conn = None
                    with self.lock:
                        self.reconnects += 1
            except (OSError, http.client.HTTPException) as exc:
                status, data = "error", type(exc).__name__
                conn.close()
                conn = None
                with self.lock:
                    self.errors[data] += 1
            elapsed = time.monotonic() - t0
            with self.lock:
                self.statuses[status] += 1
                if status == "200":
                    self.bodies[data] += 1
                if a.seq:
                    self.seq.append([round(t0 - self.start, 4), status, data, round(elapsed, 4)])
        if conn is not None:
            conn.close()

    def run(self) -> dict[str, Any]:
        threads = [threading.Thread(target=self.worker) for _ in range(self.args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out: dict[str, Any] = {
            "sent": self.sent,
            "statuses": dict(self.statuses),
            "bodies": dict(self.bodies),
            "errors": dict(self.errors),
            "reconnects": self.reconnects,
            "seconds": round(time.monotonic() - self.start, 3),
        }
        if self.args.seq:
            out["seq"] = sorted(self.seq)
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--method", default="GET")
    p.add_argument("--seq", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)
    print(json.dumps(Load(p.parse_args()).run()), flush=True)


if __name__ == "__main__":
    main()
