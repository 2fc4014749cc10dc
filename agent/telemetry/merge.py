"""One /metrics for many workers, merged exactly (issue #19).

Each worker keeps its own `ProxyMetrics` and answers `snapshot` with `ProxyMetrics.dump(legs)`.
The supervisor's `MetricsMerger` writes the sum into the supervisor's own `ProxyMetrics`
(the target), so `Family.render`, `StatWindow` and `meshagent stat` work on it unchanged:

- counters and histograms: `target[key] = retired[key] + Σ live workers' last[key]`, bucket by
  bucket with sum and count;
- gauges: `Σ live workers' last[key]` (a dead worker's open connections are gone with it), or
  the highest for a family with `merge = "max"` (a figure each worker has whole, such as the
  endpoints of a balancer: every worker balances over the same endpoints);

A counter a worker stops reporting (its idle sweep dropped it, or a reply was lost and it later
vanished), a counter that went down (dropped and re-created between two dumps) and every counter
of a dead worker (`worker_gone`) move into `retired`, so merged counters never go down. A dump
lists the children its sweep dropped at their final values, so an idle drop retires the exact
count. When the target's own render drops a merged child after `retain_idle_s` with no change
(no live worker reports it any more), its retired count goes too: memory stays bounded as in
one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .metrics import Family, HistogramChild
from .proxy_metrics import MetricsDump, ProxyMetrics

# Per family name, per label string: a counter's value, or a histogram's [counts, sum, count].
_Samples = dict[str, dict[str, Any]]


def _index(dump: MetricsDump) -> _Samples:
    return {name: {s[0]: s for s in fd["samples"]} for name, fd in dump.items()}


def _below(new: Any, old: Any) -> bool:
    """The child went down since the last dump: it was dropped and re-created."""
    return bool(new[3] < old[3]) if len(old) == 4 else bool(new[1] < old[1])


class MetricsMerger:
    def __init__(self, target: ProxyMetrics) -> None:
        self.target = target
        skip = (target.cert_expiry, target.control_cert_expiry)  # the supervisor's own gauges
        self.families: dict[str, Family] = {f.name: f for f in target.families() if f not in skip}
        self.last: dict[int, _Samples] = {}  # slot -> its latest dump, indexed
        self.retired: _Samples = {name: {} for name in self.families}
        self._hooks: dict[str, Callable[[str, Any], None]] = {}

    # --- the pool's calls -----------------------------------------------------------------

    def update(self, slot: int, dump: MetricsDump) -> None:
        """A fresh `snapshot` reply from the worker in `slot`."""
        previous = self.last.get(slot, {})
        new = _index(dump)
        for name, fd in dump.items():
            family = self.families.get(name)
            if family is None or family.kind == "gauge":
                continue
            dropped = {s[0] for s in fd["dropped"]}
            for s in fd["dropped"]:
                self._retire(name, s)
            now = new.get(name, {})
            for key, old in previous.get(name, {}).items():
                if key in dropped:
                    continue
                current = now.get(key)
                if current is None or _below(current, old):
                    self._retire(name, old)
        self.last[slot] = new
        self._write()

    def worker_gone(self, slot: int) -> None:
        """The worker in `slot` died: its counters retire, its gauges vanish."""
        gone = self.last.pop(slot, {})
        for name, samples in gone.items():
            family = self.families.get(name)
            if family is not None and family.kind != "gauge":
                for s in samples.values():
                    self._retire(name, s)
        self._write()

    # --- rendering ------------------------------------------------------------------------

    def render_worker(self, slot: int) -> Iterator[str] | None:
        """`/metrics?worker=N`: that worker's last dump alone (None: no such worker)."""
        samples = self.last.get(slot)
        if samples is None:
            return None
        one = ProxyMetrics()
        for family in one.families():
            for s in samples.get(family.name, {}).values():
                _set(family.child(s[0]), s)
        return one.render(())

    # --- internals ------------------------------------------------------------------------

    def _retire(self, name: str, s: Any) -> None:
        into = self.retired.setdefault(name, {})
        key = s[0]
        if len(s) == 4:  # histogram
            acc = into.get(key)
            if acc is None:
                into[key] = (key, list(s[1]), s[2], s[3])
            else:
                into[key] = (
                    key,
                    [a + b for a, b in zip(acc[1], s[1], strict=True)],
                    acc[2] + s[2],
                    acc[3] + s[3],
                )
        else:
            acc = into.get(key)
            into[key] = (key, s[1] + (acc[1] if acc is not None else 0.0))

    def _forget(self, name: str, key: str) -> None:
        self.retired.get(name, {}).pop(key, None)

    def _hook(self, name: str, family: Family) -> None:
        """Chain `_forget` after whatever `on_drop` the family has (StatWindow's retirement)."""
        ours = self._hooks.get(name)
        if ours is not None and family.on_drop is ours:
            return
        before = family.on_drop

        def dropped(key: str, child: Any) -> None:
            if before is not None:
                before(key, child)
            self._forget(name, key)

        self._hooks[name] = family.on_drop = dropped

    def _write(self) -> None:
        for name, family in self.families.items():
            self._hook(name, family)
            totals: dict[str, Any] = {}
            live: set[str] = set()
            if family.kind != "gauge":
                for key, s in self.retired.get(name, {}).items():
                    totals[key] = _copy(s)
            highest = getattr(family, "merge", "sum") == "max"  # a per-proxy figure, not a count
            for samples in self.last.values():
                for key, s in samples.get(name, {}).items():
                    live.add(key)
                    acc = totals.get(key)
                    if acc is None:
                        totals[key] = _copy(s)
                    elif highest:
                        acc[1] = max(acc[1], s[1])
                    else:
                        totals[key] = _add(acc, s)
            if family.kind == "gauge":
                for key in [k for k in family.children if k not in totals]:
                    del family.children[key]
            for key, s in totals.items():
                child = family.children.get(key)
                if child is None or key in live:
                    child = family.child(key)  # reported by a live worker: in use
                _set(child, s)


def _copy(s: Any) -> list[Any]:
    return [s[0], list(s[1]), s[2], s[3]] if len(s) == 4 else [s[0], s[1]]


def _add(acc: list[Any], s: Any) -> list[Any]:
    if len(s) == 4:
        counts = acc[1]
        for i, n in enumerate(s[1]):
            counts[i] += n
        acc[2] += s[2]
        acc[3] += s[3]
    else:
        acc[1] += s[1]
    return acc


def _set(child: Any, s: Any) -> None:
    if isinstance(child, HistogramChild):
        child.counts = list(s[1])
        child.sum = s[2]
        child.count = s[3]
    else:
        child.value = s[1]
