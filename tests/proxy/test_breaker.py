"""Breaker = Linkerd's consecutive-failures accrual: its `transitions` test
(linkerd/app/outbound/src/http/breaker/consecutive_failures.rs) with a fake clock, the
exp-backoff numbers, and meshagent's last-endpoint-kept rule."""

from __future__ import annotations

import random

from agent.proxy.breaker import Breaker
from agent.proxy.routes import Accrual


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_linkerd_transitions() -> None:
    clock = Clock()
    brk = Breaker(
        Accrual(max_failures=2, min_penalty_s=1.0, max_penalty_s=100.0, jitter=0.0), random.Random(1), clock
    )
    # Start open and failing.
    assert brk.record(False, False) is None and brk.state == "open" and brk.admits()
    assert brk.record(False, False) == "shut" and brk.state == "shut"
    clock.now += 0.5
    assert not brk.admits()  # shut until the first backoff (1 s) elapses
    clock.now += 0.5
    assert brk.admits() and brk.state == "probation"  # limited to a single request
    brk.sent()
    assert not brk.admits()  # the probe holds the only permit
    # The probe fails: shut again, for the next backoff (2 s).
    assert brk.record(False, False) == "shut"
    clock.now += 1.0
    assert not brk.admits()
    # Stragglers while shut are ignored.
    assert brk.record(True, False) is None and brk.state == "shut"
    clock.now += 1.0
    assert brk.admits() and brk.state == "probation"
    brk.sent()
    # A single success opens it.
    assert brk.record(True, False) == "open" and brk.state == "open" and brk.admits()
    # The backoff sequence starts over.
    brk.record(False, False)
    brk.record(False, False)
    assert brk.until == clock.now + 1.0


def test_success_resets_the_consecutive_count() -> None:
    brk = Breaker(Accrual(max_failures=3, jitter=0.0), random.Random(1), Clock())
    for _ in range(5):
        assert brk.record(False, False) is None
        assert brk.record(False, False) is None
        assert brk.record(True, False) is None
    assert brk.state == "open"


def test_exp_backoff_doubles_up_to_max() -> None:
    brk = Breaker(Accrual(min_penalty_s=1.0, max_penalty_s=60.0, jitter=0.0), random.Random(1), Clock())
    assert [brk.backoff(n) for n in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_jitter_is_bounded_by_ratio_and_max() -> None:
    brk = Breaker(Accrual(min_penalty_s=1.0, max_penalty_s=60.0, jitter=0.5), random.Random(7), Clock())
    draws = [brk.backoff(0) for _ in range(1000)]
    assert all(1.0 <= d <= 1.5 for d in draws)
    assert max(draws) > 1.4 and min(draws) < 1.1  # spread over [base, base·(1+jitter)]
    assert all(brk.backoff(6) == 60.0 for _ in range(100))  # base at max: no room for jitter


def test_last_admitting_endpoint_is_kept() -> None:
    clock = Clock()
    brk = Breaker(Accrual(max_failures=2, jitter=0.0), random.Random(1), clock)
    brk.record(False, True)
    assert brk.record(False, True) == "kept" and brk.state == "open" and brk.admits()
    # failures keep counting: once another endpoint admits again, the next failure shuts it
    assert brk.record(False, False) == "shut"


def test_failed_probe_of_the_last_endpoint_reopens_it() -> None:
    clock = Clock()
    brk = Breaker(
        Accrual(max_failures=1, min_penalty_s=1.0, max_penalty_s=10.0, jitter=0.0), random.Random(1), clock
    )
    assert brk.record(False, False) == "shut"
    clock.now += 1.0
    assert brk.admits()
    brk.sent()
    assert brk.record(False, True) == "kept" and brk.state == "open"
