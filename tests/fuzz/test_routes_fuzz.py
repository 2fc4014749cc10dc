"""Property tests of the agent's route parser (agent/proxy/routes.py `parse_routes`, reached
through `directory.merge`): any JSON as the `routes` member, random or a mutated valid item,
gives a RouteTable and rejections, never an exception; what parses can be matched, picked and
pickled (directories go to worker processes)."""

from __future__ import annotations

import copy
import pickle
import random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.proxy.directory import merge
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.routes import RequestView

LOCAL = InboundPolicy(PortPolicy(DefaultPolicy("all-authenticated"), ()), {})

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)

VALID: dict[str, Any] = {
    "parent": {
        "group": "meshagent.io",
        "kind": "Host",
        "namespace": "shop",
        "name": "web",
        "port": 8080,
        "section": "",
        "addresses": ["198.18.2.2"],
    },
    "budget": {"ratio": 0.2, "min_per_s": 10, "ttl_s": 10},
    "sources": ["HTTPRoute shop/web"],
    "routes": [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "HTTPRoute",
            "namespace": "shop",
            "name": "web",
            "created": 1.0,
            "rules": [
                {
                    "matches": [
                        {
                            "path": {"type": "PathPrefix", "value": "/api"},
                            "method": "GET",
                            "headers": [{"type": "RegularExpression", "name": "x-a", "value": "a+"}],
                            "query": [{"type": "Exact", "name": "v", "value": "2"}],
                        }
                    ],
                    "backends": [
                        {
                            "weight": 9,
                            "ref": {"kind": "Host", "namespace": "shop", "name": "v1", "port": 8080},
                            "endpoints": [{"address": "198.18.2.2", "port": 8080}],
                            "accrual": {
                                "max_failures": 7,
                                "min_penalty_ms": 1000,
                                "max_penalty_ms": 60000,
                                "jitter": 0.5,
                            },
                        },
                        {
                            "weight": 1,
                            "ref": {"kind": "Service", "namespace": "shop", "name": "v2", "port": 8080},
                        },
                    ],
                    "timeouts": {"request_ms": 5000, "attempt_ms": 100},
                    "retry": {"limit": 2, "http": [[500, 599]], "grpc": [14]},
                }
            ],
        }
    ],
}


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(VALID)[1:]


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


# Discovered Services the items may name (a Service parent or backend resolves through them).
SERVICES = [
    {"name": name, "namespace": "shop", "cluster_ips": [ip], "ports": [{"port": 8080}, {"port": 9090}],
     "endpoints": [{"address": "10.0.0.5", "ports": {"8080": 8080, "9090": 9090}}]}
    for name, ip in (("web", "10.96.0.10"), ("v2", "10.96.0.11"))
]  # fmt: skip
SERVICE_PARENT = {**VALID, "parent": {"group": "", "kind": "Service", "namespace": "shop", "name": "web"}}


SERVICE_PATHS = _paths(SERVICE_PARENT)[1:]


def _exercise(routes: Any) -> None:
    directory = merge([], LOCAL, {"services": SERVICES, "routes": routes})
    table = pickle.loads(pickle.dumps(directory)).routes  # noqa: S301 - our own bytes
    rng = random.Random(0)
    for policy in table.parents():
        view = RequestView(b"GET", "/api/x", "v=2&w=%zz", "web", {"x-a": "aaa"})
        rule = policy.select(view)
        for r in policy.rules:
            r.pick(rng, lambda b: True)
        assert rule is None or rule in policy.rules
    for rejected in directory.rejected:
        assert rejected.where.startswith("routes")


@given(json_values)
def test_random_json_never_raises(doc: Any) -> None:
    _exercise(doc)
    _exercise([doc])


@given(st.lists(st.tuples(st.sampled_from(PATHS), json_values), min_size=1, max_size=3))
def test_mutated_valid_item_never_raises(mutations: list[tuple[tuple[Any, ...], Any]]) -> None:
    doc = VALID
    for path, value in mutations:
        try:
            doc = _set(doc, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the path
    _exercise([doc, VALID])


@given(st.lists(st.tuples(st.sampled_from(SERVICE_PATHS), json_values), min_size=1, max_size=3))
def test_mutated_service_parent_never_raises(mutations: list[tuple[tuple[Any, ...], Any]]) -> None:
    doc = SERVICE_PARENT
    for path, value in mutations:
        try:
            doc = _set(doc, path, value)
        except (KeyError, IndexError, TypeError):
            continue
    _exercise([doc, SERVICE_PARENT])


def test_the_unmutated_items_parse_without_rejection() -> None:
    directory = merge([], LOCAL, {"services": SERVICES, "routes": [VALID, SERVICE_PARENT]})
    assert directory.rejected == ()
    # the port-less Service parent is one policy per port
    assert {(p.parent.kind, p.parent.port) for p in directory.routes.parents()} == {
        ("Host", 8080),
        ("Service", 8080),
        ("Service", 9090),
    }
