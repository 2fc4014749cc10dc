"""The service catalog test's client: COUNT GETs at RPS, one connection each, counted by outcome.

    python -m tests.mesh.tools.catalog_client HOST PORT COUNT RPS [--tls CERT KEY CA SERVER_NAME]

Prints one JSON line: {"sent": N, "ok": N, "failed": N, "errors": N} (failed: an HTTP 5xx;
errors: no answer at all). With --tls it is an in-cluster stand-in calling a meshed host:
mTLS with a pod certificate, the server checked against CA and SERVER_NAME.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import time


def _get(
    host: str, port: int, request: bytes, context: ssl.SSLContext | None, server_name: str | None
) -> int:
    """One request on a new connection; the answer's status code."""
    with socket.create_connection((host, port), timeout=5) as raw:
        # SNI and the name checked: the destination's identity, not its address
        sock = context.wrap_socket(raw, server_hostname=server_name) if context else raw
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("rps", type=float)
    parser.add_argument("--tls", nargs=4, metavar=("CERT", "KEY", "CA", "SERVER_NAME"))
    args = parser.parse_args()
    context, server_name = None, None
    if args.tls:
        cert, key, ca, server_name = args.tls
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(cert, key)
    request = f"GET / HTTP/1.1\r\nHost: {args.host}\r\nConnection: close\r\n\r\n".encode()
    counts = {"sent": 0, "ok": 0, "failed": 0, "errors": 0}
    start = time.monotonic()
    for n in range(args.count):
        time.sleep(max(0.0, start + n / args.rps - time.monotonic()))
        counts["sent"] += 1
        try:
            status = _get(args.host, args.port, request, context, server_name)
        except (OSError, ValueError):
            counts["errors"] += 1
            continue
        counts["ok" if status < 500 else "failed"] += 1
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
