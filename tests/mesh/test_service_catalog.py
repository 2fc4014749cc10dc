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
import re
import shutil
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.authority.prom_query import record_url
from agent.netlab import Host, Lab, netns_supported
from tests.linkerd.certs import linkerd_name, linkerd_pod_cert
from tests.mesh.conftest import AUTH_PORT, PY, Agent, Mesh, serve_authority, stop_agents, wait_for
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
WINDOW_S = 60  # the edges' window: the measured traffic and the one warm-up request per edge
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
    ids: dict[str, str] = field(default_factory=dict)  # host name -> id, once all are enrolled

    def authority(self, *args: str) -> str:
        return self.mesh.cli(self.mesh.cl, "authority", *args, "--dir", str(self.mesh.authority_dir))

    def authority_json(self, *args: str) -> Any:
        return json.loads(self.authority(*args, "--json"))

    def host_id(self, name: str) -> str:
        if not self.ids:
            self.ids.update({h["host_name"]: h["id"] for h in self.authority_json("hosts")})
        return self.ids[self.hosts[name].name]

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

    def card(self, name: str) -> dict[str, Any]:
        """`catalog show HOST --json`: the host's card as the CLI gives it."""
        doc: dict[str, Any] = self.authority_json("catalog", "show", self.host_id(name))
        assert doc["prometheus_error"] is None, doc
        return doc

    def page(self, path: str, token: str | None = None) -> tuple[int, str]:
        """GET `path` from the authority over HTTPS, with the discovery token as bearer."""
        token = (self.mesh.authority_dir / "prometheus-token").read_text().strip() if token is None else token
        out = self.mesh.cl.run(
            "curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}",
            "--cacert", str(self.mesh.authority_dir / "api-ca.crt"),
            "-H", f"Authorization: Bearer {token}",
            f"https://198.18.1.1:{AUTH_PORT}{path}",
        ).stdout  # fmt: skip
        body, _, code = out.rpartition("\n")
        return int(code), body

    def wait_scraped(self, name: str, direction: str, responses: int) -> None:
        """Until Prometheus holds every response the host's agent counted so far (`responses`,
        what the clients sent): the numbers below are then the whole traffic's."""
        promql = f'sum(response_total{{direction="{direction}",host_id="{self.host_id(name)}"}})'
        wait_for(
            lambda: [float(r["value"][1]) for r in query(self.mesh, self.prom, promql)] == [responses],  # type: ignore[index]
            f"{name}'s {responses} {direction} responses scraped",
            timeout=30,
        )

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

    def load_rules(self, rules: Path) -> list[str]:
        """`rules` (written by `slo rules --output`) as Prometheus's rule file: added to its
        config and reloaded (SIGHUP), as the command's help says. Returns the rule groups
        Prometheus then runs."""
        config = self.mesh.tmp / "prometheus" / "prometheus.yml"
        config.write_text(config.read_text() + f"rule_files: [{rules}]\n")
        text = rules.read_text()
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
            # The stand-in is a catalog destination: a reaches it with mTLS to its identity.
            mesh.cli(
                cl, "authority", "catalog", "add", "--dir", str(mesh.authority_dir),
                "--cidr", f"{IP['k']}/32", "--port", str(PORT), "--identity", f"shop/{SA['k']}",
            )  # fmt: skip
            with ThreadPoolExecutor(3) as pool:  # (each CLI run costs a Python start: at once)
                enrolled = pool.map(
                    lambda n, name: mesh.enroll(hosts[name], f"shop/{SA[name]}", f"198.18.{n}.1", [IP[name]]),
                    (1, 2, 3),
                    ("a", "b", "c"),
                )
                agents = dict(zip(("a", "b", "c"), enrolled, strict=True))
                started = [pool.submit(agent.start) for agent in agents.values()]
                # Meanwhile: payments' owner and an availability SLO of 99.9 % (inbound, 28
                # days), and the rule file for Prometheus.
                rules = mesh.tmp / "slo-rules.yml"
                authority = [*MESHAGENT, "authority"]
                where = ["--dir", str(mesh.authority_dir)]
                cl.run(
                    *authority,
                    "host",
                    "set",
                    "c",
                    "--owner-team",
                    "payments-team",
                    "--slo",
                    "availability=99.9",
                    *where,
                )
                cl.run(*authority, "slo", "rules", "--output", str(rules), *where)
                for done in started:
                    done.result()
            for agent in agents.values():
                cache = agent.state / "host-config.json"
                wait_for(lambda c=cache: c.exists() and IP["k"] in c.read_text(), "the catalog", agent)
            url = prometheus(mesh)
            prom_proc = lab.processes[-1]  # the helper's last popen: `ip netns exec` became prometheus
            assert "prometheus" in prom_proc.args, prom_proc.args  # type: ignore[operator]
            world = World(mesh, hosts, agents, url, prom_proc, certs, fail_flag)
            # Where the page and `catalog show` find Prometheus (what `serve --prometheus` records).
            record_url(mesh.authority_dir, url)
            assert world.load_rules(rules) == [f"meshagent-slo-{world.host_id('c')}"]
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


def _short(identity: str) -> str:
    return identity.split(".")[0] or "(none)"


def test_edges_are_exactly_the_traffic_with_the_clients_counts(world: World) -> None:
    counts = world.traffic(PATTERN, RPS * SECONDS, RPS)
    for edge, n in counts.items():
        assert n == {"sent": RPS * SECONDS, "ok": RPS * SECONDS, "failed": 0, "errors": 0}, (edge, n)
    # What the agents counted is in Prometheus: every request of the clients, and the warm-up's.
    world.wait_scraped("a", "outbound", 2 + 2 * RPS * SECONDS)
    world.wait_scraped("b", "inbound", 1 + RPS * SECONDS)
    world.wait_scraped("c", "inbound", 2 + 2 * RPS * SECONDS)
    expected = {(DNS[src], DNS[dst]): counts[f"{src}->{dst}"]["ok"] for src, dst in PATTERN}
    ids = {name: world.host_id(name) for name in ("a", "b", "c")}

    # `authority edges`: exactly those edges, each within 15 % of what its client counted;
    # hosts named where the identity is an enrolled host's, the stand-in by its identity alone.
    doc = world.authority_json("edges", "--window", f"{WINDOW_S}s")
    found = {(e["src"], e["dst"]): e for e in doc["edges"]}
    print("\nedges:", {f"{_short(s)}->{_short(d)}": (e["requests"], e["rps"]) for (s, d), e in found.items()})
    assert set(found) == set(expected) and len(doc["edges"]) == len(expected), doc
    host_of = {DNS[name]: ids[name] for name in ids}
    for (src, dst), e in found.items():
        assert e["requests"] == pytest.approx(expected[(src, dst)], rel=0.15), e
        assert e["rps"] == pytest.approx(expected[(src, dst)] / WINDOW_S, rel=0.15), e
        assert e["success_rate"] == 1.0, e
        assert (e["src_host"], e["dst_host"]) == (host_of.get(src), host_of.get(dst)), e
    # One host's edges: those into and out of it (payments only serves).
    into_c = world.authority_json("edges", "c", "--window", f"{WINDOW_S}s")["edges"]
    assert {(e["src"], e["dst"]) for e in into_c} == {(DNS["b"], DNS["c"]), (DNS["k"], DNS["c"])}, into_c

    # The fleet as `catalog show --json` gives it (the page's data): the same edges.
    fleet = world.authority_json("catalog", "show")
    assert fleet["prometheus_error"] is None, fleet
    got = {(e["src"], e["dst"]): e for e in fleet["edges"]}
    print("edges (catalog show):", {f"{_short(s)}->{_short(d)}": e["requests"] for (s, d), e in got.items()})
    assert set(got) == set(expected), fleet["edges"]
    for (src, dst), e in got.items():
        assert e["requests"] == pytest.approx(expected[(src, dst)], rel=0.15), e
        assert e["success_rate"] == 1.0, e
    for (src, dst), e in got.items():
        assert (e["src_host"], e["dst_host"]) == (host_of.get(src), host_of.get(dst)), e
    assert {n["identity"] for n in fleet["nodes"]} == set(DNS.values()), fleet["nodes"]


def _budget(card: dict[str, Any]) -> dict[str, Any]:
    (budget,) = card["budgets"]
    assert budget["slo"]["name"] == "availability" and budget["slo"]["objective"] == 99.9, budget
    return dict(budget)


def _page_budget(world: World, host_id: str) -> tuple[str, str]:
    """The host page's availability row: (SLI, budget left) as the page prints them."""
    code, html = world.page(f"/catalog/hosts/{host_id}")
    assert code == 200, html[:2000]
    row = re.search(r'<tr data-slo="availability">(.*?)</tr>', html, re.S)
    assert row is not None, html[:4000]
    cells = re.findall(r"<td>(.*?)</td>", row.group(1), re.S)
    assert len(cells) == 7, cells
    return cells[1], cells[2]


def _percent(text: str) -> float:
    assert text.endswith("%"), text
    return float(text[:-1]) / 100


def test_failures_fire_the_fast_burn_alert_and_spend_the_budget(world: World) -> None:
    c = world.host_id("c")
    # Before: traffic, no failures: the whole budget left, on the CLI and on the page.
    before = _budget(world.card("c"))
    assert before["sli"] == 1.0 and before["remaining"] == 1.0 and before["status"] == "ok", before
    assert _page_budget(world, c) == ("100.000%", "100.0%")
    assert world.fast_burn(c) == []
    assert world.page(f"/catalog/hosts/{c}", token="not-the-token")[0] == 401

    world.fail_flag.touch()
    try:
        counts = world.traffic((("b", "c"), ("k", "c")), RPS * 10, RPS)
    finally:
        world.fail_flag.unlink()
    failed = sum(n["failed"] for n in counts.values())
    served = sum(n["ok"] + n["failed"] for n in counts.values())
    assert failed == served // 5 and sum(n["errors"] for n in counts.values()) == 0, counts

    world.wait_scraped("c", "inbound", 2 + 2 * RPS * SECONDS + served)

    # The fast-burn alert fires in Prometheus (its own API), labelled with host, owner and SLO.
    firing = lambda: [a["state"] for a in world.fast_burn(c)] == ["firing"]  # noqa: E731
    wait_for(firing, "the fast-burn alert firing", timeout=20)
    (alert,) = world.fast_burn(c)
    assert alert["labels"]["slo"] == "availability" and alert["labels"]["severity"] == "page", alert
    assert alert["labels"]["host"] == world.hosts["c"].name, alert
    assert alert["labels"]["owner_team"] == "payments-team", alert
    # Only c has an SLO, so no other alert exists.
    assert {a["labels"]["host_id"] for a in world.prom_api("alerts")["alerts"]} == {c}

    # The budget falls: everything c served so far (the warm-up, the clean traffic, this), of
    # which the clients saw `failed` fail; 99.9 % allows 0.1 %, so it is overspent.
    total = 2 + 2 * RPS * SECONDS + served
    after = _budget(world.card("c"))
    print(f"\nbudget: before {before}\nafter {after}\nclients: {failed} of {total} failed")
    assert after["sli"] == pytest.approx(1 - failed / total, abs=0.02), (after, failed, total)
    assert after["remaining"] < 0 < before["remaining"], after
    assert after["remaining"] == pytest.approx(1 - (failed / total) / 0.001, rel=0.25), after
    assert after["status"] == "exhausted" and after["burn_1h"] > 14.4, after
    sli, left = _page_budget(world, c)
    assert _percent(sli) == pytest.approx(after["sli"], abs=0.005), (sli, after)
    assert _percent(left) == pytest.approx(after["remaining"], rel=0.05), (left, after)


def test_revoke_renewal_and_restart_are_in_the_change_log_newest_first(world: World) -> None:
    a = world.agents["a"]
    world.hosts["a"].run(*MESHAGENT, "renew", "--config", str(a.config))
    ready = a.log.read_text().count("daemon.ready")
    a.stop()
    a.start()
    wait_for(lambda: a.log.read_text().count("daemon.ready") > ready, "a restarted", a)

    def kinds() -> list[str]:
        return [e["kind"] for e in world.authority_json("changes", world.host_id("a"))]

    wait_for(lambda: "restarted" in kinds(), "the restart recorded (the agent's next report)")
    world.authority("revoke", world.host_id("a"))
    changes = world.authority_json("changes", world.host_id("a"))  # (a revoked name no longer resolves)
    print("\nchanges of a:", [(e["kind"], e["actor"]) for e in changes])
    seen = [e["kind"] for e in changes if e["kind"] in ("revoked", "restarted", "renewed", "enrolled")]
    assert seen == ["revoked", "restarted", "renewed", "enrolled"], changes
    assert {e["host_id"] for e in changes} == {world.host_id("a")}, changes
    times = [e["at"] for e in changes]
    assert times == sorted(times, reverse=True), changes
    actors = {e["kind"]: e["actor"] for e in changes}
    assert actors["renewed"] == "agent" and actors["restarted"] == "report", actors
    assert actors["revoked"].startswith("cli:") and actors["enrolled"].startswith("token:"), actors
    # The card (CLI and page data) shows the same log, the revoke first.
    assert [e["kind"] for e in world.card("a")["changes"]][:1] == ["revoked"]
