"""dispatch: the attempt loop against a fake Exchange and recording metrics (no sockets).
Retries on retryable statuses, never for ineligible requests, the budget's overflow, the limit,
per-attempt and request timeouts (Linkerd: the per-attempt one not on the last attempt),
fail-fast, connect failures re-picking the endpoint, breakers through the loop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from agent.proxy.http_balance import EndpointPick
from agent.proxy.http_dispatch import AttemptResult, RouterContext, dispatch
from agent.proxy.routes import ParentPolicy, RequestView, parse_routes
from agent.proxy.services import ServiceTable

A, B = "198.18.2.2", "198.18.4.2"


class Series:
    def __init__(self, log: list[tuple[Any, ...]], name: str) -> None:
        self.log, self.name = log, name

    def __getattr__(self, method: str) -> Callable[..., None]:
        return lambda *args: self.log.append((self.name, method, *args))


class Metrics:
    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def route(self, parent: Any, route: Any) -> Series:
        return Series(self.log, "route")

    def backend(self, parent: Any, route: Any, backend: Any) -> Series:
        return Series(self.log, f"backend:{backend.name}")

    def balancer(self, parent: Any, backend: Any) -> Series:
        return Series(self.log, f"balancer:{backend.name}")

    def retry_buffer_full(self) -> None:
        self.log.append(("retry_buffer_full",))

    def count(self, name: str, method: str) -> int:
        return sum(1 for e in self.log if e[0] == name and e[1] == method)

    def calls(self, name: str, method: str) -> list[tuple[Any, ...]]:
        return [e[2:] for e in self.log if e[0] == name and e[1] == method]


Behaviour = Callable[[EndpointPick, int], Any]  # -> AttemptResult or "hang"


class FakeExchange:
    def __init__(self, behave: Behaviour, eligible: bool = True, method: bytes = b"GET") -> None:
        self.view = RequestView(method, "/", "", "web", {})
        self.behave, self.eligible = behave, eligible
        self.attempts: list[str] = []
        self.cancelled = 0
        self.forwarded: list[AttemptResult] = []
        self.discarded: list[AttemptResult] = []
        self.errors: list[tuple[int, int, str, str, bool]] = []

    def retry_eligible(self) -> bool:
        return self.eligible

    async def attempt(self, pick: EndpointPick, deadline: float | None) -> AttemptResult:
        self.attempts.append(pick.endpoint.address)
        out = self.behave(pick, len(self.attempts))
        if out == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        assert isinstance(out, AttemptResult)
        return out

    def forward(self, result: AttemptResult) -> None:
        self.forwarded.append(result)

    def discard(self, result: AttemptResult) -> None:
        self.discarded.append(result)

    def respond_error(self, status: int, grpc_status: int, error: str, message: str, close: bool) -> None:
        self.errors.append((status, grpc_status, error, message, close))


def ok(status: int = 200) -> AttemptResult:
    return AttemptResult(status, None, None, object())


def setup(
    retry: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    endpoints: tuple[str, ...] = (A,),
    budget: dict[str, Any] | None = None,
    accrual: dict[str, Any] | None = None,
) -> tuple[RouterContext, ParentPolicy, Metrics]:
    be: dict[str, Any] = {
        "weight": 1,
        "ref": {"group": "meshagent.io", "kind": "Host", "namespace": "shop", "name": "web", "port": 8080},
        "endpoints": [{"address": a, "port": 8080} for a in endpoints],
        "accrual": accrual,
    }
    rule: dict[str, Any] = {"backends": [be], "retry": retry, "timeouts": timeouts}
    doc = [
        {
            "parent": {
                "kind": "Host",
                "namespace": "shop",
                "name": "web",
                "port": 8080,
                "addresses": ["198.18.9.9"],
            },
            "budget": budget,
            "routes": [{"group": "", "kind": "default", "namespace": "", "name": "http", "rules": [rule]}],
        }
    ]
    rejected: list[Any] = []
    table = parse_routes(doc, lambda *a: rejected.append(a), ServiceTable.empty())
    assert not rejected, rejected
    metrics = Metrics()
    ctx = RouterContext(table, ServiceTable.empty(), metrics, rng=random.Random(4))
    return ctx, table.parents()[0], metrics


FAST = {"limit": 3, "backoff_min_ms": 1, "backoff_max_ms": 2}


def run(ctx: RouterContext, policy: ParentPolicy, ex: FakeExchange) -> None:
    asyncio.run(dispatch(ctx, policy, policy.rules[0], ex))


def test_retries_a_503_then_forwards_the_success() -> None:
    ctx, policy, m = setup(retry=FAST)
    ex = FakeExchange(lambda pick, n: ok(503) if n == 1 else ok(200))
    run(ctx, policy, ex)
    assert [r.status for r in ex.forwarded] == [200] and [r.status for r in ex.discarded] == [503]
    assert (m.count("route", "retry_request"), m.count("route", "retry_success")) == (1, 1)
    assert m.count("backend:web", "request") == 2
    assert [c[:2] for c in m.calls("backend:web", "done")] == [(503, None), (200, None)]
    assert [c[:2] for c in m.calls("route", "done")] == [(200, None)]


def test_post_is_never_retried_and_deposits() -> None:
    ctx, policy, m = setup(retry=FAST, budget={"ratio": 1.0, "min_per_s": 0, "ttl_s": 10})
    ex = FakeExchange(lambda pick, n: ok(503), eligible=False, method=b"POST")
    run(ctx, policy, ex)
    assert ex.attempts == [A] and [r.status for r in ex.forwarded] == [503]
    assert m.count("route", "retry_request") == 0
    assert ctx.budget(policy).balance() == 1.0  # its deposit


def test_no_retry_policy_means_one_attempt() -> None:
    ctx, policy, _m = setup()
    ex = FakeExchange(lambda pick, n: ok(503))
    run(ctx, policy, ex)
    assert len(ex.attempts) == 1 and [r.status for r in ex.forwarded] == [503]


def test_spent_budget_stops_retries_and_counts_overflow() -> None:
    ctx, policy, m = setup(retry=FAST, budget={"ratio": 0.2, "min_per_s": 0, "ttl_s": 10})
    failing = FakeExchange(lambda pick, n: ok(503))
    run(ctx, policy, failing)
    assert len(failing.attempts) == 1 and m.count("route", "overflow") == 1
    assert [r.status for r in failing.forwarded] == [503]
    for _ in range(10):  # ten live requests: 10 deposits = 2 retries at ratio 0.2
        run(ctx, policy, FakeExchange(lambda pick, n: ok(200)))
    failing = FakeExchange(lambda pick, n: ok(503))
    run(ctx, policy, failing)
    assert len(failing.attempts) == 3  # two retries, then the budget is spent
    assert m.count("route", "retry_request") == 2 and m.count("route", "overflow") == 2
    assert m.count("route", "limit_exceeded") == 0


def test_limit_exceeded() -> None:
    ctx, policy, m = setup(retry={**FAST, "limit": 2})
    ex = FakeExchange(lambda pick, n: ok(500))
    run(ctx, policy, ex)
    assert len(ex.attempts) == 3 and [r.status for r in ex.forwarded] == [500]
    assert len(ex.discarded) == 2
    assert (m.count("route", "retry_request"), m.count("route", "limit_exceeded")) == (2, 1)
    assert m.count("route", "retry_success") == 0


def test_status_outside_the_ranges_is_not_retried() -> None:
    ctx, policy, _m = setup(retry={**FAST, "http": [[502, 504]]})
    ex = FakeExchange(lambda pick, n: ok(500))
    run(ctx, policy, ex)
    assert len(ex.attempts) == 1


def test_grpc_status_retried_when_named() -> None:
    ctx, policy, m = setup(retry={**FAST, "grpc": [14]})
    ex = FakeExchange(
        lambda pick, n: AttemptResult(200, 14, None, None) if n == 1 else AttemptResult(200, 0, None, None)
    )
    run(ctx, policy, ex)
    assert len(ex.attempts) == 2 and ex.forwarded[0].grpc_status == 0
    assert m.count("route", "retry_success") == 1


def test_per_attempt_timeout_is_retried_and_the_attempt_cancelled() -> None:
    ctx, policy, m = setup(retry=FAST, timeouts={"attempt_ms": 20})
    ex = FakeExchange(lambda pick, n: "hang" if n == 1 else ok(200))
    run(ctx, policy, ex)
    assert ex.cancelled == 1 and [r.status for r in ex.forwarded] == [200]
    assert [c[:2] for c in m.calls("backend:web", "done")] == [
        (None, "RESPONSE_HEADERS_TIMEOUT"),
        (200, None),
    ]


def test_request_timeout_answers_504() -> None:
    ctx, policy, m = setup(timeouts={"request_ms": 30})
    ex = FakeExchange(lambda pick, n: "hang")
    run(ctx, policy, ex)
    assert ex.cancelled == 1 and not ex.forwarded
    (status, grpc, error, _message, close) = ex.errors[0]
    assert (status, grpc, error, close) == (504, 4, "REQUEST_TIMEOUT", False)
    assert [c[:2] for c in m.calls("route", "done")] == [(None, "REQUEST_TIMEOUT")]


def test_the_last_attempt_has_no_per_attempt_timeout() -> None:
    # Linkerd (route/retry.rs): once retries are exhausted, only the request timeout applies.
    # (400 ms: margin for a stalled loop between the 10 ms cut and the retry on a loaded machine)
    ctx, policy, m = setup(retry={**FAST, "limit": 1}, timeouts={"attempt_ms": 10, "request_ms": 400})
    ex = FakeExchange(lambda pick, n: "hang")
    run(ctx, policy, ex)
    assert len(ex.attempts) == 2 and ex.cancelled == 2
    assert [c[1] for c in m.calls("backend:web", "done")] == ["RESPONSE_HEADERS_TIMEOUT", "REQUEST_TIMEOUT"]
    assert ex.errors[0][:3] == (504, 4, "REQUEST_TIMEOUT")


def test_backend_request_timeout_applies_to_every_attempt() -> None:
    ctx, policy, _m = setup(timeouts={"backend_request_ms": 10})
    ex = FakeExchange(lambda pick, n: "hang")
    run(ctx, policy, ex)
    assert ex.errors[0][:3] == (504, 4, "RESPONSE_HEADERS_TIMEOUT")


def test_no_endpoint_is_fail_fast_503() -> None:
    ctx, policy, m = setup(retry=FAST, endpoints=())
    ex = FakeExchange(lambda pick, n: ok(200))
    run(ctx, policy, ex)
    assert not ex.attempts and ex.errors[0][:3] == (503, 14, "FAIL_FAST")
    assert m.count("route", "retry_request") == 3 and m.count("route", "limit_exceeded") == 1


def test_connect_failure_retried_on_the_other_endpoint() -> None:
    ctx, policy, _m = setup(retry=FAST, endpoints=(A, B))
    refused = AttemptResult(None, None, "IO", None, connect_failed=True)
    ex = FakeExchange(lambda pick, n: refused if pick.endpoint.address == A else ok(200))
    for _ in range(5):
        run(ctx, policy, ex)
    # A failed once, then sat out its back-off: every later attempt went to B.
    assert ex.attempts.count(A) == 1 and [r.status for r in ex.forwarded] == [200] * 5


def test_connect_failure_without_retry_is_502() -> None:
    ctx, policy, _m = setup()
    ex = FakeExchange(lambda pick, n: AttemptResult(None, None, "IO", None, connect_failed=True))
    run(ctx, policy, ex)
    assert ex.errors[0][:3] == (502, 14, "IO")
    assert len(ex.attempts) == 1  # the only endpoint is in back-off now: not redialled at once


def test_connect_failure_goes_to_another_endpoint_even_for_a_post() -> None:
    # Nothing was sent: a POST (never retried) still reaches the endpoint that connects,
    # without a retry counted or the budget touched.
    ctx, policy, m = setup(endpoints=(A, B), budget={"ratio": 0.2, "min_per_s": 0, "ttl_s": 10})
    refused = AttemptResult(None, None, "IO", None, connect_failed=True)
    for _ in range(20):
        ex = FakeExchange(lambda pick, n: refused if pick.endpoint.address == A else ok(200), eligible=False)
        run(ctx, policy, ex)
        assert [r.status for r in ex.forwarded] == [200] and not ex.errors
    assert m.count("route", "retry_request") == 0
    assert ctx.budget(policy).balance() == 4.0  # 20 deposits, nothing withdrawn


def test_breaker_ejects_then_keeps_the_last_endpoint() -> None:
    accrual = {"max_failures": 1, "min_penalty_ms": 60000, "max_penalty_ms": 60000, "jitter": 0}
    ctx, policy, m = setup(endpoints=(A, B), accrual=accrual)
    ex = FakeExchange(lambda pick, n: ok(500))
    for _ in range(4):
        run(ctx, policy, ex)
    assert m.count("balancer:web", "ejected") == 1
    assert m.count("balancer:web", "kept_last") == 3  # the survivor keeps failing, never shut
    survivor = ex.attempts[1]
    assert ex.attempts[1:] == [survivor] * 3
    assert m.calls("balancer:web", "endpoints")[-1] == (1, 1)
    assert [b["state"] for b in ctx.status()["breakers"]] == ["shut"]


def test_cancelled_dispatch_releases_the_endpoint() -> None:
    ctx, policy, _m = setup()
    ex = FakeExchange(lambda pick, n: "hang")

    async def main() -> None:
        task = asyncio.create_task(dispatch(ctx, policy, policy.rules[0], ex))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert all(load.outstanding == 0 for load in ctx.balancer.loads.values())
    assert not ex.forwarded and not ex.errors


def test_apply_keeps_budgets_of_unchanged_parents() -> None:
    ctx, policy, _m = setup(retry=FAST, budget={"ratio": 0.2, "min_per_s": 0, "ttl_s": 10})
    for _ in range(5):
        run(ctx, policy, FakeExchange(lambda pick, n: ok(200)))
    held = ctx.budget(policy)
    ctx.apply(ctx.table, ctx.services)
    assert ctx.budget(policy) is held and held.balance() == 1.0
    status = ctx.status()
    assert status["parents"] == 1 and status["budgets"][0]["balance"] == 1.0


def test_failed_probe_is_shut_again_while_another_endpoint_admits() -> None:
    # A penalty of 200 ms, not 1: a loaded machine lets 1 ms pass before the "still shut" checks.
    accrual = {"max_failures": 1, "min_penalty_ms": 200, "max_penalty_ms": 200, "jitter": 0}
    ctx, policy, m = setup(endpoints=(A, B), accrual=accrual)
    ex = FakeExchange(lambda pick, n: ok(500) if pick.endpoint.address == A else ok(200))
    while not ex.attempts or ex.attempts[-1] != A:
        run(ctx, policy, ex)
    assert m.count("balancer:web", "ejected") == 1
    asyncio.run(asyncio.sleep(0.3))  # A's penalty (200 ms) is over: its next request is the probe
    while ex.attempts.count(A) < 2:
        run(ctx, policy, ex)
    # The probe failed with B admitting: A is shut again, not "kept" (and not a new ejection).
    assert m.count("balancer:web", "ejected") == 1 and m.count("balancer:web", "kept_last") == 0
    assert [b["state"] for b in ctx.status()["breakers"]] == ["shut"]
    assert m.calls("balancer:web", "endpoints")[-1] == (1, 1)


def test_balancer_gauge_follows_an_endpoint_back_from_connect_back_off() -> None:
    ctx, policy, m = setup(endpoints=(A, B))
    clock = [1000.0]
    ctx.balancer.clock = lambda: clock[0]
    refused = AttemptResult(None, None, "IO", None, connect_failed=True)
    up = [False]
    ex = FakeExchange(lambda pick, n: ok(200) if up[0] or pick.endpoint.address == B else refused)
    while A not in ex.attempts:
        run(ctx, policy, ex)
    assert m.calls("balancer:web", "endpoints")[-1] == (1, 1)  # A sits out its back-off
    clock[0] += 60  # the back-off is over; A connects and answers now
    up[0] = True
    while ex.attempts.count(A) < 2:
        run(ctx, policy, ex)
    assert ctx.balancer.counts(policy.rules[0].backends[0]) == (2, 0)
    assert m.calls("balancer:web", "endpoints")[-1] == (2, 0)


def test_balancer_gauge_follows_a_breaker_shut_then_open_again() -> None:
    # A penalty of 200 ms, not 1: a loaded machine lets 1 ms pass before the "still shut" checks.
    accrual = {"max_failures": 1, "min_penalty_ms": 200, "max_penalty_ms": 200, "jitter": 0}
    ctx, policy, m = setup(endpoints=(A, B), accrual=accrual)
    healthy = [False]
    ex = FakeExchange(lambda pick, n: ok(200) if healthy[0] or pick.endpoint.address == B else ok(500))
    while A not in ex.attempts:
        run(ctx, policy, ex)
    assert m.calls("balancer:web", "endpoints")[-1] == (1, 1)  # A shut
    asyncio.run(asyncio.sleep(0.3))  # its penalty is over: the next request to A is the probe
    healthy[0] = True
    while ex.attempts.count(A) < 2:
        run(ctx, policy, ex)
    assert [b["state"] for b in ctx.status()["breakers"]] == []  # open again
    assert m.calls("balancer:web", "endpoints")[-1] == (2, 0)


def test_an_exchange_that_raises_fails_the_request_not_the_worker() -> None:
    def boom(pick: EndpointPick, n: int) -> Any:
        raise ConnectionResetError("reset by peer") if n == 1 else RuntimeError("bug")

    ctx, policy, _m = setup(retry=FAST)
    ex = FakeExchange(boom)
    run(ctx, policy, ex)
    # IO is retryable, the bug is not: two attempts, then 502 UNKNOWN
    assert len(ex.attempts) == 2 and ex.errors[0][:3] == (502, 14, "UNKNOWN")
    assert all(load.outstanding == 0 for load in ctx.balancer.loads.values())


def test_with_the_real_route_metrics() -> None:
    from agent.telemetry.route_metrics import RouteMetrics

    ctx, policy, _m = setup(retry=FAST, timeouts={"request_ms": 5000})
    metrics = RouteMetrics()
    ctx.metrics = metrics
    ctx.apply(ctx.table, ctx.services)
    run(ctx, policy, FakeExchange(lambda pick, n: ok(503) if n == 1 else ok(200)))
    text = "\n".join(line for family in metrics.families() for line in family.render())
    parent = 'parent_group="",parent_kind="Host",parent_namespace="shop",parent_name="web",parent_port="8080"'
    assert f"outbound_http_route_retry_requests_total{{{parent}" in text
    retries = [
        line for line in text.splitlines() if line.startswith("outbound_http_route_retry_requests_total{")
    ]
    assert len(retries) == 1 and retries[0].endswith(" 1")
    statuses = [
        line for line in text.splitlines() if line.startswith("outbound_http_route_backend_response_statuses")
    ]
    assert any('http_status="503"' in s for s in statuses) and any('http_status="200"' in s for s in statuses)
    assert any(
        line.startswith("outbound_http_balancer_endpoints{")
        and 'endpoint_state="ready"' in line
        and line.endswith(" 1")
        for line in text.splitlines()
    )


def test_the_last_open_endpoint_is_kept_while_the_other_is_in_probation() -> None:
    # Both endpoints fail. A is shut; once its penalty is over it is in probation (one request
    # at a time). B failing then must not be shut: requests arriving while A's probe is in
    # flight would find no endpoint (503 FAIL_FAST) — B is kept instead.
    # A penalty of 200 ms, not 1: a loaded machine lets 1 ms pass before the "still shut" checks.
    accrual = {"max_failures": 1, "min_penalty_ms": 200, "max_penalty_ms": 200, "jitter": 0}
    ctx, policy, m = setup(endpoints=(A, B), accrual=accrual)
    ex = FakeExchange(lambda pick, n: ok(500))
    run(ctx, policy, ex)
    first = ex.attempts[0]
    other = B if first == A else A
    asyncio.run(asyncio.sleep(0.3))  # the first one's penalty is over: probation on next look
    rule = policy.rules[0]
    be = rule.backends[0]
    assert ctx.balancer.admits(be, be.endpoints[0]) and ctx.balancer.admits(be, be.endpoints[1])
    # the other endpoint fails now: it is the last open one
    pick = ctx.balancer.pick(be, [ep for ep in be.endpoints if ep.address == other])
    assert pick is not None
    from agent.proxy.http_dispatch import _finish

    _finish(ctx, policy, rule, pick, "failure")
    assert m.count("balancer:web", "kept_last") == 1 and m.count("balancer:web", "ejected") == 1
    for _ in range(10):
        run(ctx, policy, ex)
    assert not ex.errors  # never a 503: something always admits


class DeadlineExchange(FakeExchange):
    def __init__(self, behave: Behaviour) -> None:
        super().__init__(behave)
        self.deadlines: list[float | None] = []

    async def attempt(self, pick: EndpointPick, deadline: float | None) -> AttemptResult:
        self.deadlines.append(deadline)
        return await super().attempt(pick, deadline)


def test_response_timeout_answers_504_and_is_not_retried() -> None:
    ctx, policy, m = setup(retry=FAST, timeouts={"request_ms": 10_000, "response_ms": 30})
    ex = DeadlineExchange(lambda pick, n: "hang")
    run(ctx, policy, ex)
    assert len(ex.attempts) == 1 and ex.errors[0][:3] == (504, 4, "RESPONSE_STREAM_TIMEOUT")
    assert [c[:2] for c in m.calls("route", "done")] == [(None, "RESPONSE_STREAM_TIMEOUT")]
    # the Exchange is handed the earlier limit (the response timeout), for the body
    (deadline,) = ex.deadlines
    assert deadline is not None and m.count("route", "retry_request") == 0


def test_idle_timeout_while_waiting_for_the_head() -> None:
    ctx, policy, m = setup(retry=FAST, timeouts={"idle_ms": 20})
    ex = DeadlineExchange(lambda pick, n: "hang")
    run(ctx, policy, ex)
    assert len(ex.attempts) == 1 and ex.errors[0][:3] == (504, 4, "IDLE_TIMEOUT")
    assert ex.deadlines == [None]  # no request limit: the body is not timed
    assert m.calls("backend:web", "done")[0][:2] == (None, "IDLE_TIMEOUT")


class MovingExchange(FakeExchange):
    """Stamps `request_moved_at` (its body arriving) 10 ms apart for 100 ms, then stops."""

    def __init__(self) -> None:
        super().__init__(lambda pick, n: "hang")
        self.request_moved_at: float | None = None
        self.last_move = 0.0

    async def attempt(self, pick: EndpointPick, deadline: float | None) -> AttemptResult:
        loop = asyncio.get_running_loop()

        async def body() -> None:
            for _ in range(10):
                await asyncio.sleep(0.01)
                self.request_moved_at = self.last_move = loop.time()

        mover = asyncio.create_task(body())
        try:
            return await super().attempt(pick, deadline)
        finally:
            mover.cancel()


def test_idle_before_the_head_counts_from_the_request_bodys_last_progress() -> None:
    ctx, policy, _m = setup(timeouts={"idle_ms": 300})
    ex = MovingExchange()
    ended: list[float] = []

    async def main() -> None:
        await dispatch(ctx, policy, policy.rules[0], ex)
        ended.append(asyncio.get_running_loop().time())

    asyncio.run(main())
    assert ex.errors[0][:3] == (504, 4, "IDLE_TIMEOUT")
    assert ex.last_move > 0 and ended[0] >= ex.last_move + 0.3  # not 300 ms from the start


class UploadExchange(FakeExchange):
    """Reports its body's end (the optional hooks): the upload takes 60 ms, then the backend hangs."""

    def __init__(self) -> None:
        super().__init__(lambda pick, n: "hang")
        self.request_ended_at: float | None = None
        self.on_request_end: Callable[[], None] | None = None
        self.uploaded = False

    async def attempt(self, pick: EndpointPick, deadline: float | None) -> AttemptResult:
        self.attempts.append(pick.endpoint.address)
        await asyncio.sleep(0.06)  # the body still uploading
        self.request_ended_at = asyncio.get_running_loop().time()
        self.uploaded = True
        if self.on_request_end is not None:
            self.on_request_end()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


def test_response_timeout_counts_from_the_request_end_when_the_exchange_says() -> None:
    # Linkerd's `response` timeout starts when the request body ends: a 60 ms upload on a 30 ms
    # response timeout is not cut while uploading; the hang after it is.
    ctx, policy, _m = setup(timeouts={"response_ms": 30})
    ex = UploadExchange()
    run(ctx, policy, ex)
    assert ex.uploaded and ex.cancelled == 1
    assert ex.errors[0][:3] == (504, 4, "RESPONSE_STREAM_TIMEOUT")
    # without the hooks the same timeout counts from the head and cuts the upload
    plain = DeadlineExchange(lambda pick, n: "hang")
    run(ctx, policy, plain)
    assert plain.errors[0][:3] == (504, 4, "RESPONSE_STREAM_TIMEOUT")


def test_request_timeout_still_bounds_an_upload() -> None:
    ctx, policy, _m = setup(timeouts={"request_ms": 30, "response_ms": 10_000})
    ex = UploadExchange()
    run(ctx, policy, ex)
    assert not ex.uploaded and ex.errors[0][:3] == (504, 4, "REQUEST_TIMEOUT")


class EndingExchange(FakeExchange):
    """Reports its response's end (the optional `on_response_end` hook)."""

    def __init__(self, behave: Behaviour) -> None:
        super().__init__(behave)
        self.on_response_end: Callable[[str | None], None] | None = None


def test_metrics_recorded_at_the_response_end_when_the_exchange_reports_it() -> None:
    ctx, policy, m = setup(retry=FAST)
    ex = EndingExchange(lambda pick, n: ok(503) if n == 1 else ok(200))
    run(ctx, policy, ex)
    # forwarded, not yet ended: the retried attempt is recorded, the final one waits
    assert [c[:2] for c in m.calls("backend:web", "done")] == [(503, None)]
    assert m.calls("route", "done") == []
    assert ex.on_response_end is not None
    ex.on_response_end("RESET")  # the body broke after the head
    ex.on_response_end(None)  # a second call changes nothing
    assert [c[:2] for c in m.calls("route", "done")] == [(200, "RESET")]
    assert [c[:2] for c in m.calls("backend:web", "done")] == [(503, None), (200, "RESET")]


def test_synthesized_errors_are_recorded_at_once_even_with_the_hook() -> None:
    ctx, policy, m = setup(timeouts={"request_ms": 20})
    ex = EndingExchange(lambda pick, n: "hang")
    run(ctx, policy, ex)
    assert ex.on_response_end is None and ex.errors[0][:3] == (504, 4, "REQUEST_TIMEOUT")
    assert [c[:2] for c in m.calls("route", "done")] == [(None, "REQUEST_TIMEOUT")]
