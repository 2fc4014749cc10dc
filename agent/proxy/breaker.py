"""Failure accrual per endpoint: Linkerd's consecutive-failures breaker
(linkerd2-proxy `linkerd/app/outbound/src/http/breaker/consecutive_failures.rs`).

open (admit all; count consecutive failures; `max_failures` in a row → shut) → shut for
backoff[n] (responses ignored) → probation (admit exactly one request: success → open with the
backoff reset; failure → shut for the next backoff). The backoff is Linkerd's exp-backoff:
`base = min(max, min·2^n)` plus `min(rand·jitter·base, max - base)`.

Driven by the caller's clock (no timer of its own): `admits()` moves shut → probation when
the backoff has elapsed, so an idle breaker costs nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

from .routes import Accrual

State = Literal["open", "shut", "probation"]


class Breaker:
    def __init__(self, accrual: Accrual, rng: random.Random, clock: Callable[[], float]) -> None:
        self.accrual = accrual
        self.rng = rng
        self.clock = clock
        self.state: State = "open"
        self.failures = 0  # consecutive, while open
        self.iterations = 0  # backoffs taken since the breaker last opened
        self.until = 0.0  # shut until then
        self.probing = False  # the probation request is in flight

    def backoff(self, iterations: int) -> float:
        a = self.accrual
        base = min(a.max_penalty_s, a.min_penalty_s * 2.0 ** min(iterations, 64))
        if a.jitter == 0.0:
            return base
        return base + min(self.rng.random() * a.jitter * base, a.max_penalty_s - base)

    def admits(self) -> bool:
        """May a request go to this endpoint now? (shut → probation once the backoff ran out;
        probation admits one request at a time.)"""
        if self.state == "open":
            return True
        if self.state == "shut":
            if self.clock() < self.until:
                return False
            self.state, self.probing = "probation", False
        return not self.probing

    def sent(self) -> None:
        """A request was dispatched to the endpoint (in probation: the one probe)."""
        if self.state == "probation":
            self.probing = True

    def abandoned(self) -> None:
        """The request sent went away unanswered (the app left): in probation, the next
        request may probe instead."""
        if self.state == "probation":
            self.probing = False

    def record(self, success: bool, last_admitting: bool) -> Literal["shut", "open", "kept"] | None:
        """A response was classified. Returns the transition it caused: "shut" (ejected),
        "open" (probe succeeded), "kept" (it would have shut but is the rule's last admitting
        endpoint: it stays open, failures keep counting), None (no change)."""
        if self.state == "open":
            if success:
                self.failures = 0
                return None
            self.failures += 1
            if self.failures < self.accrual.max_failures:
                return None
            if last_admitting:
                return "kept"
            self._shut()
            return "shut"
        if self.state == "shut":
            return None  # stragglers are ignored while shut
        # probation
        self.probing = False
        if success:
            self.state, self.failures, self.iterations = "open", 0, 0
            return "open"
        if last_admitting:
            # Shutting it again would leave the rule nothing: back in rotation, still failing
            # (the backoff sequence goes on from where it was).
            self.state, self.failures = "open", 0
            return "kept"
        self._shut()
        return "shut"

    def _shut(self) -> None:
        self.state = "shut"
        self.until = self.clock() + self.backoff(self.iterations)
        self.iterations += 1
        self.failures = 0
        self.probing = False
