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

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Literal, NamedTuple

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
MAX_SERIAL = 64  # hex digits: X.509 serials are at most 20 bytes
MAX_BACKEND = 32
MAX_LISTENERS = 8
MAX_LISTENER_NAME = 32
MAX_LISTENER_ADDRESS = 64  # "[v6 address]:port"
MAX_DIGEST = 64  # hex digits of config_digest (the agent sends 16)
MAX_ADDRESSES = 64  # as many as enrollment takes (names.MAX_HOST_ADDRESSES)
_SERIAL = re.compile(r"[0-9a-fA-F]{1,64}")
_LISTENER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
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
class CertificateReport:
    """The certificate the agent serves with, and whether its renewal is failing."""

    serial: str
    not_after: float  # Unix time
    renewal_error: str = ""  # the last renewal's error while it keeps failing; "" when fine


@dataclass(frozen=True)
class InterceptionReport:
    applied: bool
    backend: str  # nft, iptables, or "" when interception is off


@dataclass(frozen=True)
class HostReport:
    agent_version: str
    ready: bool
    reason: str
    directory_updated_at: float | None
    refresh_interval_s: float
    probes: tuple[ProbeReport, ...] = ()
    # Since #18 (an older agent's report has none of these: None / empty).
    certificate: CertificateReport | None = None
    interception: InterceptionReport | None = None
    listeners: tuple[tuple[str, str], ...] = ()  # (name, "host:port"), sorted by name
    last_error: str = ""
    addresses: tuple[str, ...] = ()
    started_at: float | None = None  # since #20: when the agent process started (its clock)
    config_digest: str | None = None  # since #20: the agent's effective config, hashed (hex)

    def to_doc(self) -> dict[str, Any]:
        """The report as the agent sent it (known fields only), for the stored row and --json."""
        doc = asdict(self)
        doc["probes"] = [asdict(p) for p in self.probes]
        doc["listeners"] = dict(self.listeners)
        doc["addresses"] = list(self.addresses)
        return doc

    def to_json(self) -> str:
        """The stored form: only the known fields, so its size is bounded by parse_report's caps."""
        return json.dumps(self.to_doc(), separators=(",", ":"), sort_keys=True)


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


def _object(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(f"{key} must be an object")
    return value


def _certificate(doc: dict[str, Any]) -> CertificateReport | None:
    cert = _object(doc, "certificate")
    if cert is None:
        return None
    serial = _text(cert, "serial", MAX_SERIAL, "certificate.")
    if not _SERIAL.fullmatch(serial):
        raise _bad("certificate.serial must be hexadecimal digits")
    not_after = _time(cert, "not_after", "certificate.")
    assert not_after is not None
    renewal_error = ""
    if "renewal_error" in cert:
        renewal_error = _text(cert, "renewal_error", MAX_REASON, "certificate.")
    return CertificateReport(serial.lower(), not_after, renewal_error)


def _interception(doc: dict[str, Any]) -> InterceptionReport | None:
    value = _object(doc, "interception")
    if value is None:
        return None
    return InterceptionReport(
        applied=_bool(value, "applied", "interception."),
        backend=_text(value, "backend", MAX_BACKEND, "interception."),
    )


def _listeners(doc: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    value = _object(doc, "listeners")
    if value is None:
        return ()
    if len(value) > MAX_LISTENERS:
        raise _bad(f"listeners has {len(value)} entries; at most {MAX_LISTENERS}")
    out = []
    for name in sorted(value):
        if not _LISTENER_NAME.fullmatch(name):
            raise _bad(f"listeners: {name[:40]!r} is not a listener name (a-z, 0-9, - and _)")
        out.append((name, _text(value, name, MAX_LISTENER_ADDRESS, "listeners.")))
    return tuple(out)


def _addresses(doc: dict[str, Any]) -> tuple[str, ...]:
    value = doc.get("addresses", [])
    if not isinstance(value, list):
        raise _bad("addresses must be a list")
    if len(value) > MAX_ADDRESSES:
        raise _bad(f"addresses has {len(value)} entries; at most {MAX_ADDRESSES}")
    out = []
    for i, address in enumerate(value):
        if not isinstance(address, str) or len(address) > 45:  # the longest IPv6 text form
            raise _bad(f"addresses[{i}] must be an IP address")
        try:
            out.append(str(ipaddress.ip_address(address)))
        except ValueError:
            raise _bad(f"addresses[{i}] {address!r} is not an IP address") from None
    return tuple(out)


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
        certificate=_certificate(doc),
        interception=_interception(doc),
        listeners=_listeners(doc),
        last_error=_text(doc, "last_error", MAX_REASON) if "last_error" in doc else "",
        addresses=_addresses(doc),
        started_at=_time(doc, "started_at", nullable=True),
        config_digest=_digest(doc),
    )


_HEX = frozenset("0123456789abcdef")


def _digest(doc: dict[str, Any]) -> str | None:
    value = doc.get("config_digest")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_DIGEST or not _HEX.issuperset(value):
        raise _bad(f"config_digest must be 1 to {MAX_DIGEST} lowercase hex digits")
    return value


def load_report(text: str) -> HostReport | None:
    """A stored report, or None when the row does not parse (altered by hand or by an older
    version): the host then counts as never reported, which says to look at its agent."""
    try:
        return parse_report(json.loads(text))
    except (ValueError, RejectedError, RecursionError):
        return None


# --- what changed between two reports (the change log, #20) -------------------------------


# A report's state for the change log: what an event is recorded for when it moves. Stored
# beside the report (storage: host_reports.state); compared when a batch of reports is written.
# Short and canonical, so an unchanged host compares equal however its details (probe texts,
# times) vary.
_STATE_ENCODER = json.JSONEncoder(separators=(",", ":"))


def report_state(report: HostReport) -> str:
    probes = sorted([p.port, p.kind, p.ok] for p in report.probes)
    # [version, started_at, ready, probes, config_digest]: a list, not an object (half the cost
    # to encode). States stored before config_digest existed have four items (read as None).
    return _STATE_ENCODER.encode(
        [report.agent_version, report.started_at, report.ready, probes, report.config_digest]
    )


def state_changes(old_state: str, new_state: str, report: HostReport | None) -> list[tuple[str, str]]:
    """(event kind, detail) for each difference between two `report_state`s, in a fixed order:
    agent_version_changed, restarted, config_changed, not_ready/ready,
    probe_failing/probe_recovered. `report` (the new one, when it parses) gives the details: the
    reason, a probe's own words."""
    try:
        old, new = json.loads(old_state), json.loads(new_state)
        (old_version, old_start, old_ready, old_list), old_config = old[:4], _item(old, 4)
        (version, start, ready, new_list), config = new[:4], _item(new, 4)
        old_probes = {(p[0], p[1]): bool(p[2]) for p in old_list}
        new_probes = {(p[0], p[1]): bool(p[2]) for p in new_list}
    except (ValueError, TypeError, KeyError, IndexError):
        return []  # a state this version did not write: nothing to compare
    found: list[tuple[str, str]] = []
    if old_version != version:
        found.append(("agent_version_changed", f"{old_version} -> {version}"))
    if old_start is not None and start is not None and old_start != start:
        found.append(("restarted", f"agent started at {_at(start).isoformat(timespec='seconds')}"))
    # Like restarted: only between two reports that both carry a digest (an older agent, or
    # an upgrade to one that sends it, is not a config change).
    if old_config is not None and config is not None and old_config != config:
        found.append(("config_changed", f"config digest {old_config} -> {config}"))
    if old_ready != ready:
        reason = report.reason if report is not None else ""
        found.append(("ready", "") if ready else ("not_ready", reason))
    details = {(p.port, p.kind): p.detail for p in report.probes} if report is not None else {}
    for (port, kind), ok in sorted(new_probes.items()):
        was = old_probes.get((port, kind), True)  # a new probe is news only when it fails
        if ok != was:
            words = f"{kind} probe of port {port}" + (
                f": {details[(port, kind)]}" if details.get((port, kind)) else ""
            )
            found.append(("probe_recovered" if ok else "probe_failing", words))
    return found


def _item(state: list[Any], index: int) -> Any:
    return state[index] if len(state) > index else None


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


# --- the fleet's view: one state per host (`authority hosts`, the authority's /metrics) --------

STATE_HEALTHY = "healthy"
STATE_NOT_READY = "not_ready"
STATE_SILENT = "silent"
STATE_EXPIRING = "expiring"
STATE_REVOKED = "revoked"
STATES = (STATE_HEALTHY, STATE_NOT_READY, STATE_SILENT, STATE_EXPIRING, STATE_REVOKED)

EXPIRING_WINDOW = timedelta(hours=24)
# A certificate is "expiring soon" once it is inside EXPIRING_WINDOW *and* past the point where a
# working agent has renewed it (70 % of its lifetime, +5 % jitter): with the default 24 h
# certificates every host is always within 24 h of expiry, and the column must not say so of all.
LATE_FRACTION = 0.80
MAX_COLUMN_REASON = 80


@dataclass(frozen=True)
class FleetHealth:
    """A host's state for the operator: `state` (one of STATES, the gauge's label), `text` (the
    `authority hosts` column) and `health` (the Ready condition it comes from, with its message)."""

    state: str
    text: str
    health: Health
    since: datetime | None = None  # silent since / expiring at

    def to_doc(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "text": self.text,
            "since": None if self.since is None else rfc3339(self.since),
            "reason": self.health.reason,
            "message": self.health.message,
        }


def _short(text: str) -> str:
    return text if len(text) <= MAX_COLUMN_REASON else text[: MAX_COLUMN_REASON - 3] + "..."


def _issued_at(host: HostRecord) -> datetime:
    return host.last_renewal or host.enrolled_at


def expiring_soon(host: HostRecord, now: datetime) -> bool:
    """Within EXPIRING_WINDOW of expiry and late: past LATE_FRACTION of its lifetime (the
    lifetime as the registry knows it: from its last issue to not_after)."""
    left = host.not_after - now
    if left > EXPIRING_WINDOW:
        return False
    lifetime = host.not_after - _issued_at(host)
    return left <= lifetime * (1 - LATE_FRACTION)


class Vitals(NamedTuple):
    """What a host's state needs from its last report: read whole (HostReport) for the CLI, or
    straight from the stored JSON for the gauges (no validation: the row was checked when it was
    written; 10,000 of them are read per scrape)."""

    refresh_interval_s: float
    directory_updated_at: float | None
    ready: bool
    probes_ok: bool
    renewal_failing: bool

    @classmethod
    def of(cls, report: HostReport) -> Vitals:
        cert = report.certificate
        return cls(
            report.refresh_interval_s,
            report.directory_updated_at,
            report.ready,
            all(p.ok for p in report.probes),
            bool(cert is not None and cert.renewal_error),
        )

    @classmethod
    def from_json(cls, text: str) -> Vitals | None:
        """None when the row does not read (as load_report: the host counts as never reported)."""
        try:
            doc = json.loads(text)
            refreshed = doc["directory_updated_at"]
            cert = doc.get("certificate") or {}
            return cls(
                float(doc["refresh_interval_s"]),
                None if refreshed is None else float(refreshed),
                doc["ready"] is True,
                all(p["ok"] is True for p in doc["probes"]),
                bool(cert.get("renewal_error")),
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None


def fleet_state(host: HostRecord, now: datetime, vitals: Vitals | None, received_at: float | None) -> str:
    """One of STATES; first that applies: revoked; silent (never reported, or no report within 3
    intervals); not ready (what makes host_health not Ready: certificate expired, directory not
    refreshed within 3 intervals, agent not ready, a probe failing); expiring soon (late in its
    certificate's life, or the agent says renewal is failing); healthy."""
    if host.revoked_at is not None:
        return STATE_REVOKED
    if host.not_after <= now:
        return STATE_NOT_READY
    if vitals is None or received_at is None:
        return STATE_SILENT
    window = STALE_INTERVALS * vitals.refresh_interval_s
    if now.timestamp() - received_at > window:
        return STATE_SILENT
    refreshed = vitals.directory_updated_at
    if refreshed is None or received_at - refreshed > window or not vitals.ready or not vitals.probes_ok:
        return STATE_NOT_READY
    if vitals.renewal_failing or expiring_soon(host, now):
        return STATE_EXPIRING
    return STATE_HEALTHY


def fleet_health(
    host: HostRecord, now: datetime, report: HostReport | None, received_at: datetime | None
) -> FleetHealth:
    """The host's state (fleet_state) with the column's words, from its record and last report
    (None: never reported)."""
    health = host_health(host, now, report, received_at)
    vitals = None if report is None else Vitals.of(report)
    state = fleet_state(host, now, vitals, None if received_at is None else received_at.timestamp())
    if state == STATE_REVOKED:
        return FleetHealth(state, "revoked", health, host.revoked_at)
    if state == STATE_SILENT:
        if received_at is None or report is None:
            return FleetHealth(state, "silent since enrollment (never reported)", health, host.enrolled_at)
        return FleetHealth(state, f"silent since {rfc3339(received_at)}", health, received_at)
    if state == STATE_NOT_READY:
        return FleetHealth(state, f"not ready: {_short(_not_ready_reason(health, report))}", health)
    if state == STATE_EXPIRING:
        renewal_error = report.certificate.renewal_error if report and report.certificate else ""
        why = f", renewal failing: {_short(renewal_error)}" if renewal_error else ""
        return FleetHealth(state, f"expiring soon ({rfc3339(host.not_after)}{why})", health, host.not_after)
    return FleetHealth(state, "healthy", health)


def _not_ready_reason(health: Health, report: HostReport | None) -> str:
    if health.reason == REASON_AGENT_NOT_READY and report is not None:
        return report.reason or "no reason given"
    if health.reason == REASON_CERTIFICATE_EXPIRED:
        return f"certificate expired at {rfc3339(health.since)}"
    if health.reason == REASON_AGENT_STALE and report is not None:
        refreshed = report.directory_updated_at
        return (
            "directory never refreshed"
            if refreshed is None
            else (f"directory not refreshed since {rfc3339(_at(refreshed))}")
        )
    if health.reason == REASON_PROBE_FAILED and report is not None:
        failing = [p for p in report.probes if not p.ok]
        return ", ".join(f"{_probe_label(p)} failing" for p in failing[:2]) + (
            f" (+{len(failing) - 2})" if len(failing) > 2 else ""
        )
    return health.reason


Reports = Mapping[str, tuple[float, str]]


def stored_fleet_health(host: HostRecord, now: datetime, reports: Reports) -> FleetHealth:
    """fleet_health from the registry's `reports()`."""
    stored = reports.get(host.id)
    if stored is None:
        return fleet_health(host, now, None, None)
    at, text = stored
    return fleet_health(host, now, load_report(text), datetime.fromtimestamp(at, UTC))


def stored_report_doc(host: HostRecord, reports: Reports) -> dict[str, Any] | None:
    """The host's last report, whole, as stored (for `authority hosts --json`), times as RFC 3339;
    None: never reported. `agent_ready`/`agent_reason` repeat ready/reason under the names #17
    gave them. A row that no longer parses shows as {"received_at", "unreadable": true}."""
    stored = reports.get(host.id)
    if stored is None:
        return None
    at, text = stored
    report = load_report(text)
    received = rfc3339(_at(at))
    if report is None:
        return {"received_at": received, "unreadable": True}
    doc = report.to_doc()
    doc["directory_updated_at"] = (
        None if report.directory_updated_at is None else rfc3339(_at(report.directory_updated_at))
    )
    doc["probes"] = [{**p, "since": rfc3339(_at(p["since"]))} for p in doc["probes"]]
    if report.certificate is not None:
        doc["certificate"] = {**doc["certificate"], "not_after": rfc3339(_at(report.certificate.not_after))}
    return {"received_at": received, **doc, "agent_ready": report.ready, "agent_reason": report.reason}


@dataclass(frozen=True)
class FleetCounts:
    """The authority's fleet gauges: hosts by state, and unrevoked certificates expiring within
    24 h (the plain count, whatever their lifetime)."""

    hosts: dict[str, int]
    expiring_24h: int


def fleet_counts(hosts: Iterable[HostRecord], reports: Reports, now: datetime) -> FleetCounts:
    """One pass over the hosts and their last reports."""
    counts = dict.fromkeys(STATES, 0)
    expiring = 0
    horizon = now + EXPIRING_WINDOW
    for host in hosts:
        stored = reports.get(host.id)
        if stored is None:
            counts[fleet_state(host, now, None, None)] += 1
        else:
            counts[fleet_state(host, now, Vitals.from_json(stored[1]), stored[0])] += 1
        if not host.revoked and now < host.not_after <= horizon:
            expiring += 1
    return FleetCounts(counts, expiring)
