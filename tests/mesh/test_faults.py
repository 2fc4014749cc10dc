"""Faults against a real agent in a namespace: floods that must leave it small and serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.mesh.conftest import PY, Mesh, wait_for

pytestmark = pytest.mark.netns

# Rounds of N connections from `cl` to b's captured port 8080, each sending one TLS ClientHello
# for b's own name (so b's proxy terminates it) and then nothing; a round ends when every
# connection got the server's first flight or 1.5 s passed, then its connections close.
SILENT_CLIENT_HELLOS = """
import resource, selectors, socket, ssl, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, sni, rounds, per = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
answered = 0
for _ in range(rounds):
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(per):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(hello)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    waiting, deadline = len(socks), time.monotonic() + 1.5
    while waiting and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            sel.unregister(key.fileobj)
            waiting -= 1
            answered += 1
    for s in socks:
        s.close()
    sel.close()
print(answered, flush=True)
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def status(mesh: Mesh) -> Any:
    return json.loads(mesh.cl.run("curl", "-sS", "--max-time", "5", "http://198.18.2.2:4191/status").stdout)


def test_silent_client_hellos_leave_the_agent_small(mesh: Mesh) -> None:
    """8,000 silent ClientHellos, 1,000 at a time (issue #15: the agent stayed at 140-186 MB).
    At most proxy.max_handshakes (128) handshakes hold TLS state at once, a failed one frees
    it at once, and the memory task gives the peak back: under 80 MB at the peak, under idle
    + 20 MB once settled."""
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.2.2"])
    b.start()
    assert b.proc is not None
    pid = b.proc.pid
    idle = rss_mb(pid)
    sni = "legacy.shop.serviceaccount.identity.linkerd.cluster.local"
    flood = mesh.cl.run(PY, "-c", SILENT_CLIENT_HELLOS, "198.18.2.2", "8080", sni, "8", "1000", timeout=120)
    peak = rss_mb(pid)
    answered = int(flood.stdout.strip())
    shakes = status(mesh)["handshakes"]
    print(f"idle {idle:.1f} MB, after the flood {peak:.1f} MB, {answered} answered, {shakes}")
    assert peak < 80, f"{peak:.0f} MB after the flood (idle {idle:.0f} MB)"
    assert shakes["limit"] == 128 and shakes["queued"] > 0
    assert answered <= 8 * 128 * 2  # a slot frees early only when its client leaves
    wait_for(lambda: status(mesh)["memory"]["trims"] >= 1, "memory given back", b, 15)
    settled = rss_mb(pid)
    print(f"settled {settled:.1f} MB", status(mesh)["memory"])
    assert settled < idle + 20
    assert "memory.returned" in b.log.read_text()
    assert "Traceback" not in b.log.read_text()
