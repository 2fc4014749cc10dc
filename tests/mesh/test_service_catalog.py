"""The service catalog (#20) for real: three meshed hosts and an in-cluster stand-in call each
other in a known pattern, a real Prometheus scrapes the agents through the authority's
discovery endpoint with the generated SLO rules loaded, and what the authority works out from
it (edges, error budgets, the change log) matches what the clients did.

    cl (authority, Prometheus; forwards between its links)
     |-- 198.18.1.0/24 -- a  (meshed: web, a client only)
     |-- 198.18.2.0/24 -- b  (meshed: orders, an app and a client)
     |-- 198.18.3.0/24 -- c  (meshed: payments, an app that fails 1 request in 5 on demand)
     `-- 198.18.4.0/24 -- k  (in-cluster stand-in "checkout": a pod certificate from the mesh's
                             issuer, never enrolled; a TLS server and an mTLS client)

Traffic: a->b, b->c, a->k, k->c (and nothing else: no c->a). One module-scoped world; the tests
run in file order and the last one revokes a.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.netlab import Host, Lab, netns_supported
from tests.linkerd.certs import linkerd_name, linkerd_pod_cert
from tests.mesh.conftest import PY, Agent, Mesh, serve_authority, stop_agents, wait_for
from tests.mesh.test_metrics import prometheus, query
from tests.support import MESHAGENT

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus (scripts/bootstrap)"),
]

PORT = 8080
IP = {"a": "198.18.1.2", "b": "198.18.2.2", "c": "198.18.3.2", "k": "198.18.4.2"}
SA = {"a": "web", "b": "orders", "c": "payments", "k": "checkout"}  # service accounts in `shop`
DNS = {name: linkerd_name(sa, "shop") for name, sa in SA.items()}
PATTERN = (("a", "b"), ("b", "c"), ("a", "k"), ("k", "c"))
RPS, SECONDS = 10, 15  # per edge: 150 requests, paced by the client
WINDOW_S = SECONDS + 8  # the edges' window: the measured traffic and the scrapes after it
FAST_BURN = "MeshagentSLOFastBurn"  # agent/authority/slo.py ALERTS


@dataclass
class World:
    mesh: Mesh
    hosts: dict[str, Host]
    agents: dict[str, Agent]
    prom: str
    prom_proc: Popen[str]
    certs: Path
    fail_flag: Path

    def authority(self, *args: str) -> str:
        return self.mesh.cli(self.mesh.cl, "authority", *args, "--dir", str(self.mesh.authority_dir))

    def authority_json(self, *args: str) -> Any:
        return json.loads(self.authority(*args, "--json"))

    def host_id(self, name: str) -> str:
        hosts = self.authority_json("hosts")
        return str(next(h["id"] for h in hosts if h["host_name"] == self.hosts[name].name))

    def traffic(self, pattern: tuple[tuple[str, str], ...], count: int, rps: float) -> dict[str, Any]:
        """Every edge of `pattern` at once, each client counting its own requests."""
        procs = {}
        for src, dst in pattern:
            argv = [PY, "-m", "tests.mesh.tools.catalog_client", IP[dst], str(PORT), str(count), str(rps)]
            if src == "k":  # the stand-in speaks mTLS itself, to c's identity
                ca = str(self.mesh.authority_dir / "trust-bundle.pem")
                key = str(self.certs / "checkout.key")
                argv += ["--tls", str(self.certs / "checkout.crt"), key, ca, DNS[dst]]
            procs[f"{src}->{dst}"] = self.hosts[src].popen(*argv)
        counts = {}
        for edge, proc in procs.items():
            out, err = proc.communicate(timeout=count / rps + 60)
            assert proc.returncode == 0, (edge, err)
            counts[edge] = json.loads(out)
        return counts

    def prom_api(self, path: str) -> Any:
        doc = json.loads(self.mesh.cl.run("curl", "-sf", f"{self.prom}/api/v1/{path}").stdout)
        assert doc["status"] == "success", doc
        return doc["data"]

    def fast_burn(self, host_id: str) -> list[dict[str, Any]]:
        """The fast-burn alerts on `host_id`, pending or firing, from Prometheus's own API."""
        return [
            alert
            for alert in self.prom_api("alerts")["alerts"]
            if alert["labels"].get("alertname") == FAST_BURN and alert["labels"].get("host_id") == host_id
        ]

    def load_rules(self, text: str) -> list[str]:
        """`text` as Prometheus's rule file: added to its config and reloaded (SIGHUP), as an
        operator does after `slo rules`. Returns the rule groups Prometheus then runs."""
        directory = self.mesh.tmp / "prometheus"
        (directory / "slo-rules.yml").write_text(text)
        config = directory / "prometheus.yml"
        if "rule_files" not in config.read_text():
            config.write_text(config.read_text() + f"rule_files: [{directory / 'slo-rules.yml'}]\n")
        os.kill(self.prom_proc.pid, signal.SIGHUP)
        wanted = [g["name"] for g in yaml.safe_load(text)["groups"]]
        wait_for(lambda: [g["name"] for g in self.prom_api("rules")["groups"]] == wanted, "rules loaded")
        return wanted


def _pod_cert(mesh: Mesh, certs: Path, sa: str) -> None:
    """An in-cluster pod's certificate, as Linkerd's identity controller issues it (one DNS
    SAN), signed by the mesh's issuer: the same trust anchor as the hosts'."""
    issuer = x509.load_pem_x509_certificate((mesh.authority_dir / "issuer.crt").read_bytes())
    key = serialization.load_pem_private_key((mesh.authority_dir / "issuer.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    chain, private = linkerd_pod_cert(issuer, key, sa, "shop")
    (certs / f"{sa}.crt").write_bytes(chain)
    (certs / f"{sa}.key").write_bytes(private)


def _app(host: Host, *args: str) -> None:
    proc = host.popen(PY, "-m", "tests.mesh.tools.catalog_app", str(PORT), *args)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    reason = netns_supported()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("service-catalog")
    with Lab("sc") as lab:
        cl = lab.host("cl")
        hosts = {name: lab.host(name) for name in ("a", "b", "c", "k")}
        for n, host in enumerate(hosts.values(), start=1):
            lab.link(cl, host)
            host.run("ip", "route", "add", "default", "via", f"198.18.{n}.1")
        cl.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        mesh = Mesh(lab, tmp, cl, hosts["a"], hosts["b"])
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
        try:
            serve_authority(mesh, tmp)
            certs = tmp / "certs"
            certs.mkdir()
            _pod_cert(mesh, certs, "checkout")
            fail_flag = tmp / "payments-failing"
            _app(hosts["b"])
            _app(hosts["c"], "--fail-flag", str(fail_flag))
            bundle = str(mesh.authority_dir / "trust-bundle.pem")
            _app(hosts["k"], "--tls", str(certs / "checkout.crt"), str(certs / "checkout.key"), bundle)
            agents = {
                name: mesh.enroll(hosts[name], f"shop/{SA[name]}", f"198.18.{n}.1", [IP[name]])
                for n, name in ((1, "a"), (2, "b"), (3, "c"))
            }
            # The stand-in is a catalog destination: a reaches it with mTLS to its identity.
            mesh.cli(
                cl, "authority", "catalog", "add", "--dir", str(mesh.authority_dir),
                "--cidr", f"{IP['k']}/32", "--port", str(PORT), "--identity", f"shop/{SA['k']}",
            )  # fmt: skip
            for agent in agents.values():
                agent.start()
            for agent in agents.values():
                cache = agent.state / "host-config.json"
                wait_for(lambda c=cache: c.exists() and IP["k"] in c.read_text(), "the catalog", agent)
            url = prometheus(mesh)
            prom_proc = lab.processes[-1]  # the helper's last popen: `ip netns exec` became prometheus
            assert "prometheus" in prom_proc.args, prom_proc.args  # type: ignore[operator]
            world = World(mesh, hosts, agents, url, prom_proc, certs, fail_flag)
            world.load_rules(_slo_rules(world))
            # One request per edge first, so every series exists before the measured traffic
            # (increase() counts from a series' first sample).
            warm = world.traffic(PATTERN, 1, 1)
            assert all(c["ok"] == 1 for c in warm.values()), warm
            wait_for(
                lambda: len(query(mesh, url, 'up{job="linkerd-proxy"} == 1')) == 3,
                "the three hosts scraped",
                timeout=30,
            )
            served = 'sum(response_total{direction="inbound"}) >= 3'  # b served once, c twice
            wait_for(lambda: len(query(mesh, url, served)) == 1, "the first requests scraped", timeout=30)
            yield world
        finally:
            stop_agents(mesh)
            lab.close()


def _slo_rules(world: World) -> str:
    """payments' availability SLO (99.9 %) as Prometheus rules, from the real generator."""
    from agent.authority.host_meta import HostMeta, Slo
    from agent.authority.service import Authority
    from agent.authority.slo import render_rules

    c_id = world.host_id("c")
    c = next(h for h in Authority.open(world.mesh.authority_dir).registry.list_hosts() if h.id == c_id)
    meta = HostMeta(owner_team="payments-team", slos=(Slo("availability", "availability", 99.9),))
    return render_rules([(c, meta)])


def _edges_from_prometheus(world: World, window: str) -> dict[tuple[str, str], float]:
    """(src, dst) identity pairs and their requests over `window`, straight from Prometheus:
    a meshed client's outbound view, else (an unmeshed client) the meshed server's inbound view."""
    out = query(
        world.mesh,
        world.prom,
        f'sum by (identity, server_id) (increase(response_total{{direction="outbound"}}[{window}])) > 0',
    )
    edges: dict[tuple[str, str], float] = {}
    for row in out:
        labels: dict[str, str] = row["metric"]  # type: ignore[assignment]
        src = _dns(labels["identity"])
        edges[(src, labels["server_id"])] = float(row["value"][1])  # type: ignore[index]
    inbound = query(
        world.mesh,
        world.prom,
        f'sum by (identity, client_id) (increase(response_total{{direction="inbound"}}[{window}])) > 0',
    )
    for row in inbound:
        labels = row["metric"]  # type: ignore[assignment]
        edges.setdefault((labels["client_id"], _dns(labels["identity"])), float(row["value"][1]))  # type: ignore[index]
    return edges


def _dns(spiffe_id: str) -> str:
    """spiffe://cluster.local/ns/NS/sa/SA -> SA.NS.serviceaccount.identity.linkerd.cluster.local"""
    _, _, path = spiffe_id.partition("//")
    td, _, rest = path.partition("/")
    parts = rest.split("/")
    return linkerd_name(parts[3], parts[1], td)


def test_edges_are_exactly_the_traffic_with_the_clients_counts(world: World) -> None:
    counts = world.traffic(PATTERN, RPS * SECONDS, RPS)
    for edge, c in counts.items():
        assert c == {"sent": RPS * SECONDS, "ok": RPS * SECONDS, "failed": 0, "errors": 0}, (edge, c)
    time.sleep(3)  # two scrapes after the last request
    edges = _edges_from_prometheus(world, f"{WINDOW_S}s")
    expected = {(DNS[src], DNS[dst]): counts[f"{src}->{dst}"]["ok"] for src, dst in PATTERN}
    print(
        "\nedges (Prometheus):",
        {f"{s.split('.')[0]}->{d.split('.')[0]}": round(n, 1) for (s, d), n in edges.items()},
    )
    assert set(edges) == set(expected), edges
    for pair, sent in expected.items():
        assert edges[pair] == pytest.approx(sent, rel=0.15), (pair, edges[pair], sent)


def test_failures_fire_the_fast_burn_alert_and_spend_the_budget(world: World) -> None:
    c = world.host_id("c")
    assert world.fast_burn(c) == []  # no failures yet
    world.fail_flag.touch()
    try:
        counts = world.traffic((("b", "c"), ("k", "c")), RPS * 10, RPS)
    finally:
        world.fail_flag.unlink()
    served = sum(n["ok"] + n["failed"] for n in counts.values())
    assert sum(n["failed"] for n in counts.values()) == served // 5, counts
    wait_for(
        lambda: [a["state"] for a in world.fast_burn(c)] == ["firing"],
        "the fast-burn alert firing",
        timeout=20,
    )
    (alert,) = world.fast_burn(c)
    assert alert["labels"]["slo"] == "availability" and alert["labels"]["severity"] == "page", alert
    assert (
        alert["labels"]["host"] == world.hosts["c"].name and alert["labels"]["owner_team"] == "payments-team"
    )
    # Only c's SLO burns: a and b have none, so no other alert exists.
    assert {a["labels"]["host_id"] for a in world.prom_api("alerts")["alerts"]} == {c}


def test_revoke_renewal_and_restart_are_in_the_change_log_newest_first(world: World) -> None:
    a = world.agents["a"]
    world.hosts["a"].run(*MESHAGENT, "renew", "--config", str(a.config))
    ready = a.log.read_text().count("daemon.ready")
    a.stop()
    a.start()
    wait_for(lambda: a.log.read_text().count("daemon.ready") > ready, "a restarted", a)
    world.authority("revoke", world.host_id("a"))
