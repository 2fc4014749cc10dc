"""The authority's side of health: a report checked strictly (hostile inputs), Ready from the
last report (a table of every reason), reports stored and read back, and data_version."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.authority import kube_export as kx
from agent.authority import kube_objects as ko
from agent.authority.health import HostReport, host_health, load_report, parse_report
from agent.authority.storage import HostRecord, PolicyRecord, SqliteRegistry
from agent.errors import RejectedError
from agent.identity.names import WorkloadIdentity

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)


def _record(**kw: Any) -> HostRecord:
    base: dict[str, Any] = {
        "id": "h-0123456789ab",
        "identity": "shop/billing",
        "host_name": "legacy-db-1",
        "addresses": ("198.18.0.10",),
        "serial": "ab",
        "not_after": T0 + timedelta(hours=24),
        "cert_pem": "",
        "enrolled_at": T0,
        "last_renewal": None,
        "revoked_at": None,
    }
    return HostRecord(**{**base, **kw})


def _doc(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "agent_version": "0.1.0",
        "ready": True,
        "reason": "",
        "directory_updated_at": (NOW - timedelta(seconds=10)).timestamp(),
        "refresh_interval_s": 30.0,
        "probes": [],
    }
    return {**doc, **kw}


def _probe(**kw: Any) -> dict[str, Any]:
    return {
        "port": 8080,
        "kind": "http",
        "ok": True,
        "detail": "GET /healthz: status 200",
        "since": T0.timestamp(),
        **kw,
    }


# --- parse_report --------------------------------------------------------------------------------


def test_parse_report_round_trips_and_ignores_unknown_keys() -> None:
    report = parse_report(_doc(probes=[_probe()], extra_from_a_newer_agent=1))
    assert report.probes[0].port == 8080 and report.ready
    stored = report.to_json()
    assert "extra_from_a_newer_agent" not in stored
    assert load_report(stored) == report
    assert load_report("{not json") is None and load_report('{"ready": 1}') is None


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([], "the body must be a JSON object"),
        (None, "the body must be a JSON object"),
        (_doc(ready=1), "ready must be true or false"),
        (_doc(ready="true"), "ready must be true or false"),
        (_doc(agent_version=None), "agent_version must be a string"),
        (_doc(agent_version="v" * 65), "agent_version is 65 characters; at most 64"),
        (_doc(reason="r" * 1001), "reason is 1001 characters; at most 1000"),
        (_doc(reason="ok\x1b[2J"), "reason has control characters"),
        (_doc(refresh_interval_s=0), "refresh_interval_s must be between 1 and 86400"),
        (_doc(refresh_interval_s=float("nan")), "refresh_interval_s must be a number"),
        (_doc(refresh_interval_s=True), "refresh_interval_s must be a number"),
        (_doc(directory_updated_at=float("inf")), "directory_updated_at must be a Unix time"),
        (_doc(directory_updated_at=-1), "directory_updated_at -1 is not a plausible Unix time"),
        (_doc(directory_updated_at=1e300), "is not a plausible Unix time"),
        (_doc(probes={}), "probes must be a list"),
        (_doc(probes=[_probe()] * 33), "33 probes; at most 32"),
        (_doc(probes=["tcp"]), "probes[0] must be an object"),
        (_doc(probes=[_probe(port=0)]), "probes[0].port must be a port number 1-65535"),
        (_doc(probes=[_probe(port=True)]), "probes[0].port must be a port number"),
        (_doc(probes=[_probe(kind="grpc")]), "probes[0].kind must be one of tcp, http, exec"),
        (_doc(probes=[_probe(ok=None)]), "probes[0].ok must be true or false"),
        (_doc(probes=[_probe(detail="d" * 301)]), "probes[0].detail is 301 characters; at most 300"),
        (_doc(probes=[_probe(detail="a\nb")]), "probes[0].detail has control characters"),
        (_doc(probes=[_probe(since="yesterday")]), "probes[0].since must be a Unix time"),
        ({**_doc(), **{f"k{i}": i for i in range(40)}}, "keys; at most 32"),
        ({k: v for k, v in _doc().items() if k != "ready"}, "ready must be true or false"),
    ],
)
def test_parse_report_refuses_hostile_input(doc: Any, field: str) -> None:
    with pytest.raises(RejectedError) as info:
        parse_report(doc)
    assert info.value.code == "invalid_request"
    assert field in info.value.message and info.value.hint


def test_a_stored_report_stays_small() -> None:
    """The largest report parse_report accepts stays in the tens of kilobytes."""
    big = _doc(
        agent_version="v" * 64,
        reason="r" * 1000,
        probes=[_probe(detail="d" * 300, port=p) for p in range(1, 33)],
    )
    assert len(parse_report(big).to_json()) < 20_000


# --- host_health -----------------------------------------------------------------------------------

RECEIVED = NOW - timedelta(seconds=20)
FAILING_SINCE = (T0 + timedelta(minutes=30)).timestamp()


@pytest.mark.parametrize(
    ("record", "doc", "received", "ready", "reason", "since", "words"),
    [
        (_record(), _doc(), RECEIVED, True, "AgentReady", T0, "agent 0.1.0 ready"),
        (
            _record(),
            _doc(probes=[_probe(since=FAILING_SINCE - 60)]),
            RECEIVED,
            True,
            "AgentReady",
            datetime.fromtimestamp(FAILING_SINCE - 60, UTC),
            "1 probe(s) passing",
        ),
        # 3 intervals of 30 s without a report: stale, since the moment the third one lapsed.
        (
            _record(),
            _doc(),
            NOW - timedelta(seconds=91),
            False,
            "AgentStale",
            NOW - timedelta(seconds=1),
            "more than 3 refresh intervals (30s each) ago",
        ),
        (_record(), _doc(), NOW - timedelta(seconds=90), True, "AgentReady", T0, "ready"),
        # Reporting, but the directory has not been refreshed for 3 intervals.
        (
            _record(),
            _doc(directory_updated_at=(RECEIVED - timedelta(seconds=100)).timestamp()),
            RECEIVED,
            False,
            "AgentStale",
            RECEIVED - timedelta(seconds=10),
            "has not refreshed its directory within 3 intervals",
        ),
        (_record(), _doc(directory_updated_at=None), RECEIVED, False, "AgentStale", RECEIVED, "(never)"),
        (
            _record(),
            _doc(ready=False, reason="proxy: listeners not up"),
            RECEIVED,
            False,
            "AgentNotReady",
            RECEIVED,
            "is not ready: proxy: listeners not up",
        ),
        (
            _record(),
            _doc(
                probes=[
                    _probe(),
                    _probe(
                        port=5432, kind="tcp", ok=False, detail="connection refused", since=FAILING_SINCE + 5
                    ),
                    _probe(port=9000, ok=False, detail="GET /healthz: status 503", since=FAILING_SINCE),
                ]
            ),
            RECEIVED,
            False,
            "ProbeFailed",
            datetime.fromtimestamp(FAILING_SINCE, UTC),
            "http probe of port 9000 on legacy-db-1 is failing since 2026-03-01T12:30:00Z: "
            "GET /healthz: status 503; 1 more probe(s) failing",
        ),
        (_record(), None, None, False, "NeverReported", T0, "no health report from the agent on legacy-db-1"),
        (
            _record(revoked_at=T0 + timedelta(minutes=5)),
            _doc(),
            RECEIVED,
            False,
            "Revoked",
            T0 + timedelta(minutes=5),
            "revoked at",
        ),
        (
            _record(not_after=T0 + timedelta(minutes=50)),
            _doc(),
            RECEIVED,
            False,
            "CertificateExpired",
            T0 + timedelta(minutes=50),
            "expired",
        ),
    ],
)
def test_host_health_from_the_last_report(
    record: HostRecord,
    doc: dict[str, Any] | None,
    received: datetime | None,
    ready: bool,
    reason: str,
    since: datetime,
    words: str,
) -> None:
    report = None if doc is None else parse_report(doc)
    health = host_health(record, NOW, report, received)
    assert (health.ready, health.reason, health.since) == (ready, reason, since)
    assert words in health.message
    # Valid as a condition on the object the cluster sees.
    workload = ko.HostWorkload(
        host_id=record.id,
        host_name=record.host_name,
        identity=WorkloadIdentity.parse_short(record.identity, "cluster.local", "linkerd"),
        addresses=record.addresses,
        ports=(),
        health=health,
    )
    (cond,) = ko.external_workload(workload, "default")["status"]["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Ready", "True" if ready else "False", reason)


def test_a_steady_host_yields_the_same_condition_report_after_report() -> None:
    """Nothing in the condition moves while the state does not: the controller writes nothing."""
    record = _record()
    conditions = set()
    for minute in range(5):
        received = NOW + timedelta(minutes=minute)
        doc = _doc(directory_updated_at=received.timestamp(), probes=[_probe()])
        conditions.add(host_health(record, received + timedelta(seconds=1), parse_report(doc), received))
    assert len(conditions) == 1


def test_export_takes_the_stored_reports() -> None:
    record = _record()
    ident = WorkloadIdentity.parse_short(record.identity, "cluster.local", "linkerd")
    # No reports consulted: the certificate's health, as kube export gave it before reports.
    assert kx.host_workload(record, ident, NOW).health.reason == "CertificateValid"
    assert kx.host_workload(record, ident, NOW, {}).health.reason == "NeverReported"
    stored = {record.id: (RECEIVED.timestamp(), parse_report(_doc()).to_json())}
    assert kx.host_workload(record, ident, NOW, stored).health.reason == "AgentReady"
    garbled = {record.id: (RECEIVED.timestamp(), "{")}
    assert kx.host_workload(record, ident, NOW, garbled).health.reason == "NeverReported"
    workloads, _ = kx.desired_workloads(
        [record], trust_domain="cluster.local", mesh="linkerd", now=NOW, reports=stored
    )
    assert workloads[0].health.ready


# --- storage ---------------------------------------------------------------------------------------


def test_reports_round_trip_and_keep_the_last(tmp_path: Path) -> None:
    registry = SqliteRegistry(tmp_path / "registry.db")
    assert registry.reports() == {}
    first = parse_report(_doc(ready=False, reason="starting")).to_json()
    registry.record_report("h-1", first, T0)
    last = parse_report(_doc()).to_json()
    registry.record_report("h-1", last, NOW)
    registry.record_report("h-2", first, 12.5)
    registry.close()
    again = SqliteRegistry(tmp_path / "registry.db")  # a second open finds the table and leaves it
    assert again.reports() == {"h-1": (NOW.timestamp(), last), "h-2": (12.5, first)}
    stored = load_report(again.reports()["h-1"][1])
    assert isinstance(stored, HostReport) and stored.ready
    assert (tmp_path / "registry-reports.db").exists()


def test_data_version_moves_on_registry_writes_from_any_process_not_on_reports(tmp_path: Path) -> None:
    registry = SqliteRegistry(tmp_path / "registry.db")
    other = SqliteRegistry(tmp_path / "registry.db")  # another worker or the CLI
    v0 = registry.data_version()
    assert registry.data_version() == v0
    registry.record_report("h-1", json.dumps({}), NOW)
    assert registry.data_version() == v0  # reports live in their own file
    registry.set_policy(PolicyRecord("shop/billing", 0, "deny", ()))  # this connection's own write
    v1 = registry.data_version()
    assert v1 != v0
    other.remove_policy("shop/billing", 0)
    v2 = registry.data_version()
    assert v2 != v1
    # Each instance sees every write (its values are its own: compare only with themselves).
    w = other.data_version()
    registry.set_policy(PolicyRecord("shop/billing", 0, "deny", ()))
    assert other.data_version() != w
    registry.close()
    other.close()
