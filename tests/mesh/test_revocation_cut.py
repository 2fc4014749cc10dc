"""Revocation cuts live connections, for real: `meshagent authority revoke a` while connections
are open A -> B and B -> A (and C <-> B, which must stay). B's agent learns it from its long
poll of the directory (refresh interval 30 s here: only the long poll can bring it within 5 s),
closes both, counts and logs them; new connections either way are refused; A's own agent is
told it is revoked.

    cl (authority; forwards between its links)
     |-- 198.18.1.0/24 -- a   (shop/a: the host revoked)
     |-- 198.18.2.0/24 -- b   (shop/b)
     `-- 198.18.3.0/24 -- c   (shop/c: the control)

Each host runs an echo app on port 7000 and its agent (`meshagent run`, interception on).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.netlab import Host, Lab, netns_supported
from tests.mesh.conftest import Agent, Mesh, serve_authority, stop_agents, wait_for
from tests.support import MESHAGENT, metric_sum

pytestmark = pytest.mark.netns

APP_PORT = 7000
CUT_WITHIN_S = 5.0
A_NAME = "a.shop.serviceaccount.identity.linkerd.cluster.local"

ECHO = f"""
import socketserver
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(4096):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", {APP_PORT}), Echo).serve_forever()
"""

# A client: one echo ("up"), then (hold) a ping every 50 ms until the connection ends, when it
# prints "closed" and the time; a failure to connect or echo prints "failed".
CLIENT = """
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def end(what):
    print(what, repr(time.time()), flush=True)
    sys.exit(0)
try:
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"ping")
    if s.recv(16) != b"ping":
        end("failed")
except OSError:
    end("failed")
print("up", flush=True)
if mode == "once":
    sys.exit(0)
s.settimeout(None)
while True:
    try:
        s.sendall(b"ping")
        if not s.recv(16):
            end("closed")
    except OSError:
        end("closed")
    time.sleep(0.05)
"""

UP = f"import socket, sys; socket.create_connection((sys.argv[1], {APP_PORT}), timeout=1).close()"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Mesh]:
    reason = netns_supported()
    if reason:
        pytest.skip(reason)
    with Lab("rv") as lab:
        cl, a, b, c = lab.host("cl"), lab.host("a"), lab.host("b"), lab.host("c")
        for n, host in enumerate((a, b, c), start=1):
            lab.link(cl, host)
            host.run("ip", "route", "add", "default", "via", f"198.18.{n}.1")
        cl.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        mesh = Mesh(lab, tmp_path, cl, a, b)
        sans = [arg for n in (1, 2, 3) for arg in ("--san", f"198.18.{n}.1")]
        cl.run(
            *MESHAGENT,
            "authority",
            "init",
            "--dir",
            str(mesh.authority_dir),
            "--trust-domain",
            "cluster.local",
            *sans,
        )
        serve_authority(mesh, tmp_path)
        try:
            yield mesh
        finally:
            stop_agents(mesh)
            lab.close()


class Client:
    """A CLIENT process in `host`, its output in a file."""

    def __init__(self, tmp: Path, host: Host, mode: str, to: Host, name: str) -> None:
        self.out = tmp / f"client-{name}.out"
        self.name = name
        with open(self.out, "w") as out:
            self.proc = host.popen(sys.executable, "-c", CLIENT, mode, to.ip4, str(APP_PORT), stdout=out)

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait(self, word: str) -> list[str]:
        wait_for(lambda: any(line.startswith(word) for line in self.lines()), f"{self.name}: {word}")
        return self.lines()

    def ended(self) -> str:
        """'up', 'failed' or 'closed <time>': how a one-shot client ended."""
        self.proc.wait(timeout=15)
        return self.lines()[-1]


def _cached(agent: Agent) -> str:
    """The agent's cached directory document ("" until its first fetch is written)."""
    try:
        return (agent.state / "host-config.json").read_text()
    except FileNotFoundError:
        return ""


def _metrics(host: Host) -> str:
    return host.run("curl", "-sf", "http://127.0.0.1:4191/metrics").stdout


def _status(host: Host) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(host.run("curl", "-sf", "http://127.0.0.1:4191/status").stdout)
    return doc


def _find(doc: Any, key: str) -> Any:
    """The first value under `key` anywhere in a JSON document."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        doc = list(doc.values())
    if isinstance(doc, list):
        for item in doc:
            found = _find(item, key)
            if found is not None:
                return found
    return None


def test_revoking_a_host_cuts_its_connections_both_ways_within_5s(hub: Mesh, tmp_path: Path) -> None:
    mesh, cl = hub, hub.cl
    a, b = mesh.a, mesh.b
    c = mesh.lab.hosts[3]
    for host in (a, b, c):
        host.popen(sys.executable, "-c", ECHO)
    for host in (a, b, c):  # (before the agents: nothing intercepted yet)
        wait_for(lambda h=host: h.run(sys.executable, "-c", UP, h.ip4, check=False).returncode == 0, "app")
    agents = {}
    for host in (a, b, c):
        agent = mesh.enroll(host, f"shop/{host.name}", host.addr4[0].rsplit(".", 1)[0] + ".1", [host.ip4])
        # The default refresh interval (30 s): a change must come by the long poll, not a poll.
        agent.config.write_text(
            agent.config.read_text().replace("refresh_interval_s = 1.0", "refresh_interval_s = 30.0")
        )
        assert "refresh_interval_s = 30.0" in agent.config.read_text()
        agents[host.name] = agent
    for agent in agents.values():
        agent.start()
    for host, others in ((a, "bc"), (b, "ac"), (c, "ab")):
        wait_for(
            lambda h=host, o=others: all(
                f"198.18.{'abc'.index(x) + 1}.2/32" in _cached(agents[h.name]) for x in o
            ),
            f"{host.name}'s catalog",
            agents[host.name],
        )

    held = {
        "a->b": Client(tmp_path, a, "hold", b, "a-b"),
        "b->a": Client(tmp_path, b, "hold", a, "b-a"),
        "c->b": Client(tmp_path, c, "hold", b, "c-b"),
        "b->c": Client(tmp_path, b, "hold", c, "b-c"),
    }
    for client in held.values():
        assert client.wait("up")[0] == "up", client.lines()
    # Every one of them is mTLS through both agents.
    assert metric_sum(_metrics(b), "tcp_open_connections", 'direction="inbound"', 'tls="true"') >= 2

    started = time.time()
    cl.run(*MESHAGENT, "authority", "revoke", "a", "--dir", str(mesh.authority_dir))
    returned = time.time()  # the registry write is done: what is left is the agents' part
    cut = {}
    for name in ("a->b", "b->a"):
        line = held[name].wait("closed")[-1]
        cut[name] = float(line.split()[1]) - started
    print(
        f"revocation cut: {', '.join(f'{k} after {v:.2f} s' for k, v in cut.items())} from the start of "
        f"`authority revoke` (which returned after {returned - started:.2f} s)"
    )
    assert all(t < CUT_WITHIN_S for t in cut.values()), cut

    # New connections either way are refused; C and B still talk, the held ones stay up.
    assert Client(tmp_path, a, "once", b, "a-b-new").ended().startswith("failed")
    assert Client(tmp_path, b, "once", a, "b-a-new").ended().startswith("failed")
    assert Client(tmp_path, c, "once", b, "c-b-new").ended() == "up"
    assert Client(tmp_path, b, "once", c, "b-c-new").ended() == "up"
    for name in ("c->b", "b->c"):
        assert held[name].proc.poll() is None and held[name].lines() == ["up"], (name, held[name].lines())

    # B counted and logged each: the two closes and the two refusals.
    metrics = _metrics(b)
    for direction in ("inbound", "outbound"):
        refused = metric_sum(
            metrics,
            "meshagent_connections_refused_total",
            f'direction="{direction}"',
            'reason="peer_revoked"',
        )
        assert refused >= 1, (direction, metrics)
    refused_status = _find(_status(b), "refused")
    assert refused_status.get("inbound:revoked_closed") == 1, refused_status
    assert refused_status.get("outbound:revoked_closed") == 1, refused_status
    for direction in ("inbound", "outbound"):
        assert (
            metric_sum(metrics, "meshagent_revoked_connections_closed_total", f'direction="{direction}"') == 1
        )
    log = agents["b"].log.read_text()
    closed = [line for line in log.splitlines() if "connection.revoked" in line and "action=closed" in line]
    assert {("direction=inbound" in line) for line in closed} == {True, False}, closed
    assert all(A_NAME in line for line in closed), closed
    assert "action=refused" in log
    # C's agent cut nothing: it had no connection with A.
    assert "action=closed" not in agents["c"].log.read_text()

    # A is told: its long poll is refused as revoked.
    wait_for(lambda: "identity.revoked" in agents["a"].log.read_text(), "a: identity.revoked", agents["a"])
    assert _find(_status(a), "revoked")
