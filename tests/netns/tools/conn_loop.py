"""Open connection after connection to a tcp_who server and count who answered.

    conn_loop.py 198.18.1.2 8080 /tmp/stop

Runs until the stop file exists, then prints one JSON line: {role: count, ..., "refused": n,
"error": n}. Each connection sends a line and reads the server's JSON answer (tcp_who.py), so a
connection counts only once data crossed both ways. Stdlib only.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter


def once(host: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))
            sock.sendall(b"hello\n")
            line = sock.makefile("r").readline()
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return "error"
    try:
        return str(json.loads(line)["role"])
    except (ValueError, KeyError):
        return "error"


def main() -> int:
    host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    counts: Counter[str] = Counter()
    print("started", flush=True)
    while not os.path.exists(stop):
        counts[once(host, port)] += 1
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
