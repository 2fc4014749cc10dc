"""A TCP server that tells each client who answered, and a client that asks.

    tcp_who.py serve --role inbound --listen :::4143 [--listen 0.0.0.0:22] [--transparent]
    tcp_who.py connect 198.18.1.2 8080 [--mark 0x1000000] [--sport 40000] [--timeout 10]
                       [--hold open|answered]

The server prints `ready` once every socket listens, then for each connection reads one line
and answers one JSON line: role, the socket's local and peer address, the original destination
as `agent.intercept.orig_dst` reports it, and the line it got back (so data crossed both ways).
Each connection is served in its own thread, so a client that holds a connection open
(`--hold open`: connect, print `connected`, wait for stdin to close; `--hold answered`: the same
after the exchange, once the server has closed its side) never stalls the others.
The client is stdlib-only so it runs under any uid with the system python; `--sport` binds
a fixed source port (to meet a stale conntrack entry's 4-tuple).
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import threading
from pathlib import Path
from typing import Any

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = 36


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def serve(role: str, listens: list[str], transparent: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from agent.intercept.orig_dst import original_dst

    sel = selectors.DefaultSelector()
    for item in listens:
        host, port = _split(item)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(64)
        sel.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            listener: socket.socket = key.fileobj  # type: ignore[assignment]
            conn, peer = listener.accept()
            threading.Thread(target=_answer, args=(conn, peer, role, original_dst), daemon=True).start()


def _answer(conn: socket.socket, peer: tuple[str, int], role: str, original_dst: Any) -> None:
    with conn:
        conn.settimeout(10)
        try:
            line = conn.makefile("r").readline().strip()
            orig = original_dst(conn)
            doc = {
                "role": role,
                "local": list(conn.getsockname()[:2]),
                "peer": list(peer[:2]),
                "orig_host": orig.host,
                "orig_port": orig.port,
                "via": orig.via,
                "echo": line,
            }
            conn.sendall((json.dumps(doc) + "\n").encode())
        except OSError as exc:
            print(f"connection error: {exc}", file=sys.stderr, flush=True)


def connect(host: str, port: int, mark: int | None, sport: int, timeout: float, hold: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if sport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            if hold == "open":
                print("connected", flush=True)
                sys.stdin.read()
                return 0
            sock.sendall(b"hello\n")
            reply = sock.makefile("r").readline()
            if hold == "answered":  # the server has closed its side; ours stays open
                print("connected", flush=True)
                sys.stdin.read()
                return 0
        except OSError as exc:
            print(json.dumps({"error": str(exc)}))
            return 1
    print(reply.strip())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--role", required=True)
    s.add_argument("--listen", action="append", required=True)
    s.add_argument("--transparent", action="store_true")
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--mark", type=lambda v: int(v, 0))
    c.add_argument("--sport", type=int, default=0)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--hold", choices=["open", "answered"], default="")
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.role, args.listen, args.transparent)
        return 0
    return connect(args.host, args.port, args.mark, args.sport, args.timeout, args.hold)


if __name__ == "__main__":
    sys.exit(main())
