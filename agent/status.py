"""What the running agent says about itself: the `/status` document (`meshagent status`, the
agent's `/metrics` gauges), its readiness, and the health report it sends to the authority.

One owner for all three, so they cannot disagree: each is built here from the daemon's parts
(credentials, rotator, rules, proxy, reporter, probes, DNS), which the daemon only holds.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from agent.health.report import build_report, config_digest, error_line, host_addresses
from agent.identity.certinfo import utcnow
from agent.proxy.http1 import IMPLEMENTATION as HTTP1_IMPLEMENTATION
from agent.proxy.http1 import STOPPED as HTTP_ACCOUNTING_STOPPED
from agent.proxy.relay import relay_implementation
from agent.telemetry.process import rss_bytes, tree_memory
from agent.workers.pool import WorkerPool

if TYPE_CHECKING:
    from agent.daemon import Daemon

REVOKED_REASON = "identity: revoked by the authority"


def not_ready(d: Daemon) -> list[str]:
    """Why the agent cannot serve mTLS right now (empty: ready)."""
    reasons = []
    if d.state.revoked is not None:
        reasons.append(REVOKED_REASON)
    if d.credentials is None or d.credentials.identity.summary.not_after <= utcnow():
        reasons.append("identity: no valid certificate")
    if d.config.intercept.enabled and d.state.rules is None:
        reasons.append("intercept: rules not applied")
    if d.proxy is None or len(d.proxy.listening) < 2:
        reasons.append("proxy: listeners not up")
    if isinstance(d.proxy, WorkerPool):
        reasons.extend(d.proxy.not_ready())  # a worker down for a while
    reasons.extend(d.tasks.not_ready())
    return reasons


def http_accounting(d: Daemon) -> str:
    """off, or which implementation counts requests: compiled, or python (not built)."""
    t = d.config.telemetry
    return HTTP1_IMPLEMENTATION if t.metrics and t.http_accounting else "off"


def relay(d: Daemon) -> str:
    """Which relay carries L4 mTLS connections' bytes: native, python, or python (not built)."""
    return relay_implementation(d.config.proxy.native_relay)


def listeners(d: Daemon) -> dict[str, str]:
    proxy = d.proxy
    return {} if proxy is None else {k: f"{h}:{p}" for k, (h, p) in proxy.listening.items()}


def last_errors(d: Daemon) -> list[dict[str, Any]]:
    return d.state.last_errors + ([] if d.proxy is None else list(d.proxy.stats.last_errors))


def memory(d: Daemon) -> dict[str, Any]:
    """This process's RSS; with workers, also Σ PSS (shared pages once: what the host pays) and
    Σ RSS over the agent's processes."""
    out: dict[str, Any] = {"rss_mb": round(rss_bytes() / 2**20, 1), **d.state.memory}
    if isinstance(d.proxy, WorkerPool) and d.workers is not None:
        tree = tree_memory([os.getpid(), *d.proxy.pids()])
        out.update(pss_total_mb=round(tree.pss / 2**20, 1), rss_total_mb=round(tree.rss / 2**20, 1))
    return out


ROUTES_LISTED = 100  # entries of each /status routes list (the count says how many in all)


def _bounded(items: list[Any]) -> tuple[list[Any], int]:
    return items[:ROUTES_LISTED], len(items)


def routes_status(d: Daemon) -> dict[str, Any]:
    """The traffic policy the proxy enforces (#21): parents, routed app connections, the route
    entries of the directory left out (and why), breakers not admitting, retry budgets. From
    the router's own `status()` when the proxy has one; else what the route table says."""
    rejected = [r.to_dict() for r in d.state.rejected if r.where.startswith("routes")]
    shown, count = _bounded(rejected)
    out: dict[str, Any] = {
        "parents": 0,
        "connections": 0,
        "rejected_count": count,
        "rejected": shown,
        "breakers": [],
        "budgets": [],
    }
    proxy = d.proxy
    router = getattr(proxy, "router", None)
    table = getattr(proxy, "routes", None)
    doc: dict[str, Any] | None = None
    if router is not None and callable(getattr(router, "status", None)):
        doc = router.status()
    elif isinstance(proxy, WorkerPool):
        doc = _workers_routes(proxy)
    if table is not None and callable(getattr(table, "parents", None)):
        out["parents"] = len(table.parents())
    if doc is not None:
        for name in ("breakers", "budgets"):
            if isinstance(doc.get(name), list):
                doc[name], doc[f"{name}_count"] = _bounded(doc[name])
        out.update({k: v for k, v in doc.items() if k not in ("rejected", "rejected_count")})
    return out


def _workers_routes(pool: WorkerPool) -> dict[str, Any] | None:
    """Each worker's `router.status()` (from its last status snapshot) as one: connections
    summed, breakers and budgets listed with the worker they are in (each worker has its own,
    as each Linkerd proxy has). None while no worker reports one."""
    found = [(slot.index, slot.status.get("routes")) for slot in pool.slots]
    reported = [(i, doc) for i, doc in found if isinstance(doc, dict)]
    if not reported:
        return None
    out: dict[str, Any] = {"connections": 0, "breakers": [], "budgets": []}
    for index, doc in reported:
        out["connections"] += int(doc.get("connections", 0))
        for name in ("breakers", "budgets"):
            out[name].extend({**entry, "worker": index} for entry in doc.get(name) or [])
    return out


def daemon_status(d: Daemon) -> dict[str, Any]:
    """Everything the daemon knows, for `/status` and `meshagent status`."""
    ident = d.credentials.identity if d.credentials else None
    proxy, rotator = d.proxy, d.rotator
    now = utcnow()
    reasons = not_ready(d)
    return {
        "ready": not reasons,
        "not_ready_reasons": reasons,
        "started_at": d.started_at,
        "identity": None
        if ident is None
        else {
            "spiffe_id": ident.workload.spiffe_id,
            "dns_name": ident.workload.dns_name,
            "serial": ident.summary.serial,
            "not_after": ident.summary.not_after.isoformat(),
            "seconds_left": int((ident.summary.not_after - now).total_seconds()),
            "renewals": rotator.renewals if rotator else 0,
            "renewal_failures": rotator.failures if rotator else 0,
            "last_renewal_error": rotator.last_error if rotator else "",
        },
        # How the authority is reached: "direct", or "via http://proxy:3128 (from ...)".
        "authority_proxy": d.authority_proxy.describe(),
        # Set once the authority refused this host as revoked (its long poll, report or renewal).
        "revoked": d.state.revoked,
        "rules": None
        if d.state.rules is None
        else {k: v for k, v in d.state.rules.to_dict().items() if k != "steps"},
        "listeners": listeners(d),
        "catalog": {
            "entries": 0 if proxy is None else len(proxy.catalog),
            "source": d.state.directory_source,
            "updated_at": d.state.directory_updated_at,
            "rejected_count": len(d.state.rejected),
            "rejected": [r.to_dict() for r in d.state.rejected],
        },
        "services": 0 if proxy is None else len(proxy.services),
        "routes": routes_status(d),
        # Peers the authority revoked, as this agent refuses them (the directory's `revoked`).
        "revoked_peers": None
        if proxy is None
        else {"identities": len(proxy.revoked.identities), "serials": len(proxy.revoked.serials)},
        "health": {
            "probes": d.probes.results(),
            "reports_sent": d.reporter.sent,
            "report_failures": d.reporter.failures,
            "last_report_error": d.reporter.last_error,
        },
        "dns": {"enabled": False} if d.dns is None else d.dns.status(),
        "tasks": d.tasks.status(),
        "admin": None if d.admin is None else d.admin.stats(),
        "handshakes": None if proxy is None else proxy.handshakes.status(),
        "memory": memory(d),
        "connections": {
            "open": 0 if proxy is None else proxy.open_connections,
            "opened": {} if proxy is None else dict(proxy.stats.opened),
            "refused": {} if proxy is None else dict(proxy.stats.refused),
            "failures": {} if proxy is None else dict(proxy.stats.failures),
        },
        "http_accounting": http_accounting(d),
        "relay": relay(d),
        "http_accounting_stopped": proxy.http_accounting_stopped
        if isinstance(proxy, WorkerPool)
        else dict(HTTP_ACCOUNTING_STOPPED),
        "last_errors": last_errors(d),
        # Each worker process (proxy.workers = 0: the proxy runs in this process, no list).
        "workers": proxy.worker_status() if isinstance(proxy, WorkerPool) else [],
    }


def health_report(d: Daemon) -> dict[str, Any]:
    """The report POSTed to the authority (agent/health/report.py sends it): the same facts as
    `daemon_status`, the few the fleet view needs."""
    ident = d.credentials.identity if d.credentials else None
    rotator = d.rotator
    rules = d.state.rules
    errors = last_errors(d)
    last = max(errors, key=lambda e: e.get("at", 0.0)) if errors else None
    return build_report(
        not_ready_reasons=not_ready(d),
        directory_updated_at=d.state.directory_updated_at,
        refresh_interval_s=d.reporter.interval_s,  # what this process runs (a reload needs a restart)
        probes=d.probes.results(),
        certificate=None
        if ident is None
        else {
            "serial": ident.summary.serial,
            "not_after": ident.summary.not_after.timestamp(),
            # Only while renewal keeps failing (a later success clears last_error).
            "renewal_error": rotator.last_error if rotator is not None else "",
        },
        interception={
            "applied": rules is not None,
            "backend": "" if rules is None else rules.backend,
        },
        listeners=listeners(d),
        last_error="" if last is None else error_line(last),
        addresses=host_addresses(),
        config_digest=config_digest(d.config),  # the config as last (re)loaded: SIGHUP moves it
    )
