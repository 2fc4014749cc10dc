"""RetryBudget = tower's TpsBudget: tower's own tests (tower/src/retry/budget/tps_budget.rs)
translated with a fake clock, plus Linkerd's defaults."""

from __future__ import annotations

import pytest

from agent.proxy.retry_budget import RetryBudget
from agent.proxy.routes import BudgetSpec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def budget(ttl_s: float, min_per_s: int, ratio: float) -> tuple[RetryBudget, Clock]:
    clock = Clock()
    return RetryBudget(BudgetSpec(ratio=ratio, min_per_s=min_per_s, ttl_s=ttl_s), clock), clock


def test_tps_empty() -> None:
    bgt, _ = budget(1, 0, 1.0)
    assert not bgt.withdraw()


def test_tps_leaky() -> None:
    bgt, clock = budget(1, 0, 1.0)
    bgt.deposit()
    clock.advance(3)
    assert not bgt.withdraw()


def test_tps_slots() -> None:
    bgt, clock = budget(1, 0, 0.5)
    bgt.deposit()
    bgt.deposit()
    clock.advance(0.901)
    assert bgt.withdraw()  # 900 ms later the deposits are still valid
    clock.advance(2.001)  # blank slate
    bgt.deposit()
    clock.advance(0.301)
    bgt.deposit()
    clock.advance(0.801)
    bgt.deposit()
    # the first deposit has expired, the second still counts, with the third
    assert bgt.withdraw()


def test_tps_reserve() -> None:
    bgt, _ = budget(1, 5, 1.0)
    for _ in range(5):
        assert bgt.withdraw()
    assert not bgt.withdraw()


def test_linkerd_defaults_cost_five_deposits_per_retry() -> None:
    bgt, clock = budget(10, 0, 0.2)
    assert (bgt.deposit_amount, bgt.withdraw_amount, bgt.reserve) == (1, 5, 0)
    for _ in range(100):
        bgt.deposit()
    granted = 0
    while bgt.withdraw():
        granted += 1
    assert granted == 20  # 0.2 x 100 requests
    clock.advance(11)  # past the ttl: the deposits are gone
    assert not bgt.withdraw()


def test_reserve_is_min_per_second_times_ttl() -> None:
    bgt, _ = budget(10, 10, 0.2)
    assert bgt.reserve == 10 * 10 * 5
    assert bgt.balance() == 100.0
    granted = sum(1 for _ in range(200) if bgt.withdraw())
    assert granted == 100


def test_ratio_above_one_and_zero() -> None:
    big, _ = budget(1, 0, 2.0)
    assert (big.deposit_amount, big.withdraw_amount) == (1000, 500)
    big.deposit()
    assert big.withdraw() and big.withdraw() and not big.withdraw()
    none, _ = budget(1, 0, 0.0)
    none.deposit()
    assert not none.withdraw()


def test_out_of_bounds_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="tower"):
        RetryBudget(BudgetSpec(ttl_s=0.5))
