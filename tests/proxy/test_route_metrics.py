"""Linkerd's outbound route families (issue #21): exact exposition (names, label order, buckets,
`le` as Rust renders an f64), registered in ProxyMetrics so a worker's dump merges exactly, and
series re-resolved after an idle drop."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from agent.telemetry.merge import MetricsMerger
from agent.telemetry.proxy_metrics import ProxyMetrics
from agent.telemetry.route_metrics import RouteMetrics

_SAMPLE = re.compile(r"^(\S+?)(\{.*\})? (\S+)$")


@dataclass(frozen=True)
class Ref:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None
    section: str = ""


PARENT = Ref("meshagent.io", "Host", "shop", "web-v1", 8080)
ROUTE = Ref("gateway.networking.k8s.io", "HTTPRoute", "shop", "web")
DEFAULT = Ref("", "default", "", "http")
V1 = Ref("meshagent.io", "Host", "shop", "web-v1", 8080)
V2 = Ref("", "Service", "shop", "web-v2", 8080)

P = (
    'parent_group="meshagent.io",parent_kind="Host",parent_namespace="shop",parent_name="web-v1",'
    'parent_port="8080",parent_section_name=""'
)
R = 'route_group="gateway.networking.k8s.io",route_kind="HTTPRoute",route_namespace="shop",route_name="web"'
B2 = (
    'backend_group="",backend_kind="Service",backend_namespace="shop",backend_name="web-v2",'
    'backend_port="8080",backend_section_name=""'
)


def samples(lines: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in lines:
        if line.startswith("#") or not line:
            continue
        match = _SAMPLE.match(line)
        assert match, line
        out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def route_lines(pm: ProxyMetrics) -> list[str]:
    return [line for f in pm.routes.families() for line in f.render()]


def test_exposition_golden() -> None:
    pm = ProxyMetrics()
    rm = pm.routes
    r = rm.route(PARENT, ROUTE)
    r.done(200, None, 0.03125)
    r.done(200, None, 1.0)  # on a bound: counted in that bucket (le is inclusive)
    r.done(None, "REQUEST_TIMEOUT", 2.0)
    r.retry_request()
    r.retry_success()
    r.overflow()
    b = rm.backend(PARENT, ROUTE, V2)
    b.request()
    b.done(503, None, 0.2)
    rm.balancer(PARENT, V2).endpoints(1, 1)
    rm.balancer(PARENT, V2).ejected()
    text = route_lines(pm)
    rs = f'{P},{R},hostname=""'
    bs = f"{P},{R},{B2}"
    expected_in_order = [
        "# HELP outbound_http_route_request_duration_seconds "
        "The time between request initialization and response completion.",
        "# TYPE outbound_http_route_request_duration_seconds histogram",
        f'outbound_http_route_request_duration_seconds_bucket{{{rs},le="0.05"}} 1',
        f'outbound_http_route_request_duration_seconds_bucket{{{rs},le="0.5"}} 1',
        f'outbound_http_route_request_duration_seconds_bucket{{{rs},le="1.0"}} 2',
        f'outbound_http_route_request_duration_seconds_bucket{{{rs},le="10.0"}} 3',
        f'outbound_http_route_request_duration_seconds_bucket{{{rs},le="+Inf"}} 3',
        f"outbound_http_route_request_duration_seconds_count{{{rs}}} 3",
        f"outbound_http_route_request_duration_seconds_sum{{{rs}}} 3.03125",
        "# TYPE outbound_http_route_request_statuses_total counter",
        f'outbound_http_route_request_statuses_total{{{rs},http_status="200",error=""}} 2',
        f'outbound_http_route_request_statuses_total{{{rs},http_status="",error="REQUEST_TIMEOUT"}} 1',
        f"outbound_http_route_backend_requests_total{{{bs}}} 1",
        f'outbound_http_route_backend_response_duration_seconds_bucket{{{bs},le="0.025"}} 0',
        f'outbound_http_route_backend_response_duration_seconds_bucket{{{bs},le="0.25"}} 1',
        f'outbound_http_route_backend_response_duration_seconds_bucket{{{bs},le="10.0"}} 1',
        f'outbound_http_route_backend_response_statuses_total{{{bs},http_status="503",error=""}} 1',
        f"outbound_http_route_retry_requests_total{{{rs}}} 1",
        f"outbound_http_route_retry_successes_total{{{rs}}} 1",
        f"outbound_http_route_retry_overflow_total{{{rs}}} 1",
        f'outbound_http_balancer_endpoints{{{P},{B2},endpoint_state="ready"}} 1',
        f'outbound_http_balancer_endpoints{{{P},{B2},endpoint_state="pending"}} 1',
        f"meshagent_http_breaker_ejections_total{{{P},{B2}}} 1",
    ]
    at = -1
    for want in expected_in_order:
        assert want in text, want
        assert text.index(want) > at, f"out of order: {want}"
        at = text.index(want)
    # Every family's name is Linkerd's, and the full /metrics carries them.
    full = "\n".join(pm.render(()))
    for name in (
        "outbound_http_route_retry_limit_exceeded_total",
        "meshagent_http_breaker_last_endpoint_kept_total",
        "meshagent_http_retry_buffer_full_total",
        "meshagent_http_routed_fallback_total",
    ):
        assert f"# TYPE {name} counter" in full
    assert 'le="1.0"' in full and 'le="1"' not in full.split("outbound_http_route")[1]


def test_default_route_labels() -> None:
    rm = RouteMetrics()
    rm.route(PARENT, DEFAULT).done(200, None, 0.01)
    (key,) = rm.request_statuses.children
    assert 'route_group="",route_kind="default",route_namespace="",route_name="http",hostname=""' in key


def test_series_cached_and_reresolved_after_idle_drop() -> None:
    rm = RouteMetrics()
    a = rm.route(PARENT, ROUTE)
    assert rm.route(PARENT, ROUTE) is a
    a.done(200, None, 0.01)
    for family in rm.families():
        family.retain_idle_s = 0.0
        for child in family.children.values():
            child.touched = -1e9
    dropped_names: list[str] = []
    rm.on_drop = lambda name, key, child: dropped_names.append(name)
    for family in rm.families():
        family.sweep()  # first sweep: values moved since the last one, so marked in use
        for child in family.children.values():
            child.touched = -1e9
        family.sweep()
    assert "outbound_http_route_request_statuses_total" in dropped_names
    assert rm.request_statuses.children == {}
    b = rm.route(PARENT, ROUTE)
    assert b is not a
    b.done(200, None, 0.01)
    assert next(iter(rm.request_statuses.children.values())).value == 1


def record(pm: ProxyMetrics, rng: random.Random, n: int) -> None:
    rm = pm.routes
    for _ in range(n):
        backend = rng.choice([V1, V2])
        r = rm.route(PARENT, rng.choice([ROUTE, DEFAULT]))
        b = rm.backend(PARENT, ROUTE, backend)
        status = rng.choice([200, 200, 503, None])
        error = None if status else rng.choice(["REQUEST_TIMEOUT", "FAIL_FAST"])
        b.request()
        b.done(status, error, rng.randrange(200) / 64)  # exact in binary: sums add exactly
        r.done(status, error, rng.randrange(800) / 64)
        if rng.random() < 0.2:
            r.retry_request()
        if rng.random() < 0.05:
            r.limit_exceeded()
        rm.balancer(PARENT, backend).ejected()
    rm.retry_buffer_full()
    rm.routed_fallback(rng.choice(["opaque", "detect_timeout"]))


def test_worker_merge_sums_exactly() -> None:
    workers = [ProxyMetrics() for _ in range(3)]
    alone = ProxyMetrics()  # every worker's traffic recorded in one process
    for i, w in enumerate(workers):
        record(w, random.Random(i), 200)
        record(alone, random.Random(i), 200)
    target = ProxyMetrics()
    merger = MetricsMerger(target)
    for slot, w in enumerate(workers):
        merger.update(slot, w.dump(()))
    assert samples(route_lines(target)) == samples(route_lines(alone))
    # A worker dies: its counters retire, merged totals stay.
    merger.worker_gone(1)
    assert samples(route_lines(target)) == samples(route_lines(alone))
    # Gauges: a live worker's balancer state only.
    workers[0].routes.balancer(PARENT, V1).endpoints(2, 1)
    merger.update(0, workers[0].dump(()))
    got = samples(route_lines(target))
    assert got[f'outbound_http_balancer_endpoints{{{P},{V1_LABELS},endpoint_state="ready"}}'] == 2


V1_LABELS = (
    'backend_group="meshagent.io",backend_kind="Host",backend_namespace="shop",backend_name="web-v1",'
    'backend_port="8080",backend_section_name=""'
)


def test_render_worker_shows_route_families() -> None:
    w = ProxyMetrics()
    record(w, random.Random(5), 20)
    merger = MetricsMerger(ProxyMetrics())
    merger.update(0, w.dump(()))
    lines = merger.render_worker(0)
    assert lines is not None
    text = list(lines)
    assert samples(x for x in text if "outbound_http_route" in x) == samples(
        x for x in route_lines(w) if "outbound_http_route" in x
    )


def test_balancer_gauge_merges_by_max_over_workers() -> None:
    """Every worker balances over the same endpoints: the merged gauge is Linkerd's per-proxy
    count (an endpoint shut in any worker reads pending), not a sum; counters still add."""
    a, b = ProxyMetrics(), ProxyMetrics()
    a.routes.balancer(PARENT, V1).endpoints(2, 0)
    b.routes.balancer(PARENT, V1).endpoints(1, 1)
    b.routes.balancer(PARENT, V1).ejected()
    a.routes.balancer(PARENT, V1).ejected()
    target = ProxyMetrics()
    merger = MetricsMerger(target)
    merger.update(0, a.dump(()))
    merger.update(1, b.dump(()))
    got = samples(route_lines(target))
    state = f"outbound_http_balancer_endpoints{{{P},{V1_LABELS},endpoint_state="
    assert got[state + '"ready"}'] == 2
    assert got[state + '"pending"}'] == 1
    assert got[f"meshagent_http_breaker_ejections_total{{{P},{V1_LABELS}}}"] == 2
    merger.worker_gone(1)  # the shut view goes with its worker
    assert samples(route_lines(target))[state + '"pending"}'] == 0
