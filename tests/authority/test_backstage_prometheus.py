"""dependsOn from a real Prometheus: slo's fixture (tests/authority/test_edges_and_budgets.py:
a loopback exporter with three hosts' agent series, scraped every second) reused, its edges
through agent/authority/edges.py, then the Backstage export of those hosts.

The traffic there: web-1 -> api-1 (host to host), db-1 -> api-1, web-1 -> pay (in-cluster),
web-1 -> a destination without identity, a plain-text client -> api-1, frontend (in-cluster)
-> web-1, and an idle series."""

from __future__ import annotations

import shutil

import pytest

from agent.authority import backstage as bs
from agent.authority.edges import edges
from agent.authority.storage import HostRecord
from tests.authority.test_backstage import assert_backstage_valid
from tests.authority.test_edges_and_budgets import HOSTS, META, Running, dns, running

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs prometheus (scripts/bootstrap)"
)

__all__ = ["running"]  # the fixture, imported for this module


def identity_of(host: HostRecord) -> str:
    return dns(host.identity.rsplit("/", 1)[-1])


def spiffe_of(host: HostRecord) -> str:
    return f"spiffe://cluster.local/ns/shop/sa/{host.identity.rsplit('/', 1)[-1]}"


def test_depends_on_is_what_each_host_called(running: Running) -> None:
    found = edges(running.prom, HOSTS, identity_of, window="10s")
    result = bs.export(HOSTS, META, found, identity_of, spiffe_of)
    docs = {c.host_name: c.doc for c in result.components}
    assert {name: d["spec"]["dependsOn"] for name, d in docs.items()} == {
        "web-1": ["component:default/api-1", "component:shop/pay"],
        "db-1": ["component:default/api-1"],
        "api-1": [],  # called by others, calls nobody
    }
    assert result.external_refs == ["component:shop/pay"]
    assert result.unmeshed_edges == 1  # web-1 -> the destination without identity
    assert docs["web-1"]["spec"]["owner"] == "group:default/web-team"
    assert docs["db-1"]["spec"]["owner"] == "unknown"
    for doc in docs.values():
        assert_backstage_valid(doc)
