"""The service catalog's assembled view (issue #20): what the registry knows of each host (its
record, metadata, state and change log) with what Prometheus knows (edges, SLO budgets).

One place builds it for `authority catalog show`, the JSON API and the page, so the three agree
(tests compare the page's graph with the CLI's JSON). Prometheus is optional: unset or
unreachable, the view still holds everything the registry knows and `prometheus_error` says why
the rest is missing. The first Prometheus failure stops further queries for that view, so a dead
Prometheus costs one timeout, not one per host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.errors import MeshagentError, RejectedError
from agent.logs import get_logger

from . import edges as edges_mod
from . import health
from . import slo as slo_mod
from .edges import Edge
from .events import Event
from .host_meta import HostMeta, Slo
from .prom_query import PromClient
from .service import Authority
from .slo import Budget
from .storage import HostRecord

log = get_logger("meshagent.authority.catalog")

EDGE_WINDOW = "5m"  # the edges' rate window, as `authority edges` defaults to
CHANGES_ON_CARD = 20
NO_PROMETHEUS = (
    "no Prometheus configured: edges and SLO budgets need one "
    "(authority serve --prometheus URL, or --prometheus / MESHAGENT_PROMETHEUS_URL)"
)


@dataclass(frozen=True)
class HostCard:
    """One host as the catalog shows it."""

    host: HostRecord
    meta: HostMeta
    state: str  # health.fleet_state's word (healthy, not_ready, silent, expiring, revoked)
    edges_in: list[Edge]
    edges_out: list[Edge]
    budgets: list[Budget]
    changes: list[Event]
    prometheus_error: str | None  # set when Prometheus is unset or did not answer
    identity: str = ""  # the host's mesh DNS identity (what edges name it by)
    state_text: str = ""  # the `authority hosts` HEALTH column


@dataclass(frozen=True)
class FleetRow:
    """One host in the fleet list."""

    host: HostRecord
    meta: HostMeta
    state: str
    identity: str
    budgets: list[Budget]
    last_change: Event | None


@dataclass(frozen=True)
class FleetView:
    """The fleet: one row per host and every edge Prometheus saw (the dependency graph)."""

    rows: list[FleetRow]
    edges: list[Edge]
    prometheus_error: str | None
    nodes: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (identity, host ids)


class _Prom:
    """A PromClient that stops after its first failure (the error is kept for the view)."""

    def __init__(self, prom: PromClient | None) -> None:
        self.prom = prom
        self.error: str | None = None if prom is not None else NO_PROMETHEUS

    def usable(self) -> PromClient | None:
        return self.prom if self.error is None else None

    def failed(self, exc: MeshagentError) -> None:
        self.error = exc.message
        log.warning("catalog.prometheus_failed", error=exc.message)


def _identity_of(authority: Authority) -> Callable[[HostRecord], str]:
    """A host's mesh DNS identity (what the metrics' client_id/server_id name it by)."""
    cache: dict[str, str] = {}

    def identity_of(host: HostRecord) -> str:
        if host.identity not in cache:
            try:
                cache[host.identity] = authority.identity(host.identity).dns_name
            except MeshagentError:  # a row altered by hand: it names nothing edges could
                cache[host.identity] = ""
        return cache[host.identity]

    return identity_of


def find_host(hosts: Sequence[HostRecord], ref: str) -> HostRecord:
    """The host `ref` names: its id, or its name when exactly one unrevoked host has it (as
    `authority revoke` resolves it)."""
    by_id = [h for h in hosts if h.id == ref]
    if by_id:
        return by_id[0]
    named = [h for h in hosts if h.host_name == ref and not h.revoked]
    if not named:
        raise RejectedError(
            f"no enrolled host with id or name {ref[:200]!r}",
            code="not_found",
            hint="list hosts with: meshagent authority catalog show",
        )
    if len(named) > 1:
        raise RejectedError(
            f"{len(named)} hosts are named {ref[:200]!r} ({', '.join(h.id for h in named)})",
            code="host_ambiguous",
            hint="name the host by its id instead",
        )
    return named[0]


def _budgets(prom: _Prom, host_id: str, meta: HostMeta) -> list[Budget]:
    return _fleet_budgets(prom, {host_id: meta}).get(host_id, [])


def _fleet_budgets(prom: _Prom, metas: dict[str, HostMeta]) -> dict[str, list[Budget]]:
    """Budgets of many hosts in a few queries (one per SLO shape and window: slo.fleet_budgets)."""
    client = prom.usable()
    with_slos = {host_id: meta for host_id, meta in metas.items() if meta.slos}
    if client is None or not with_slos:
        return {}
    try:
        if len(with_slos) == 1:
            ((host_id, meta),) = with_slos.items()
            return {host_id: slo_mod.budgets(client, host_id, meta)}
        return slo_mod.fleet_budgets(client, with_slos)
    except MeshagentError as exc:
        prom.failed(exc)
        return {}


def _edges(
    prom: _Prom, authority: Authority, hosts: Sequence[HostRecord], host_id: str | None = None
) -> list[Edge]:
    client = prom.usable()
    if client is None:
        return []
    try:
        found = edges_mod.edges(client, hosts, _identity_of(authority), EDGE_WINDOW, host_id=host_id)
    except MeshagentError as exc:
        prom.failed(exc)
        return []
    return sorted(found, key=lambda e: (e.src, e.dst))


def host_card(authority: Authority, prom: PromClient | None, ref: str) -> HostCard:
    """The card of the host `ref` (id or unique name); RejectedError not_found when none."""
    registry = authority.registry
    hosts = registry.list_hosts()
    host = find_host(hosts, ref)
    meta = registry.host_meta([host.id]).get(host.id, HostMeta())
    fleet = health.stored_fleet_health(host, authority.clock(), registry.reports())
    changes = registry.events(host.id, limit=CHANGES_ON_CARD)
    identity = _identity_of(authority)(host)
    p = _Prom(prom)
    found = _edges(p, authority, hosts, host.id)
    edges_out = [e for e in found if _is(host, identity, e.src_host, e.src)]
    edges_in = [e for e in found if _is(host, identity, e.dst_host, e.dst)]
    budgets = _budgets(p, host.id, meta)
    return HostCard(
        host, meta, fleet.state, edges_in, edges_out, budgets, changes, p.error, identity, fleet.text
    )


def _is(host: HostRecord, identity: str, host_id: str | None, edge_identity: str) -> bool:
    """Whether an edge's end is `host`: by host id when the edge names one, else by identity."""
    return host_id == host.id if host_id is not None else bool(identity) and edge_identity == identity


def fleet_view(authority: Authority, prom: PromClient | None, *, budgets: bool = True) -> FleetView:
    """Every host's row and the fleet's edges (budgets=False: rows without budgets and no
    budget query, for the Backstage export, which needs only the edges)."""
    registry = authority.registry
    hosts = registry.list_hosts()
    metas = registry.host_meta([h.id for h in hosts])
    reports = registry.reports()
    now = authority.clock()
    identity_of = _identity_of(authority)
    p = _Prom(prom)
    # Edges first: the budgets read the SLO window (the slower queries), and the first
    # Prometheus failure ends the view's queries.
    found = _edges(p, authority, hosts)
    found_budgets = (
        _fleet_budgets(p, {h.id: metas.get(h.id, HostMeta()) for h in hosts if not h.revoked})
        if budgets
        else {}
    )
    latest = registry.latest_events([h.id for h in hosts])
    rows = []
    for host in hosts:
        rows.append(
            FleetRow(
                host,
                metas.get(host.id, HostMeta()),
                health.stored_fleet_health(host, now, reports).state,
                identity_of(host),
                found_budgets.get(host.id, []),
                latest.get(host.id),
            )
        )
    return FleetView(rows, found, p.error, graph_nodes(rows, found))


def graph_nodes(rows: Sequence[FleetRow], found: Sequence[Edge]) -> list[tuple[str, tuple[str, ...]]]:
    """The dependency graph's nodes: every unrevoked host's identity and every identity an edge
    names (in-cluster workloads, "" for clients without one), with the hosts that carry it."""
    nodes: dict[str, list[str]] = {}
    for row in rows:
        if not row.host.revoked and row.identity:
            nodes.setdefault(row.identity, []).append(row.host.id)
    for e in found:
        nodes.setdefault(e.src, [])
        nodes.setdefault(e.dst, [])
    return sorted((k, tuple(sorted(v))) for k, v in nodes.items())


# --- documents (the CLI's --json and the JSON API: the same) ----------------------------------


def _time(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _float(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def edge_doc(e: Edge) -> dict[str, Any]:
    return {
        "src": e.src,
        "dst": e.dst,
        "src_host": e.src_host,
        "dst_host": e.dst_host,
        "requests": _float(e.requests),
        "rps": _float(e.rps),
        "success_rate": _float(e.success_rate),
        "p99_ms": _float(e.p99_ms),
        "connections": _float(e.connections),
        "by_identity": e.by_identity,  # a call another host saw from this host's shared identity
    }


def slo_doc(s: Slo) -> dict[str, Any]:
    return s.to_doc()


def budget_doc(b: Budget) -> dict[str, Any]:
    return {
        "slo": slo_doc(b.slo),
        "sli": _float(b.sli),
        "remaining": _float(b.remaining),
        "burn_1h": _float(b.burn_1h),
        "burn_6h": _float(b.burn_6h),
        "exhaustion_s": _float(b.exhaustion_s),
        "status": budget_status(b),
        "source": b.source,  # "rules": the rule file's recorded series; "raw": the agents' series
    }


def event_doc(e: Event) -> dict[str, Any]:
    return {"id": e.id, "at": _time(e.at), "kind": e.kind, "detail": e.detail, "actor": e.actor}


def budget_status(b: Budget) -> str:
    """ok / burning (the last hour spent budget faster than the SLO allows: burn > 1) /
    exhausted (none left) / no_data (no traffic in the SLO window)."""
    if b.remaining is None:
        return "no_data"
    if b.remaining <= 0:
        return "exhausted"
    if b.burn_1h is not None and b.burn_1h > 1.0:
        return "burning"
    return "ok"


def slo_status(budgets: Sequence[Budget], meta: HostMeta) -> str:
    """A row's SLO column: none (no SLOs), the worst budget's status, unknown (no budgets read)."""
    if not meta.slos:
        return "none"
    if not budgets:
        return "unknown"
    order = ("exhausted", "burning", "no_data", "ok")
    return min((budget_status(b) for b in budgets), key=order.index)


def lowest_remaining(budgets: Sequence[Budget]) -> float | None:
    left = [b.remaining for b in budgets if b.remaining is not None]
    return min(left) if left else None


def _host_doc(host: HostRecord, identity: str) -> dict[str, Any]:
    return {
        "id": host.id,
        "host_name": host.host_name,
        "identity": identity,
        "workload": host.identity,
        "addresses": list(host.addresses),
        "enrolled_at": _time(host.enrolled_at),
        "not_after": _time(host.not_after),
        "revoked_at": _time(host.revoked_at),
    }


def card_doc(card: HostCard) -> dict[str, Any]:
    return {
        "host": _host_doc(card.host, card.identity),
        "meta": card.meta.to_doc(),
        "state": card.state,
        "state_text": card.state_text,
        "slo_status": slo_status(card.budgets, card.meta),
        "budgets": [budget_doc(b) for b in card.budgets],
        "edges_in": [edge_doc(e) for e in card.edges_in],
        "edges_out": [edge_doc(e) for e in card.edges_out],
        "changes": [event_doc(e) for e in card.changes],
        "prometheus_error": card.prometheus_error,
    }


def row_doc(row: FleetRow) -> dict[str, Any]:
    return {
        "host": _host_doc(row.host, row.identity),
        "owner_team": row.meta.owner_team,
        "tier": row.meta.tier,
        "system": row.meta.system,
        "state": row.state,
        "slo_status": slo_status(row.budgets, row.meta),
        "budget_remaining": _float(lowest_remaining(row.budgets)),
        "budgets": [budget_doc(b) for b in row.budgets],
        "last_change": None if row.last_change is None else event_doc(row.last_change),
    }


def fleet_doc(view: FleetView) -> dict[str, Any]:
    return {
        "hosts": [row_doc(r) for r in view.rows],
        "nodes": [{"identity": identity, "hosts": list(ids)} for identity, ids in view.nodes],
        "edges": [edge_doc(e) for e in view.edges],
        "prometheus_error": view.prometheus_error,
    }


# --- words for people (the CLI's tables and the page: the same) ------------------------------


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage ("-" when unknown)."""
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def duration_text(seconds: float | None) -> str:
    """A time to exhaustion in the largest two units ("-" when not burning)."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m}m"
    return f"{m}m{s}s" if m else f"{s}s"


def slo_text(slo: dict[str, Any]) -> str:
    """An SLO as one phrase: "availability 99.9% over 28d (inbound, port 8080)"."""
    what = f"{slo['kind']} {slo['objective']:g}%"
    if slo.get("threshold_ms") is not None:
        what += f" under {slo['threshold_ms']}ms"
    where = slo.get("direction") or "inbound"
    if slo.get("port") is not None:
        where += f", port {slo['port']}"
    return f"{slo['name']}: {what} over {slo['window_days']}d ({where})"


def rate_text(edge: dict[str, Any]) -> str:
    """An edge's request rate; "-" for a connection-only edge (TCP, no HTTP responses)."""
    if edge["rps"] is None or (not edge["requests"] and edge.get("connections")):
        return "-"
    return f"{edge['rps']:.2f}/s"


def connections_text(edge: dict[str, Any]) -> str:
    """TCP connections the edge opened over the window."""
    n = edge.get("connections")
    return "-" if n is None else f"{n:.0f}"
