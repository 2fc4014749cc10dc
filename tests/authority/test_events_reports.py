"""The change log's report-derived events (#20): a host's reports, posted to two replicas in
turn, log each change of agent version, start, readiness and probe exactly once."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.authority.ca import load_authority
from agent.authority.health import parse_report, report_state, state_changes
from agent.authority.registry import open_registry
from agent.authority.service import Authority
from agent.health.report import build_report, process_started_at
from agent.identity.pki import generate_key, make_csr
from tests.pgcluster import PgCluster
from tests.support import init_authority, running_authority

T0 = datetime(2026, 1, 1, tzinfo=UTC)
_names = itertools.count()


def _report(
    version: str = "1.0",
    started: float = 1000.0,
    probe_ok: bool = True,
    detail: str = "ok",
    config: str | None = "00000000000000aa",
) -> dict[str, Any]:
    probes = [{"port": 8080, "kind": "http", "ok": probe_ok, "detail": detail, "since": 5.0}]
    return build_report(
        not_ready_reasons=[] if probe_ok else ["probe failing"],
        directory_updated_at=None,
        refresh_interval_s=30,
        probes=probes,
        agent_version=version,
        started_at=started,
        config_digest=config,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Authority, Authority]]:
    """Two authorities on one registry, as replicas are (their clocks set by the test)."""
    directory = tmp_path / "authority"
    init_authority(directory)
    database = None
    if request.param == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        database = cluster.create_database(f"events_{next(_names)}")
    pair = tuple(Authority(load_authority(directory), open_registry(directory, database)) for _ in range(2))
    yield pair  # type: ignore[misc]
    for authority in pair:
        authority.registry.close()


def test_each_change_is_logged_once_whichever_replica_takes_the_report(
    replicas: tuple[Authority, Authority],
) -> None:
    a, b = replicas
    token = a.create_tokens("shop/web", "https://127.0.0.1:1", timedelta(minutes=5))[0]
    host = a.enroll(token.secret, make_csr(generate_key()).decode(), "web-1", ["198.18.0.1"]).host
    steps = [
        _report(),  # the first report: nothing to compare with
        _report(detail="ok in 3 ms"),  # details vary: not a change
        _report(probe_ok=False, detail="GET /: status 503"),
        _report(probe_ok=False, detail="GET /: status 500"),
        _report(),
        _report(version="1.1", started=2000.0),  # an upgrade: a new version and a restart
        _report(version="1.1", started=2000.0),
        _report(version="1.1", started=2000.0, config="00000000000000bb"),  # SIGHUP, new config
    ]
    for i, doc in enumerate(steps):
        replica = (a, b)[i % 2]
        replica.clock = lambda i=i: T0 + timedelta(seconds=30 * (i + 1))  # type: ignore[misc]
        replica.record_report(host, doc)
        replica.registry.flush_reports()
    at = [T0 + timedelta(seconds=30 * (i + 1)) for i in range(len(steps))]
    logged = [(e.kind, e.detail, e.actor, e.at) for e in b.registry.events(host.id)]
    assert logged[:-1] == [  # newest first; within one report in a fixed order (reversed here)
        ("config_changed", "config digest 00000000000000aa -> 00000000000000bb", "report", at[7]),
        ("restarted", "agent started at 1970-01-01T00:33:20+00:00", "report", at[5]),
        ("agent_version_changed", "1.0 -> 1.1", "report", at[5]),
        ("probe_recovered", "http probe of port 8080: ok", "report", at[4]),
        ("ready", "", "report", at[4]),
        ("probe_failing", "http probe of port 8080: GET /: status 503", "report", at[2]),
        ("not_ready", "probe failing", "report", at[2]),
    ]
    assert logged[-1][0] == "enrolled"
    assert a.registry.events(host.id) == b.registry.events(host.id)


def test_a_change_is_logged_once_when_two_replicas_write_it_at_the_same_moment(
    replicas: tuple[Authority, Authority],
) -> None:
    """Both replicas hold a report with the same new state and write their batches at once
    (a Barrier before flush_reports): the stored rows are read locked (FOR UPDATE / BEGIN
    IMMEDIATE), so one writer sees the change and the other sees it already stored. Without
    the lock both read the old state and the change is logged twice (or a write fails)."""
    a, b = replicas
    token = a.create_tokens("shop/web", "https://127.0.0.1:1", timedelta(minutes=5))[0]
    host = a.enroll(token.secret, make_csr(generate_key()).decode(), "web-1", ["198.18.0.1"]).host
    a.clock = lambda: T0  # type: ignore[method-assign]
    a.record_report(host, _report())
    a.registry.flush_reports()
    rounds = 12  # one race can go either way by luck; twelve in a row without the lock do not
    for r in range(rounds):
        doc = _report(probe_ok=r % 2 == 1, detail=f"round {r}")
        for i, replica in enumerate((a, b)):
            replica.clock = lambda r=r, i=i: T0 + timedelta(seconds=10 * r + i + 1)  # type: ignore[misc]
            replica.record_report(host, doc)
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_flush, args=(replica, barrier, errors)) for replica in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    kinds = [e.kind for e in b.registry.events(host.id) if e.kind != "enrolled"]
    # Each round flips the probe (and readiness): two events a round, once each.
    assert sorted(kinds) == sorted(["probe_failing", "not_ready"] * 6 + ["probe_recovered", "ready"] * 6)
    assert len(kinds) == 2 * rounds


def _flush(replica: Authority, barrier: threading.Barrier, errors: list[BaseException]) -> None:
    barrier.wait()
    try:
        replica.registry.flush_reports()
    except BaseException as exc:  # reported by the test's assertion
        errors.append(exc)


def test_state_changes_between_two_reports() -> None:
    def state(**kw: Any) -> str:
        return report_state(parse_report(_report(**kw)))

    assert state(detail="x") == state(detail="y")
    assert state_changes(state(), state(), None) == []
    assert state_changes(state(), state(version="2"), None) == [("agent_version_changed", "1.0 -> 2")]
    new = parse_report(_report(probe_ok=False, detail="refused"))
    assert state_changes(state(), report_state(new), new) == [
        ("not_ready", "probe failing"),
        ("probe_failing", "http probe of port 8080: refused"),
    ]
    # An older agent (no started_at) never counts as restarted; an unreadable state compares as nothing.
    old_agent = parse_report({**_report(), "started_at": None})
    assert state_changes(report_state(old_agent), state(started=5.0), None) == []
    assert state_changes("not json", state(), None) == []
    # The config digest: a change is logged; an agent without one (older) never counts as changed,
    # nor does a state stored before the digest existed (four items).
    assert state_changes(state(config="aa"), state(config="bb"), None) == [
        ("config_changed", "config digest aa -> bb")
    ]
    assert state_changes(state(config=None), state(config="bb"), None) == []
    assert state_changes(json.dumps(json.loads(state())[:4]), state(config="bb"), None) == []
    assert state_changes(json.dumps(json.loads(state())[:4]), state(version="2"), None) == [
        ("agent_version_changed", "1.0 -> 2")
    ]
    # A restart with another config: both.
    assert [k for k, _ in state_changes(state(), state(started=9.0, config="cc"), None)] == [
        "restarted",
        "config_changed",
    ]


def test_the_agent_reports_when_its_process_started() -> None:
    doc = build_report(not_ready_reasons=[], directory_updated_at=None, refresh_interval_s=5)
    assert doc["started_at"] == process_started_at() <= datetime.now(UTC).timestamp()
    assert parse_report(doc).started_at == doc["started_at"]
    del doc["started_at"]  # an older agent's report is still taken
    assert parse_report(doc).started_at is None


def test_reports_posted_to_a_running_authority_reach_the_change_log(tmp_path: Path) -> None:
    """The wired path: POST /v1/host/report -> the write-behind batch (its own thread) -> the log."""
    with running_authority(tmp_path / "authority") as server:
        local = Authority.open(server.directory)  # the operator's side, on the same registry
        try:
            token = local.create_tokens("shop/web", server.url, timedelta(minutes=5))[0]
            enrolled = local.enroll(token.secret, make_csr(generate_key()).decode(), "web-1", ["198.18.0.1"])
            headers = {"authorization": f"Bearer {enrolled.api_token}"}
            with httpx.Client(base_url=server.url, verify=server.tls, headers=headers, timeout=10) as client:
                for doc in (_report(), _report(probe_ok=False, detail="connection refused")):
                    assert client.post("/v1/host/report", json=doc).status_code == 204
                    # (each report is stored before the next goes: the server writes within a second)
                    _until(lambda doc=doc: _stored(local, enrolled.host.id) == doc["probes"][0]["ok"])
            _until(lambda: len(local.registry.events(enrolled.host.id)) == 3)
            assert [(e.kind, e.detail, e.actor) for e in local.registry.events(enrolled.host.id)[:2]] == [
                ("probe_failing", "http probe of port 8080: connection refused", "report"),
                ("not_ready", "probe failing", "report"),
            ]
        finally:
            local.registry.close()


def _stored(authority: Authority, host_id: str) -> bool | None:
    found = authority.registry.reports().get(host_id)
    return None if found is None else bool(json.loads(found[1])["probes"][0]["ok"])


def _until(condition: Callable[[], bool], limit_s: float = 30) -> None:
    """Polls `condition` (a state the test waits for, not a duration it assumes)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)
