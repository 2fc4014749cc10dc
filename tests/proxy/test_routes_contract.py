"""Contract with the authority: the wire items rauth's compiler renders for its fixture
(tests/authority/fixtures/routes/expected.json, compiled from routes.yaml) parse on the agent
with no rejection and route as the policy says."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from agent.proxy.routes import RequestView, parse_routes
from agent.proxy.services import ServiceTable, parse_services

FIXTURE = Path(__file__).parents[1] / "authority" / "fixtures" / "routes" / "expected.json"


def discovered(items: list[dict[str, Any]]) -> ServiceTable:
    """A discovery result holding every Service the items name (parents and backends)."""
    ports: dict[tuple[str, str], set[int]] = {}
    refs = [item["parent"] for item in items] + [
        b["ref"] for item in items for r in item["routes"] for rule in r["rules"] for b in rule["backends"]
    ]
    for ref in refs:
        if ref["kind"] == "Service":
            ports.setdefault((ref["namespace"], ref["name"]), set()).add(ref["port"])
    docs = [
        {
            "name": name,
            "namespace": ns,
            "cluster_ips": [f"10.96.0.{i + 10}"],
            "ports": [{"port": p} for p in sorted(ps)],
            "endpoints": [{"address": f"10.0.{i}.5", "ports": {str(p): p for p in ps}}],
        }
        for i, ((ns, name), ps) in enumerate(sorted(ports.items()))
    ]
    return parse_services(docs, lambda *a: (_ for _ in ()).throw(AssertionError(a)))


def test_rauth_fixture_parses_without_rejection() -> None:
    items = json.loads(FIXTURE.read_text())
    services = discovered(items)
    rejected: list[Any] = []
    table = parse_routes(items, lambda *a: rejected.append(a), services)
    assert rejected == []
    assert len(table.parents()) == len(items)
    for item, policy in zip(items, table.parents(), strict=True):
        assert policy.parent.name == item["parent"]["name"] and policy.parent.port == item["parent"]["port"]
        assert policy.sources == tuple(item["sources"])
        assert len(policy.rules) == sum(len(r["rules"]) for r in item["routes"])
        for rule in policy.rules:
            for backend in rule.backends:
                assert backend.resolve(services), backend.ref  # every backend has endpoints here


def test_rauth_fixture_routes_as_written() -> None:
    items = json.loads(FIXTURE.read_text())
    services = discovered(items)
    table = parse_routes(items, lambda *a: None, services)
    billing = table.lookup("198.18.2.2", 8080)
    assert billing is not None
    rule = billing.select(RequestView(b"POST", "/anything", "", "billing", {}))
    assert rule is not None and rule.route.kind == "default" and rule.route.name == "http"
    rng = random.Random(1)
    names = [rule.pick(rng, lambda b: True).ref.name for _ in range(2000)]  # type: ignore[union-attr]
    assert 0.08 < names.count("billing-v2") / 2000 < 0.12
    orders = next(p for p in table.parents() if p.parent.name == "orders" and p.parent.port == 8080)
    api = orders.select(RequestView(b"GET", "/api/x", "v=2", "orders", {"x-canary": "1", "x-user": "u7"}))
    assert api is not None and api.route.name == "orders-api"
    assert (api.timeouts.request_s, api.timeouts.backend_request_s) == (5.0, 1.0)
    health = orders.select(RequestView(b"GET", "/healthz", "", "orders", {}))
    assert health is api
    admin = orders.select(RequestView(b"POST", "/admin/users", "", "orders", {}))
    assert admin is not None and admin.route.name == "orders-admin"
    assert admin.retry is not None and admin.retry.grpc == frozenset({4, 14})
    assert orders.select(RequestView(b"GET", "/other", "", "orders", {})) is None  # 404
