"""kube_routes (issue #21): route objects validated at apply (every problem named by object
and field, the whole file refused) and compiled into the directory's `routes` member. The
fixture (tests/authority/fixtures/routes) is the wire contract the agent's parser is tested
against (tests/proxy/test_routes*.py)."""

from __future__ import annotations

import json
import random
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.authority import kube_routes as kr
from agent.authority.kube_routes import KnownRefs, RouteObject, RouteRefused
from agent.authority.storage import HostRecord, Registration
from agent.errors import ExitCode
from agent.identity.delta import canonical_json

FIXTURES = Path(__file__).parent / "fixtures" / "routes"
NOW = 1765000000.0


def fixture_known(path: Path = FIXTURES / "known.json") -> tuple[list[dict[str, Any]], list[HostRecord]]:
    """The catalog entries and host records of known.json, as Authority.catalog renders them."""
    doc = json.loads(path.read_text())
    hosts, catalog = [], []
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for h in doc["hosts"]:
        ns, name = h["identity"].split("/")
        ports = tuple((n, p, proto) for n, p, proto in h["ports"])
        hosts.append(
            HostRecord(h["id"], h["identity"], h["id"], tuple(h["addresses"]), "01", at, "", at, None, None,
                       Registration(ports=ports))
        )  # fmt: skip
        for address in h["addresses"]:
            catalog.append(
                {
                    "cidr": f"{address}/32",
                    "ports": [],
                    "identity": f"spiffe://{doc['trust_domain']}/ns/{ns}/sa/{name}",
                    "server_name": f"{name}.{ns}.serviceaccount.identity.{doc['mesh']}.{doc['trust_domain']}",
                    "source": f"host:{h['id']}",
                }
            )
    return catalog, hosts


def known() -> KnownRefs:
    catalog, hosts = fixture_known()
    return kr.known_refs(catalog, hosts)


def parse(
    text: str, refs: KnownRefs | None = None, stored: list[RouteObject] | None = None
) -> list[RouteObject]:
    return kr.parse_routes_file(textwrap.dedent(text), refs or known(), now=NOW, stored=stored or [])


def problems(text: str, refs: KnownRefs | None = None, stored: list[RouteObject] | None = None) -> list[str]:
    with pytest.raises(RouteRefused) as caught:
        parse(text, refs, stored)
    assert caught.value.exit_code == ExitCode.CONFIG
    return list(caught.value.problems)


def compile_all(
    objects: list[RouteObject], refs: KnownRefs | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    skipped: list[str] = []
    items = kr.compile_routes(objects, refs or known(), lambda o, r: skipped.append(f"{o.label}: {r}"))
    return items, skipped


# --- the fixture: the wire contract --------------------------------------------------------------


def test_fixture_compiles_to_the_expected_wire_items() -> None:
    notes: list[str] = []
    objects = kr.parse_routes_file((FIXTURES / "routes.yaml").read_bytes(), known(), now=NOW, notes=notes)
    items, skipped = compile_all(objects)
    assert skipped == []
    assert items == json.loads((FIXTURES / "expected.json").read_text())
    # Service refs with no discovery behind them are pointed out, never refused.
    text = "\n".join(notes)
    assert "TrafficSplit shop/billing-canary: Service shop/billing-v2 (resolved by discovery" in text
    # A split root that is not a Service: the hosts of that identity, said so.
    assert (
        "TrafficSplit shop/billing-canary: spec.service billing: no Service shop/billing is known, "
        "so the enrolled hosts of identity shop/billing, port(s) 8080" in notes
    )


def test_compiled_member_is_the_same_bytes_whatever_the_order() -> None:
    objects = kr.parse_routes_file((FIXTURES / "routes.yaml").read_bytes(), known(), now=NOW)
    first = canonical_json(compile_all(objects)[0])
    for seed in range(5):
        shuffled = list(objects)
        random.Random(seed).shuffle(shuffled)
        assert canonical_json(compile_all(shuffled)[0]) == first


def test_fixture_fields_mapped() -> None:
    """Spot checks of the mapping in expected.json, so a regenerated fixture cannot drift."""
    items = json.loads((FIXTURES / "expected.json").read_text())
    by = {(i["parent"]["kind"], i["parent"]["name"], i["parent"]["port"]): i for i in items}
    split = by[("Host", "billing", 8080)]
    assert split["parent"]["addresses"] == ["198.18.2.2", "198.18.3.2"]  # sorted, both hosts
    (default,) = split["routes"]
    assert (default["group"], default["kind"], default["namespace"], default["name"]) == (
        "",
        "default",
        "",
        "http",
    )
    rule = default["rules"][0]
    assert rule["matches"] == []
    assert [b["weight"] for b in rule["backends"]] == [90, 10]
    host = rule["backends"][0]
    assert host["endpoints"][0] == {
        "address": "198.18.2.2",
        "port": 8080,
        "identity": "spiffe://cluster.local/ns/shop/sa/billing",
        "server_name": "billing.shop.serviceaccount.identity.linkerd.cluster.local",
    }
    assert "endpoints" not in rule["backends"][1]
    # accrual annotation on the TrafficSplit (meshagent extension): Linkerd's defaults.
    assert host["accrual"] == {
        "max_failures": 7,
        "min_penalty_ms": 1000,
        "max_penalty_ms": 60000,
        "jitter": 0.5,
    }
    assert rule["retry"]["http"] == [[502, 504]]  # gateway-error
    assert rule["retry"]["limit"] == 1  # Linkerd's default limit
    assert rule["timeouts"]["request_ms"] == 3000  # the TrafficSplit's own annotation

    orders = by[("Service", "orders", 8080)]
    assert orders["budget"] == {"ratio": 0.1, "min_per_s": 5, "ttl_s": 20.0}  # the ServiceProfile
    api, admin = orders["routes"]  # oldest first
    assert (api["name"], admin["name"]) == ("orders-api", "orders-admin")
    assert admin["group"] == "policy.linkerd.io"
    api_rule = api["rules"][0]
    assert api_rule["timeouts"] == {
        "request_ms": 5000,  # rules[].timeouts.request, over the Service's annotation (10s)
        "response_ms": None,  # (no timeout.linkerd.io/response or /idle on this route or Service)
        "idle_ms": None,
        "attempt_ms": None,
        "backend_request_ms": 1000,
    }
    assert api_rule["retry"]["limit"] == 3 and api_rule["retry"]["http"] == [[502, 502], [503, 503]]
    assert (api_rule["retry"]["backoff_min_ms"], api_rule["retry"]["backoff_max_ms"]) == (50, 500)
    assert api_rule["backends"][1]["accrual"] == {  # the backend Service's annotations
        "max_failures": 5,
        "min_penalty_ms": 500,
        "max_penalty_ms": 60000,
        "jitter": 0.25,
    }
    assert api_rule["matches"][0]["headers"][0] == {"type": "Exact", "name": "x-canary", "value": "1"}
    admin_rule = admin["rules"][0]
    assert admin_rule["backends"] == [  # no backendRefs: the parent itself
        {"weight": 1, "accrual": None, "ref": {"group": "", "kind": "Service", "namespace": "shop",
                                                "name": "orders", "port": 8080, "section": ""}}
    ]  # fmt: skip
    assert admin_rule["retry"]["grpc"] == [4, 14] and admin_rule["retry"]["limit"] == 2
    assert admin_rule["timeouts"]["attempt_ms"] == 300
    assert admin_rule["timeouts"]["request_ms"] == 10000  # the Service's annotation: service-level default
    # Service-level annotations, no route on 9090: Linkerd's default route.
    assert by[("Service", "orders", 9090)]["routes"][0]["kind"] == "default"


def test_stored_bodies_keep_only_what_is_read() -> None:
    objects = kr.parse_routes_file((FIXTURES / "routes.yaml").read_bytes(), known(), now=NOW)
    orders = next(o for o in objects if o.key == ("Service", "shop", "orders"))
    assert orders.body == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "orders",
            "namespace": "shop",
            "annotations": {"timeout.linkerd.io/request": "10s"},
        },
        "spec": {
            "ports": [
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "admin", "port": 9090, "protocol": "TCP"},
            ]
        },
    }
    assert orders.created_at == NOW and orders.source == "file"
    api = next(o for o in objects if o.name == "orders-api")
    assert api.created_at == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert api.body["metadata"]["creationTimestamp"] == "2026-12-01T00:00:00Z"


# --- validation: the issue's four cases and design §3.4 ---------------------------------------

SPLIT = """
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {namespace: shop, name: x}
spec:
  service: billing
  backends: [{service: billing, weight: %s}, {service: billing, weight: %s}]
"""

ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: shop, name: x%s}
spec:
  parentRefs: [{group: meshagent.io, kind: Host, name: billing, port: 8080}]
  rules:
    - %s
"""


def route(rule: str, annotations: str = "") -> str:
    meta = f", annotations: {{{annotations}}}" if annotations else ""
    return ROUTE % (meta, rule)


CASES = [
    # (the issue's four cases first)
    (
        "apiVersion: v1\nkind: Foo\nmetadata: {namespace: shop, name: x}\n",
        'Foo shop/x: kind "Foo" is not a route object meshagent reads '
        "(use HTTPRoute, TrafficSplit, ServiceProfile, Service)",
    ),
    (SPLIT % (0, 0), "TrafficSplit shop/x: spec.backends: every weight is 0: no request could be routed"),
    (
        route("{timeouts: {request: -5s}}"),
        'HTTPRoute shop/x: spec.rules[0].timeouts.request "-5s" is not a Gateway API duration',
    ),
    (
        route(
            "{backendRefs: [{group: meshagent.io, kind: Host, name: billing, port: 8080}, "
            "{name: ghost, port: 8080}]}"
        ),
        "HTTPRoute shop/x: spec.rules[0].backendRefs[1] Service shop/ghost is not in this file "
        "and no enrolled host has identity shop/ghost",
    ),
    # the rest of §3.4
    (
        SPLIT.replace("v1alpha2", "v1alpha1") % (1, 1),
        'apiVersion "split.smi-spec.io/v1alpha1" is not supported for TrafficSplit '
        "(use split.smi-spec.io/v1alpha2)",
    ),
    (
        ROUTE % ("", "{backendRefs: [{name: billing, kind: Host, group: meshagent.io, port: 8080}]}")
        + "    - {backendRefs: [{name: billing, kind: Host, group: meshagent.io, port: 8080, weight: 0}]}\n",
        "HTTPRoute shop/x: spec.rules[1].backendRefs: every weight is 0: no request could be routed",
    ),
    (SPLIT % ('"50%"', 1), "TrafficSplit shop/x: spec.backends[0].weight"),
    (SPLIT % (1.5, 1), "TrafficSplit shop/x: spec.backends[0].weight"),
    (
        route("{}", '"timeout.linkerd.io/request": "-5s"'),
        'HTTPRoute shop/x: metadata.annotations["timeout.linkerd.io/request"] "-5s": '
        "duration value cannot be negative",
    ),
    (
        route("{}", '"timeout.linkerd.io/request": "1.5s"'),
        'metadata.annotations["timeout.linkerd.io/request"] "1.5s"',
    ),
    (route("{}", '"retry.linkerd.io/timeout": "5"'), 'metadata.annotations["retry.linkerd.io/timeout"] "5"'),
    (
        route("{timeouts: {request: 1s, backendRequest: 2s}}"),
        "HTTPRoute shop/x: spec.rules[0].timeouts.backendRequest is longer than timeouts.request",
    ),
    (
        route("{backendRefs: [{name: billing-v2}]}"),
        "HTTPRoute shop/x: spec.rules[0].backendRefs[0].port is required for Service",
    ),
    (
        route("{backendRefs: [{group: meshagent.io, kind: Host, name: ghost, port: 80}]}"),
        "spec.rules[0].backendRefs[0] Host shop/ghost: no enrolled host has identity shop/ghost",
    ),
    (
        ROUTE.replace("name: billing, port: 8080", "name: ghost, port: 8080") % ("", "{}"),
        "HTTPRoute shop/x: spec.parentRefs[0] Host shop/ghost: no enrolled host has identity shop/ghost",
    ),
    (
        ROUTE.replace(
            "{group: meshagent.io, kind: Host, name: billing, port: 8080}",
            "{kind: Service, group: '', name: web}",
        )
        % ("", "{}"),
        "HTTPRoute shop/x: spec.parentRefs[0] Service shop/web is not in this file "
        "and no enrolled host has identity",
    ),
    (
        ROUTE.replace(
            "{group: meshagent.io, kind: Host, name: billing, port: 8080}",
            "{kind: Service, group: '', name: billing}",
        )
        % ("", "{}"),
        "enrolled hosts have identity shop/billing: name them with group: meshagent.io, kind: Host",
    ),
    (
        SPLIT.replace("service: billing\n", "service: ghost\n", 1) % (1, 1),
        "TrafficSplit shop/x: spec.service Service shop/ghost",
    ),
    (
        SPLIT % (1, "1}, {service: nope, weight: 1"),
        "TrafficSplit shop/x: spec.backends[2].service Service shop/nope is not in this file",
    ),
    (
        route("{matches: [{path: {value: /a//b}}]}"),
        'spec.rules[0].matches[0].path.value "/a//b" is not a path',
    ),
    (
        route("{matches: [{path: {value: api}}]}"),
        'spec.rules[0].matches[0].path.value "api" must start with /',
    ),
    (route("{matches: [{path: {value: /a/.., type: Exact}}]}"), "spec.rules[0].matches[0].path.value"),
    (route("{matches: [{path: {value: '/a', type: Glob}}]}"), 'spec.rules[0].matches[0].path.type "Glob"'),
    (
        route("{matches: [{headers: [{name: 'x y', value: '1'}]}]}"),
        "spec.rules[0].matches[0].headers[0].name",
    ),
    (
        route("{matches: [{queryParams: [{name: 'q', value: ''}]}]}"),
        "spec.rules[0].matches[0].queryParams[0].value",
    ),
    (route("{matches: [{method: FETCH}]}"), 'spec.rules[0].matches[0].method "FETCH" is not one of GET'),
    (
        route("{matches: [{path: {type: RegularExpression, value: '/(a'}}]}"),
        'spec.rules[0].matches[0].path.value "/(a" is not a regular expression',
    ),
    (
        route("{filters: [{type: RequestHeaderModifier}]}"),
        "spec.rules[0].filters: filters are not supported "
        "(meshagent would otherwise change requests silently)",
    ),
    (
        ROUTE.replace("spec:\n", "spec:\n  hostnames: [shop.example]\n") % ("", "{}"),
        "HTTPRoute shop/x: spec.hostnames must be empty",
    ),
    (
        ROUTE.replace("{group: meshagent.io, kind: Host, name: billing, port: 8080}", "{name: gw}")
        % ("", "{}"),
        'spec.parentRefs[0].kind "Gateway": Gateway parents are not supported',
    ),
    (
        ROUTE.replace("name: billing, port: 8080", "name: billing, namespace: other, port: 8080")
        % ("", "{}"),
        'spec.parentRefs[0].namespace "other": a parent in another namespace makes a consumer route',
    ),
    (
        ROUTE.replace("name: billing, port: 8080", "name: billing") % ("", "{}"),
        "spec.parentRefs[0].port is required for Host",
    ),
    (ROUTE % ("", "{name: a}") + "    - {name: a}\n", 'spec.rules[1].name "a" is given to two rules'),
    (route("{retry: {attempts: 0}}"), 'spec.rules[0].retry.attempts "0" must be a whole number from 1'),
    (route("{retry: {codes: [600]}}"), "spec.rules[0].retry.codes[0]"),
    (
        route("{retry: {attempts: 2}}", '"retry.linkerd.io/limit": "2"'),
        "spec.rules[0].retry and retry.linkerd.io annotations both given: use one",
    ),
    (
        route("{}", '"retry.linkerd.io/http": "5xy"'),
        'metadata.annotations["retry.linkerd.io/http"] "5xy" is not 5xx',
    ),
    (
        route("{}", '"retry.linkerd.io/http": "600-700"'),
        'metadata.annotations["retry.linkerd.io/http"] "600-700"',
    ),
    (route("{}", '"retry.linkerd.io/grpc": "oops"'), 'metadata.annotations["retry.linkerd.io/grpc"] "oops"'),
    (
        route("{}", '"balancer.linkerd.io/failure-accrual": "unified"'),
        'metadata.annotations["balancer.linkerd.io/failure-accrual"] "unified" '
        "is not supported (use consecutive)",
    ),
    (
        route(
            "{}",
            '"balancer.linkerd.io/failure-accrual": consecutive, '
            '"balancer.linkerd.io/failure-accrual-consecutive-min-penalty": 2m, '
            '"balancer.linkerd.io/failure-accrual-consecutive-max-penalty": 1m',
        ),
        'failure-accrual-consecutive-min-penalty"] is above the max penalty',
    ),
    (
        route(
            "{}",
            '"balancer.linkerd.io/failure-accrual": consecutive, '
            '"balancer.linkerd.io/failure-accrual-consecutive-jitter-ratio": "101"',
        ),
        'failure-accrual-consecutive-jitter-ratio"] "101" is not a number from 0 to 100',
    ),
    (
        route("{}", '"balancer.linkerd.io/failure-accrual-consecutive-max-failures": "3"'),
        "has no effect without balancer.linkerd.io/failure-accrual: consecutive",
    ),
    (
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\nmetadata: {namespace: shop, name: billing}\n"
        "spec: {retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s}}\n",
        'ServiceProfile shop/billing: metadata.name "billing" must be SERVICE.shop.svc.cluster.local',
    ),
    (
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n"
        "metadata: {namespace: shop, name: billing.shop.svc.cluster.local}\nspec: {routes: []}\n",
        "spec.routes is not read: meshagent reads a ServiceProfile's retryBudget only",
    ),
    (
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n"
        "metadata: {namespace: shop, name: billing.shop.svc.cluster.local}\n"
        "spec: {retryBudget: {retryRatio: 2000, minRetriesPerSecond: 10, ttl: 10s}}\n",
        'spec.retryBudget.retryRatio "2000" must be a number from 0 to 1000',
    ),
    (
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n"
        "metadata: {namespace: shop, name: billing.shop.svc.cluster.local}\n"
        "spec: {retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 2m}}\n",
        'spec.retryBudget.ttl "2m" must be from 1s to 60s',
    ),
    (
        ROUTE.replace("port: 8080}", "port: 25}") % ("", "{}"),
        "spec.parentRefs[0].port 25 is a skip-detect port",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop, name: db}\n"
        "spec: {ports: [{name: pg, port: 5432}]}\n"
        "---\n"
        + ROUTE.replace(
            "{group: meshagent.io, kind: Host, name: billing, port: 8080}",
            "{kind: Service, group: '', name: db, port: 5432}",
        )
        % ("", "{}"),
        "spec.parentRefs[0].port 5432 is an opaque port of Service shop/db",
    ),
    (
        SPLIT % (1, 1) + "---\n" + ROUTE.replace("name: x", "name: y") % ("", "{}"),
        "Host shop/billing port 8080 already has",
    ),
    (route("{backendref: []}"), "spec.rules[0].backendref is not a field meshagent reads here"),
    (
        SPLIT.replace("spec:\n", "spec:\n  matches: []\n") % (1, 1),
        "TrafficSplit shop/x: spec.matches is not a field",
    ),
    (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {namespace: shop, name: g}\n",
        'GRPCRoute shop/g: kind "GRPCRoute" is not read: use an HTTPRoute',
    ),
    (
        ROUTE.replace("rules:\n    - %s\n", "rules: [%s]\n") % ("", ", ".join(["{}"] * 17)),
        "spec.rules has 17 entries; at most 16",
    ),
    (SPLIT.replace("namespace: shop, ", "") % (1, 1), "metadata.namespace is required"),
    (
        SPLIT.replace("name: x", "name: X") % (1, 1),
        'TrafficSplit shop/X: metadata.name "X" is not a valid name',
    ),
    (
        route("{}", '"retry.linkerd.io/limt": "3"'),
        'metadata.annotations["retry.linkerd.io/limt"] is not an annotation meshagent reads (known: '
        "retry.linkerd.io/grpc, retry.linkerd.io/http, retry.linkerd.io/limit, retry.linkerd.io/timeout)",
    ),
    (
        SPLIT.replace("name: x}", "name: x, annotations: {timeout.linkerd.io/reqeust: 2s}}") % (1, 1),
        'TrafficSplit shop/x: metadata.annotations["timeout.linkerd.io/reqeust"] is not an annotation',
    ),
    # what the hosts could not parse is refused (never accepted and ignored)
    (
        route("{}", '"timeout.linkerd.io/response": 1.5s'),
        'metadata.annotations["timeout.linkerd.io/response"] "1.5s": is not a duration',
    ),
    (
        route("{}", '"timeout.linkerd.io/idle": "-1s"'),
        'metadata.annotations["timeout.linkerd.io/idle"] "-1s": duration value cannot be negative',
    ),
    (route("{}", '"timeout.linkerd.io/request": 2d'), '"2d": is longer than a day'),
    (route("{timeouts: {request: 48h}}"), 'spec.rules[0].timeouts.request "48h" is longer than a day'),
    (route("{retry: {backoff: 3h}}"), 'spec.rules[0].retry.backoff "3h" is longer than 2h24m'),
    (
        route(
            "{}",
            '"balancer.linkerd.io/failure-accrual": consecutive, '
            '"balancer.linkerd.io/failure-accrual-consecutive-max-penalty": 2d',
        ),
        'failure-accrual-consecutive-max-penalty"] "2d": is longer than a day',
    ),
    (
        route("{matches: [{headers: [{type: RegularExpression, name: x, value: '%s'}]}]}" % ("a" * 1025)),
        "spec.rules[0].matches[0].headers[0].value is a regular expression longer than 1024 characters",
    ),
    (
        route("{}", '"retry.linkerd.io/limit": 3'),
        'metadata.annotations["retry.linkerd.io/limit"] must be a string',
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop, name: api}\n"
        "spec: {ports: [{port: 80}]}\n---\n" + route("{backendRefs: [{name: api, port: 8080}]}"),
        "spec.rules[0].backendRefs[0].port 8080 is not a TCP port of Service shop/api",
    ),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_refused_with_the_field_named(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in p for p in found), found


def test_a_file_is_refused_whole() -> None:
    text = SPLIT % (90, 10) + "---\n" + route("{timeouts: {request: -5s}}")
    found = problems(text)
    assert len(found) == 1 and found[0].startswith("HTTPRoute shop/x: spec.rules[0].timeouts.request")


def test_every_problem_is_listed() -> None:
    text = SPLIT % (0, 0) + "---\n" + route("{timeouts: {request: -5s}}") + "---\napiVersion: v1\nkind: Foo\n"
    found = problems(text)
    assert len(found) == 3


def test_yaml_aliases_and_garbage_refused() -> None:
    assert "aliases are not accepted" in problems("a: &x 1\nb: *x\n")[0]
    assert "not valid YAML" in problems("a: [\n")[0]


def test_two_sources_checked_against_the_stored_objects() -> None:
    stored = parse(SPLIT % (1, 1))
    found = problems(ROUTE.replace("name: x", "name: y") % ("", "{}"), stored=stored)
    assert found == [
        "HTTPRoute shop/y: Host shop/billing port 8080 already has TrafficSplit shop/x: "
        "a parent port takes HTTPRoutes or one TrafficSplit"
    ]
    # The other way round: a TrafficSplit onto a port HTTPRoutes hold, named once.
    routes = parse(ROUTE.replace("name: x", "name: y") % ("", "{}"))
    assert problems(SPLIT % (1, 1), stored=routes) == [
        "TrafficSplit shop/x: Host shop/billing port 8080 already has HTTPRoute shop/y: "
        "a parent port takes HTTPRoutes or one TrafficSplit"
    ]
    # The same TrafficSplit applied again replaces itself: no conflict.
    assert [o.label for o in parse(SPLIT % (2, 1), stored=stored)] == ["TrafficSplit shop/x"]


def test_an_item_too_large_is_refused_at_apply() -> None:
    matches = ", ".join(f"{{headers: [{{name: h{i}, value: {'v' * 700}}}]}}" for i in range(60))
    text = route(f"{{matches: [{matches}]}}") + f"    - {{matches: [{matches}]}}\n"
    found = problems(text)
    assert any("item too large" in p for p in found), found


def test_accepted_forms() -> None:
    """What must not be refused: defaults, core group spelled "core", Service sectionName,
    Linkerd's duration forms, a split root that names hosts with annotated ports."""
    objects = parse(
        """
        apiVersion: v1
        kind: Service
        metadata: {namespace: shop, name: web}
        spec: {ports: [{name: http, port: 80}, {name: grpc, port: 9000}]}
        ---
        apiVersion: gateway.networking.k8s.io/v1beta1
        kind: HTTPRoute
        metadata:
          namespace: shop
          name: web
          annotations:
            timeout.linkerd.io/request: "0"
            retry.linkerd.io/limit: "0"
            retry.linkerd.io/http: "503"
        spec:
          parentRefs: [{group: core, kind: Service, name: web, sectionName: grpc}]
        ---
        apiVersion: split.smi-spec.io/v1alpha2
        kind: TrafficSplit
        metadata: {namespace: shop, name: vm, annotations: {split.meshagent.io/ports: "9443"}}
        spec: {service: orders-vm, backends: [{service: orders-vm, weight: 1}]}
        """
    )
    items, skipped = compile_all(objects)
    assert skipped == []
    web = next(i for i in items if i["parent"]["name"] == "web")
    assert web["parent"]["port"] == 9000
    rule = web["routes"][0]["rules"][0]
    assert rule["matches"] == [
        {"path": {"type": "PathPrefix", "value": "/"}, "method": None, "headers": [], "query": []}
    ]
    assert rule["timeouts"]["request_ms"] is None  # "0": none
    assert rule["retry"]["limit"] == 1 and rule["retry"]["http"] == [[503, 503]]  # limit 0 = unset = 1
    vm = next(i for i in items if i["parent"]["name"] == "orders-vm")
    assert vm["parent"] == {"group": "meshagent.io", "kind": "Host", "namespace": "shop", "name": "orders-vm",
                            "port": 9443, "section": "", "addresses": ["198.18.4.2"]}  # fmt: skip


def test_response_and_idle_timeouts_compile_and_reach_the_agent() -> None:
    """Linkerd's timeout.linkerd.io/response and /idle: the route's own annotations, else the
    Service's (service-level defaults); "0" is none, but still the route's own set (the
    Service's set then applies not at all). The agent reads them into Rule.timeouts."""
    from agent.proxy.routes import parse_routes
    from agent.proxy.services import parse_services

    objects = parse(
        """
        apiVersion: v1
        kind: Service
        metadata:
          namespace: shop
          name: web
          annotations: {timeout.linkerd.io/response: 3s, timeout.linkerd.io/idle: 1m}
        spec: {ports: [{name: http, port: 80}, {name: grpc, port: 9000}]}
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata:
          namespace: shop
          name: web-http
          annotations: {timeout.linkerd.io/response: 2s, timeout.linkerd.io/idle: 500ms}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata:
          namespace: shop
          name: web-grpc
          annotations: {timeout.linkerd.io/idle: "0"}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 9000}]
        """
    )
    items, skipped = compile_all(objects)
    assert skipped == []
    by_port = {i["parent"]["port"]: i["routes"][0]["rules"][0]["timeouts"] for i in items}
    assert (by_port[80]["response_ms"], by_port[80]["idle_ms"]) == (2000, 500)  # the route's own
    assert (by_port[9000]["response_ms"], by_port[9000]["idle_ms"]) == (None, None)  # the route's set
    docs = [
        {"name": "web", "namespace": "shop", "cluster_ips": ["198.19.0.1"],
         "ports": [{"port": 80}, {"port": 9000}],
         "endpoints": [{"address": "198.19.1.1", "ports": {"80": 80, "9000": 9000}}]}
    ]  # fmt: skip
    rejected: list[Any] = []
    table = parse_routes(
        items, lambda *a: rejected.append(a), parse_services(docs, lambda *a: rejected.append(a))
    )
    assert rejected == []
    got = {p.parent.port: p.rules[0].timeouts for p in table.parents()}
    assert (got[80].response_s, got[80].idle_s) == (2.0, 0.5)
    assert (got[9000].response_s, got[9000].idle_s) == (None, None)


def test_route_timeout_or_retry_annotations_replace_the_services_whole_set() -> None:
    """Linkerd (policy-controller outbound http.rs): a rule whose route carries any
    timeout.linkerd.io/* (or whose `timeouts.request` is set) takes none of the Service's
    timeouts; a route with any retry.linkerd.io/* takes none of the Service's retry settings,
    `retry.linkerd.io/timeout` included. A route with neither takes the Service's sets whole."""
    objects = parse(
        """
        apiVersion: v1
        kind: Service
        metadata:
          namespace: shop
          name: web
          annotations:
            timeout.linkerd.io/request: 10s
            timeout.linkerd.io/idle: 1s
            retry.linkerd.io/http: 5xx
            retry.linkerd.io/limit: "3"
            retry.linkerd.io/timeout: 400ms
        spec: {ports: [{name: http, port: 80}, {name: grpc, port: 9000}, {name: admin, port: 9990}]}
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata:
          namespace: shop
          name: export
          annotations: {timeout.linkerd.io/request: 5m, retry.linkerd.io/http: gateway-error}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {namespace: shop, name: plain}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 9000}]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {namespace: shop, name: ruled}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 9990}]
          rules: [{timeouts: {request: 2s}}]
        """
    )
    items, skipped = compile_all(objects)
    assert skipped == []
    rules = {i["parent"]["port"]: i["routes"][0]["rules"][0] for i in items}
    export, plain, ruled = rules[80], rules[9000], rules[9990]
    # The route's request only: not the Service's idle 1s (an export quiet for 1 s is not cut).
    assert (export["timeouts"]["request_ms"], export["timeouts"]["idle_ms"]) == (300_000, None)
    # The route's retry (limit 1, gateway-error), and no attempt timeout from the Service.
    assert export["retry"]["limit"] == 1 and export["retry"]["http"] == [[502, 504]]
    assert export["timeouts"]["attempt_ms"] is None
    # No annotations on the route: the Service's sets, whole.
    assert (plain["timeouts"]["request_ms"], plain["timeouts"]["idle_ms"]) == (10_000, 1000)
    assert plain["retry"]["limit"] == 3 and plain["timeouts"]["attempt_ms"] == 400
    # The rule's timeouts.request is a timeout of the route's own: the Service's idle is not taken.
    assert (ruled["timeouts"]["request_ms"], ruled["timeouts"]["idle_ms"]) == (2000, None)
    assert ruled["retry"]["limit"] == 3  # (no retry on the route: the Service's retry set)


def test_split_root_of_hosts_without_ports_is_refused_with_the_annotation_named() -> None:
    text = SPLIT.replace("billing", "orders-vm") % (1, 1)
    assert any('annotation split.meshagent.io/ports: "8080,8443"' in p for p in problems(text))


def test_service_parent_without_port_attaches_to_every_http_port() -> None:
    objects = parse(
        """
        apiVersion: v1
        kind: Service
        metadata: {namespace: shop, name: web}
        spec: {ports: [{name: http, port: 80}, {name: alt, port: 8080}, {name: db, port: 3306}]}
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {namespace: shop, name: web}
        spec: {parentRefs: [{group: "", kind: Service, name: web}]}
        """
    )
    items, _ = compile_all(objects)
    ports = [i["parent"]["port"] for i in items if i["parent"]["name"] == "web"]
    assert ports == [80, 8080]  # 3306: opaque by Linkerd's default and skip-detect
    # The parent itself as backend, on each port.
    assert [i["routes"][0]["rules"][0]["backends"][0]["ref"]["port"] for i in items] == [80, 8080]


# --- compile: stored objects that no longer resolve are skipped, never fatal -------------------


def test_revoked_hosts_skip_the_objects_naming_them() -> None:
    objects = kr.parse_routes_file((FIXTURES / "routes.yaml").read_bytes(), known(), now=NOW)
    catalog, hosts = fixture_known()
    catalog = [c for c in catalog if c["source"] != "host:h-orders-vm"]  # revoked: out of the catalog
    items, skipped = compile_all(objects, kr.known_refs(catalog, hosts))
    assert skipped == [
        "HTTPRoute shop/orders-api: spec.rules[0].backendRefs[0] Host shop/orders-vm: "
        "no enrolled host has identity shop/orders-vm"
    ]
    orders = next(i for i in items if (i["parent"]["name"], i["parent"]["port"]) == ("orders", 8080))
    assert [r["name"] for r in orders["routes"]] == ["orders-admin"]
    assert len(items) == 4


def test_a_stored_body_that_no_longer_parses_is_skipped() -> None:
    (good,) = parse(SPLIT % (1, 1))
    bad = RouteObject("HTTPRoute", "shop", "hand", "gateway.networking.k8s.io/v1", {"spec": 5}, "file", 0.0)
    items, skipped = compile_all([good, bad])
    assert len(items) == 1 and skipped[0].startswith("HTTPRoute shop/hand: no longer valid")


def test_known_refs_from_the_catalog() -> None:
    catalog, hosts = fixture_known()
    refs = kr.known_refs(
        catalog,
        hosts,
        [{"namespace": "shop", "name": "web", "cluster_ips": ["198.19.0.1"],
          "ports": [{"port": 80, "name": "http", "protocol": "TCP", "opaque": False},
                    {"port": 5432, "name": "", "protocol": "TCP", "opaque": True}], "endpoints": []}],
    )  # fmt: skip
    billing = refs.hosts[("shop", "billing")]
    assert billing.addresses == ("198.18.2.2", "198.18.3.2")
    assert billing.identity == "spiffe://cluster.local/ns/shop/sa/billing"
    assert billing.ports == (("http", 8080),)
    web = refs.services[("shop", "web")]
    assert web.discovered and web.opaque == frozenset({5432}) and web.ports == (("http", 80), ("", 5432))


# --- contract with the agent: whatever compiles, the agent parses without rejection ---------

ACCEPTED = [
    (FIXTURES / "routes.yaml").read_text(),
    SPLIT % (1, 0),
    route("{matches: [{path: {type: Exact, value: /a}, method: GET}], timeouts: {request: 1h2m3s4ms}}"),
    route(
        "{retry: {codes: [500, 503], attempts: 5, backoff: 100ms}}",
        '"balancer.linkerd.io/failure-accrual": consecutive, "timeout.linkerd.io/request": "1d"',
    ),
    """
    apiVersion: v1
    kind: Service
    metadata: {namespace: shop, name: web, annotations: {retry.linkerd.io/grpc: "unavailable,internal"}}
    spec: {ports: [{name: http, port: 80}, {name: alt, port: 8080}]}
    """,
    # the largest value of each grammar must still parse on the hosts
    route(
        "{matches: [{path: {type: RegularExpression, value: '/" + "a" * 1023 + "'},"
        " headers: [{type: RegularExpression, name: x, value: '" + "b" * 1024 + "'}]}],"
        " backendRefs: [{group: meshagent.io, kind: Host, name: billing, port: 65535, weight: 1000000}],"
        " timeouts: {request: 24h, backendRequest: 24h},"
        " retry: {codes: [599], attempts: 65535, backoff: 2h24m}}"
    ),
    route(
        "{}",
        '"balancer.linkerd.io/failure-accrual": consecutive, '
        '"balancer.linkerd.io/failure-accrual-consecutive-max-failures": "2147483648", '
        '"balancer.linkerd.io/failure-accrual-consecutive-min-penalty": 1d, '
        '"balancer.linkerd.io/failure-accrual-consecutive-max-penalty": 1d, '
        '"balancer.linkerd.io/failure-accrual-consecutive-jitter-ratio": "100", '
        '"retry.linkerd.io/timeout": 1d, "retry.linkerd.io/limit": "65535", '
        '"timeout.linkerd.io/request": 1d, '
        '"retry.linkerd.io/http": "100-599", "retry.linkerd.io/grpc": "cancelled,deadline-exceeded,internal,'
        'resource-exhausted,unavailable"',
    )
    + "---\napiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n"
    "metadata: {namespace: shop, name: billing.shop.svc.cluster.local}\n"
    "spec: {retryBudget: {retryRatio: 1000, minRetriesPerSecond: 2147483646, ttl: 60s}}\n",
]


@pytest.mark.parametrize("text", ACCEPTED, ids=[f"accepted{i}" for i in range(len(ACCEPTED))])
def test_compiled_items_parse_on_the_agent(text: str) -> None:
    from agent.proxy.routes import parse_routes
    from agent.proxy.services import parse_services

    items, skipped = compile_all(parse(text))
    assert items and skipped == []
    # The Services the items name, as discovery would serve them (one endpoint each).
    ports: dict[tuple[str, str], set[int]] = {}
    for item in items:
        refs = [
            item["parent"],
            *(b["ref"] for r in item["routes"] for rule in r["rules"] for b in rule["backends"]),
        ]
        for ref in refs:
            if ref["kind"] == "Service":
                ports.setdefault((ref["namespace"], ref["name"]), set()).add(ref["port"])
    docs = [
        {"name": name, "namespace": ns, "cluster_ips": [f"198.19.0.{i + 1}"],
         "ports": [{"port": p} for p in sorted(ps)],
         "endpoints": [{"address": f"198.19.1.{i + 1}", "ports": {str(p): p for p in ps}}]}
        for i, ((ns, name), ps) in enumerate(sorted(ports.items()))
    ]  # fmt: skip
    rejected: list[Any] = []
    services = parse_services(docs, lambda *a: rejected.append(a))
    table = parse_routes(items, lambda *a: rejected.append(a), services)
    assert rejected == []
    assert len(table.parents()) == len(items)


JUNK: list[Any] = [None, 5, -1, 1.5, True, "x", "-5s", "", [], {}, [1, 2], {"a": 1}, {"port": "http"}, [None]]


def _mutate(value: Any, rng: random.Random) -> Any:
    """`value` with one node somewhere in it replaced by junk."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        return {**value, key: _mutate(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return [*value[:i], _mutate(value[i], rng), *value[i + 1 :]]
    return rng.choice(JUNK)


def test_stored_bodies_that_do_not_read_never_break_the_document() -> None:
    """Rows written by hand (or by another version) are skipped, one object each: known_refs
    and compile_routes never raise, and what they render is canonical JSON."""
    objects = kr.parse_routes_file((FIXTURES / "routes.yaml").read_bytes(), known(), now=NOW)
    catalog, hosts = fixture_known()
    skips = 0
    for seed in range(300):
        rng = random.Random(seed)
        broken = list(objects)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(broken))
            o = broken[i]
            broken[i] = RouteObject(
                o.kind, o.namespace, o.name, o.api_version, _mutate(o.body, rng), o.source, 0.0
            )
        refs = kr.known_refs(catalog, hosts, (), broken)
        items, skipped = compile_all(broken, refs)
        canonical_json(items)
        skips += bool(skipped)
    assert skips > 100  # the junk does reach the compiler


def test_service_profile_domain_checked_at_apply_any_at_render() -> None:
    """The name is checked against --cluster-domain at apply; the authority (which has no such
    setting) compiles what was stored, whatever the domain."""
    text = (
        "apiVersion: linkerd.io/v1alpha2\nkind: ServiceProfile\n"
        "metadata: {namespace: shop, name: billing.shop.svc.example.org}\n"
        "spec: {retryBudget: {retryRatio: 0.5, minRetriesPerSecond: 1, ttl: 5s}}\n---\n" + SPLIT % (1, 1)
    )
    assert any("must be SERVICE.shop.svc.cluster.local" in p for p in problems(text))
    objects = kr.parse_routes_file(text, known(), kr.RouteSettings("example.org"), now=NOW)
    items, skipped = compile_all(objects)
    assert skipped == [] and items[0]["budget"] == {"ratio": 0.5, "min_per_s": 1, "ttl_s": 5.0}
    assert "ServiceProfile shop/billing.shop.svc.example.org" in items[0]["sources"]


def test_stored_rows_that_clash_resolve_to_the_routes() -> None:
    """Apply refuses a TrafficSplit and an HTTPRoute on one parent port; rows that clash anyway
    (written by hand, or by two versions) serve the HTTPRoute and skip the split, saying why."""
    (split,) = parse(SPLIT % (1, 1))
    (http,) = parse(ROUTE.replace("name: x", "name: y") % ("", "{}"))
    items, skipped = compile_all([split, http])
    assert [r["name"] for i in items for r in i["routes"]] == ["y"]
    assert skipped == ["TrafficSplit shop/x: Host shop/billing port 8080 already has HTTPRoute shop/y"]
