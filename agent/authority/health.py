"""A host's Ready condition from its agent's reports (issue #17 "Health").

The agent reports (POST /v1/host/report, agent/health/report.py) every refresh interval and
whenever its readiness or a probe flips. `parse_report` checks a report strictly and keeps it
small (a host must not make the registry store megabytes); `host_health` turns the last stored
report into the condition the cluster sees:

Ready = enrolled, unrevoked, certificate unexpired, a report within 3 x refresh_interval_s
that also says the directory was refreshed within 3 intervals, the agent ready, every probe ok.

Reasons (first that applies): Revoked, CertificateExpired, NeverReported, AgentStale,
AgentNotReady, ProbeFailed, else AgentReady. The condition's time moves only on a transition
where the report can tell one (a probe's `since`, the moment a host went stale), so an
unchanged host yields an unchanged object and the controller writes nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Literal

from agent.errors import RejectedError

from .kube_objects import Health, rfc3339
from .storage import HostRecord

REASON_CERTIFICATE_VALID = "CertificateValid"  # no report consulted (kube export without reports)
REASON_CERTIFICATE_EXPIRED = "CertificateExpired"
REASON_REVOKED = "Revoked"
REASON_NEVER_REPORTED = "NeverReported"
REASON_AGENT_STALE = "AgentStale"
REASON_AGENT_NOT_READY = "AgentNotReady"
REASON_PROBE_FAILED = "ProbeFailed"
REASON_AGENT_READY = "AgentReady"

STALE_INTERVALS = 3
MAX_PROBES = 32
MAX_VERSION = 64
MAX_REASON = 1000
MAX_DETAIL = 300
MAX_KEYS = 32  # top-level keys (unknown ones from a newer agent are ignored, not stored)
MIN_INTERVAL_S, MAX_INTERVAL_S = 1.0, 86400.0
KINDS = ("tcp", "http", "exec")
_HINT = "the agent sends this by itself; upgrade the agent or report a bug if it keeps happening"


@dataclass(frozen=True)
class ProbeReport:
    port: int
    kind: str
    ok: bool
    detail: str
    since: float  # Unix time of the probe's last flip (the agent's clock)


@dataclass(frozen=True)
class HostReport:
    agent_version: str
    ready: bool
    reason: str
    directory_updated_at: float | None
    refresh_interval_s: float
    probes: tuple[ProbeReport, ...] = ()

    def to_json(self) -> str:
        """The stored form: only the known fields, so its size is bounded by parse_report's caps."""
        doc = asdict(self)
        doc["probes"] = [asdict(p) for p in self.probes]
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _bad(message: str) -> RejectedError:
    return RejectedError(f"health report: {message}", _HINT, code="invalid_request")


def _text(doc: dict[str, Any], key: str, limit: int, where: str = "") -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise _bad(f"{where}{key} must be a string")
    if len(value) > limit:
        raise _bad(f"{where}{key} is {len(value)} characters; at most {limit}")
    if not value.isprintable():
        raise _bad(f"{where}{key} has control characters")
    return value


def _bool(doc: dict[str, Any], key: str, where: str = "") -> bool:
    value = doc.get(key)
    if not isinstance(value, bool):
        raise _bad(f"{where}{key} must be true or false")
    return value


def _time(doc: dict[str, Any], key: str, where: str = "", *, nullable: bool = False) -> float | None:
    value = doc.get(key)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"{where}{key} must be a Unix time (a number)")
    if not 0 <= value < 2**33:  # until the year 2242: a time, not an arbitrary float
        raise _bad(f"{where}{key} {value!r} is not a plausible Unix time")
    return float(value)


def _probe(doc: object, where: str) -> ProbeReport:
    if not isinstance(doc, dict):
        raise _bad(f"{where} must be an object")
    port = doc.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise _bad(f"{where}.port must be a port number 1-65535")
    kind = doc.get("kind")
    if kind not in KINDS:
        raise _bad(f"{where}.kind must be one of tcp, http, exec")
    since = _time(doc, "since", f"{where}.")
    assert since is not None
    return ProbeReport(
        port=port,
        kind=kind,
        ok=_bool(doc, "ok", f"{where}."),
        detail=_text(doc, "detail", MAX_DETAIL, f"{where}."),
        since=since,
    )


def parse_report(doc: Any) -> HostReport:
    """A report body, checked: types, bounded strings and lists, finite times, no control
    characters. Refused whole with RejectedError(code=invalid_request) naming the field."""
    if not isinstance(doc, dict):
        raise _bad("the body must be a JSON object")
    if len(doc) > MAX_KEYS:
        raise _bad(f"{len(doc)} keys; at most {MAX_KEYS}")
    interval = doc.get("refresh_interval_s")
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not math.isfinite(interval):
        raise _bad("refresh_interval_s must be a number of seconds")
    if not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:
        raise _bad(f"refresh_interval_s must be between {MIN_INTERVAL_S:g} and {MAX_INTERVAL_S:g}")
    probes = doc.get("probes", [])
    if not isinstance(probes, list):
        raise _bad("probes must be a list")
    if len(probes) > MAX_PROBES:
        raise _bad(f"{len(probes)} probes; at most {MAX_PROBES}")
    return HostReport(
        agent_version=_text(doc, "agent_version", MAX_VERSION),
        ready=_bool(doc, "ready"),
        reason=_text(doc, "reason", MAX_REASON),
        directory_updated_at=_time(doc, "directory_updated_at", nullable=True),
        refresh_interval_s=float(interval),
        probes=tuple(_probe(p, f"probes[{i}]") for i, p in enumerate(probes)),
    )


def load_report(text: str) -> HostReport | None:
    """A stored report, or None when the row does not parse (altered by hand or by an older
    version): the host then counts as never reported, which says to look at its agent."""
    try:
        return parse_report(json.loads(text))
    except (ValueError, RejectedError, RecursionError):
        return None


# --- the condition ---------------------------------------------------------------------------


class _Unchecked(Enum):
    UNCHECKED = "unchecked"


# host_health(host, now) without a report argument: the certificate-only health that
# `kube export` gave before reports existed (its callers that have no reports keep it).
UNCHECKED = _Unchecked.UNCHECKED
Unchecked = Literal[_Unchecked.UNCHECKED]


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _probe_label(p: ProbeReport) -> str:
    return f"{p.kind} probe of port {p.port}"


def host_health(
    host: HostRecord,
    now: datetime,
    report: HostReport | Unchecked | None = UNCHECKED,
    received_at: datetime | None = None,
) -> Health:
    """The host's Ready condition. `report` is its last report (None: it never sent one) and
    `received_at` when the authority stored it; without `report`, the certificate alone."""
    if host.revoked_at is not None:
        return Health(False, REASON_REVOKED, f"revoked at {rfc3339(host.revoked_at)}", host.revoked_at)
    if host.not_after <= now:
        return Health(
            False,
            REASON_CERTIFICATE_EXPIRED,
            f"the host's certificate expired at {rfc3339(host.not_after)}: it was not renewed "
            "(agent down or unreachable); enroll it again",
            host.not_after,
        )
    if report is UNCHECKED:
        return Health(
            True,
            REASON_CERTIFICATE_VALID,
            f"enrolled, not revoked, certificate valid until {rfc3339(host.not_after)} "
            "(the agent's reports were not consulted)",
            host.enrolled_at,
        )
    if report is None or received_at is None:
        return Health(
            False,
            REASON_NEVER_REPORTED,
            f"no health report from the agent on {host.host_name} since enrollment: is `meshagent run` "
            "running there and able to reach the authority? (`meshagent status` on the host)",
            host.enrolled_at,
        )
    window = timedelta(seconds=STALE_INTERVALS * report.refresh_interval_s)
    if now - received_at > window:
        return Health(
            False,
            REASON_AGENT_STALE,
            f"last report from the agent on {host.host_name} at {rfc3339(received_at)}, more than "
            f"{STALE_INTERVALS} refresh intervals ({report.refresh_interval_s:g}s each) ago: the agent "
            "is down or cannot reach the authority (`meshagent status` on the host)",
            received_at + window,
        )
    refreshed = report.directory_updated_at
    if refreshed is None or received_at - _at(refreshed) > window:
        last = "never" if refreshed is None else f"last at {rfc3339(_at(refreshed))}"
        return Health(
            False,
            REASON_AGENT_STALE,
            f"the agent on {host.host_name} reports, but has not refreshed its directory within "
            f"{STALE_INTERVALS} intervals ({last}): its catalog and policy may be out of date "
            "(`meshagent status` on the host shows the refresh error)",
            received_at if refreshed is None else _at(refreshed) + window,
        )
    if not report.ready:
        return Health(
            False,
            REASON_AGENT_NOT_READY,
            f"the agent on {host.host_name} is not ready: {report.reason or 'no reason given'}",
            received_at,
        )
    failing = sorted((p for p in report.probes if not p.ok), key=lambda p: p.since)
    if failing:
        first = failing[0]
        others = f"; {len(failing) - 1} more probe(s) failing" if len(failing) > 1 else ""
        return Health(
            False,
            REASON_PROBE_FAILED,
            f"the app's {_probe_label(first)} on {host.host_name} is failing since "
            f"{rfc3339(_at(first.since))}: {first.detail}{others}",
            _at(first.since),
        )
    since = max([host.enrolled_at, *(_at(p.since) for p in report.probes)])
    probes = f", {len(report.probes)} probe(s) passing" if report.probes else ""
    return Health(
        True,
        REASON_AGENT_READY,
        # No report time here: the message changes only with the state, so the object does too.
        f"agent {report.agent_version} ready{probes}",
        since,
    )
