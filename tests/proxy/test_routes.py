"""routes.py: matching with Gateway API precedence (HTTPRouteRule's documented order), path,
header and query semantics, the weighted RandomAvailable pick, and the parser's
entry-by-entry rejections."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest

from agent.proxy.directory import merge
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.routes import Backend, RequestView, parse_routes
from agent.proxy.services import ServiceTable, parse_services

PARENT = {
    "group": "meshagent.io",
    "kind": "Host",
    "namespace": "shop",
    "name": "web",
    "port": 8080,
    "addresses": ["198.18.9.9"],
}


def backend(name: str, weight: int = 1) -> dict[str, Any]:
    return {
        "weight": weight,
        "ref": {"group": "meshagent.io", "kind": "Host", "namespace": "shop", "name": name, "port": 8080},
        "endpoints": [{"address": "198.18.2.2", "port": 8080}],
    }


def rule(to: str, *matches: dict[str, Any]) -> dict[str, Any]:
    return {"matches": list(matches), "backends": [backend(to)]}


def route(name: str, *rules: dict[str, Any], created: float = 0.0, ns: str = "shop") -> dict[str, Any]:
    return {
        "group": "gateway.networking.k8s.io",
        "kind": "HTTPRoute",
        "namespace": ns,
        "name": name,
        "created": created,
        "rules": list(rules),
    }


def table(*routes: dict[str, Any], parent: dict[str, Any] | None = None) -> Any:
    rejected: list[tuple[str, Any, str]] = []
    doc = [{"parent": parent or PARENT, "routes": list(routes)}]
    t = parse_routes(doc, lambda w, d, r: rejected.append((w, d, r)), ServiceTable.empty())
    assert not rejected, rejected
    return t.lookup("198.18.9.9", 8080)


def req(path: str = "/", method: bytes = b"GET", query: str = "", **headers: str) -> RequestView:
    return RequestView(method, path, query, "web", {k.replace("_", "-"): v for k, v in headers.items()})


def to(policy: Any, view: RequestView) -> str | None:
    found = policy.select(view)
    return None if found is None else found.backends[0].ref.name


def path(kind: str, value: str) -> dict[str, Any]:
    return {"path": {"type": kind, "value": value}}


# --- precedence (Gateway API: HTTPRouteRule) ------------------------------------------------

PRECEDENCE = [
    # (rules as (backend, match) in one route, request, expected)
    ([("prefix", path("PathPrefix", "/api")), ("exact", path("Exact", "/api"))], req("/api"), "exact"),
    (
        [("short", path("PathPrefix", "/api")), ("long", path("PathPrefix", "/api/v1"))],
        req("/api/v1/x"),
        "long",
    ),
    # RegularExpression is implementation-specific: after Exact, before any PathPrefix (as in
    # Linkerd, where a whole-path regex match outranks a prefix match by length).
    (
        [("regex", path("RegularExpression", "/api/.*")), ("prefix", path("PathPrefix", "/api/x"))],
        req("/api/x/y"),
        "regex",
    ),
    (
        [("regex", path("RegularExpression", "/api/.*")), ("exact", path("Exact", "/api/x"))],
        req("/api/x"),
        "exact",
    ),
    (
        [("path", path("PathPrefix", "/a")), ("method", {**path("PathPrefix", "/a"), "method": "GET"})],
        req("/a"),
        "method",
    ),
    (
        [("method", {"method": "GET"}), ("header", {"headers": [{"name": "x-v", "value": "1"}]})],
        req("/", x_v="1"),
        "method",
    ),
    (
        [
            ("one", {"headers": [{"name": "x-a", "value": "1"}]}),
            ("two", {"headers": [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "2"}]}),
        ],
        req("/", x_a="1", x_b="2"),
        "two",
    ),
    (
        [
            ("hdr", {"headers": [{"name": "x-a", "value": "1"}]}),
            ("query", {"query": [{"name": "q", "value": "1"}]}),
        ],
        req("/", "GET", "q=1", x_a="1"),
        "hdr",
    ),
    (
        [
            ("q1", {"query": [{"name": "a", "value": "1"}]}),
            ("q2", {"query": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}),
        ],
        req("/", query="a=1&b=2"),
        "q2",
    ),
    ([("first", {}), ("second", {})], req("/x"), "first"),  # same route: rule order
]


@pytest.mark.parametrize(("rules", "view", "expected"), PRECEDENCE)
def test_gateway_precedence(
    rules: list[tuple[str, dict[str, Any]]], view: RequestView, expected: str
) -> None:
    assert to(table(route("r", *(rule(b, m) for b, m in rules))), view) == expected
    # the same in reverse order of declaration (except where order is the tie-break)
    if expected not in ("first",):
        assert to(table(route("r", *(rule(b, m) for b, m in reversed(rules)))), view) == expected


def test_ties_between_routes_oldest_then_name() -> None:
    older = route("zz", rule("older", path("PathPrefix", "/")), created=100.0)
    newer = route("aa", rule("newer", path("PathPrefix", "/")), created=200.0)
    assert to(table(newer, older), req("/x")) == "older"
    same_a = route("aa", rule("a", path("PathPrefix", "/")), created=100.0)
    same_b = route("bb", rule("b", path("PathPrefix", "/")), created=100.0)
    assert to(table(same_b, same_a), req("/x")) == "a"
    other_ns = route("aa", rule("ns-b", path("PathPrefix", "/")), created=100.0, ns="zz")
    assert to(table(other_ns, same_b), req("/x")) == "b"  # "shop/bb" < "zz/aa"


def test_precedence_is_per_match_not_per_rule() -> None:
    # A rule with a weak and a strong match wins over a rule with a medium one via its strong match.
    r1 = rule("mixed", path("PathPrefix", "/"), path("Exact", "/a/b"))
    r2 = rule("medium", path("PathPrefix", "/a"))
    policy = table(route("r", r2, r1))
    assert to(policy, req("/a/b")) == "mixed"
    assert to(policy, req("/a/c")) == "medium"
    assert to(policy, req("/z")) == "mixed"


def test_no_match_is_none() -> None:
    policy = table(route("r", rule("api", path("PathPrefix", "/api"))))
    assert to(policy, req("/other")) is None


def test_rule_without_matches_matches_everything() -> None:
    policy = table(route("r", rule("all")))
    assert to(policy, req("/anything", b"DELETE")) == "all"


# --- path, headers, query ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "matching", "not_matching"),
    [
        ("/api", ["/api", "/api/", "/api/x", "/api/x/y"], ["/apix", "/ap", "/", "/API"]),
        ("/api/", ["/api", "/api/", "/api/x"], ["/apix"]),
        ("/", ["/", "/x", "/x/y"], []),
        ("/a/b", ["/a/b", "/a/b/c"], ["/a/bc", "/a"]),
    ],
)
def test_path_prefix_matches_whole_segments(
    prefix: str, matching: list[str], not_matching: list[str]
) -> None:
    policy = table(route("r", rule("hit", path("PathPrefix", prefix))))
    for p in matching:
        assert to(policy, req(p)) == "hit", p
    for p in not_matching:
        assert to(policy, req(p)) is None, p


def test_exact_and_regex_paths() -> None:
    policy = table(
        route("r", rule("exact", path("Exact", "/a")), rule("re", path("RegularExpression", r"/v\d+/.*")))
    )
    assert to(policy, req("/a")) == "exact"
    assert to(policy, req("/a/")) is None
    assert to(policy, req("/v2/users")) == "re"
    assert to(policy, req("/x/v2/users")) is None  # the whole path must match
    assert to(policy, req("/v2")) is None


def test_header_names_case_insensitive_values_exact() -> None:
    policy = table(
        route(
            "r",
            rule("exact", {"headers": [{"type": "Exact", "name": "X-Canary", "value": "Yes"}]}),
            rule("re", {"headers": [{"type": "RegularExpression", "name": "x-user", "value": "u[0-9]+"}]}),
        )
    )
    assert to(policy, req("/", x_canary="Yes")) == "exact"  # view names are lower-case
    assert to(policy, req("/", x_canary="yes")) is None
    assert to(policy, req("/", x_user="u42")) == "re"
    assert to(policy, req("/", x_user="u42x")) is None  # fullmatch


def test_query_params_decoded_any_value() -> None:
    policy = table(
        route(
            "r",
            rule("exact", {"query": [{"type": "Exact", "name": "who", "value": "a b/c"}]}),
            rule("re", {"query": [{"type": "RegularExpression", "name": "v", "value": "2.*"}]}),
        )
    )
    assert to(policy, req("/", query="who=a%20b%2Fc")) == "exact"
    assert to(policy, req("/", query="who=a+b/c")) == "exact"
    assert to(policy, req("/", query="v=1&v=2x")) == "re"
    assert to(policy, req("/", query="v=1")) is None
    assert to(policy, req("/", query="")) is None


def test_method_match() -> None:
    policy = table(route("r", rule("get", {"method": "get"})))
    assert to(policy, req("/", b"GET")) == "get"
    assert to(policy, req("/", b"POST")) is None


# --- picking ------------------------------------------------------------------------------


def weighted(*weights: int) -> Any:
    doc = {"matches": [], "backends": [backend(f"b{i}", w) for i, w in enumerate(weights)]}
    return table(route("r", doc)).rules[0]


def test_pick_90_10_within_one_percent() -> None:
    r = weighted(90, 10)
    rng = random.Random(21)
    draws = [r.pick(rng, lambda b: True).ref.name for _ in range(10_000)]
    assert abs(draws.count("b1") / 10_000 - 0.10) < 0.01


def test_pick_moves_an_unavailable_share_and_skips_weight_zero() -> None:
    r = weighted(50, 0, 30, 20)
    rng = random.Random(3)
    picks = [r.pick(rng, lambda b: b.ref.name != "b0").ref.name for _ in range(5000)]
    assert "b0" not in picks and "b1" not in picks
    assert abs(picks.count("b2") / 5000 - 0.6) < 0.03  # 30 / (30 + 20)
    assert r.pick(rng, lambda b: False) is None
    assert weighted(0, 0).pick(rng, lambda b: True) is None


# --- parsing: entry by entry ----------------------------------------------------------------


def test_rejections_name_the_entry_and_keep_the_rest() -> None:
    good = route("good", rule("ok"))
    bad_backend = backend("bad")
    bad_backend["weight"] = -1
    mixed = route(
        "mixed",
        {"matches": [], "backends": [backend("kept"), bad_backend]},
        {"matches": [{"path": {"type": "Nope", "value": "/"}}], "backends": [backend("x")]},
    )
    doc = [
        {"parent": PARENT, "routes": [good, mixed, {"name": "no-rules"}]},
        {"parent": {**PARENT, "addresses": ["not-an-ip"]}, "routes": [good]},
        "garbage",
        {"parent": {**PARENT, "port": 9090}, "routes": [route("allbad", {"backends": [bad_backend]})]},
    ]
    rejected: list[tuple[str, Any, str]] = []
    t = parse_routes(doc, lambda w, d, r: rejected.append((w, d, r)), ServiceTable.empty())
    where = [w for w, _, _ in rejected]
    assert where == [
        "routes[0].routes[1].rules[0].backends[1]",
        "routes[0].routes[1].rules[1]",
        "routes[0].routes[2]",
        "routes[1]",
        "routes[2]",
        "routes[3].routes[0].rules[0].backends[0]",
        "routes[3].routes[0].rules[0]",
        "routes[3].routes[0]",
        "routes[3]",
    ], rejected
    reasons = dict((w, r) for w, _, r in rejected)
    assert "weight -1" in reasons["routes[0].routes[1].rules[0].backends[1]"]
    assert "path.type 'Nope'" in reasons["routes[0].routes[1].rules[1]"]
    assert "not-an-ip" in reasons["routes[1]"]
    policy = t.lookup("198.18.9.9", 8080)
    assert policy is not None and len(policy.rules) == 2
    assert [b.ref.name for b in policy.rules[1].backends] == ["kept"]
    assert t.lookup("198.18.9.9", 9090) is None  # every route failed: stays L4
    assert len(t) == 1


def test_service_parent_and_backend_resolve_through_discovery() -> None:
    services = parse_services(
        [
            {
                "name": "web",
                "namespace": "shop",
                "cluster_ips": ["10.96.0.10"],
                "ports": [{"port": 80}, {"port": 81}],
                "endpoints": [
                    {
                        "address": "10.0.0.5",
                        "ports": {"80": 8080, "81": 8081},
                        "identity": "spiffe://cluster.local/ns/shop/sa/web",
                    }
                ],
            }
        ],
        lambda *a: pytest.fail(str(a)),
    )
    svc_ref = {"group": "", "kind": "Service", "namespace": "shop", "name": "web", "port": 80, "section": ""}
    doc = [
        {"parent": svc_ref, "routes": [route("r", {"backends": [{"weight": 1, "ref": svc_ref}]})]},
        {"parent": {**svc_ref, "port": None}, "routes": [route("default", {"backends": []})]},
    ]
    rejected: list[Any] = []
    t = parse_routes(doc, lambda *a: rejected.append(a), services)
    # the second item expands to ports 80 and 81; 80 is already routed by the first one
    assert [w for w, _, _ in rejected] == ["routes[1]"]
    policy = t.lookup("::ffff:10.96.0.10", 80)
    assert policy is not None and t.lookup("10.96.0.10", 81) is not None
    be: Backend = policy.rules[0].backends[0]
    (ep,) = be.resolve(services)
    assert (ep.address, ep.port, ep.identity) == ("10.0.0.5", 8080, "spiffe://cluster.local/ns/shop/sa/web")
    assert be.resolve(ServiceTable.empty()) == ()
    default = t.lookup("10.96.0.10", 81)
    assert default is not None and default.rules[0].backends[0].ref.name == "web"  # FirstAvailable{parent}


def test_unknown_service_parent_is_rejected() -> None:
    doc = [
        {
            "parent": {"group": "", "kind": "Service", "namespace": "shop", "name": "ghost", "port": 80},
            "routes": [route("r", rule("x"))],
        }
    ]
    rejected: list[Any] = []
    assert not parse_routes(doc, lambda *a: rejected.append(a), ServiceTable.empty())
    assert rejected[0][0] == "routes[0]" and "ghost" in rejected[0][2]


def test_wire_fields_map_to_the_model() -> None:
    doc = rule("b", path("PathPrefix", "/"))
    doc["timeouts"] = {
        "request_ms": 5000,
        "response_ms": None,
        "idle_ms": 0,
        "attempt_ms": 1000,
        "backend_request_ms": 250,
    }
    doc["retry"] = {
        "limit": 3,
        "http": [[500, 599]],
        "grpc": [14],
        "backoff_min_ms": 25,
        "backoff_max_ms": 250,
        "jitter": 1.0,
        "max_request_bytes": 65536,
    }
    doc["backends"][0]["accrual"] = {
        "max_failures": 5,
        "min_penalty_ms": 1000,
        "max_penalty_ms": 4000,
        "jitter": 0,
    }
    r = table(route("r", doc)).rules[0]
    t = r.timeouts
    assert (t.request_s, t.response_s, t.idle_s, t.attempt_s, t.backend_request_s) == (
        5.0,
        None,
        None,
        1.0,
        0.25,
    )
    assert r.retry is not None and r.retry.limit == 3 and r.retry.grpc == frozenset({14})
    assert r.retry.retryable_status(503) and not r.retry.retryable_status(404)
    assert (r.retry.backoff_min_s, r.retry.backoff_max_s) == (0.025, 0.25)
    acc = r.backends[0].accrual
    assert acc is not None and (acc.max_failures, acc.min_penalty_s, acc.max_penalty_s, acc.jitter) == (
        5,
        1,
        4,
        0,
    )


def test_directory_carries_routes_and_pickles() -> None:
    remote = {"routes": [{"parent": PARENT, "routes": [route("r", rule("ok"))]}, {"parent": 1}]}
    local = InboundPolicy(PortPolicy(DefaultPolicy("all-authenticated"), ()), {})
    directory = merge([], local, remote)
    assert [r.where for r in directory.rejected] == ["routes[1]"]
    copy = pickle.loads(pickle.dumps(directory))  # noqa: S301 - our own bytes
    policy = copy.routes.lookup("198.18.9.9", 8080)
    assert policy is not None and to(policy, req("/x")) == "ok"
    assert not merge([], local, {}).routes
    assert not merge([], local, {"routes": "nope"}).routes


def test_labels() -> None:
    policy = table(route("r", rule("ok")))
    assert policy.parent.labels("parent") == (
        'parent_group="meshagent.io",parent_kind="Host",parent_namespace="shop",parent_name="web",'
        'parent_port="8080",parent_section_name=""'
    )
    assert policy.rules[0].route.labels("route") == (
        'route_group="gateway.networking.k8s.io",route_kind="HTTPRoute",route_namespace="shop",route_name="r"'
    )


def test_default_route_skips_matching_even_after_pickling() -> None:
    policy = table(route("r", rule("all")))
    assert policy.only is policy.rules[0]
    copy = pickle.loads(pickle.dumps(policy))  # noqa: S301 - our own bytes
    assert copy.only is copy.rules[0] and to(copy, req("/x", b"PATCH")) == "all"
    assert table(route("r", rule("api", path("PathPrefix", "/api")))).only is None


def test_the_longest_durations_the_authority_accepts_parse() -> None:
    # Gateway's Duration grammar allows up to four 5-digit parts ("99999h99999m99999s99999ms");
    # Linkerd's annotations allow days. None of them may make the agent drop the rule.
    gateway_max = ((99999 * 60 + 99999) * 60 + 99999) * 1000 + 99999
    linkerd_days = 10_000 * 86_400_000
    doc = rule("b")
    doc["timeouts"] = {"request_ms": gateway_max, "idle_ms": linkerd_days, "attempt_ms": 1}
    doc["retry"] = {"limit": 1, "backoff_min_ms": 25, "backoff_max_ms": gateway_max}
    doc["backends"][0]["accrual"] = {
        "max_failures": 7,
        "min_penalty_ms": 1000,
        "max_penalty_ms": linkerd_days,
    }
    r = table(route("r", doc)).rules[0]
    assert r.timeouts.request_s == gateway_max / 1000 and r.timeouts.idle_s == linkerd_days / 1000
    rejected: list[Any] = []
    for bad in (-1, float("inf"), float("nan"), 2**60):
        bad_doc = rule("b")
        bad_doc["timeouts"] = {"request_ms": bad}
        item = {"parent": PARENT, "routes": [route("r", bad_doc)]}
        parse_routes([item], lambda *a: rejected.append(a), ServiceTable.empty())
        assert "finite number of milliseconds" in rejected[-3][2], (bad, rejected)
