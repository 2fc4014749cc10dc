"""A Service's cluster IP, for real: a host's agent captures a connection to an address nothing
routes, picks one of the Service's ready endpoints and speaks mTLS to that endpoint's own identity.

    cl (authority; forwards between its links, knows no route to 198.19/16)
     |-- 198.18.1.0/24 -- c   (meshed client: curl)
     |-- 198.18.2.0/24 -- p1  ("pod" orders-1: an enrolled agent, an app that answers its name)
     `-- 198.18.3.0/24 -- p2  ("pod" orders-2)

The authority here serves the `services` of its document from a file: a stand-in for the
controller's discovery, which needs a Kubernetes API server (none can run on these machines).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.netlab import Host, Lab, netns_supported
from tests.mesh.conftest import AUTH_PORT, Mesh, wait_for
from tests.support import MESHAGENT, metric_sum

pytestmark = pytest.mark.netns

CLUSTER_IP, EMPTY_IP = "198.19.0.10", "198.19.0.11"
P1, P2 = "198.18.2.2", "198.18.3.2"
TD = "cluster.local"
CLIENT = "client.shop.serviceaccount.identity.linkerd.cluster.local"
CALLS = 100

# `authority serve` with the discovered services read from a file on every request, handed to
# the authority through the entry point discovery uses (set_discovered).
AUTHORITY = f"""
import json, sys
from pathlib import Path
from agent.authority import server
from agent.authority.service import Authority

directory, services = Path(sys.argv[1]), Path(sys.argv[2])
render = Authority.render_host_config

def with_services(self, host, *args, **kwargs):
    self.set_discovered(json.loads(services.read_text()))  # unchanged content: no wake-up
    return render(self, host, *args, **kwargs)

Authority.render_host_config = with_services
server.serve(directory, "0.0.0.0:{AUTH_PORT}")
"""

# A "pod"'s app: answers every GET with its own name.
APP = """
import http.server, sys
name = sys.argv[1].encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(name)))
        self.end_headers()
        self.wfile.write(name)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def _endpoint(address: str, sa: str) -> dict[str, Any]:
    return {
        "address": address,
        "ports": {"80": 8080},
        "identity": f"spiffe://{TD}/ns/shop/sa/{sa}",
        "server_name": f"{sa}.shop.serviceaccount.identity.linkerd.{TD}",
        "proxy_port": 4143,
        "source": f"pod:shop/{sa}",
    }


def _services(*endpoints: dict[str, Any]) -> list[dict[str, Any]]:
    port = [{"port": 80, "name": "http", "protocol": "TCP", "opaque": False}]
    return [
        {
            "name": "orders",
            "namespace": "shop",
            "cluster_ips": [CLUSTER_IP],
            "ports": port,
            "endpoints": list(endpoints),
        },
        {"name": "empty", "namespace": "shop", "cluster_ips": [EMPTY_IP], "ports": port, "endpoints": []},
    ]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Mesh, Host, Path]]:
    reason = netns_supported()
    if reason:
        pytest.skip(reason)
    with Lab("cs") as lab:
        cl, c, p1, p2 = lab.host("cl"), lab.host("c"), lab.host("p1"), lab.host("p2")
        for n, host in enumerate((c, p1, p2), start=1):
            lab.link(cl, host)
            host.run("ip", "route", "add", "default", "via", f"198.18.{n}.1")
        cl.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        mesh = Mesh(lab, tmp_path, cl, c, p1)
        sans = [arg for n in (1, 2, 3) for arg in ("--san", f"198.18.{n}.1")]
        cl.run(*MESHAGENT, "authority", "init", "--dir", str(mesh.authority_dir), "--trust-domain", TD, *sans)
        services = tmp_path / "services.json"
        services.write_text(json.dumps(_services(_endpoint(P1, "orders-1"), _endpoint(P2, "orders-2"))))
        log = open(tmp_path / "authority.log", "a")  # noqa: SIM115 - lives as long as the process
        cl.popen(
            sys.executable, "-c", AUTHORITY, str(mesh.authority_dir), str(services), stdout=log, stderr=log
        )
        wait_for(
            lambda: (
                cl.run("curl", "-sfk", f"https://198.18.1.1:{AUTH_PORT}/healthz", check=False).returncode == 0
            ),
            "authority up",
        )
        try:
            yield mesh, p2, services
        finally:
            for agent in mesh.agents.values():
                if agent.proc is not None and agent.proc.poll() is None:
                    agent.stop()
            lab.close()


def _metrics(host: Host) -> str:
    return host.run("curl", "-sf", "http://127.0.0.1:4191/metrics").stdout


def _calls(c: Host, ip: str, n: int) -> Counter[str]:
    """`n` sequential curl calls; what each answered (or `failed`)."""
    out = c.sh(f"for i in $(seq {n}); do curl -s --max-time 5 http://{ip}/ || printf failed; echo; done")
    return Counter(out.split())


def test_a_cluster_ip_reaches_both_pods_with_their_identities(cluster: tuple[Mesh, Host, Path]) -> None:
    mesh, p2, services = cluster
    c, p1 = mesh.a, mesh.b
    for host, name in ((p1, "orders-1"), (p2, "orders-2")):
        host.popen(sys.executable, "-c", APP, name)
    pods = [
        mesh.enroll(p1, "shop/orders-1", "198.18.2.1", [P1]),
        mesh.enroll(p2, "shop/orders-2", "198.18.3.1", [P2]),
    ]
    client = mesh.enroll(c, "shop/client", "198.18.1.1", ["198.18.1.2"])
    # Nothing routes the cluster IP: without the agent the call fails.
    assert _calls(c, CLUSTER_IP, 1) == Counter({"failed": 1})
    for agent in (*pods, client):
        agent.start()
    for host in (p1, p2):
        wait_for(
            lambda h=host: h.run("curl", "-sf", f"http://{h.ip4}:8080/", check=False).returncode == 0, "app"
        )
    cache = client.state / "host-config.json"  # written by the agent's first fetch, not before
    wait_for(lambda: cache.exists() and "services" in cache.read_text(), "c's services", client)

    answered = _calls(c, CLUSTER_IP, CALLS)
    print("answered:", dict(answered))
    assert answered["orders-1"] + answered["orders-2"] == CALLS, answered
    assert answered["orders-1"] > 0 and answered["orders-2"] > 0, answered
    # Each pod's agent terminated mTLS and saw the client's identity, once per call it got.
    for host, name in ((p1, "orders-1"), (p2, "orders-2")):
        seen = metric_sum(
            _metrics(host), "request_total", 'direction="inbound"', 'tls="true"', f'client_id="{CLIENT}"'
        )
        assert seen == answered[name], (name, seen, answered)
    # The client labelled each call with the endpoint's identity.
    out = _metrics(c)
    for name in ("orders-1", "orders-2"):
        server = f'server_id="{name}.shop.serviceaccount.identity.linkerd.{TD}"'
        assert (
            metric_sum(out, "response_total", 'direction="outbound"', server, f'dst_serviceaccount="{name}"')
            == answered[name]
        )

    # orders-2 no longer ready: gone from the document; after the next refresh it gets nothing.
    services.write_text(json.dumps(_services(_endpoint(P1, "orders-1"))))
    # (the agent caches a document after it starts routing by it)
    cache = client.state / "host-config.json"

    def endpoints() -> list[str]:
        return [e["address"] for s in json.loads(cache.read_text())["services"] for e in s["endpoints"]]

    wait_for(lambda: endpoints() == [P1], "the document without orders-2", client)
    assert _calls(c, CLUSTER_IP, 20) == Counter({"orders-1": 20})

    # A Service without a ready endpoint: refused and counted.
    assert _calls(c, EMPTY_IP, 3) == Counter({"failed": 3})
    refused = metric_sum(
        _metrics(c),
        "meshagent_connections_refused_total",
        'direction="outbound"',
        'reason="no_ready_endpoint"',
    )
    assert refused == 3
