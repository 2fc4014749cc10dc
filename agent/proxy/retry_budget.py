"""The retry budget: tower's `TpsBudget` (tower/src/retry/budget/tps_budget.rs), ported exactly.

Each live request deposits, each retry withdraws; with Linkerd's defaults (ratio 0.2,
min 10/s, ttl 10 s) a deposit is worth 1 and a retry costs 5, so retries stay within
0.2 x the requests of the last ttl plus a reserve of min_per_s x ttl. Deposits expire in ten
slots of ttl/10. One budget per parent per worker process (Linkerd: per proxy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from .routes import BudgetSpec

SLOTS: Final = 10


class RetryBudget:
    def __init__(self, spec: BudgetSpec, clock: Callable[[], float] = time.monotonic) -> None:
        # The bounds tower asserts; the parser enforces them, a bad spec here is a bug.
        if (
            not 1.0 <= spec.ttl_s <= 60.0
            or not 0.0 <= spec.ratio <= 1000.0
            or not 0 <= spec.min_per_s < 2**31 - 1
        ):
            raise ValueError(f"retry budget {spec} is outside tower's bounds")
        self.spec = spec
        self.clock = clock
        if spec.ratio == 0.0:
            self.deposit_amount, self.withdraw_amount = 0, 1  # only the reserve, over time
        elif spec.ratio <= 1.0:
            self.deposit_amount, self.withdraw_amount = 1, int(1.0 / spec.ratio)
        else:
            self.deposit_amount, self.withdraw_amount = 1000, int(1000.0 / spec.ratio)
        # tower: min_per_sec x ttl.as_secs() (whole seconds) x withdraw amount.
        self.reserve = spec.min_per_s * int(spec.ttl_s) * self.withdraw_amount
        self.window = spec.ttl_s / SLOTS
        self.slots = [0] * SLOTS
        self.writer = 0
        self.index = 0
        self.generation_at = clock()

    def _expire(self) -> None:
        now = self.clock()
        diff = now - self.generation_at
        if diff < self.window:
            return
        self.slots[self.index] = self.writer
        self.writer = 0
        idx = (self.index + 1) % SLOTS
        while diff > self.window:
            self.slots[idx] = 0
            diff -= self.window
            idx = (idx + 1) % SLOTS
        self.index = idx
        self.generation_at = now

    def _sum(self) -> int:
        return self.writer + sum(self.slots) + self.reserve

    def deposit(self) -> None:
        self._expire()
        self.writer += self.deposit_amount

    def withdraw(self) -> bool:
        self._expire()
        if self._sum() >= self.withdraw_amount:
            self.writer -= self.withdraw_amount
            return True
        return False

    def balance(self) -> float:
        """Retries available now (for /status)."""
        self._expire()
        return self._sum() / self.withdraw_amount
