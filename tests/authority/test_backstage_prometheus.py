"""dependsOn from a real Prometheus: slo's fixture (tests/authority/test_edges_and_budgets.py:
an authority with web-1, api-1 and db-1 enrolled and their metadata set, a loopback exporter
serving their agents' series, a real Prometheus scraping it every second) reused, through
agent/authority/edges.py and through the CLI itself.

The traffic there: web-1 -> api-1 and db-1 -> api-1 (HTTP), web-1 -> db-1 (TCP only: a
database protocol, connections but no requests), web-1 -> pay (in-cluster), web-1 -> a
destination without identity, a plain-text client -> api-1, frontend and monitor (in-cluster)
-> web-1 / db-1, and an idle series."""

from __future__ import annotations

import shutil

import pytest
import yaml
from click.testing import CliRunner

from agent.authority import backstage as bs
from agent.authority.edges import dns_identity, edges
from agent.authority.host_meta import HostMeta
from agent.authority.prom_query import PROMETHEUS_ENV
from agent.cli.main import cli as meshagent
from tests.authority.test_backstage import assert_backstage_valid
from tests.authority.test_edges_and_budgets import MESH, META, TD, Running, running

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs prometheus (scripts/bootstrap)"
)

__all__ = ["running"]  # the fixture, imported for this module

EXPECTED = {
    "web-1": ["component:default/api-1", "component:default/db-1", "component:shop/pay"],
    "db-1": ["component:default/api-1"],
    "api-1": [],  # called by others, calls nobody
}


def test_depends_on_is_what_each_host_called(running: Running) -> None:
    found = edges(running.prom, running.records, dns_identity(TD, MESH), window="10s")
    metas: dict[str, HostMeta] = {h.id: META[role] for role, h in running.hosts.items()}
    result = bs.export(
        running.records, metas, found, dns_identity(TD, MESH), lambda h: f"spiffe://{TD}/ns/{h.identity}"
    )
    docs = {c.host_name: c.doc for c in result.components}
    assert {name: d["spec"]["dependsOn"] for name, d in docs.items()} == EXPECTED
    assert result.external_refs == ["component:shop/pay"]
    assert result.unmeshed_edges == 1  # web-1 -> the destination without identity
    assert docs["web-1"]["spec"]["owner"] == "group:default/web-team"
    assert docs["db-1"]["spec"]["owner"] == "unknown"
    for doc in docs.values():
        assert_backstage_valid(doc)


def test_the_cli_export_with_prometheus(running: Running) -> None:
    result = CliRunner().invoke(
        meshagent,
        ["authority", "backstage", "export", "--dir", str(running.directory), "--prometheus", running.url],
        env={PROMETHEUS_ENV: None},
    )
    assert result.exit_code == 0, result.output
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout)}
    assert {name: d["spec"]["dependsOn"] for name, d in docs.items()} == EXPECTED
    assert "dependsOn left out" not in result.stderr
    for doc in docs.values():
        assert_backstage_valid(doc)
