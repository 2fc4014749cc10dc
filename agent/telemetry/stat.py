"""`meshagent stat`: golden metrics over a recent window, in the shape of `linkerd viz stat`.

The daemon snapshots its own counters every few seconds (a ring of two minutes); a query takes
the difference between now and the snapshot a window ago, per direction and peer identity:
success rate, requests per second, latency quantiles (Prometheus' histogram_quantile), and the
TCP connections open now. Pure apart from the clock: tests feed it metrics directly.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .metrics import HistogramChild
from .proxy_metrics import LATENCY_BOUNDS_MS, ProxyMetrics

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_labels(key: str) -> dict[str, str]:
    return {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(key)}


def group_of(labels: dict[str, str]) -> tuple[str, str] | None:
    direction = labels.get("direction")
    if direction not in ("inbound", "outbound"):
        return None
    peer = labels.get("client_id" if direction == "inbound" else "server_id")
    if peer is None:
        peer = "(no identity)" if labels.get("tls") != "opaque" else "(app TLS)"
    return direction, peer or "(no identity)"


Group = tuple[str, str]  # (direction, peer identity)


@dataclass
class Snapshot:
    """Totals per group at one moment. They only grow: a series the families drop as idle hands
    its counts to the window's `retired` totals first (see `StatWindow`)."""

    at: float
    success: dict[Group, float]
    failure: dict[Group, float]
    buckets: dict[Group, list[int]]
    routes: RouteSnapshot = field(default_factory=dict)  # per route and route backend (#21)


def quantile(q: float, counts: list[int], bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> float | None:
    """histogram_quantile over non-cumulative bucket counts (last bucket is +Inf)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    for i, count in enumerate(counts):
        if cumulative + count >= rank and count > 0:
            if i >= len(bounds):
                return float(bounds[-1])  # in +Inf: Prometheus answers the highest finite bound
            lower = 0.0 if i == 0 else float(bounds[i - 1])
            return lower + (float(bounds[i]) - lower) * (rank - cumulative) / count
        cumulative += count
    return float(bounds[-1])


class StatWindow:
    def __init__(
        self,
        metrics: ProxyMetrics,
        clock: Callable[[], float] = time.monotonic,
        keep_s: float = 120.0,
        settle: Callable[[], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.settle = settle  # brings open connections' kept-back counts in (ProxyMetrics.settle)
        self.clock = clock
        self.keep_s = keep_s
        self.ring: deque[Snapshot] = deque()
        # Counts of series dropped as idle, per group, so totals never go down (a window that
        # spans a drop would otherwise lose the whole series' count).
        self.retired = Snapshot(0.0, {}, {}, {})
        metrics.response_total.on_drop = self._retire_response
        metrics.response_latency_ms.on_drop = self._retire_latency
        # The route families' dropped children, by family name and label string (#21).
        self.route_retired: dict[str, dict[str, Any]] = {}
        metrics.routes.on_drop = self._retire_route
        self.snapshot()

    def _retire_route(self, family: str, key: str, child: Any) -> None:
        into = self.route_retired.setdefault(family, {})
        if isinstance(child, HistogramChild):
            acc = into.get(key)
            into[key] = (
                list(child.counts)
                if acc is None
                else [a + b for a, b in zip(acc, child.counts, strict=False)]
            )
        else:
            into[key] = into.get(key, 0.0) + child.value

    def _route_families(self) -> dict[str, dict[str, Any]]:
        """The route families' totals (retired + current), by name and label string."""
        out: dict[str, dict[str, Any]] = {}
        for family in self.metrics.routes.families():
            retired = self.route_retired.get(family.name, {})
            values: dict[str, Any] = {}
            for key, child in family.children.items():
                if isinstance(child, HistogramChild):
                    old = retired.get(key)
                    counts = list(child.counts)
                    values[key] = (
                        counts if old is None else [a + b for a, b in zip(counts, old, strict=False)]
                    )
                else:
                    values[key] = child.value + retired.get(key, 0.0)
            for key, value in retired.items():
                values.setdefault(key, value)
            out[family.name] = values
        return out

    def _retire_response(self, key: str, child: Any) -> None:
        _add_response(self.retired, key, child.value)

    def _retire_latency(self, key: str, child: Any) -> None:
        _add_latency(self.retired, key, child.counts)

    def _take(self) -> Snapshot:
        if self.settle is not None:
            self.settle()
        r = self.retired
        snap = Snapshot(
            self.clock(), dict(r.success), dict(r.failure), {g: list(c) for g, c in r.buckets.items()}
        )
        for key, child in self.metrics.response_total.children.items():
            _add_response(snap, key, child.value)
        for key, child in self.metrics.response_latency_ms.children.items():
            if isinstance(child, HistogramChild):
                _add_latency(snap, key, child.counts)
        snap.routes = route_snapshot(self._route_families())
        return snap

    def snapshot(self) -> None:
        self.ring.append(self._take())
        while self.ring and self.ring[0].at < self.clock() - self.keep_s:
            self.ring.popleft()

    def _open_connections(self) -> dict[Group, int]:
        out: dict[Group, int] = {}
        for key, child in self.metrics.tcp_open_connections.children.items():
            labels = parse_labels(key)
            # Count the peer-facing leg only: inbound from clients, outbound to servers.
            if (labels.get("direction"), labels.get("peer")) not in (("inbound", "src"), ("outbound", "dst")):
                continue
            group = group_of(labels)
            if group is not None:
                out[group] = out.get(group, 0) + int(child.value)
        return out

    def _window(self, window_s: float) -> tuple[Snapshot, Snapshot, float]:
        now = self._take()
        start = self.ring[0] if self.ring else now
        for snap in self.ring:
            if snap.at <= now.at - window_s:
                start = snap
        return now, start, max(now.at - start.at, 1e-9)

    def query_routes(self, window_s: float = 60.0) -> list[dict[str, Any]]:
        """`meshagent stat --routes`: per route, then its backends (route_rows)."""
        now, start, elapsed = self._window(window_s)
        return route_rows(now.routes, start.routes, elapsed)

    def query(self, window_s: float = 60.0) -> list[dict[str, Any]]:
        now, start, elapsed = self._window(window_s)
        tcp = self._open_connections()
        rows = []
        for group in sorted(set(now.success) | set(now.failure) | set(tcp)):
            ok = now.success.get(group, 0.0) - start.success.get(group, 0.0)
            bad = now.failure.get(group, 0.0) - start.failure.get(group, 0.0)
            total = ok + bad
            new = now.buckets.get(group, [])
            old = start.buckets.get(group, [0] * len(new))
            delta = [a - b for a, b in zip(new, old, strict=False)]
            p50, p95, p99 = (quantile(q, delta) for q in (0.5, 0.95, 0.99))
            rows.append(
                {
                    "direction": group[0],
                    "peer_identity": group[1],
                    "requests": int(total),
                    "success_rate": None if total == 0 else ok / total,
                    "rps": total / elapsed,
                    "latency_p50_ms": p50,
                    "latency_p95_ms": p95,
                    "latency_p99_ms": p99,
                    "tcp_open_connections": tcp.get(group, 0),
                    "window_s": round(elapsed, 1),
                }
            )
        return rows


def _add_response(snap: Snapshot, key: str, value: float) -> None:
    labels = parse_labels(key)
    group = group_of(labels)
    if group is not None:
        into = snap.success if labels.get("classification") == "success" else snap.failure
        into[group] = into.get(group, 0.0) + value


def _add_latency(snap: Snapshot, key: str, counts: list[int]) -> None:
    group = group_of(parse_labels(key))
    if group is not None:
        acc = snap.buckets.setdefault(group, [0] * len(counts))
        for i, c in enumerate(counts):
            acc[i] += c


# --- per route: `meshagent stat --routes`, as `linkerd viz stat-outbound` computes it ----------

# viz/cmd/stat-outbound.go: a timeout is one of these errors; failure = 5xx or any error.
TIMEOUT_ERRORS = frozenset({"RESPONSE_HEADERS_TIMEOUT", "REQUEST_TIMEOUT"})
RouteKey = tuple[str, ...]  # (parent, route type, route) or (parent, route type, route, backend)


def ref_name(labels: dict[str, str], scope: str) -> str:
    """`Host shop/web-v1:8080` (`Service shop/web`, a port or section when the ref has one)."""
    kind = labels.get(f"{scope}_kind", "")
    name = f"{kind} {labels.get(f'{scope}_namespace', '')}/{labels.get(f'{scope}_name', '')}"
    port = labels.get(f"{scope}_port", "")
    section = labels.get(f"{scope}_section_name", "")
    return name + (f":{port}" if port else "") + (f" ({section})" if section else "")


def route_name(labels: dict[str, str]) -> str:
    """viz shows the default route (TrafficSplit or Service-level policy) as `[default]`."""
    if labels.get("route_kind") == "default":
        return "[default]"
    return f"{labels.get('route_namespace', '')}/{labels.get('route_name', '')}"


@dataclass
class RouteTotals:
    success: float = 0.0
    failure: float = 0.0
    timeouts: float = 0.0
    retries: float = 0.0
    buckets: list[int] | None = None

    def add_status(self, labels: dict[str, str], value: float) -> None:
        status, error = labels.get("http_status", ""), labels.get("error", "")
        if error or status.startswith("5"):
            self.failure += value
        else:
            self.success += value
        if error in TIMEOUT_ERRORS:
            self.timeouts += value

    def add_buckets(self, counts: list[int]) -> None:
        if self.buckets is None:
            self.buckets = [0] * len(counts)
        for i, c in enumerate(counts):
            self.buckets[i] += c

    def minus(self, old: RouteTotals | None) -> RouteTotals:
        if old is None:
            return self
        new = self.buckets or []
        was = old.buckets or [0] * len(new)
        return RouteTotals(
            self.success - old.success,
            self.failure - old.failure,
            self.timeouts - old.timeouts,
            self.retries - old.retries,
            [a - b for a, b in zip(new, was, strict=False)],
        )


RouteSnapshot = dict[RouteKey, RouteTotals]


def route_snapshot(families: dict[str, dict[str, Any]]) -> RouteSnapshot:
    """Totals per route and per route backend from the route families' children (by family
    name, label string → child value or bucket counts)."""
    from .route_metrics import (
        BACKEND_DURATION,
        BACKEND_STATUSES,
        REQUEST_DURATION,
        REQUEST_STATUSES,
        RETRY_REQUESTS,
    )

    out: RouteSnapshot = {}

    def totals(labels: dict[str, str], backend: bool) -> RouteTotals:
        key: RouteKey = (ref_name(labels, "parent"), labels.get("route_kind", ""), route_name(labels))
        if backend:
            key = (*key, ref_name(labels, "backend"))
        found = out.get(key)
        if found is None:
            found = out[key] = RouteTotals()
        return found

    for name, backend in ((REQUEST_STATUSES, False), (BACKEND_STATUSES, True)):
        for key, value in families.get(name, {}).items():
            labels = parse_labels(key)
            totals(labels, backend).add_status(labels, value)
    for name, backend in ((REQUEST_DURATION, False), (BACKEND_DURATION, True)):
        for key, counts in families.get(name, {}).items():
            totals(parse_labels(key), backend).add_buckets(counts)
    for key, value in families.get(RETRY_REQUESTS, {}).items():
        totals(parse_labels(key), False).retries += value
    return out


def route_rows(now: RouteSnapshot, start: RouteSnapshot, elapsed: float) -> list[dict[str, Any]]:
    """One row per (parent, route), each followed by its backends' rows (`backend` set), with
    viz stat-outbound's columns: success rate, RPS, p50/p95/p99 from Linkerd's (coarse)
    buckets, the timeouts' share and the retry rate (retries / (successes + failures +
    retries)). Latencies in ms."""
    from .route_metrics import REQUEST_BUCKETS, RESPONSE_BUCKETS

    rows: list[dict[str, Any]] = []
    routes = sorted(k for k in now if len(k) == 3)
    for route in routes:
        backends = sorted(k for k in now if len(k) == 4 and k[:3] == route)
        for key in (route, *backends):
            d = now[key].minus(start.get(key))
            total = d.success + d.failure
            bounds = tuple(1000 * b for b in (REQUEST_BUCKETS if len(key) == 3 else RESPONSE_BUCKETS))
            counts = d.buckets or []
            p50, p95, p99 = (quantile(q, counts, bounds) for q in (0.5, 0.95, 0.99))
            attempts = total + d.retries
            rows.append(
                {
                    "parent": key[0],
                    "route": key[2],
                    "type": key[1],  # route_kind: HTTPRoute, or default (viz's TYPE column)
                    "backend": key[3] if len(key) == 4 else None,
                    "requests": int(total),
                    "success_rate": None if total == 0 else d.success / total,
                    "rps": total / elapsed,
                    "latency_p50_ms": p50,
                    "latency_p95_ms": p95,
                    "latency_p99_ms": p99,
                    "timeouts": None if total == 0 else d.timeouts / total,
                    "retries": None if len(key) == 4 or attempts == 0 else d.retries / attempts,
                    "window_s": round(elapsed, 1),
                }
            )
    return rows
