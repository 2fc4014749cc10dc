"""gRPC load for the traffic-policy proofs: COUNT unary calls of /demo.Echo/Who on ONE channel
(one HTTP/2 connection), CONCURRENCY in flight; prints one JSON document:

    {"sent": n, "names": {"b1": n, ...}, "codes": {"OK": n, "UNAVAILABLE": n, ...}}

    python -m tests.mesh.tools.policy_grpc HOST PORT COUNT [CONCURRENCY] [TIMEOUT]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc


def main() -> None:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 10.0
    names: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        who = channel.unary_unary("/demo.Echo/Who")

        def call(_: int) -> tuple[str, str]:
            try:
                return "OK", who(b"", timeout=timeout).decode()
            except grpc.RpcError as exc:
                return exc.code().name, ""

        with ThreadPoolExecutor(concurrency) as pool:
            for code, name in pool.map(call, range(count)):
                codes[code] += 1
                if name:
                    names[name] += 1
    print(json.dumps({"sent": count, "names": dict(names), "codes": dict(codes)}), flush=True)


if __name__ == "__main__":
    main()
