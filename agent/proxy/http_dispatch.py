"""The attempt loop of a routed request, protocol-neutral (H1Router and H2Router both call
`dispatch` with their own `Exchange`).

Per request: pick a backend by weight among the available ones (Rule.pick), an endpoint by
P2C/peak-EWMA (HttpBalancer), run one attempt under its deadlines, classify the outcome, and
retry as Linkerd does (design-21 §4.7; linkerd2-proxy `linkerd/http/retry/src/lib.rs`): only
eligible requests, only retryable outcomes, at most `limit` retries, each withdrawn from the
parent's retry budget (tower's TpsBudget), with exponential backoff and jitter; every retry
re-picks the backend and the endpoint. Non-retryable outcomes deposit.

Timeouts are deadlines on the event loop's clock: the attempt's head deadline is one
`loop.call_at` timer (re-armed per attempt, and lazily once the request body moved), no
polling. Until the head: `request` (REQUEST_TIMEOUT), `response` (RESPONSE_STREAM_TIMEOUT, from
the request's end when the Exchange reports it, else from its head), per-attempt
`attempt`/`backendRequest` (RESPONSE_HEADERS_TIMEOUT, retryable) and `idle` (IDLE_TIMEOUT: no
byte either way while a head is awaited, from the attempt's start or the request body's last
progress). After the head was forwarded the body is the Exchange's: it gets the request's limit
with each attempt, and H1Router and H2Router also cut a body past the `response` timeout (from
the request's end) or silent for `idle`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from agent.logs import Throttled, get_logger
from agent.telemetry.proxy_metrics import GRPC_FAILURES

from .http_balance import EndpointPick, HttpBalancer, Outcome
from .retry_budget import RetryBudget
from .routes import (
    Backend,
    BudgetSpec,
    EndpointRef,
    ParentPolicy,
    Ref,
    RequestView,
    RouteTable,
    Rule,
    Timeouts,
)
from .services import ServiceTable

log = get_logger("meshagent.proxy.http_dispatch")
# Every failure of a kept endpoint would log again: once per parent/backend per 10 s.
_kept_log = Throttled(log, "http.breaker.last_endpoint_kept")

# Linkerd's error label values (linkerd/app/outbound/src/http/logical/policy/route/metrics/labels.rs).
FAIL_FAST: Final = "FAIL_FAST"
REQUEST_TIMEOUT: Final = "REQUEST_TIMEOUT"
RESPONSE_HEADERS_TIMEOUT: Final = "RESPONSE_HEADERS_TIMEOUT"
RESPONSE_STREAM_TIMEOUT: Final = "RESPONSE_STREAM_TIMEOUT"
IDLE_TIMEOUT: Final = "IDLE_TIMEOUT"
TIMEOUT_MESSAGES: Final = {
    REQUEST_TIMEOUT: "request timed out",
    RESPONSE_HEADERS_TIMEOUT: "response headers timed out",
    RESPONSE_STREAM_TIMEOUT: "response timed out",
    IDLE_TIMEOUT: "idle timeout: no response",
}
# Errors before a response head that a retry may cure (another endpoint, another connection).
RETRYABLE_ERRORS: Final = frozenset(
    {FAIL_FAST, RESPONSE_HEADERS_TIMEOUT, "REFUSED", "RESET", "GO_AWAY", "IO"}
)
RECONNECTS: Final = 2  # other endpoints tried after a failed connect, before the retry policy
GRPC_DEADLINE_EXCEEDED: Final = 4
GRPC_UNAVAILABLE: Final = 14


@dataclass
class AttemptResult:
    """How one attempt ended. A response head: `status` (and `grpc_status` when known from
    trailers-only), `error` None. No head: `status` None and `error` a Linkerd label
    ("IO", "RESET", "REFUSED", "GO_AWAY", ...); `connect_failed` when the upstream connection
    or its TLS handshake failed (the endpoint sits out a back-off)."""

    status: int | None
    grpc_status: int | None
    error: str | None  # Linkerd's error label value
    upstream: Any  # protocol-specific handle (kept or discarded)
    connect_failed: bool = False


class Exchange(Protocol):
    """One request as the router holds it (H1: the app connection's current request; H2: a stream)."""

    view: RequestView

    def retry_eligible(self) -> bool:
        """Idempotent method (or gRPC on a rule with gRPC conditions), body fully received
        and within the rule's `max_request_bytes`, no Expect/Upgrade. Called once, before the
        first retry decision."""
        ...

    async def attempt(self, pick: EndpointPick, deadline: float | None) -> AttemptResult:
        """Send the request to `pick.endpoint`, return at the response head (held, not yet
        relayed). `deadline`: the request's limit (loop time; None: none) — the earlier of
        `timeouts.request` from the request head and `timeout.linkerd.io/response` — for the
        body after `forward`. dispatch cancels this coroutine when the attempt's head deadline
        passes: release (close) the upstream on CancelledError."""
        ...

    def forward(self, result: AttemptResult) -> None:
        """Relay this response (head held by `attempt`, then its body) to the app."""
        ...

    def discard(self, result: AttemptResult) -> None:
        """A retried attempt's response: drop it (drain a small body or close the upstream)."""
        ...

    # Optional (duck-typed, for `timeout.linkerd.io/idle` until the head): `request_moved_at:
    # float | None`, the loop time the app's request body last moved; without it idle counts
    # from the attempt's start.
    # Optional (duck-typed, for `timeout.linkerd.io/response`, which counts from the request's
    # end): `request_ended_at: float | None` (loop time the body ended; None while it uploads)
    # and `on_request_end: Callable[[], None] | None`, which dispatch may set and the Exchange
    # calls once when the body ends. Without them the response timeout counts from the head.
    # And `on_response_end: Callable[[str | None], None] | None`: dispatch sets it before
    # `forward`; call it once when the relayed response ended (None) or broke after its head
    # (a Linkerd error label: "RESET", "IO", a timeout's). Without it the route and backend
    # series are recorded at the head.

    def respond_error(self, status: int, grpc_status: int, error: str, message: str, close: bool) -> None:
        """Answer with a synthesized error (H1: `status`; gRPC: 200 + `grpc_status`), headers
        `l5d-proxy-error` and `meshagent-proxy-error` = `message`. `close` True: the app
        connection must close; the Exchange may close anyway (request body not fully read)."""
        ...


class RouteMetricsLike(Protocol):
    """What dispatch records (agent.telemetry.route_metrics.RouteMetrics)."""

    def route(self, parent: Any, route: Any) -> Any: ...
    def backend(self, parent: Any, route: Any, backend: Any) -> Any: ...
    def balancer(self, parent: Any, backend: Any) -> Any: ...
    def retry_buffer_full(self) -> None: ...


class RouterContext:
    """What routed requests of one worker share: the balancer (EWMA, breakers, connect
    back-off), the budgets per parent, the pools (E4/E5's), the metrics. One per Proxy for
    its whole life; `apply` at each new directory keeps the state of what is still routed."""

    def __init__(
        self,
        table: RouteTable,
        services: ServiceTable,
        metrics: RouteMetricsLike,
        pools: Any = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        balancer: HttpBalancer | None = None,
    ) -> None:
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - load spreading, not secrets
        self.clock = clock
        self.metrics = metrics
        self.pools = pools
        self.balancer = balancer if balancer is not None else HttpBalancer(self.rng, clock)
        self.budgets: dict[Ref, RetryBudget] = {}
        self.table = RouteTable.empty()
        self.services = ServiceTable.empty()
        self._endpoints: dict[Ref, tuple[EndpointRef, ...]] = {}
        self.connections = 0  # routed app connections so far (the routers count them)
        self.apply(table, services)

    def apply(self, table: RouteTable, services: ServiceTable) -> None:
        """A new directory. Requests in flight keep their Rule; new ones use the new table."""
        self.table, self.services = table, services
        self._endpoints = {}
        self.balancer.retain(table, services)
        budgets: dict[Ref, RetryBudget] = {}
        for policy in table.parents():
            held = self.budgets.get(policy.parent)
            budgets[policy.parent] = (
                held
                if held is not None and held.spec == policy.budget
                else RetryBudget(policy.budget, self.clock)
            )
        self.budgets = budgets
        for policy in table.parents():
            for backend in {b.ref: b for rule in policy.rules for b in rule.backends}.values():
                self.gauge(policy.parent, backend)

    def endpoints(self, backend: Backend) -> tuple[EndpointRef, ...]:
        if backend.endpoints is not None:
            return backend.endpoints
        found = self._endpoints.get(backend.ref)
        if found is None:
            found = self._endpoints[backend.ref] = backend.resolve(self.services)
        return found

    def budget(self, policy: ParentPolicy) -> RetryBudget:
        found = self.budgets.get(policy.parent)
        if found is None:  # a policy from before the last apply: a budget of its own
            found = self.budgets[policy.parent] = RetryBudget(policy.budget or BudgetSpec(), self.clock)
        return found

    def gauge(self, parent: Ref, backend: Backend) -> None:
        ready, pending = self.balancer.counts(backend, self.endpoints(backend))
        self.metrics.balancer(parent, backend.ref).endpoints(ready, pending)

    def rule_admitting(self, rule: Rule, besides: EndpointPick | None = None) -> int:
        """Endpoints admitting every request (breaker open) over every backend of the rule,
        leaving out `besides` (the endpoint whose failure is being recorded)."""
        count = 0
        for b in rule.backends:
            if b.weight <= 0:
                continue
            eps = self.endpoints(b)
            if besides is not None and b is besides.backend:
                eps = tuple(ep for ep in eps if ep != besides.endpoint)
            count += self.balancer.admitting(b, eps)
        return count

    def connectable(self, rule: Rule) -> bool:
        """Is an endpoint of the rule admitting and out of connect back-off?"""
        return any(self.balancer.counts(b, self.endpoints(b))[0] for b in rule.backends if b.weight > 0)

    def status(self) -> dict[str, Any]:
        """For /status: parents, routed app connections, breakers not open, budgets."""
        breakers: list[dict[str, Any]] = []
        now = self.clock()
        for policy in self.table.parents():
            for rule in policy.rules:
                for backend in rule.backends:
                    if backend.accrual is None:
                        continue
                    for ep in self.endpoints(backend):
                        brk = self.balancer.breaker(backend, ep, create=False)
                        if brk is None or brk.state == "open":
                            continue
                        breakers.append(
                            {
                                "parent": policy.parent.key(),
                                "backend": backend.ref.key(),
                                "endpoint": f"{ep.address}:{ep.port}",
                                "state": brk.state,
                                "until": round(max(0.0, brk.until - now), 3),
                            }
                        )
        budgets = [{"parent": ref.key(), "balance": round(b.balance(), 1)} for ref, b in self.budgets.items()]
        # Whole lists: agent/status.py bounds them (and counts what it leaves out).
        return {
            "parents": len(self.table.parents()),
            "connections": self.connections,
            "breakers": breakers,
            "budgets": budgets,
        }


class _Limit:
    """The request's deadline (loop time) and its error label, and the running attempt's one
    timer. `response` moves the deadline earlier when the request's body ends; `idle` (until
    the head) runs from the attempt's start or the request body's last progress, whichever is
    later: the body only stamps the Exchange's `request_moved_at`, and the timer, when it fires
    before the idle limit it was armed for moved, re-arms itself (no polling, no per-chunk work)."""

    __slots__ = (
        "armed_at",
        "at",
        "ex",
        "handle",
        "hard_at",
        "hard_label",
        "idle_s",
        "label",
        "response_s",
        "since",
        "timer",
        "timer_label",
    )

    def __init__(self, request_at: float | None, response_s: float | None) -> None:
        self.at, self.label = request_at, REQUEST_TIMEOUT
        self.response_s = response_s
        # The running attempt's (None between attempts): its cancel scope, the one loop timer,
        # its hard deadline (request/response/per-attempt) and its idle limit.
        self.timer: asyncio.Timeout | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.armed_at = 0.0
        self.hard_at: float | None = None
        self.hard_label = REQUEST_TIMEOUT
        self.idle_s: float | None = None
        self.since = 0.0
        self.ex: Any = None
        self.timer_label = REQUEST_TIMEOUT

    def start(
        self, timer: asyncio.Timeout, hard_at: float | None, hard_label: str, idle_s: float | None, ex: Any
    ) -> None:
        """An attempt begins under `timer` (a scope that expires only when this says so)."""
        self.timer, self.hard_at, self.hard_label, self.idle_s, self.ex = (
            timer,
            hard_at,
            hard_label,
            idle_s,
            ex,
        )
        self.since = asyncio.get_running_loop().time()
        self._arm()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.timer = self.handle = self.ex = None

    def _idle_at(self) -> float | None:
        if self.idle_s is None:
            return None
        moved: float | None = getattr(self.ex, "request_moved_at", None)
        return (self.since if moved is None or moved < self.since else moved) + self.idle_s

    def _arm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        at, idle_at = self.hard_at, self._idle_at()
        if idle_at is not None and (at is None or idle_at < at):
            at = idle_at
        if at is not None:
            self.armed_at = at
            self.handle = asyncio.get_running_loop().call_at(at, self._fired)

    def _fired(self) -> None:
        self.handle = None
        timer = self.timer
        if timer is None:
            return
        idle_at = self._idle_at()
        if self.hard_at is not None and self.hard_at <= self.armed_at:
            self.timer_label = self.hard_label
        elif idle_at is not None and idle_at <= self.armed_at:
            self.timer_label = IDLE_TIMEOUT
        else:  # the request body moved since: the idle limit is later now
            self._arm()
            return
        timer.reschedule(asyncio.get_running_loop().time())  # the attempt is cancelled: TimeoutError

    def move(self, at: float) -> None:
        if self.at is None or at < self.at:
            self.at, self.label = at, RESPONSE_STREAM_TIMEOUT
            if self.timer is not None and (self.hard_at is None or at < self.hard_at):
                self.hard_at, self.hard_label = at, RESPONSE_STREAM_TIMEOUT
                self._arm()

    def request_ended(self) -> None:
        """The Exchange's `on_request_end`: the body is complete, `response` starts now."""
        if self.response_s is not None:
            self.move(asyncio.get_running_loop().time() + self.response_s)


def backoff_s(
    rule_retry_min: float, rule_retry_max: float, jitter: float, n: int, rng: random.Random
) -> float:
    """Linkerd's exp-backoff for retry n (1-based): min·2^(n-1) ≤ max, + min(rand·jitter·base, max - base)."""
    base = min(rule_retry_max, rule_retry_min * 2.0 ** min(n - 1, 64))
    if jitter == 0.0:
        return base
    return base + min(rng.random() * jitter * base, rule_retry_max - base)


def _success(result: AttemptResult) -> bool:
    """For the breaker and the retry counters: a response head below 500, not a gRPC failure."""
    if result.status is None or result.status >= 500:
        return False
    return result.grpc_status is None or result.grpc_status not in GRPC_FAILURES


def _retryable(rule: Rule, result: AttemptResult) -> bool:
    retry = rule.retry
    if retry is None:
        return False
    if result.status is None:
        return result.connect_failed or result.error in RETRYABLE_ERRORS
    if result.grpc_status is not None and result.grpc_status in retry.grpc:
        return True
    return retry.retryable_status(result.status)


async def dispatch(ctx: RouterContext, policy: ParentPolicy, rule: Rule, ex: Exchange) -> None:
    """Route one request to the rule's backends, retrying as its policy says, and answer the app
    (ex.forward or ex.respond_error, exactly once)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    t = rule.timeouts
    limit = _Limit(None if t.request_s is None else started + t.request_s, t.response_s)
    if t.response_s is not None:
        # `response` counts from the request's end. An Exchange that tells when its body ended
        # (`request_ended_at`, `on_request_end`) gets that; else it counts from the head.
        if hasattr(ex, "on_request_end") and hasattr(ex, "request_ended_at"):
            ended = ex.request_ended_at
            if ended is None:
                ex.on_request_end = limit.request_ended
            else:
                limit.move(ended + t.response_s)
        else:
            limit.move(started + t.response_s)
    retry = rule.retry
    route = ctx.metrics.route(policy.parent, rule.route)
    budget = ctx.budget(policy)
    eligible: bool | None = None  # asked once, when first needed
    most = retry.limit if retry is not None else 0
    retries = 0
    while True:
        last = retries >= most  # the per-attempt header timeout is not applied to it (Linkerd)
        result, record = await _attempt(ctx, policy, rule, ex, limit, last)
        # Nothing was sent when the connection failed: another endpoint (the failed one now sits
        # out its back-off) is tried for any method, not as a retry and without the budget.
        # Linkerd never sends to an endpoint that is not connected.
        for _ in range(RECONNECTS):
            if not result.connect_failed or (limit.at is not None and loop.time() >= limit.at):
                break
            if not ctx.connectable(rule):
                break  # every endpoint is in back-off: no other to try (a dead one is not redialled)
            result, record = await _attempt(ctx, policy, rule, ex, limit, last)
        retryable = _retryable(rule, result)
        if retryable and eligible is None:
            eligible = ex.retry_eligible()
        if not retryable or not eligible:
            budget.deposit()  # a live request (tower/Linkerd legacy placement)
            if retries and _success(result):
                route.retry_success()
            break
        if retries >= most:
            route.limit_exceeded()
            break
        if not budget.withdraw():
            route.overflow()
            break
        retries += 1
        if record is not None:
            record(None)
            record = None
        if result.status is not None or result.upstream is not None:
            ex.discard(result)  # a response head, or an upstream left in a failed state
        assert retry is not None
        delay = backoff_s(retry.backoff_min_s, retry.backoff_max_s, retry.jitter, retries, ctx.rng)
        if limit.at is not None and loop.time() + delay >= limit.at:
            await asyncio.sleep(max(0.0, limit.at - loop.time()))
            result = AttemptResult(None, None, limit.label, None)
            break
        await asyncio.sleep(delay)
        route.retry_request()
    if result.status is not None and hasattr(ex, "on_response_end"):
        # Linkerd's durations run to the response's end, and a response broken after its head
        # is counted with the error: the Exchange calls this when it ends (once).
        ex.on_response_end = _ended(loop, route, result.status, started, record)
        ex.forward(result)
        return
    if record is not None:
        record(None)
    _answer(ex, route, result, loop.time() - started, t)


async def _attempt(
    ctx: RouterContext,
    policy: ParentPolicy,
    rule: Rule,
    ex: Exchange,
    limit: _Limit,
    last: bool,
) -> tuple[AttemptResult, Callable[[str | None], None] | None]:
    """One attempt: backend, endpoint, the request under its head deadline, the outcome recorded.
    With a response head, also the function that records the backend series when it ends."""
    # A backend whose endpoints all sit out a connect back-off is skipped while another is
    # ready; with none ready, every available one is tried anyway (as the L4 balancer does).
    backend = rule.pick(ctx.rng, lambda b: ctx.balancer.ready(b, ctx.endpoints(b))) or rule.pick(
        ctx.rng, lambda b: ctx.balancer.available(b, ctx.endpoints(b))
    )
    pick = None if backend is None else ctx.balancer.pick(backend, ctx.endpoints(backend))
    if backend is None or pick is None:
        return AttemptResult(None, None, FAIL_FAST, None), None
    loop = asyncio.get_running_loop()
    t = rule.timeouts
    now = loop.time()
    request_deadline = deadline = limit.at
    label = limit.label
    # Until the head: the per-attempt timeouts (retryable), and `idle` (no byte either way: the
    # request body's progress re-arms it; after the head the body's idleness is the Exchange's).
    for timeout in (t.backend_request_s, None if last else t.attempt_s):
        if timeout is not None and (deadline is None or now + timeout < deadline):
            deadline, label = now + timeout, RESPONSE_HEADERS_TIMEOUT
    series = ctx.metrics.backend(policy.parent, rule.route, backend.ref)
    series.request()
    outcome: Outcome = "failure"
    try:
        try:
            async with asyncio.timeout_at(None) as timer:  # expired by limit's timer only
                limit.start(timer, deadline, label, t.idle_s, ex)
                result = await ex.attempt(pick, request_deadline)
        except TimeoutError:
            result = AttemptResult(None, None, limit.timer_label, None)
        except OSError as exc:  # the Exchange should map these itself; never let one escape
            log.debug("http.attempt.io_error", endpoint=pick.endpoint.address, error=str(exc))
            result = AttemptResult(None, None, "IO", None)
        except Exception as exc:  # a bug in an Exchange: the request fails, the worker stays up
            log.error("http.attempt.failed", endpoint=pick.endpoint.address, error=repr(exc))
            result = AttemptResult(None, None, "UNKNOWN", None)
        outcome = "connect_failed" if result.connect_failed else "success" if _success(result) else "failure"
    except asyncio.CancelledError:
        ctx.balancer.finished(pick, "cancelled", 0)
        raise
    finally:
        limit.stop()
        if not pick.done:
            _finish(ctx, policy, rule, pick, outcome)
    if result.status is None:
        series.done(None, result.error, loop.time() - now)
        return result, None

    def record(error: str | None) -> None:
        """The response ended (`error`: how it broke after its head, else None)."""
        series.done(result.status, error, loop.time() - now)

    return result, record


def _finish(
    ctx: RouterContext, policy: ParentPolicy, rule: Rule, pick: EndpointPick, outcome: Outcome
) -> None:
    backend = pick.backend
    breaker_counts = backend.accrual is not None and outcome != "success"
    admitting = ctx.rule_admitting(rule, besides=pick) + 1 if breaker_counts else 0
    transition = ctx.balancer.finished(pick, outcome, admitting)
    if transition is None and outcome != "connect_failed":
        return
    series = ctx.metrics.balancer(policy.parent, backend.ref)
    if transition == "shut":
        brk = ctx.balancer.breaker(backend, pick.endpoint, create=False)
        if brk is not None and brk.iterations == 1:  # open → shut; a failed probe is not a new ejection
            series.ejected()
            log.info(
                "http.breaker.shut",
                parent=policy.parent.key(),
                backend=backend.ref.key(),
                endpoint=pick.endpoint.address,
                penalty_s=round(brk.until - ctx.clock(), 3),
            )
    elif transition == "kept":
        series.kept_last()
        _kept_log.warning(
            f"{policy.parent.key()} {backend.ref.key()}",
            parent=policy.parent.key(),
            backend=backend.ref.key(),
            endpoint=pick.endpoint.address,
        )
    ctx.gauge(policy.parent, backend)


def _ended(
    loop: asyncio.AbstractEventLoop,
    route: Any,
    status: int,
    started: float,
    record: Callable[[str | None], None] | None,
) -> Callable[[str | None], None]:
    done = False

    def ended(error: str | None = None) -> None:
        nonlocal done
        if done:
            return
        done = True
        route.done(status, error, loop.time() - started)
        if record is not None:
            record(error)

    return ended


def _answer(ex: Exchange, route: Any, result: AttemptResult, duration_s: float, t: Timeouts) -> None:
    """Forward the last response, or synthesize the error (Linkerd's codes, design-21 §4.2)."""
    if result.status is not None:
        route.done(result.status, None, duration_s)
        ex.forward(result)
        return
    error = result.error or "UNKNOWN"
    route.done(None, error, duration_s)
    timeout = TIMEOUT_MESSAGES.get(error)
    if timeout is not None:
        configured = {
            REQUEST_TIMEOUT: t.request_s,
            RESPONSE_STREAM_TIMEOUT: t.response_s,
            IDLE_TIMEOUT: t.idle_s,
        }.get(error)
        message = timeout if configured is None else f"{timeout} after {configured:g}s"
        ex.respond_error(504, GRPC_DEADLINE_EXCEEDED, error, message, False)
    elif error == FAIL_FAST:
        ex.respond_error(
            503, GRPC_UNAVAILABLE, error, "no backend of this route is available (fail-fast)", False
        )
    elif result.connect_failed:
        ex.respond_error(502, GRPC_UNAVAILABLE, error, "connection to the backend endpoint failed", False)
    else:
        ex.respond_error(
            502, GRPC_UNAVAILABLE, error, f"the backend endpoint failed ({error.lower()})", False
        )
