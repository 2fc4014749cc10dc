"""Linkerd's outbound HTTP route families, for the host's routed requests (issue #21).

Names, types, label sets and order, and buckets as linkerd2-proxy's outbound policy stack
(`linkerd/app/outbound/src/http/logical/policy/route/metrics.rs`, `linkerd/http/prom`,
`linkerd/http/retry`, `linkerd/proxy/balance/gauge-endpoints`), so Linkerd's dashboards and
`linkerd viz stat-outbound`'s queries read a host's series as a pod's:

- Route labels: parent_{group,kind,namespace,name,port,section_name}, route_{group,kind,
  namespace,name}, hostname (always "": a legacy app's Host header is unbounded cardinality);
- RouteBackend: parent_* + route_* + backend_{group,kind,namespace,name,port,section_name};
- Concrete (balancer): parent_* + backend_*.

Histogram bounds are rendered as prometheus-client (Rust) renders an f64 (`le="1.0"`, not
meshagent's usual `le="1"`): a `sum by (le)` across pods and hosts would otherwise split buckets.
Python's `repr(float)` gives the same strings for these bounds.

Recording: a caller asks for a series object once per request (`route`, `backend`, `balancer`;
cached here by the refs, so a keep-alive stream of requests pays one dict lookup) and then only
adds to resolved children. A child the idle sweep drops bumps `generation`, which empties the
caches: a series object never writes into a dropped child for longer than one request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

from .metrics import Family, HistogramChild, fmt, join, labels

# linkerd/app/outbound/src/http/logical/policy/route/metrics.rs
REQUEST_BUCKETS: Final = (0.05, 0.5, 1.0, 10.0)
RESPONSE_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0)

# linkerd/app/outbound/src/http/logical/policy/route/metrics/labels.rs: the `error` label's values.
ERRORS: Final = frozenset(
    {
        "FAIL_FAST",
        "LOAD_SHED",
        "REQUEST_TIMEOUT",
        "RESPONSE_HEADERS_TIMEOUT",
        "RESPONSE_STREAM_TIMEOUT",
        "IDLE_TIMEOUT",
        "CANCEL",
        "REFUSED",
        "ENHANCE_YOUR_CALM",
        "RESET",
        "GO_AWAY",
        "IO",
        "UNKNOWN",
    }
)
FALLBACK_REASONS: Final = ("opaque", "detect_timeout", "upgrade")

REQUEST_DURATION: Final = "outbound_http_route_request_duration_seconds"
REQUEST_STATUSES: Final = "outbound_http_route_request_statuses_total"
BACKEND_REQUESTS: Final = "outbound_http_route_backend_requests_total"
BACKEND_DURATION: Final = "outbound_http_route_backend_response_duration_seconds"
BACKEND_STATUSES: Final = "outbound_http_route_backend_response_statuses_total"
RETRY_REQUESTS: Final = "outbound_http_route_retry_requests_total"
RETRY_SUCCESSES: Final = "outbound_http_route_retry_successes_total"
RETRY_LIMIT_EXCEEDED: Final = "outbound_http_route_retry_limit_exceeded_total"
RETRY_OVERFLOW: Final = "outbound_http_route_retry_overflow_total"
BALANCER_ENDPOINTS: Final = "outbound_http_balancer_endpoints"
EJECTIONS: Final = "meshagent_http_breaker_ejections_total"
LAST_KEPT: Final = "meshagent_http_breaker_last_endpoint_kept_total"
BUFFER_FULL: Final = "meshagent_http_retry_buffer_full_total"
FALLBACK: Final = "meshagent_http_routed_fallback_total"


class RefLike(Protocol):
    """agent.proxy.routes.Ref's shape (Linkerd's meta labels); a Protocol so telemetry does not
    import the proxy."""

    @property
    def group(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def port(self) -> int | None: ...
    @property
    def section(self) -> str: ...


def meta(scope: str, ref: RefLike, with_port: bool = True) -> str:
    """`scope_group="",scope_kind="Service",...` in Linkerd's order (routes have no port)."""
    pairs = [
        (f"{scope}_group", ref.group),
        (f"{scope}_kind", ref.kind),
        (f"{scope}_namespace", ref.namespace),
        (f"{scope}_name", ref.name),
    ]
    if with_port:
        pairs.append((f"{scope}_port", "" if ref.port is None else str(ref.port)))
        pairs.append((f"{scope}_section_name", ref.section))
    return labels(*pairs)


def route_labels(parent: RefLike, route: RefLike) -> str:
    return join(meta("parent", parent), meta("route", route, with_port=False), labels(("hostname", "")))


def backend_labels(parent: RefLike, route: RefLike, backend: RefLike) -> str:
    return join(meta("parent", parent), meta("route", route, with_port=False), meta("backend", backend))


def concrete_labels(parent: RefLike, backend: RefLike) -> str:
    return join(meta("parent", parent), meta("backend", backend))


def status_labels(http_status: int | None, error: str | None) -> str:
    return labels(("http_status", "" if http_status is None else str(http_status)), ("error", error or ""))


class FloatLeFamily(Family):
    """A Family whose histogram bounds render as Rust's f64 Display does (`"1.0"`, `"0.05"`).
    `merge`: how MetricsMerger combines the workers' gauges ("sum", or "max")."""

    merge = "sum"

    def render(self, live: Callable[[str], float] | None = None) -> Iterator[str]:
        if self.kind != "histogram":
            yield from super().render(live)
            return
        self.sweep()
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, c in self.children.items():
            braces = "{" + key + "}" if key else ""
            bucket = self.name + "_bucket{" + (key + "," if key else "")  # (not the cached `join`)
            cumulative = 0
            for bound, count in zip(c.bounds, c.counts, strict=False):
                cumulative += count
                le = 'le="' + repr(float(bound)) + '"'
                yield f"{bucket}{le}}} {cumulative}"
            inf = 'le="+Inf"'
            yield f"{bucket}{inf}}} {c.count}"
            yield f"{self.name}_count{braces} {c.count}"
            yield f"{self.name}_sum{braces} {fmt(c.sum)}"


def _observe(child: HistogramChild, bounds: tuple[float, ...], value: float) -> None:
    child.counts[bisect_left(bounds, value)] += 1
    child.sum += value
    child.count += 1


class RouteSeries:
    """One (parent, route)'s children: request statuses resolved once per (status, error)."""

    __slots__ = (
        "base",
        "by_status",
        "duration",
        "generation",
        "limit",
        "over",
        "owner",
        "retries",
        "successes",
    )

    def __init__(self, owner: RouteMetrics, base: str) -> None:
        self.owner = owner
        self.base = base
        self.generation = owner.generation
        self.duration: HistogramChild = owner.request_duration.child(base)
        self.retries = owner.retry_requests.child(base)
        self.successes = owner.retry_successes.child(base)
        self.limit = owner.retry_limit_exceeded.child(base)
        self.over = owner.retry_overflow.child(base)
        self.by_status: dict[tuple[int | None, str | None], Any] = {}

    def done(self, http_status: int | None, error: str | None, duration_s: float) -> None:
        """A request/response stream ended: its final status (None: no response), the Linkerd
        error label (None: none), request start → response end."""
        key = (http_status, error)
        child = self.by_status.get(key)
        if child is None:
            child = self.owner.request_statuses.child(join(self.base, status_labels(http_status, error)))
            self.by_status[key] = child
        child.value += 1
        _observe(self.duration, REQUEST_BUCKETS, duration_s)

    def retry_request(self) -> None:
        self.retries.value += 1

    def retry_success(self) -> None:
        self.successes.value += 1

    def limit_exceeded(self) -> None:
        self.limit.value += 1

    def overflow(self) -> None:
        self.over.value += 1


class BackendSeries:
    """One (parent, route, backend)'s children."""

    __slots__ = ("base", "by_status", "duration", "generation", "owner", "requests")

    def __init__(self, owner: RouteMetrics, base: str) -> None:
        self.owner = owner
        self.base = base
        self.generation = owner.generation
        self.requests = owner.backend_requests.child(base)
        self.duration: HistogramChild = owner.backend_duration.child(base)
        self.by_status: dict[tuple[int | None, str | None], Any] = {}

    def request(self) -> None:
        """A request (an attempt: retries count again) was dispatched to this backend."""
        self.requests.value += 1

    def done(self, http_status: int | None, error: str | None, duration_s: float) -> None:
        """An attempt at this backend ended; `duration_s`: request end → response end."""
        key = (http_status, error)
        child = self.by_status.get(key)
        if child is None:
            child = self.owner.backend_statuses.child(join(self.base, status_labels(http_status, error)))
            self.by_status[key] = child
        child.value += 1
        _observe(self.duration, RESPONSE_BUCKETS, duration_s)


class BalancerSeries:
    """One (parent, backend)'s balancer gauge and breaker counters."""

    __slots__ = ("base", "ejections", "generation", "kept", "owner", "pending", "ready")

    def __init__(self, owner: RouteMetrics, base: str) -> None:
        self.owner = owner
        self.base = base
        self.generation = owner.generation
        self.ready = owner.balancer_endpoints.child(join(base, labels(("endpoint_state", "ready"))))
        self.pending = owner.balancer_endpoints.child(join(base, labels(("endpoint_state", "pending"))))
        self.ejections = owner.ejections.child(base)
        self.kept = owner.last_kept.child(base)

    def endpoints(self, ready: int, pending: int) -> None:
        """The backend's endpoints now: admitting (`ready`), shut or in probation (`pending`)."""
        self.ready.value = ready
        self.pending.value = pending

    def ejected(self) -> None:
        """A breaker went open → shut."""
        self.ejections.value += 1

    def kept_last(self) -> None:
        """A breaker would have shut the rule's last admitting endpoint: kept in rotation."""
        self.kept.value += 1


RefKey = tuple[Any, ...]


class RouteMetrics:
    """The route families (owned by ProxyMetrics, listed in its `families()`) and the series
    caches. `on_drop`: told of each child any of these families drops as idle (StatWindow)."""

    def __init__(self) -> None:
        f = FloatLeFamily
        self.request_duration = f(
            REQUEST_DURATION,
            "The time between request initialization and response completion.",
            "histogram",
            REQUEST_BUCKETS,
        )
        self.request_statuses = f(REQUEST_STATUSES, "Completed request-response streams.", "counter")
        self.backend_requests = f(BACKEND_REQUESTS, "The total number of requests dispatched.", "counter")
        self.backend_duration = f(
            BACKEND_DURATION,
            "The time between request completion and response completion.",
            "histogram",
            RESPONSE_BUCKETS,
        )
        self.backend_statuses = f(BACKEND_STATUSES, "Completed responses.", "counter")
        self.retry_requests = f(RETRY_REQUESTS, "Retry requests emitted.", "counter")
        self.retry_successes = f(RETRY_SUCCESSES, "Successful responses to retry requests.", "counter")
        self.retry_limit_exceeded = f(
            RETRY_LIMIT_EXCEEDED, "Retryable requests not sent due to retry limits.", "counter"
        )
        self.retry_overflow = f(
            RETRY_OVERFLOW, "Retryable requests not sent due to circuit breakers.", "counter"
        )
        self.balancer_endpoints = f(BALANCER_ENDPOINTS, "The number of endpoints in a balancer.", "gauge")
        # Every worker balances over the same endpoints: merged by max, not summed (an endpoint
        # shut in any worker reads pending), so the value is Linkerd's per-proxy count.
        self.balancer_endpoints.merge = "max"
        self.ejections = f(
            EJECTIONS, "Endpoints a failure-accrual breaker took out of rotation (open to shut)", "counter"
        )
        self.last_kept = f(
            LAST_KEPT,
            "Breakers that would have shut a rule's last admitting endpoint and kept it in rotation",
            "counter",
        )
        self.buffer_full = f(
            BUFFER_FULL,
            "Requests not made retryable because the worker's retry buffers were full",
            "counter",
            retain_idle_s=None,
        )
        self.fallback = f(
            FALLBACK,
            "Connections to a routed destination relayed as TCP instead, by reason",
            "counter",
            retain_idle_s=None,
        )
        self.generation = 0
        self.on_drop: Callable[[str, str, Any], None] | None = None  # (family name, key, child)
        self._routes: dict[RefKey, RouteSeries] = {}
        self._backends: dict[RefKey, BackendSeries] = {}
        self._balancers: dict[RefKey, BalancerSeries] = {}
        for family in self.families():
            family.on_drop = self._dropper(family.name)

    def families(self) -> list[Family]:
        return [
            self.request_duration,
            self.request_statuses,
            self.backend_requests,
            self.backend_duration,
            self.backend_statuses,
            self.retry_requests,
            self.retry_successes,
            self.retry_limit_exceeded,
            self.retry_overflow,
            self.balancer_endpoints,
            self.ejections,
            self.last_kept,
            self.buffer_full,
            self.fallback,
        ]

    def _dropper(self, name: str) -> Callable[[str, Any], None]:
        def dropped(key: str, child: Any) -> None:
            self.generation += 1
            self._routes.clear()
            self._backends.clear()
            self._balancers.clear()
            if self.on_drop is not None:
                self.on_drop(name, key, child)

        return dropped

    def route(self, parent: RefLike, route: RefLike) -> RouteSeries:
        key = (parent, route)
        series = self._routes.get(key)
        if series is None:
            series = self._routes[key] = RouteSeries(self, route_labels(parent, route))
        return series

    def backend(self, parent: RefLike, route: RefLike, backend: RefLike) -> BackendSeries:
        key = (parent, route, backend)
        series = self._backends.get(key)
        if series is None:
            series = self._backends[key] = BackendSeries(self, backend_labels(parent, route, backend))
        return series

    def balancer(self, parent: RefLike, backend: RefLike) -> BalancerSeries:
        key = (parent, backend)
        series = self._balancers.get(key)
        if series is None:
            series = self._balancers[key] = BalancerSeries(self, concrete_labels(parent, backend))
        return series

    def retry_buffer_full(self) -> None:
        self.buffer_full.child("").value += 1

    def routed_fallback(self, reason: str) -> None:
        """A routed destination's connection went L4: `opaque`, `detect_timeout` or `upgrade`."""
        self.fallback.child(labels(("reason", reason))).value += 1
