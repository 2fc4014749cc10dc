"""Issue #17 end to end: the cluster knows the hosts and the hosts know the cluster.

    cl: the authority (`serve --kubernetes`), the Kubernetes API *test stand-in*
        (tests/kube/apiserver.py, not an API server) and dnsmasq (the hosts' resolver)
     |-- 198.18.1.0/24 -- c   (the legacy host: curl by name; its agent answers cluster names)
     |-- 198.18.2.0/24 -- p1  ("pod" orders-1: an enrolled agent, an app answering its name)
     `-- 198.18.3.0/24 -- p2  ("pod" orders-2)

The cluster's objects (a Service `orders` whose cluster IP nothing routes, its EndpointSlice, the
two Pods with their service accounts) are served by the stand-in; the authority's controller
discovers them, and registers every enrolled host as an ExternalWorkload whose Ready comes from
its agent's reports. What runs for real: the authority, the controller with its real client
library, the agents (interception, DNS stub, mTLS), dnsmasq, curl. What does not: a Kubernetes
API server, Linkerd.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.netlab import Host, Lab, netns_supported
from tests.mesh.conftest import AUTH_PORT, Mesh, wait_for
from tests.mesh.test_cluster_services import APP  # a "pod"'s app: answers its own name
from tests.support import MESHAGENT

pytestmark = pytest.mark.netns

REPO = Path(__file__).parents[2]
CLUSTER_IP = "198.19.0.10"
P1, P2 = "198.18.2.2", "198.18.3.2"
RESOLVER = "198.18.1.1"  # dnsmasq on cl: the legacy host's nameserver
API = "127.0.0.1:16443"  # the stand-in, inside cl
TOKEN = "e2e-test-token"  # the stand-in's bearer token (made up here, for this test only)
TD = "cluster.local"
NAME = f"orders.shop.svc.{TD}"
LEGACY = f"legacy.shop.serviceaccount.identity.linkerd.{TD}"
CALLS = 100
PROBE = '[[health.probes]]\nport = 8080\nkind = "tcp"\ninterval_s = 1\nfailure_threshold = 2\n'


# Talks to the stand-in as any client would (run inside cl): GET or PUT one object path.
KUBE = f"""
import json, sys, httpx
method, path = sys.argv[1], sys.argv[2]
body = json.loads(sys.stdin.read()) if method == "PUT" else None
r = httpx.request(method, "http://{API}" + path, json=body, headers={{"Authorization": "Bearer {TOKEN}"}})
r.raise_for_status()
print(r.text)
"""

STATUS = ("status", "--config")
SLICE_PATH = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/orders-x1"


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"linkerd.io/control-plane-ns": "linkerd"}},
        "spec": {"serviceAccountName": name, "containers": [{"name": "app", "image": "orders"}]},
    }


def _endpoint(address: str, pod: str, ready: bool = True) -> dict[str, Any]:
    return {
        "addresses": [address],
        "conditions": {"ready": ready},
        "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"},
    }


def _slice(*endpoints: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "orders-x1",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "orders"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": list(endpoints),
    }


def _objects() -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": CLUSTER_IP,
                "clusterIPs": [CLUSTER_IP],
                "selector": {"app": "orders"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        },
        _slice(_endpoint(P1, "orders-1"), _endpoint(P2, "orders-2")),
        _pod("orders-1"),
        _pod("orders-2"),
    ]


@dataclass
class Cluster:
    mesh: Mesh
    c: Host
    p1: Host
    p2: Host

    def kube(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        out = self.mesh.cl.run(
            sys.executable, "-c", KUBE, method, path, input=json.dumps(body) if body else ""
        ).stdout
        return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    reason = netns_supported()
    for tool in ("dnsmasq", "curl", "getent"):
        reason = reason or (None if shutil.which(tool) else f"{tool} is not installed")
    if reason:
        pytest.skip(reason)
    resolv_dirs: list[Path] = []
    with Lab("ke") as lab:
        cl, c, p1, p2 = lab.host("cl"), lab.host("c"), lab.host("p1"), lab.host("p2")
        for n, host in enumerate((c, p1, p2), start=1):
            lab.link(cl, host)
            host.run("ip", "route", "add", "default", "via", f"198.18.{n}.1")
        cl.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        mesh = Mesh(lab, tmp_path, cl, c, p1)
        try:
            # c's own resolv.conf (`ip netns exec` mounts /etc/netns/NS/resolv.conf over it).
            resolv = Path("/etc/netns") / c.ns
            resolv.mkdir(parents=True)
            resolv_dirs.append(resolv)
            (resolv / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
            cl.popen(
                "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                f"--listen-address={RESOLVER}", "--bind-interfaces", f"--pid-file={tmp_path}/dnsmasq.pid",
                "--address=/public.example/192.0.2.7",
            )  # fmt: skip
            objects = tmp_path / "objects.yaml"
            objects.write_text(yaml.safe_dump_all(_objects()))
            kubeconfig = tmp_path / "kubeconfig"
            log = open(tmp_path / "apiserver.log", "a")  # noqa: SIM115 - lives as long as the process
            cl.popen(
                sys.executable, "-m", "tests.kube.apiserver", "--listen", API, "--kubeconfig",
                str(kubeconfig), "--objects", str(objects), "--token", TOKEN, "--namespace", "meshagent",
                stdout=log, stderr=log, cwd=str(REPO),
            )  # fmt: skip
            wait_for(kubeconfig.exists, "the API stand-in")
            sans = [arg for n in (1, 2, 3) for arg in ("--san", f"198.18.{n}.1")]
            cl.run(
                *MESHAGENT, "authority", "init", "--dir", str(mesh.authority_dir), "--trust-domain", TD, *sans
            )
            log = open(tmp_path / "authority.log", "a")  # noqa: SIM115
            cl.popen(
                *MESHAGENT, "authority", "serve", "--dir", str(mesh.authority_dir),
                "--listen", f"0.0.0.0:{AUTH_PORT}", "--kubernetes", "--kubeconfig", str(kubeconfig),
                "--lease-namespace", "meshagent",
                stdout=log, stderr=log,
            )  # fmt: skip
            wait_for(
                lambda: (
                    cl.run("curl", "-sfk", f"https://{RESOLVER}:{AUTH_PORT}/healthz", check=False).returncode
                    == 0
                ),
                "authority up",
            )
            yield Cluster(mesh, c, p1, p2)
        finally:
            for agent in mesh.agents.values():
                if agent.proc is not None and agent.proc.poll() is None:
                    agent.stop()
            lab.close()
            for path in resolv_dirs:
                shutil.rmtree(path, ignore_errors=True)


def _calls(c: Host, n: int) -> Counter[str]:
    """`n` sequential curl calls to the Service by name; what each answered (or `failed`)."""
    out = c.sh(f"for i in $(seq {n}); do curl -s --max-time 5 http://{NAME}/ || printf failed; echo; done")
    return Counter(out.split())


def _ready(workload: dict[str, Any]) -> bool:
    return _condition(workload).get("status") == "True"


def _condition(workload: dict[str, Any]) -> dict[str, Any]:
    conditions = workload.get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "Ready"), {})


def test_a_legacy_host_calls_a_cluster_service_by_name_and_the_cluster_sees_the_hosts(
    cluster: Cluster,
) -> None:
    mesh, c, p1, p2 = cluster.mesh, cluster.c, cluster.p1, cluster.p2
    public_before = c.run("getent", "hosts", "public.example").stdout.split()
    assert public_before[0] == "192.0.2.7"
    assert c.run("getent", "hosts", NAME, check=False).returncode != 0  # nobody knows it yet

    apps = {
        name: host.popen(sys.executable, "-c", APP, name)
        for host, name in ((p1, "orders-1"), (p2, "orders-2"))
    }
    pods = [
        mesh.enroll(p1, "shop/orders-1", "198.18.2.1", [P1]),
        # orders-2's app has a readiness probe, as Istio's WorkloadGroup.probe (fast, for the test)
        mesh.enroll(p2, "shop/orders-2", "198.18.3.1", [P2], extra_config=PROBE),
    ]
    legacy = mesh.enroll(
        c,
        "shop/legacy",
        RESOLVER,
        ["198.18.1.2"],
        extra_config=f'[dns]\nenabled = true\nstub_addresses = ["{RESOLVER}"]\n',
    )
    for agent in (*pods, legacy):
        agent.start()
    cache = legacy.state / "host-config.json"

    def endpoints() -> list[str]:
        if not cache.exists():
            return []
        doc = json.loads(cache.read_text())
        return sorted(e["address"] for s in doc.get("services", []) for e in s["endpoints"])

    wait_for(lambda: endpoints() == [P1, P2], "the Service's endpoints on the legacy host", legacy)

    # The cluster sees every host: an ExternalWorkload each, Ready from its agent's reports.
    def workloads() -> dict[str, dict[str, Any]]:
        items = cluster.kube("GET", "/apis/workload.linkerd.io/v1beta1/namespaces/shop/externalworkloads")
        return {w["metadata"]["annotations"]["meshagent.io/host-name"]: w for w in items["items"]}

    wait_for(lambda: sorted(workloads()) == ["c", "p1", "p2"], "three ExternalWorkloads")
    wait_for(lambda: all(_ready(w) for w in workloads().values()), "every ExternalWorkload Ready")
    seen = workloads()["c"]
    assert seen["spec"]["meshTLS"]["identity"] == f"spiffe://{TD}/ns/shop/sa/legacy"
    assert seen["spec"]["workloadIPs"] == [{"ip": "198.18.1.2"}]

    # The name resolves on the host, other names exactly as before.
    assert c.run("getent", "hosts", NAME).stdout.split()[0] == CLUSTER_IP
    assert c.run("getent", "hosts", "public.example").stdout.split() == public_before

    answered = _calls(c, CALLS)
    print("answered:", dict(answered))
    assert answered["orders-1"] + answered["orders-2"] == CALLS, answered
    assert answered["orders-1"] > 0 and answered["orders-2"] > 0, answered
    # mTLS to each pod with its own identity: each pod's agent counted the legacy host's.
    for host, name in ((p1, "orders-1"), (p2, "orders-2")):
        metrics = host.run("curl", "-sf", "http://127.0.0.1:4191/metrics").stdout
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("request_total{")
            and 'direction="inbound"' in line
            and 'tls="true"' in line
            and f'client_id="{LEGACY}"' in line
        )
        assert counted == answered[name], (name, counted, answered)

    # orders-2 is marked not ready in the cluster: within the refresh time it gets no call.
    current = cluster.kube("GET", SLICE_PATH)
    current["endpoints"] = _slice(_endpoint(P1, "orders-1"), _endpoint(P2, "orders-2", ready=False))[
        "endpoints"
    ]
    cluster.kube("PUT", SLICE_PATH, current)
    wait_for(lambda: endpoints() == [P1], "orders-2 gone from the legacy host's Services", legacy)
    assert _calls(c, 20) == Counter({"orders-1": 20})

    # The agent stopped: other names resolve exactly as before it ran.
    legacy.stop()
    assert c.run("getent", "hosts", "public.example").stdout.split() == public_before

    # orders-2's app dies: its probe fails, the cluster sees the host not Ready and why; back
    # when the app is.
    apps["orders-2"].kill()
    apps["orders-2"].wait(timeout=10)
    wait_for(lambda: not _ready(workloads()["p2"]), "p2's ExternalWorkload not Ready")
    condition = _condition(workloads()["p2"])
    assert condition["reason"] == "ProbeFailed" and "tcp probe of port 8080" in condition["message"], (
        condition
    )
    hosts = mesh.cli(mesh.cl, "authority", "hosts", "--dir", str(mesh.authority_dir))
    assert "ProbeFailed" in hosts, hosts
    assert "tcp :8080 failing" in mesh.cli(p2, *STATUS, str(pods[1].config))
    p2.popen(sys.executable, "-c", APP, "orders-2")
    wait_for(lambda: _ready(workloads()["p2"]), "p2's ExternalWorkload Ready again")
