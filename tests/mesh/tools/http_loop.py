"""A bounded client load: one HTTP/1.0 request per new connection every INTERVAL seconds for
DURATION seconds; prints one line per request: `<unix time> ok|err <detail>`.

    python http_loop.py HOST PORT DURATION [INTERVAL] [TIMEOUT]
"""

from __future__ import annotations

import socket
import sys
import time


def once(host: str, port: int, timeout: float) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = data.split(b"\r\n", 1)[0]
    return "ok 200" if b" 200 " in status else f"err status={status!r}"


def main() -> None:
    host, port, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.05
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 2.0
    end = time.time() + duration
    while time.time() < end:
        started = time.time()
        try:
            result = once(host, port, timeout)
        except OSError as exc:
            result = f"err {exc.__class__.__name__}"
        print(f"{started:.3f} {result}", flush=True)
        time.sleep(max(0.0, interval - (time.time() - started)))


if __name__ == "__main__":
    main()
