"""Prometheus metric primitives, small enough to keep the hot path cheap.

A `Family` has a name, help and type; its children are keyed by their rendered label string
(`direction="inbound",peer="src",...`), so series of one family may carry different label
names, as linkerd-proxy's do (`client_id` inbound, `server_id` outbound). Children are resolved
once per connection and then updated with plain attribute arithmetic. Children not touched for
`retain_idle_s` are dropped at render time (linkerd2-proxy's `retain_idle`), so peers that come
and go do not grow memory without bound.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any, Final

RETAIN_IDLE_S: Final = 600.0

# Label strings are built for every connection from the same few parts (direction, peer
# identity, target, tls state): each distinct one is built once and the same str object is
# handed out again, so a child lookup hashes and compares it at no cost. Bounded (least recently
# used go first): destinations and peers that come and go cannot grow it.
LABEL_CACHE_SIZE: Final = 1024


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@lru_cache(maxsize=LABEL_CACHE_SIZE)
def labels(*pairs: tuple[str, str]) -> str:
    """`labels(("a", "1"), ("b", "x"))` -> `a="1",b="x"` (the form children are keyed by)."""
    return ",".join(f'{k}="{escape(v)}"' for k, v in pairs)


@lru_cache(maxsize=LABEL_CACHE_SIZE)
def join(*parts: str) -> str:
    return ",".join(p for p in parts if p)


def fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class CounterChild:
    __slots__ = ("seen", "touched", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.seen = 0.0  # the value at the last render: a change there also counts as use
        self.touched = time.monotonic()


class GaugeChild(CounterChild):
    __slots__ = ()


class HistogramChild:
    __slots__ = ("bounds", "count", "counts", "seen", "sum", "touched")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0
        self.seen = 0
        self.touched = time.monotonic()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Family:
    def __init__(
        self,
        name: str,
        help_text: str,
        kind: str,
        buckets: Sequence[float] = (),
        retain_idle_s: float | None = RETAIN_IDLE_S,
    ) -> None:
        self.name = name
        self.help = help_text
        self.kind = kind  # counter | gauge | histogram
        self.buckets = tuple(buckets)
        self.retain_idle_s = retain_idle_s
        self.children: dict[str, Any] = {}
        self.on_drop: Callable[[str, Any], None] | None = None  # told of each child dropped as idle

    def child(self, key: str) -> Any:
        """The child for this label string (created on first use); marks it as in use."""
        found = self.children.get(key)
        if found is None:
            if self.kind == "histogram":
                found = HistogramChild(self.buckets)
            else:
                found = GaugeChild() if self.kind == "gauge" else CounterChild()
            self.children[key] = found
        found.touched = time.monotonic()
        return found

    def sweep(self) -> list[tuple[str, Any]]:
        """Drop children idle for `retain_idle_s` (the drop half of `render`; a worker's dump
        runs it too, so workers still forget idle peers). Returns the dropped (key, child)s."""
        dropped: list[tuple[str, Any]] = []
        if self.retain_idle_s is None:
            return dropped
        # Children are updated through references held by connections, not through child():
        # a value that moved since the last sweep is in use too.
        now = time.monotonic()
        cutoff = now - self.retain_idle_s
        for key, c in list(self.children.items()):
            current = c.count if isinstance(c, HistogramChild) else c.value
            if current != c.seen:
                c.seen, c.touched = current, now
            elif c.touched < cutoff and _settled(c):
                del self.children[key]
                dropped.append((key, c))
                if self.on_drop is not None:
                    self.on_drop(key, c)
        return dropped

    def render(self, live: Callable[[str], float] | None = None) -> Iterator[str]:
        """Exposition lines. `live(key)` adds not-yet-settled amounts (open connections' bytes)."""
        self.sweep()
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, c in self.children.items():
            braces = "{" + key + "}" if key else ""
            if isinstance(c, HistogramChild):
                # (Not `join`: its cache is for the per-connection label sets; a scrape's one-off
                # bucket labels would push those out.)
                bucket = self.name + "_bucket{" + (key + "," if key else "")
                cumulative = 0
                for bound, count in zip(c.bounds, c.counts, strict=False):
                    cumulative += count
                    le = 'le="' + fmt(bound) + '"'
                    yield f"{bucket}{le}}} {cumulative}"
                inf = 'le="+Inf"'
                yield f"{bucket}{inf}}} {c.count}"
                yield f"{self.name}_count{braces} {c.count}"
                yield f"{self.name}_sum{braces} {fmt(c.sum)}"
            else:
                value = c.value + (live(key) if live is not None else 0.0)
                yield f"{self.name}{braces} {fmt(value)}"


def _settled(child: Any) -> bool:
    """A gauge above zero still describes something live: never drop it."""
    return not (isinstance(child, GaugeChild) and child.value != 0)
