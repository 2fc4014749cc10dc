"""Edges, budgets and the generated alerts against a real Prometheus.

A loopback exporter serves agent-format series (agent/telemetry/proxy_metrics.py's names and
labels) for three hosts, each counter growing at a rate the test sets (value = rate x seconds
since start, computed at scrape time, so every window sees the same rate). Prometheus scrapes
each host as a separate target with the labels the discovery endpoint adds (`host_id`, `host`,
`identity`, ...), every second, and loads the rules `slo.rules` writes.

The traffic (requests/s):
    web (ha)  -> api (hb)    10, 20 % 5xx, all in (50, 100] ms; ha's own outbound view says 7
                              (never so in life: it shows which view an edge takes)
    db (hc)   -> api (hb)     4, all in (4, 5] ms; hc's outbound view says 4 too
    plain     -> api (hb)     2 (no TLS: no client_id), (4, 5] ms
    frontend  -> web (ha)     5, 0.05 % 5xx (frontend: an in-cluster identity, no host)
    web (ha)  -> pay          3, a third 5xx (pay: an in-cluster identity)
    web (ha)  -> (no identity) 1, a quarter to each of four addresses
    an idle series (a caller gone quiet) that must not be an edge
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from agent.authority.edges import Edge, WindowInvalid, dns_identity, edges, window_seconds
from agent.authority.host_meta import HostMeta, Slo
from agent.authority.prom_query import PROMETHEUS_ENV, PromClient, PromUnavailable
from agent.authority.service import Authority
from agent.authority.slo import MARKER, budgets, burn_history, fleet_budgets, rules
from agent.authority.storage import HostRecord
from agent.cli.main import cli as meshagent
from agent.identity.pki import generate_key, make_csr
from agent.telemetry.proxy_metrics import LATENCY_BOUNDS_MS
from tests.authority.promserver import Exporter, host_record, prometheus, wait_for
from tests.support import free_port, init_authority

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs prometheus (scripts/bootstrap)"
)

MESH = "linkerd"
TD = "cluster.local"


def dns(name: str) -> str:
    return f"{name}.shop.serviceaccount.identity.{MESH}.{TD}"


def host(host_id: str, name: str, sa: str) -> HostRecord:
    """A host record outside any registry (for what the library does with several per identity)."""
    return host_record(host_id, name, f"shop/{sa}")


# role -> (host name, service account): enrolled in a real registry, so the CLI sees them too
ROLES = {"ha": ("web-1", "web"), "hb": ("api-1", "api"), "hc": ("db-1", "db")}


HOST_IP = "198.18.0.10"  # every enrolled host's registered address (enroll_fleet)
POD_IP = "198.18.0.9"  # any other address: an in-cluster pod or a destination outside the mesh

AVAIL = Slo("availability", "availability", 99.9)
FAST = Slo("fast", "latency", 99.0, threshold_ms=100)
SLOW = Slo("under-50", "latency", 99.0, threshold_ms=50)
OTHER_PORT = Slo("admin-port", "availability", 99.0, port=9999)
META = {
    "ha": HostMeta(owner_team="web-team", slos=(AVAIL,)),
    "hb": HostMeta(owner_team="api-team", slos=(AVAIL, FAST, SLOW, OTHER_PORT)),
    "hc": HostMeta(),
}


@dataclass(frozen=True)
class Flow:
    """One label set's traffic: `rps` responses/s, `fail` of them 5xx, latencies in bucket `le`."""

    direction: str
    peer: str  # client_id (inbound) / server_id (outbound); "" = no TLS
    rps: float
    fail: float = 0.0
    le: int = 5
    port: int = 8080
    tcp_only: bool = False  # not HTTP: `rps` is connections opened/s (0: one held open, none opened)
    target: str = POD_IP  # outbound: the address dialled (HOST_IP: the enrolled hosts')


FLOWS: dict[str, list[Flow]] = {
    "ha": [
        Flow("inbound", dns("frontend"), 5.0, fail=0.0005),
        Flow("outbound", dns("api"), 7.0, fail=0.2, le=100, target=HOST_IP),
        # the api's pods (its service half migrated: same identity as hb, another address)
        Flow("outbound", dns("api"), 2.0, fail=0.5, le=50),
        Flow("outbound", dns("pay"), 3.0, fail=1 / 3),
        # outside the mesh, at four addresses (an API behind DNS): one edge, 1 req/s
        *(Flow("outbound", "", 0.25, target=f"198.19.0.{i}") for i in range(1, 5)),
        Flow("outbound", dns("db"), 0.5, tcp_only=True, port=5432, target=HOST_IP),  # hc's inbound view
    ],
    "hb": [
        Flow("inbound", dns("web"), 10.0, fail=0.2, le=100),
        Flow("inbound", dns("db"), 4.0),
        Flow("inbound", "", 2.0),
        Flow("inbound", dns("gone"), 0.0),  # idle: a constant series
    ],
    "hc": [
        Flow("outbound", dns("api"), 4.0, target=HOST_IP),
        Flow("inbound", dns("web"), 0.5, tcp_only=True, port=5432),  # a database protocol
        Flow("inbound", dns("monitor"), 0.0, tcp_only=True, port=5432),  # a quiet pooled connection
    ],
    # An in-cluster linkerd-proxy scraped by the same Prometheus: the same families, no host_id.
    # None of it is a host's edge or counts toward a host's budget.
    "pod": [
        Flow("inbound", dns("web"), 6.0, fail=0.5),
        Flow("outbound", dns("api"), 2.0, fail=0.5),
        Flow("outbound", "", 1.0),
    ],
}


def exposition(flows: list[Flow], elapsed: float) -> str:
    """The agent's families as it writes them, for `elapsed` seconds of each flow."""
    lines = ["# TYPE response_total counter", "# TYPE response_latency_ms histogram"]
    hist: list[str] = []
    tcp = ["# TYPE tcp_open_total counter", "# TYPE tcp_open_connections gauge"]
    for f in flows:
        if f.direction == "inbound":
            tls = (
                f'tls="true",client_id="{f.peer}"'
                if f.peer
                else 'tls="no_identity",no_tls_reason="no_tls_from_remote"'
            )
            base = (
                f'direction="inbound",target_addr="198.18.0.1:{f.port}",target_ip="198.18.0.1",'
                f'target_port="{f.port}",{tls},srv_group="",srv_kind="default",'
                f'srv_name="all-unauthenticated",srv_port="{f.port}"'
            )
        else:
            tls = (
                f'tls="true",server_id="{f.peer}"'
                if f.peer
                else 'tls="no_identity",no_tls_reason="not_provided_by_service_discovery"'
            )
            base = (
                f'direction="outbound",target_addr="{f.target}:{f.port}",target_ip="{f.target}",'
                f'target_port="{f.port}",{tls}'
            )
        n = 100.0 if f.rps == 0 else f.rps * elapsed  # the idle flow stays at 100
        if f.tcp_only:
            leg = f'{base},peer="{"src" if f.direction == "inbound" else "dst"}"'
            tcp.append(f"tcp_open_total{{{leg}}} {n!r}")
            tcp.append(f"tcp_open_connections{{{leg}}} {1.0 if f.rps == 0 else 0.0!r}")
            continue
        for status, share in (("200", 1 - f.fail), ("500", f.fail)):
            if share == 0:
                continue
            klass = "failure" if status == "500" else "success"
            labels = f'{base},status_code="{status}",classification="{klass}",grpc_status="",error=""'
            lines.append(f"response_total{{{labels}}} {n * share!r}")
            count = n * share
            for bound in LATENCY_BOUNDS_MS:
                hist.append(
                    f'response_latency_ms_bucket{{{base},status_code="{status}",le="{bound}"}} '
                    f"{count if bound >= f.le else 0.0!r}"
                )
            hist.append(f'response_latency_ms_bucket{{{base},status_code="{status}",le="+Inf"}} {count!r}')
            hist.append(f'response_latency_ms_count{{{base},status_code="{status}"}} {count!r}')
            hist.append(f'response_latency_ms_sum{{{base},status_code="{status}"}} {count * f.le!r}')
    return "\n".join(lines + hist + tcp) + "\n"


@dataclass
class Running:
    prom: PromClient
    url: str
    directory: Path  # the authority's
    hosts: dict[str, HostRecord]  # by role

    def id(self, role: str) -> str:
        return self.hosts[role].id

    def role(self, host_id: str | None) -> str | None:
        return next(
            (r for r, h in self.hosts.items() if h.id == host_id), None if host_id is None else host_id
        )

    @property
    def records(self) -> list[HostRecord]:
        return list(self.hosts.values())


def enroll_fleet(directory: Path) -> dict[str, HostRecord]:
    """An authority with the three hosts of ROLES enrolled and META set."""
    init_authority(directory)
    authority = Authority.open(directory)
    hosts = {}
    for role, (name, sa) in ROLES.items():
        secret = authority.create_tokens(f"shop/{sa}", "https://127.0.0.1:1", timedelta(minutes=5))[0].secret
        hosts[role] = authority.enroll(secret, make_csr(generate_key()).decode(), name, [HOST_IP]).host
        authority.registry.set_host_meta(hosts[role].id, META[role], "cli:test")
    authority.registry.close()
    return hosts


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except PromUnavailable:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    d: Path = tmp_path_factory.mktemp("prometheus")
    hosts = enroll_fleet(d / "authority")
    exporter = Exporter(lambda name, elapsed: exposition(FLOWS.get(name, []), elapsed))
    jobs = [
        {
            "job_name": f"meshagent-{role}",
            "metrics_path": f"/metrics/{role}",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{exporter.port}"],
                    # what agent/authority/service.py prometheus_targets labels a host with
                    "labels": {
                        "host_id": h.id,
                        "host": h.host_name,
                        "identity": f"spiffe://{TD}/ns/shop/sa/{h.identity.split('/')[1]}",
                        "namespace": "shop",
                        "serviceaccount": h.identity.split("/")[1],
                    },
                }
            ],
        }
        for role, h in hosts.items()
    ]
    jobs.append(
        {
            "job_name": "linkerd-proxy",
            "metrics_path": "/metrics/pod",
            "static_configs": [
                {"targets": [f"127.0.0.1:{exporter.port}"], "labels": {"namespace": "shop", "pod": "web-7d9"}}
            ],
        }
    )
    try:
        with prometheus(d, jobs, rules=rules([(h, META[role]) for role, h in hosts.items()])) as url:
            # Enough samples for a 10 s window that starts after the series began (12 scrapes).
            scrapes = (
                f'min(count_over_time(response_total{{host_id="{hosts["hb"].id}",client_id!=""}}[1m])) >= 12'
            )
            wait_for(url, scrapes, d)
            with PromClient(url) as prom:
                yield Running(prom, url, d / "authority", hosts)
    finally:
        exporter.close()


def test_edges_are_exactly_the_traffic_one_view_per_call(running: Running) -> None:
    found = edges(running.prom, running.records, dns_identity(TD, MESH), window="10s")
    by_pair = {(e.src, e.dst, running.role(e.dst_host)): e for e in found}
    expected = {
        # (src, dst, dst_host): (src_host, rps, success rate)
        ("", dns("api"), "hb"): (None, 2.0, 1.0),
        (dns("db"), dns("api"), "hb"): ("hc", 4.0, 1.0),
        (dns("web"), dns("api"), "hb"): ("ha", 10.0, 0.8),  # hb's inbound 10, not ha's outbound 7
        # the same identity's pods: ha's outbound view of its calls to other addresses
        (dns("web"), dns("api"), None): ("ha", 2.0, 0.5),
        (dns("frontend"), dns("web"), "ha"): (None, 5.0, 0.9995),
        (dns("web"), dns("pay"), None): ("ha", 3.0, 2 / 3),
        (dns("web"), "", None): ("ha", 1.0, 1.0),
        (dns("web"), dns("db"), "hc"): ("ha", 0.0, None),  # not HTTP: connections only
        (dns("monitor"), dns("db"), "hc"): (None, 0.0, None),  # one connection held open
    }
    assert sorted(by_pair, key=str) == sorted(expected, key=str), found
    assert len(found) == len(expected)
    for pair, (src_host, rps, success) in expected.items():
        e = by_pair[pair]
        assert running.role(e.src_host) == src_host, e
        # increase() extrapolates to the window's edges: a late scrape under load costs a few %
        assert e.rps == pytest.approx(rps, rel=0.08), e
        assert e.requests == pytest.approx(rps * 10, rel=0.08), e
        assert e.success_rate == (None if success is None else pytest.approx(success, abs=1e-3)), e
    # histogram_quantile's interpolation in the (50, 100] bucket: 50 + 0.99 * 50
    assert by_pair[(dns("web"), dns("api"), "hb")].p99_ms == pytest.approx(99.5, abs=0.5)
    assert by_pair[(dns("db"), dns("api"), "hb")].p99_ms == pytest.approx(4.99, abs=0.05)
    below = max(b for b in LATENCY_BOUNDS_MS if b < 50)
    assert by_pair[(dns("web"), dns("api"), None)].p99_ms == pytest.approx(
        below + 0.99 * (50 - below), abs=0.5
    )
    tcp, pool = by_pair[(dns("web"), dns("db"), "hc")], by_pair[(dns("monitor"), dns("db"), "hc")]
    assert tcp.connections == pytest.approx(5, rel=0.08) and tcp.p99_ms is None
    assert pool.connections == 0 and pool.p99_ms is None


def test_edges_of_one_host_are_those_into_or_out_of_it(running: Running) -> None:
    found = edges(
        running.prom, running.records, dns_identity(TD, MESH), window="10s", host_id=running.id("ha")
    )
    assert sorted((e.src, e.dst) for e in found) == sorted(
        [
            (dns("web"), dns("api")),
            (dns("web"), dns("api")),  # hb, and the api's pods
            (dns("frontend"), dns("web")),
            (dns("web"), dns("pay")),
            (dns("web"), ""),
            (dns("web"), dns("db")),
        ]
    )
    assert all(isinstance(e, Edge) and running.id("ha") in (e.src_host, e.dst_host) for e in found)


class Recording(PromClient):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.asked: list[str] = []
        self.answers: list[list[tuple[dict[str, str], float]]] = []

    def query(self, promql: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        self.asked.append(promql)
        answer = super().query(promql, at)
        self.answers.append(answer)
        return answer


def test_calls_outside_the_mesh_are_one_sample_per_host_not_per_address(running: Running) -> None:
    """Review 20b M6: the outbound view needs the address only for destinations with an identity
    (a host's or a pod's); a host calling thousands of addresses outside the mesh must not make
    the answer thousands of samples (over the bound, the page loses edges and budgets)."""
    with Recording(running.url) as prom:
        found = edges(prom, running.records, dns_identity(TD, MESH), window="10s")
    outbound = [a for q, a in zip(prom.asked, prom.answers, strict=True) if 'direction="outbound"' in q]
    assert len(outbound) == 5  # total, ok, opened, open, buckets
    for answer in outbound:
        unnamed = [labels for labels, _ in answer if not labels.get("server_id")]
        assert all("target_ip" not in labels for labels in unnamed), unnamed
    ha = running.id("ha")
    total = outbound[0]
    assert [v for labels, v in total if labels["host_id"] == ha and not labels.get("server_id")] == [
        pytest.approx(10, rel=0.08)
    ]
    assert any("target_ip" in labels for labels, _ in total)  # calls to identities: by address
    (out,) = [e for e in found if e.src_host == ha and e.dst == ""]
    assert out.rps == pytest.approx(1.0, rel=0.08)


@pytest.mark.parametrize("role", ["ha", "hb", "hc"])
def test_one_host_s_edges_read_only_its_series_and_its_callees_views_of_it(
    running: Running, role: str
) -> None:
    """A card's edges: the host's own series and its callees' inbound series naming its identity
    (review L13: the whole fleet's series were read and filtered in Python), the same edges."""
    hid, identity = running.id(role), dns(ROLES[role][1])
    fleet = edges(running.prom, running.records, dns_identity(TD, MESH), window="1m")
    with Recording(running.url) as prom:
        mine = edges(prom, running.records, dns_identity(TD, MESH), window="1m", host_id=hid)
    assert prom.asked and all(f'host_id="{hid}"' in q or f'client_id="{identity}"' in q for q in prom.asked)
    want = [e for e in fleet if hid in (e.src_host, e.dst_host)]
    assert [(e.src, e.dst, e.src_host, e.dst_host) for e in mine] == [
        (e.src, e.dst, e.src_host, e.dst_host) for e in want
    ]
    for a, b in zip(mine, want, strict=True):
        assert a.requests == pytest.approx(b.requests, rel=0.05) and a.connections == pytest.approx(
            b.connections, rel=0.05
        )


def test_an_identity_several_hosts_share_names_no_single_host(running: Running) -> None:
    twin = host("hd", "web-2", "web")  # a second host of the web service account
    found = edges(running.prom, [*running.records, twin], dns_identity(TD, MESH), window="10s")
    web_to_api = next(e for e in found if (e.src, e.dst) == (dns("web"), dns("api")) and e.dst_host)
    assert web_to_api.src_host is None and web_to_api.dst_host == running.id("hb")
    # a revoked record of the same identity (the host re-enrolled) does not hide the live one
    old = dataclasses.replace(twin, revoked_at=datetime.now(UTC))
    found = edges(running.prom, [*running.records, old], dns_identity(TD, MESH), window="10s")
    web_to_api = next(e for e in found if (e.src, e.dst) == (dns("web"), dns("api")) and e.dst_host)
    assert web_to_api.src_host == running.id("ha")


def test_one_host_s_calls_are_kept_when_other_hosts_share_its_identity(running: Running) -> None:
    """Review 20b L3: a second host of web's identity makes web-1's calls to other hosts (their
    inbound view: client_id = web, no single host) no host's; web-1's edges (and card) keep
    them, marked as attributed by identity only."""
    from agent.cli.authority_slo import _edges_table

    twin = host("hd", "web-2", "web")
    ha = running.id("ha")
    found = edges(running.prom, [*running.records, twin], dns_identity(TD, MESH), window="10s", host_id=ha)
    shared = [e for e in found if e.by_identity]
    assert sorted((e.dst, running.role(e.dst_host)) for e in shared) == [
        (dns("api"), "hb"),
        (dns("db"), "hc"),
    ]
    assert all(e.src == dns("web") and e.src_host is None for e in shared)
    web_to_api = next(e for e in shared if e.dst == dns("api"))
    assert web_to_api.rps == pytest.approx(10, rel=0.08) and web_to_api.to_doc()["by_identity"] is True
    # what its own views say stays its own, unmarked
    assert sorted(
        ((e.src, e.dst, running.role(e.dst_host)) for e in found if not e.by_identity), key=str
    ) == sorted(
        [
            (dns("frontend"), dns("web"), "ha"),
            (dns("web"), dns("api"), None),
            (dns("web"), dns("pay"), None),
            (dns("web"), "", None),
        ],
        key=str,
    )
    # without the twin, the same calls are web-1's by host id
    alone = edges(running.prom, running.records, dns_identity(TD, MESH), window="10s", host_id=ha)
    assert not any(e.by_identity for e in alone)
    assert _edges_table([web_to_api], {}).splitlines()[1].startswith("shop/web* ")


class WithoutRules(PromClient):
    """A Prometheus where the rule file is not loaded: its marker series are not there."""

    def query(self, promql: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        return [] if promql.startswith(MARKER) else super().query(promql, at)


@pytest.mark.parametrize("loaded", [True, False], ids=["recorded", "raw"])
def test_budgets_from_the_real_engine(running: Running, loaded: bool) -> None:
    """The same numbers from the rules' recorded series (the SLO window's ratio summed from the
    5 m rates) and, where the rules are not loaded, from the raw series."""
    with PromClient(running.url) if loaded else WithoutRules(running.url) as prom:
        _budgets_are_the_traffic_s(prom, running, "rules" if loaded else "raw")


def test_rules_written_for_another_slo_shape_are_not_read(running: Running) -> None:
    weekly = dataclasses.replace(AVAIL, window_days=7)  # the loaded rules record 28 d
    (now,) = budgets(running.prom, running.id("hb"), HostMeta(slos=(weekly,)))
    assert now.source == "raw" and now.sli == pytest.approx(0.875, abs=1e-3)


def _budgets_are_the_traffic_s(prom: PromClient, running: Running, source: str) -> None:
    hb = {b.slo.name: b for b in budgets(prom, running.id("hb"), META["hb"])}
    assert list(hb) == ["availability", "fast", "under-50", "admin-port"]
    assert {b.source for b in hb.values()} == {source}
    # hb serves 16 req/s, 2 of them failures: an error ratio of 0.125 against a 0.001 budget.
    a = hb["availability"]
    assert a.sli == pytest.approx(0.875, abs=1e-3)
    assert a.burn_1h == pytest.approx(125, rel=0.01) and a.burn_6h == pytest.approx(125, rel=0.01)
    assert a.remaining == pytest.approx(-124, rel=0.01)
    assert a.exhaustion_s == 0.0  # already overspent
    # Every response under 100 ms: nothing spent, not burning.
    fast = hb["fast"]
    assert fast.sli == pytest.approx(1.0) and fast.remaining == pytest.approx(1.0)
    assert fast.burn_1h == pytest.approx(0.0) and fast.exhaustion_s is None
    # 10 of 16 req/s take over 50 ms: 0.625 against a 0.01 budget.
    assert hb["under-50"].burn_1h == pytest.approx(62.5, rel=0.01)
    # No traffic on that port: nothing known.
    none = hb["admin-port"]
    assert (none.sli, none.remaining, none.burn_1h, none.exhaustion_s) == (None, None, None, None)

    # ha: 0.05 % failures against 0.1 %: half the budget spent, burning at 0.5, so what is
    # left (half a 28-day budget) lasts 28 days more.
    (ha,) = budgets(prom, running.id("ha"), META["ha"])
    assert ha.remaining == pytest.approx(0.5, abs=0.01)
    assert ha.burn_1h == pytest.approx(0.5, abs=0.01)
    assert ha.exhaustion_s == pytest.approx(28 * 86400, rel=0.03)


class CountingClient(WithoutRules):
    def __init__(self, url: str, loaded: bool) -> None:
        super().__init__(url)
        self.queries = 0
        self.loaded = loaded

    def query(self, promql: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        self.queries += 1
        return PromClient.query(self, promql, at) if self.loaded else super().query(promql, at)


@pytest.mark.parametrize("loaded", [True, False], ids=["recorded", "raw"])
def test_fleet_budgets_are_the_per_host_ones_in_a_few_queries(running: Running, loaded: bool) -> None:
    metas = {running.id(role): META[role] for role in ROLES}
    with CountingClient(running.url, loaded) as prom:
        fleet = fleet_budgets(prom, metas)
        if loaded:
            # the marker, and the ratio records over 28 d, 1 h and 6 h: for the whole fleet
            assert prom.queries == 4
        else:
            # the marker, then per shape (availability (all ports), availability port 9999,
            # latency 100 ms, latency 50 ms) each over its SLO window, 1 h and 6 h; ha's
            # availability SLO shares hb's queries
            assert prom.queries == 1 + 4 * 3
    assert list(fleet) == list(metas) and fleet[running.id("hc")] == []
    for host_id, meta in metas.items():
        one = budgets(running.prom, host_id, meta)
        assert [b.slo for b in fleet[host_id]] == [b.slo for b in one]
        for mine, theirs in zip(fleet[host_id], one, strict=True):
            for field in ("sli", "remaining", "burn_1h", "burn_6h", "exhaustion_s"):
                a, b = getattr(mine, field), getattr(theirs, field)
                assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=0.01)), field


def test_burn_history_is_the_hourly_burn_over_time(running: Running) -> None:
    now = time.time()
    points = burn_history(running.prom, running.id("hb"), AVAIL, span_s=5, step_s=1, end=now)
    assert 5 <= len(points) <= 6
    assert all(now - 5.01 <= t <= now + 0.01 for t, _ in points)
    assert all(burn == pytest.approx(125, rel=0.02) for _, burn in points)
    assert burn_history(running.prom, running.id("hb"), OTHER_PORT, span_s=5, step_s=1, end=now) == []


def test_the_generated_rules_fire_the_fast_burn_alert_in_prometheus(running: Running) -> None:
    def firing() -> set[tuple[str, str, str]]:
        return {
            (a["labels"]["alertname"], running.role(a["labels"]["host_id"]), a["labels"]["slo"])
            for a in running.prom.alerts()
            if a["state"] == "firing"
        }

    _wait(lambda: ("MeshagentSLOFastBurn", "hb", "availability") in firing(), "the fast-burn alert")
    alerts = firing()
    # hb's availability and its 50 ms latency SLO burn at every window's factor ...
    for name in (
        "MeshagentSLOFastBurn",
        "MeshagentSLOMediumBurn",
        "MeshagentSLOSlowBurn",
        "MeshagentSLOVerySlowBurn",
    ):
        assert (name, "hb", "availability") in alerts
        assert (name, "hb", "under-50") in alerts
    # ... ha's half-speed burn, the 100 ms SLO and the idle port fire nothing.
    assert not {a for a in alerts if a[1] == "ha" or a[2] in ("fast", "admin-port")}, alerts
    fast = next(
        a
        for a in running.prom.alerts()
        if a["labels"]["alertname"] == "MeshagentSLOFastBurn" and a["labels"]["slo"] == "availability"
    )
    assert fast["labels"]["severity"] == "page"
    assert fast["labels"]["owner_team"] == "api-team" and fast["labels"]["host"] == "api-1"
    assert "12.5%" in fast["annotations"]["description"]


def cli(running: Running, *args: str, prometheus: str | None = "") -> tuple[int, str, str]:
    """`meshagent authority ARGS --dir DIR [--prometheus URL]`, in this process (a subprocess per
    call costs a second of imports on a loaded machine)."""
    extra = ["--prometheus", prometheus or running.url] if prometheus is not None else []
    result = CliRunner().invoke(
        meshagent, ["authority", *args, "--dir", str(running.directory), *extra], env={PROMETHEUS_ENV: None}
    )
    return result.exit_code, result.stdout, result.stderr


def test_cli_edges_table_and_json(running: Running) -> None:
    code, out, err = cli(running, "edges", "--window", "10s", "--json")
    assert code == 0, err
    doc = json.loads(out)
    pairs = {(e["src"], e["dst"], e["dst_host"]): e for e in doc["edges"]}
    assert len(pairs) == 9 and pairs[(dns("web"), dns("api"), running.id("hb"))]["rps"] == pytest.approx(
        10, rel=0.08
    )
    code, _, err = cli(running, "edges", "--window", "1h30m")
    assert code == 2 and "not a duration" in err
    code, out, err = cli(running, "edges", "api-1", "--window", "10s")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SRC", "DST", "REQ/S", "SUCCESS", "P99", "SECURED"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[1:]}
    assert set(rows) == {("(no", "identity)"), ("db-1", "api-1"), ("web-1", "api-1")}, out
    success, p99, secured = rows[("web-1", "api-1")][1:]
    assert (success, secured) == ("80.00%", "yes") and p99 in ("99ms", "100ms")  # 99.5 rounded
    assert next(line for line in lines if line.startswith("(no identity)")).endswith(" no")


def test_cli_slo_status_shows_budgets_and_the_firing_alert(running: Running) -> None:
    code, out, err = cli(running, "slo", "status", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["prometheus_error"] is None
    by_host = {h["host"]: h for h in doc["hosts"]}
    assert set(by_host) == {"web-1", "api-1"}  # db-1 has no SLO
    api = {b["slo"]["name"]: b for b in by_host["api-1"]["budgets"]}
    assert api["availability"]["burn_1h"] == pytest.approx(125, rel=0.01)
    assert "MeshagentSLOFastBurn" in by_host["api-1"]["firing"]
    assert by_host["web-1"]["firing"] == []
    code, out, err = cli(running, "slo", "status", "web-1")
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split()[:3] == ["HOST", "SLO", "OBJECTIVE"]
    assert row.startswith("web-1") and "50.0%" in row and "0.50x" in row  # half the budget left


def test_cli_without_prometheus_still_lists_the_slos_exits_0_and_says_why(running: Running) -> None:
    """The rule for every catalog view: what the registry knows is shown (exit 0, the reason on
    stderr and as the JSON's prometheus_error string); `edges` has nothing else and exits 5."""
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = cli(running, "slo", "status", "--json", prometheus=dead)
    assert code == 0 and "did not answer" in err
    doc = json.loads(out)
    assert isinstance(doc["prometheus_error"], str) and "did not answer" in doc["prometheus_error"]
    api = next(h for h in doc["hosts"] if h["host"] == "api-1")
    assert [b["slo"]["name"] for b in api["budgets"]] == ["availability", "fast", "under-50", "admin-port"]
    assert all(b["remaining"] is None and b["status"] == "no_data" for b in api["budgets"])
    code, out, err = cli(running, "slo", "status", prometheus=dead)
    assert code == 0 and "api-1" in out and "did not answer" in err and "hint:" in err
    code, out, err = cli(running, "edges", prometheus=dead)
    assert code == 5 and out == "" and "did not answer" in err


def test_cli_slo_status_json_is_the_catalog_s_budget_document(running: Running) -> None:
    """One parser for `slo status --json`, `catalog show --json` and GET /v1/catalog: each
    budget is service_catalog.budget_doc's document (rounded, with its status)."""
    code, out, err = cli(running, "slo", "status", "api-1", "--json")
    assert code == 0, err
    budgets = next(h for h in json.loads(out)["hosts"] if h["host"] == "api-1")["budgets"]
    code, out, err = cli(running, "catalog", "show", "api-1", "--json")
    assert code == 0, err
    shown = json.loads(out)["budgets"]
    assert [sorted(b) for b in budgets] == [sorted(b) for b in shown]
    assert [(b["slo"], b["status"]) for b in budgets] == [(b["slo"], b["status"]) for b in shown]
    assert budgets[0]["status"] == "exhausted" and "host_id" not in budgets[0]
    assert {b["source"] for b in budgets} == {"rules"}  # the rule file is loaded there


def test_cli_slo_status_shows_the_registry_when_prometheus_refuses_the_query(running: Running) -> None:
    """A query Prometheus refuses (PromQueryError: an answer over the bound here) is handled as
    one it did not answer: the SLOs are listed, the reason on stderr."""
    from agent.authority import prom_query

    limit = prom_query.MAX_ANSWER_BYTES
    prom_query.MAX_ANSWER_BYTES = 10
    try:
        code, out, err = cli(running, "slo", "status", "--json")
    finally:
        prom_query.MAX_ANSWER_BYTES = limit
    assert code == 0, err
    doc = json.loads(out)
    assert "more than 10 bytes" in doc["prometheus_error"] and "more than 10 bytes" in err
    assert {h["host"] for h in doc["hosts"]} == {"web-1", "api-1"}


def test_cli_slo_rules_writes_the_registry_s_slos(running: Running) -> None:
    target = running.directory / "slo-rules.yml"
    code, _, err = cli(running, "slo", "rules", "--output", str(target), prometheus=None)
    assert code == 0, err
    assert "5 SLO(s) on 2 host(s)" in err
    doc = yaml.safe_load(target.read_text())
    assert [g["name"] for g in doc["groups"]] == sorted(
        f"meshagent-slo-{running.id(r)}" for r in ("ha", "hb")
    )
    code, printed, err = cli(running, "slo", "rules", prometheus=None)
    assert code == 0 and printed == target.read_text()


def test_a_dead_port_is_prometheus_unavailable_with_a_hint() -> None:
    with (
        PromClient(f"http://127.0.0.1:{free_port()}", timeout_s=2) as prom,
        pytest.raises(PromUnavailable) as e,
    ):
        edges(prom, [host("ha", "web-1", "web")], dns_identity(TD, MESH))
    assert "did not answer" in e.value.message and "--prometheus" in e.value.hint


def test_a_host_s_address_is_matched_however_the_socket_wrote_it() -> None:
    from agent.authority.edges import _address

    assert _address("::ffff:198.18.0.10") == "198.18.0.10" == _address("198.18.0.10")
    assert _address("2001:db8:0::1") == "2001:db8::1" and _address("not-an-ip") == "not-an-ip"


def test_windows_are_prometheus_durations() -> None:
    assert window_seconds("5m") == 300 and window_seconds("1h") == 3600 and window_seconds("10s") == 10
    for bad in ("5", "0m", "5s", "8d", "1h30m", "5M", "-1m", "1e3s"):
        with pytest.raises(WindowInvalid):
            window_seconds(bad)
    assert math.isclose(window_seconds("7d"), 7 * 86400)
