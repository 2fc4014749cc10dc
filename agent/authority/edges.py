"""Who calls whom: the fleet's dependency edges, worked out by Prometheus from the agents' series.

Filled in below; the contract (interfaces20.md) is `Edge` and `edges`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .prom_query import PromClient
from .storage import HostRecord


@dataclass(frozen=True)
class Edge:
    src: str  # the caller's mesh DNS identity (`client_id` / the caller host's), "" = no identity
    dst: str  # the callee's mesh DNS identity (`server_id` / the callee host's), "" = no identity
    src_host: str | None  # host ids, when the identity is an enrolled host's
    dst_host: str | None
    requests: float  # responses over the window (Prometheus's increase: extrapolated, not integral)
    rps: float
    success_rate: float | None  # None: no responses classified in the window
    p99_ms: float | None  # None: no latency observed (only failed connections)


def edges(
    prom: PromClient,
    hosts: Sequence[HostRecord],
    identity_of: Callable[[HostRecord], str],
    window: str = "5m",
    host_id: str | None = None,
) -> list[Edge]:
    raise NotImplementedError
