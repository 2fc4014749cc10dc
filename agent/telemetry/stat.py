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
from dataclasses import dataclass
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
        self.snapshot()

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

    def query(self, window_s: float = 60.0) -> list[dict[str, Any]]:
        now = self._take()
        start = self.ring[0] if self.ring else now
        for snap in self.ring:
            if snap.at <= now.at - window_s:
                start = snap
        elapsed = max(now.at - start.at, 1e-9)
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
