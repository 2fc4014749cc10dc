"""HttpBalancer: tower's peak-EWMA numbers (tower/src/load/peak_ewma.rs `default_decay`,
`compound_decay`), P2C preferring the less loaded endpoint, connect back-off, breakers,
and state kept across a new directory."""

from __future__ import annotations

import random

import pytest

from agent.proxy.http_balance import HttpBalancer
from agent.proxy.routes import Accrual, Backend, EndpointRef, Ref, parse_routes
from agent.proxy.services import ServiceTable

A = EndpointRef("198.18.2.2", 8080, None, None)
B = EndpointRef("198.18.3.2", 8080, None, None)
C = EndpointRef("198.18.4.2", 8080, None, None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def backend(*eps: EndpointRef, accrual: Accrual | None = None) -> Backend:
    return Backend(Ref("meshagent.io", "Host", "shop", "web", 8080), 1, accrual, eps)


def test_tower_default_decay() -> None:
    clock = Clock()
    bal = HttpBalancer(random.Random(1), clock, default_rtt_s=0.010, decay_s=1.0)
    assert bal.cost(A) == pytest.approx(0.010)
    clock.now += 0.1
    assert 0.009 < bal.cost(A) < 0.010
    clock.now += 0.1
    assert 0.008 < bal.cost(A) < 0.009


def test_tower_compound_decay() -> None:
    clock = Clock()
    bal = HttpBalancer(random.Random(1), clock, default_rtt_s=0.020, decay_s=1.0)
    be = backend(A)
    assert bal.cost(A) == pytest.approx(0.020)
    clock.now += 0.1
    rsp0 = bal.pick(be, [A])
    assert rsp0 is not None and bal.cost(A) > 0.020
    clock.now += 0.1
    rsp1 = bal.pick(be, [A])
    assert rsp1 is not None and bal.cost(A) > 0.040
    clock.now += 0.1
    bal.finished(rsp0, "success", 1)
    assert bal.cost(A) == pytest.approx(0.400)  # peak 200 ms x (1 pending + 1)
    clock.now += 0.1
    bal.finished(rsp1, "success", 1)
    assert bal.cost(A) == pytest.approx(0.200)
    clock.now += 1.0
    assert bal.cost(A) < 0.100
    clock.now += 10.0
    assert bal.cost(A) < 0.0001


def test_p2c_prefers_fewer_outstanding() -> None:
    bal = HttpBalancer(random.Random(3), Clock())
    be = backend(A, B)
    first = bal.pick(be, [A, B])
    assert first is not None
    # With two endpoints P2C always compares both: the busy one loses every time.
    for _ in range(20):
        nxt = bal.pick(be, [A, B])
        assert nxt is not None and nxt.endpoint != first.endpoint
        bal.finished(nxt, "success", 2)


def test_p2c_prefers_lower_latency() -> None:
    clock = Clock()
    bal = HttpBalancer(random.Random(5), clock)
    be = backend(A, B, C)
    slow = bal.pick(be, [A])
    assert slow is not None
    clock.now += 0.5
    bal.finished(slow, "success", 3)  # A: 500 ms observed
    picks = []
    for _ in range(300):
        p = bal.pick(be, [A, B, C])
        assert p is not None
        clock.now += 0.001
        bal.finished(p, "success", 3)
        picks.append(p.endpoint)
    # A only wins a draw it is not part of; it is in 2 of 3 pairs and loses those.
    assert picks.count(A) == 0
    assert picks.count(B) > 100 and picks.count(C) > 100


def test_connect_failure_backs_off_unless_all_do() -> None:
    clock = Clock()
    bal = HttpBalancer(random.Random(1), clock)
    be = backend(A, B)
    p = bal.pick(be, [A])
    assert p is not None
    bal.finished(p, "connect_failed", 2)
    for _ in range(20):
        q = bal.pick(be, [A, B])
        assert q is not None and q.endpoint == B
        bal.finished(q, "success", 2)
    assert bal.counts(be, [A, B]) == (1, 1)
    # Both in back-off: tried all the same.
    clock.now += 0.5
    q = bal.pick(be, [B])
    assert q is not None
    bal.finished(q, "connect_failed", 2)
    assert bal.pick(be, [A, B]) is not None
    clock.now += 0.51  # A's first back-off (1 s) is over, not B's
    assert bal.counts(be, [A, B]) == (1, 1)


def test_breaker_takes_endpoint_out_and_last_is_kept() -> None:
    clock = Clock()
    bal = HttpBalancer(random.Random(1), clock)
    be = backend(A, B, accrual=Accrual(max_failures=1, min_penalty_s=1.0, max_penalty_s=4.0, jitter=0.0))
    p = bal.pick(be, [A])
    assert p is not None
    assert bal.finished(p, "failure", 2) == "shut"
    assert bal.counts(be, [A, B]) == (1, 1)
    assert all(bal.pick(be, [A, B]).endpoint == B for _ in range(10))  # type: ignore[union-attr]
    q = bal.pick(be, [B])
    assert q is not None
    assert bal.finished(q, "failure", 1) == "kept"  # the rule's last admitting endpoint
    assert bal.available(be, [A, B])
    clock.now += 1.0  # A's backoff over: probation, one request
    assert bal.admits(be, A) and bal.admits(be, B)
    assert bal.admitting(be, [A, B]) == 1  # in probation A admits one request: not counted as open
    probe = bal.pick(be, [A])
    assert probe is not None and not bal.admits(be, A)
    assert bal.finished(probe, "success", 2) == "open"
    assert bal.admits(be, A)


def test_no_admitting_endpoint_is_unavailable() -> None:
    bal = HttpBalancer(random.Random(1), Clock())
    be = backend(A, accrual=Accrual(max_failures=1, jitter=0.0))
    assert not bal.available(be, [])
    p = bal.pick(be, [A])
    assert p is not None and bal.finished(p, "failure", 2) == "shut"
    assert not bal.available(be, [A]) and bal.pick(be, [A]) is None


def test_finished_twice_counts_once() -> None:
    bal = HttpBalancer(random.Random(1), Clock())
    be = backend(A)
    p = bal.pick(be, [A])
    assert p is not None
    bal.finished(p, "success", 1)
    bal.finished(p, "success", 1)
    assert bal.loads[A.key].outstanding == 0


def _table(weights: tuple[int, int], endpoints: list[str]) -> list[dict[str, object]]:
    return [
        {
            "parent": {
                "group": "meshagent.io",
                "kind": "Host",
                "namespace": "shop",
                "name": "web",
                "port": 8080,
                "addresses": ["198.18.9.9"],
            },
            "routes": [
                {
                    "group": "",
                    "kind": "default",
                    "namespace": "",
                    "name": "http",
                    "rules": [
                        {
                            "backends": [
                                {
                                    "weight": weights[0],
                                    "ref": {"kind": "Host", "namespace": "shop", "name": "v1", "port": 8080},
                                    "endpoints": [{"address": a, "port": 8080} for a in endpoints],
                                    "accrual": {
                                        "max_failures": 1,
                                        "min_penalty_ms": 1000,
                                        "max_penalty_ms": 4000,
                                        "jitter": 0,
                                    },
                                },
                                {
                                    "weight": weights[1],
                                    "ref": {"kind": "Host", "namespace": "shop", "name": "v2", "port": 8080},
                                    "endpoints": [{"address": "198.18.3.2", "port": 8080}],
                                },
                            ]
                        }
                    ],
                }
            ],
        }
    ]


def test_retain_keeps_state_when_weights_move_and_drops_gone_endpoints() -> None:
    clock = Clock()
    bal = HttpBalancer(random.Random(1), clock)
    old = parse_routes(_table((90, 10), ["198.18.2.2", "198.18.4.2"]), _no_reject, ServiceTable.empty())
    v1 = old.parents()[0].rules[0].backends[0]
    assert v1.endpoints is not None
    inflight = bal.pick(v1, [v1.endpoints[0]])
    shut = bal.pick(v1, [v1.endpoints[1]])
    assert inflight is not None and shut is not None
    assert bal.finished(shut, "failure", 2) == "shut"
    bal.retain(
        parse_routes(_table((50, 50), ["198.18.2.2", "198.18.4.2"]), _no_reject, ServiceTable.empty()),
        ServiceTable.empty(),
    )
    new_v1 = backend(*v1.endpoints, accrual=v1.accrual)
    assert bal.loads[A.key].outstanding == 1  # the request in flight still counts
    assert not bal.admits(new_v1, v1.endpoints[1])  # the breaker survived the new weights
    bal.retain(
        parse_routes(_table((50, 50), ["198.18.2.2"]), _no_reject, ServiceTable.empty()), ServiceTable.empty()
    )
    assert C.key not in bal.loads  # its load and breaker are gone
    bal.finished(inflight, "success", 2)  # finishing after a refresh is harmless
    assert bal.loads[A.key].outstanding == 0


def _no_reject(where: str, doc: object, reason: str) -> None:
    raise AssertionError(f"{where}: {reason}")


def test_one_endpoint_in_two_backends_with_different_accruals_has_two_breakers() -> None:
    bal = HttpBalancer(random.Random(1), Clock())
    strict = backend(A, accrual=Accrual(max_failures=1, jitter=0.0))
    lenient = Backend(
        Ref("", "Service", "shop", "web-v2", 8080), 1, Accrual(max_failures=3, jitter=0.0), (A,)
    )
    p = bal.pick(strict, [A])
    assert p is not None and bal.finished(p, "failure", 2) == "shut"
    assert not bal.admits(strict, A) and bal.admits(lenient, A)
    q = bal.pick(lenient, [A])
    assert q is not None and bal.finished(q, "failure", 2) is None  # 1 of 3
    assert not bal.admits(strict, A)


def test_a_cancelled_probe_frees_the_probation_slot() -> None:
    clock = Clock()
    bal = HttpBalancer(random.Random(1), clock)
    be = backend(A, B, accrual=Accrual(max_failures=1, min_penalty_s=1.0, max_penalty_s=1.0, jitter=0.0))
    p = bal.pick(be, [A])
    assert p is not None and bal.finished(p, "failure", 2) == "shut"
    clock.now += 1.0
    probe = bal.pick(be, [A])
    assert probe is not None and not bal.admits(be, A)
    bal.finished(probe, "cancelled", 2)
    assert bal.admits(be, A)  # still in probation, free to probe again
    again = bal.pick(be, [A])
    assert again is not None and bal.finished(again, "success", 2) == "open"


def test_split_90_10_over_10000_requests_through_pick_and_balancer() -> None:
    table = parse_routes(_table((90, 10), ["198.18.2.2", "198.18.4.2"]), _no_reject, ServiceTable.empty())
    rule = table.parents()[0].rules[0]
    bal = HttpBalancer(random.Random(11), Clock())
    rng = random.Random(12)
    counts: dict[str, int] = {}
    for _ in range(10_000):
        be = rule.pick(rng, lambda b: bal.available(b, b.endpoints or ()))
        assert be is not None and be.endpoints is not None
        p = bal.pick(be, be.endpoints)
        assert p is not None
        bal.finished(p, "success", 3)
        counts[p.endpoint.address] = counts.get(p.endpoint.address, 0) + 1
    assert abs(counts["198.18.3.2"] / 10_000 - 0.10) < 0.01  # v2's share
    # v1's two endpoints share its 90 % about evenly (P2C on equal load)
    assert abs(counts["198.18.2.2"] - counts["198.18.4.2"]) < 0.1 * 9000
