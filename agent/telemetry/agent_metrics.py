"""The agent's own health on /metrics, in meshagent's namespace, from its /status document.

Rendered from the same document `/status` serves, so the two never disagree. Labels are
bounded: task names are the agent's fixed set, outcomes and states are fixed words; a rejected
entry's text stays in /status, only its count is a metric.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from agent.telemetry.metrics import fmt, labels


def _family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> Iterator[str]:
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} {kind}"
    for label_set, value in samples:
        yield f"{name}{{{label_set}}} {fmt(value)}" if label_set else f"{name} {fmt(value)}"


def render_agent(status: dict[str, Any]) -> Iterator[str]:
    catalog = status.get("catalog") or {}
    yield from _family(
        "meshagent_directory_rejected_entries",
        "gauge",
        "Entries of the authority's latest catalog and policy document the agent left out "
        "(each in /status catalog.rejected with the reason).",
        [("", float(catalog.get("rejected_count", 0)))],
    )
    tasks: dict[str, dict[str, Any]] = status.get("tasks") or {}
    yield from _family(
        "meshagent_task_failures_total",
        "counter",
        "Failures of a background task since the agent started (each logged as task.failed).",
        [(labels(("task", name)), float(t.get("failures", 0))) for name, t in sorted(tasks.items())],
    )
    yield from _family(
        "meshagent_task_failing",
        "gauge",
        "Failures of a background task in a row (0: healthy; 3 or more: the agent is not ready).",
        [(labels(("task", name)), float(t.get("failing", 0))) for name, t in sorted(tasks.items())],
    )
    yield from _family(
        "meshagent_ready",
        "gauge",
        "1 when the agent is ready (as /ready), else 0 (/status not_ready_reasons says why).",
        [("", 1.0 if status.get("ready") else 0.0)],
    )
    shakes: dict[str, int] = status.get("handshakes") or {}
    if shakes:
        yield from _family(
            "meshagent_inbound_handshakes",
            "gauge",
            "Inbound mTLS handshakes in progress (active) and waiting for a slot "
            "(proxy.max_handshakes is the limit).",
            [(labels(("state", s)), float(shakes.get(s, 0))) for s in ("active", "waiting")],
        )
        yield from _family(
            "meshagent_inbound_handshake_waits_total",
            "counter",
            "Inbound mTLS connections over the handshake limit: queued (waited for a slot), "
            "refused_over_limit (the line was full), timed_out_waiting, left_waiting.",
            [
                (labels(("outcome", o)), float(shakes.get(o, 0)))
                for o in ("queued", "refused_over_limit", "timed_out_waiting", "left_waiting")
            ],
        )
        yield from _family(
            "meshagent_tls_chain_verifications_total",
            "counter",
            "Peer certificate chains checked in full handshakes, both directions: verified in "
            "full, or answered from the TLS contexts' verification caches (a chain verified "
            "before, until its earliest notAfter).",
            [(labels(("result", r)), float(shakes.get(f"chains_{r}", 0))) for r in ("verified", "cached")],
        )
    admin: dict[str, Any] = status.get("admin") or {}
    if admin:
        yield from _family(
            "meshagent_admin_connections",
            "gauge",
            "Connections open on the admin port.",
            [("", float(admin.get("open", 0)))],
        )
        yield from _family(
            "meshagent_admin_connections_closed_total",
            "counter",
            "Admin connections the agent closed: evicted_idle (waiting for a request at the cap), "
            "refused_over_limit, timed_out.",
            [
                (labels(("reason", r)), float(admin.get(r, 0)))
                for r in ("evicted_idle", "refused_over_limit", "timed_out")
            ],
        )
    stopped: dict[str, int] = status.get("http_accounting_stopped") or {}
    samples = []
    for key, count in sorted(stopped.items()):  # "<protocol>:<reason>", a fixed set of words
        protocol, _, reason = key.partition(":")
        samples.append((labels(("protocol", protocol), ("reason", reason)), float(count)))
    yield from _family(
        "meshagent_http_accounting_stopped_total",
        "counter",
        "Connections whose request accounting stopped at one of its bounds (their bytes still "
        "flowed; their later requests were not counted).",
        samples,
    )
    memory: dict[str, Any] = status.get("memory") or {}
    yield from _family(
        "meshagent_memory_returns_total",
        "counter",
        "Times the agent gave freed memory back to the system after a peak of connections.",
        [("", float(memory.get("trims", 0)))],
    )
