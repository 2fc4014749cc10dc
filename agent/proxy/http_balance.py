"""Per-request endpoint choice for routed HTTP: power of two choices over peak-EWMA load, as
Linkerd's outbound balancer (linkerd2-proxy `linkerd/pool/p2c`, `linkerd/proxy/balance`; tower
`tower/src/load/peak_ewma.rs`).

cost = rtt_estimate x (outstanding + 1). The estimate starts at `default_rtt_s` (Linkerd: 30 ms)
and on each response takes the sample when it is above the estimate (peak), else moves toward
it by `1 - e^(-Δt/decay)` (decay 10 s); when read it first decays toward 0 the same way.

An endpoint is left out while its breaker does not admit, and while it sits out a connect
back-off (1 s doubling to 30 s, reset by a response) unless every admitted one does (then all
are tried, as the L4 balancer does). State is keyed by endpoint (address, port, identity,
header port) and breaker by endpoint and accrual, so a new directory that only moves weights
keeps every estimate, count and breaker (`retain`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from .breaker import Breaker
from .routes import Accrual, Backend, EndpointRef, Ref, RouteTable
from .services import BACKOFF_INITIAL_S, BACKOFF_MAX_S, ServiceTable

DEFAULT_RTT_S: Final = 0.030  # linkerd2 policy-controller outbound.rs
DECAY_S: Final = 10.0

Outcome = Literal["success", "failure", "connect_failed", "cancelled"]  # cancelled: no sample, no breaker
# "recovered": an endpoint in connect back-off answered (ready again; the gauge follows).
Transition = Literal["shut", "open", "kept", "recovered"]


def endpoint_key(ep: EndpointRef) -> str:
    return ep.key


@dataclass
class _Load:
    """One endpoint's state: its RTT estimate, requests outstanding, connect back-off, breaker."""

    rtt_s: float
    updated: float
    outstanding: int = 0
    connect_failures: int = 0
    retry_at: float = 0.0  # connect back-off until then
    accrual: Accrual | None = None  # the accrual `breaker` runs with
    breaker: Breaker | None = None
    # The same endpoint in backends with another accrual (rare): a breaker per accrual.
    others: dict[Accrual, Breaker] | None = None


@dataclass(eq=False)
class EndpointPick:
    """One attempt's endpoint; report how it went once with `HttpBalancer.finished`."""

    endpoint: EndpointRef
    backend: Backend
    sent_at: float
    done: bool = False


class HttpBalancer:
    def __init__(
        self,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        default_rtt_s: float = DEFAULT_RTT_S,
        decay_s: float = DECAY_S,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - load spreading, not secrets
        self.clock = clock
        self.default_rtt_s = default_rtt_s
        self.decay_s = decay_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.loads: dict[str, _Load] = {}  # by EndpointRef.key
        self.seen: dict[Ref, tuple[EndpointRef, ...]] = {}  # last endpoints per backend (gauges)

    # --- load -------------------------------------------------------------------------------

    def _load(self, key: str) -> _Load:
        load = self.loads.get(key)
        if load is None:
            load = self.loads[key] = _Load(self.default_rtt_s, self.clock())
        return load

    def estimate(self, ep: EndpointRef, now: float | None = None) -> float:
        """The RTT estimate now, decayed toward 0 since the last update (tower's `update(now, now)`)."""
        load = self._load(ep.key)
        now = self.clock() if now is None else now
        self._decay(load, now)
        return load.rtt_s

    def cost(self, ep: EndpointRef, now: float | None = None) -> float:
        load = self._load(ep.key)
        now = self.clock() if now is None else now
        self._decay(load, now)
        return load.rtt_s * (load.outstanding + 1)

    def _decay(self, load: _Load, now: float) -> None:
        elapsed = now - load.updated
        if elapsed > 0:
            load.rtt_s *= math.exp(-elapsed / self.decay_s)
            load.updated = now

    def _observe(self, load: _Load, now: float, sample: float) -> None:
        if load.rtt_s < sample:
            load.rtt_s = sample  # peak: the worst case counts at once
        else:
            decay = math.exp(-max(0.0, now - load.updated) / self.decay_s)
            load.rtt_s = load.rtt_s * decay + sample * (1.0 - decay)
        load.updated = now

    # --- breakers ---------------------------------------------------------------------------

    def breaker(self, backend: Backend, ep: EndpointRef, create: bool = True) -> Breaker | None:
        """The endpoint's breaker under the backend's accrual (None: no accrual)."""
        accrual = backend.accrual
        if accrual is None:
            return None
        load = self._load(ep.key) if create else self.loads.get(ep.key)
        if load is None:
            return None
        if load.accrual is accrual or (load.breaker is not None and load.accrual == accrual):
            return load.breaker
        if load.breaker is None:
            if not create:
                return None
            load.accrual, load.breaker = accrual, Breaker(accrual, self.rng, self.clock)
            return load.breaker
        if load.others is None:
            load.others = {}
        found = load.others.get(accrual)
        if found is None and create:
            found = load.others[accrual] = Breaker(accrual, self.rng, self.clock)
        return found

    def admits(self, backend: Backend, ep: EndpointRef) -> bool:
        if backend.accrual is None:
            return True
        b = self.breaker(backend, ep)
        return b is None or b.admits()

    def admitting(self, backend: Backend, endpoints: Sequence[EndpointRef]) -> int:
        """How many of the backend's endpoints admit every request (breaker open or none).
        An endpoint in probation admits one request at a time, so it does not count: were the
        last open endpoint shut while another probes, requests meanwhile would find none."""
        if backend.accrual is None:
            return len(endpoints)
        count = 0
        for ep in endpoints:
            brk = self.breaker(backend, ep, create=False)
            count += brk is None or brk.state == "open"
        return count

    def available(self, backend: Backend, endpoints: Sequence[EndpointRef]) -> bool:
        """Any endpoint admitting? (Rule.pick's `available`.)"""
        self.seen[backend.ref] = tuple(endpoints)
        if not endpoints:
            return False
        if backend.accrual is None:
            return True
        return any(self.admits(backend, ep) for ep in endpoints)

    def ready(self, backend: Backend, endpoints: Sequence[EndpointRef]) -> bool:
        """Available, with an admitting endpoint out of connect back-off: Linkerd's ready
        endpoint. Rule.pick tries this first, so a backend whose every endpoint failed to
        connect gives its share to the others (RandomAvailable) instead of being redialled."""
        if not self.available(backend, endpoints):
            return False
        now, loads = self.clock(), self.loads
        for ep in endpoints:
            load = loads.get(ep.key)
            if (load is None or load.retry_at <= now) and self.admits(backend, ep):
                return True
        return False

    # --- picking ----------------------------------------------------------------------------

    def pick(self, backend: Backend, endpoints: Sequence[EndpointRef]) -> EndpointPick | None:
        """An endpoint for one attempt (None: none admits), counted outstanding."""
        if backend.accrual is not None:
            endpoints = [ep for ep in endpoints if self.admits(backend, ep)]
        if not endpoints:
            return None
        now = self.clock()
        if len(endpoints) > 1:
            ready = [ep for ep in endpoints if self._load(ep.key).retry_at <= now]
            if ready:  # all in connect back-off: try them all the same
                endpoints = ready
        if len(endpoints) == 1:
            chosen = endpoints[0]
        else:
            a = self.rng.randrange(len(endpoints))
            b = self.rng.randrange(len(endpoints) - 1)
            b += b >= a  # two distinct endpoints
            ea, eb = endpoints[a], endpoints[b]
            chosen = ea if self.cost(ea, now) <= self.cost(eb, now) else eb
        self._load(chosen.key).outstanding += 1
        brk = self.breaker(backend, chosen)
        if brk is not None:
            brk.sent()
        return EndpointPick(chosen, backend, now)

    def finished(self, pick: EndpointPick, outcome: Outcome, rule_admitting: int) -> Transition | None:
        """The attempt ended (once per pick; later calls do nothing). `rule_admitting`: the
        admitting endpoints of the whole rule, this one included (1: it is the last, never shut).
        Returns the breaker's transition, if any, else "recovered" when the endpoint was in
        connect back-off (its ready/pending count changed: refresh the gauge)."""
        if pick.done:
            return None
        pick.done = True
        now = self.clock()
        load = self.loads.get(pick.endpoint.key)
        if load is None:  # dropped by a new directory meanwhile
            return None
        if load.outstanding > 0:
            load.outstanding -= 1
        if outcome == "cancelled":
            brk = self.breaker(pick.backend, pick.endpoint, create=False)
            if brk is not None:
                brk.abandoned()  # a cancelled probe must not hold probation's only slot
            return None
        recovered = False
        if outcome == "connect_failed":
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2**load.connect_failures)
            load.connect_failures = min(load.connect_failures + 1, 16)
            load.retry_at = now + delay
        else:
            recovered = load.connect_failures > 0
            load.connect_failures, load.retry_at = 0, 0.0
            self._observe(load, now, max(0.0, now - pick.sent_at))
        brk = self.breaker(pick.backend, pick.endpoint, create=False)
        transition = None if brk is None else brk.record(outcome == "success", rule_admitting <= 1)
        return "recovered" if transition is None and recovered else transition

    def counts(self, backend: Backend, endpoints: Sequence[EndpointRef] | None = None) -> tuple[int, int]:
        """(ready, pending) for `outbound_http_balancer_endpoints`: shut breakers and connect
        back-offs are pending."""
        eps = endpoints if endpoints is not None else self.seen.get(backend.ref, backend.endpoints or ())
        now = self.clock()
        ready = 0
        for ep in eps:
            load = self.loads.get(ep.key)
            if self.admits(backend, ep) and (load is None or load.retry_at <= now):
                ready += 1
        return ready, len(eps) - ready

    def retain(self, table: RouteTable, services: ServiceTable) -> None:
        """A new directory: keep the state of endpoints (and breakers) still routed to, drop the
        rest. Requests in flight on dropped endpoints finish harmlessly."""
        keep: dict[str, set[Accrual]] = {}
        seen: dict[Ref, tuple[EndpointRef, ...]] = {}
        for policy in table.parents():
            for rule in policy.rules:
                for backend in rule.backends:
                    eps = backend.resolve(services)
                    seen[backend.ref] = eps
                    for ep in eps:
                        accruals = keep.setdefault(ep.key, set())
                        if backend.accrual is not None:
                            accruals.add(backend.accrual)
        loads: dict[str, _Load] = {}
        for key, load in self.loads.items():
            kept = keep.get(key)
            if kept is None:
                continue
            if load.accrual is not None and load.accrual not in kept:
                load.accrual, load.breaker = None, None
            if load.others:
                load.others = {a: b for a, b in load.others.items() if a in kept} or None
            loads[key] = load
        self.loads = loads
        self.seen = seen
