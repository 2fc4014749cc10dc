"""A DNS client for the netns test: sends raw query bytes and prints the raw answer as hex.

    python dns_client.py udp|tcp SERVER PORT QUERY_HEX [MARK]   -> answer hex, or TIMEOUT
    python dns_client.py flood SERVER PORT COUNT NAME_SUFFIX     -> how many answers came back
Each UDP query uses a fresh socket (a new source port), as glibc does. MARK sets SO_MARK (the
agent's own mark) so the query skips the redirect: the "direct" path to the upstream."""

from __future__ import annotations

import socket
import struct
import sys
import time

sys.path.insert(0, sys.argv[0].rsplit("/tests/", 1)[0])
from agent.dns.message import encode_query


def exchange(mode: str, server: str, port: int, query: bytes, mark: int) -> bytes | None:
    kind = socket.SOCK_DGRAM if mode == "udp" else socket.SOCK_STREAM
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.settimeout(3.0)
        try:
            sock.connect((server, port))
            if mode == "udp":
                sock.send(query)
                return sock.recv(65535)
            sock.sendall(struct.pack("!H", len(query)) + query)
            head = sock.recv(2, socket.MSG_WAITALL)
            return sock.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
        except (TimeoutError, OSError, struct.error):
            return None


def flood(server: str, port: int, count: int, suffix: str) -> int:
    """Send `count` queries from one socket in batches of 50 (so the listener's receive buffer,
    not the stub, is never what drops them); answers are not waited for."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((server, port))
        for i in range(count):
            sock.send(encode_query(f"q{i}.{suffix}", 1, ident=i & 0xFFFF))
            if i % 50 == 49:
                time.sleep(0.005)
    return count


if __name__ == "__main__":
    mode, server, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "flood":
        print(flood(server, port, int(sys.argv[4]), sys.argv[5]))
    else:
        answer = exchange(
            mode, server, port, bytes.fromhex(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0
        )
        print("TIMEOUT" if answer is None else answer.hex())
