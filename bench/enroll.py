"""Benchmark: enrollments per second the authority sustains, and `meshagent enroll` latency.

    .venv/bin/python -m bench.enroll [--enrollments 2000] [--concurrency 64] [--workers 1] [--cli-runs 20]

Everything runs on this machine on loopback: one `meshagent authority serve` process (plus its
workers) and this client, which pre-makes keys and CSRs so that the measured rate is the
authority's (TLS, CSR checks, signing, one SQLite transaction per host). The second part times
the whole `meshagent enroll` command, as an operator runs it, from start to stored identity.
Results print as a table and go to bench/results/enroll.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from agent.authority.service import Authority
from agent.identity.pki import generate_key, make_csr
from tests.support import MESHAGENT, running_authority

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _request(host: str, body: bytes) -> bytes:
    head = (
        f"POST /v1/enroll HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def fire(
    url: str, ca_file: str, secrets: list[str], csrs: list[str], concurrency: int
) -> tuple[float, int]:
    """Send every enrollment over `concurrency` keep-alive TLS connections; (seconds, failures).

    A deliberately small HTTP/1.1 client: the requests are pre-encoded so the client's own CPU
    (which shares this machine's two cores with the authority) stays far below the server's.
    """
    host_port = url.removeprefix("https://")
    host, port = host_port.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca_file)
    requests = [
        _request(
            host_port,
            json.dumps({"token_secret": s, "csr": c, "host_name": f"bench-{i}", "addresses": []}).encode(),
        )
        for i, (s, c) in enumerate(zip(secrets, csrs, strict=True))
    ]
    queue = iter(requests)
    failures = 0

    async def connection() -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        for request in queue:
            writer.write(request)
            if await _read_response(reader) != 200:
                failures += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return time.perf_counter() - started, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--enrollments", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="authority worker processes")
    parser.add_argument("--cli-runs", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="meshagent-bench-") as tmp:
        root = Path(tmp)
        with running_authority(root / "authority", workers=args.workers) as auth:
            authority = Authority.open(auth.directory)
            tokens = authority.create_tokens("bench/host", auth.url, timedelta(hours=1), args.enrollments)
            secrets = [t.secret for t in tokens]
            csrs = [make_csr(generate_key()).decode() for _ in tokens]
            elapsed, failures = asyncio.run(fire(auth.url, auth.ca_file, secrets, csrs, args.concurrency))
            rate = (args.enrollments - failures) / elapsed

            cli_times: list[float] = []
            for i in range(args.cli_runs):
                token = auth.token("bench/cli")
                started = time.perf_counter()
                subprocess.run(
                    [*MESHAGENT, "enroll", token, "--state-dir", str(root / f"cli-{i}")],
                    check=True,
                    capture_output=True,
                )
                cli_times.append(time.perf_counter() - started)

    result = {
        "enrollments": args.enrollments,
        "concurrency": args.concurrency,
        "authority_workers": args.workers,
        "failures": failures,
        "elapsed_s": round(elapsed, 3),
        "enrollments_per_s": round(rate, 1),
        "cli_enroll_runs": args.cli_runs,
        "cli_enroll_median_s": round(statistics.median(cli_times), 3),
        "cli_enroll_p99_s": round(percentile(cli_times, 99), 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "enroll.json").write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
