"""The fleet's view (issue #18): the report's new fields through the real API (checked, bounded,
old reports still taken), each health state from real registry records, `authority hosts`
showing them, and the authority's /metrics counting them behind the discovery token."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.authority import discovery
from agent.authority.api import create_app
from agent.authority.health import (
    STATES,
    expiring_soon,
    fleet_counts,
    load_report,
    parse_report,
    stored_fleet_health,
    stored_report_doc,
)
from agent.authority.service import Authority
from agent.authority.storage import HostRecord
from agent.errors import RejectedError
from agent.identity.pki import generate_key, make_csr
from tests.support import init_authority, metric_samples, run_cli

SERIAL = "5f1e0c2a9b7d3e4f"


def _report(**kw: Any) -> dict[str, Any]:
    """A report as a #18 agent sends it (agent/status.py health_report)."""
    now = datetime.now(UTC).timestamp()
    doc: dict[str, Any] = {
        "agent_version": "0.18.0",
        "ready": True,
        "reason": "",
        "directory_updated_at": now - 5,
        "refresh_interval_s": 30.0,
        "probes": [
            {"port": 8080, "kind": "http", "ok": True, "detail": "GET /: status 200", "since": now - 60}
        ],
        "certificate": {"serial": SERIAL, "not_after": now + 3600, "renewal_error": ""},
        "interception": {"applied": True, "backend": "nft"},
        "listeners": {"inbound": "0.0.0.0:4143", "outbound": "127.0.0.1:4140"},
        "last_error": "directory_refresh: authority_unreachable: connection refused",
        "addresses": ["198.18.0.10", "2001:db8::7"],
    }
    return {**doc, **kw}


def _old_report() -> dict[str, Any]:
    """What a #17 agent sends: none of the new fields."""
    doc = _report()
    for key in ("certificate", "interception", "listeners", "last_error", "addresses"):
        del doc[key]
    return doc


@dataclass
class Fleet:
    directory: Path
    authority: Authority

    def enroll(self, name: str) -> tuple[str, str]:
        """A host enrolled with a real CSR through the authority: (host id, its api token)."""
        secret = self.authority.create_tokens("shop/web", "https://127.0.0.1:1", timedelta(minutes=5))[
            0
        ].secret
        result = self.authority.enroll(secret, make_csr(generate_key()).decode(), name, ["198.18.0.10"])
        return result.host.id, result.api_token

    def host(self, host_id: str) -> HostRecord:
        return next(h for h in self.authority.registry.list_hosts() if h.id == host_id)


def _fleet(directory: Path, *init: str) -> Fleet:
    init_authority(directory, *init)
    return Fleet(directory, Authority.open(directory))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield _fleet(tmp_path / "authority")


def _http(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://authority")


def _post_reports(app: Any, posts: list[tuple[str, Any]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with _http(app) as http:
            return [
                await http.post("/v1/host/report", headers={"authorization": f"Bearer {t}"}, json=doc)
                for t, doc in posts
            ]

    return asyncio.run(run())


# --- the report's new fields --------------------------------------------------------------------


def test_the_new_fields_round_trip_through_the_api_and_old_reports_are_still_taken(fleet: Fleet) -> None:
    new_id, new_token = fleet.enroll("new-agent")
    old_id, old_token = fleet.enroll("old-agent")
    sent = _report(certificate={"serial": SERIAL.upper(), "not_after": 1.9e9, "renewal_error": ""})
    app = create_app(fleet.authority)
    answers = _post_reports(app, [(new_token, sent), (old_token, _old_report())])
    assert [r.status_code for r in answers] == [204, 204]

    stored = fleet.authority.registry.reports()
    new = load_report(stored[new_id][1])
    assert new is not None and new.certificate is not None and new.interception is not None
    assert (new.certificate.serial, new.certificate.not_after) == (SERIAL, 1.9e9)  # serial lower-cased
    assert (new.interception.applied, new.interception.backend) == (True, "nft")
    assert dict(new.listeners) == sent["listeners"]
    assert new.last_error == sent["last_error"]
    assert new.addresses == ("198.18.0.10", "2001:db8::7")
    old = load_report(stored[old_id][1])
    assert old is not None and old.certificate is None and old.interception is None
    assert (old.listeners, old.last_error, old.addresses) == ((), "", ())

    # `authority hosts --json`'s record: the whole report, times as RFC 3339, #17's names kept.
    doc = stored_report_doc(fleet.host(new_id), stored)
    assert doc is not None
    assert doc["certificate"] == {"serial": SERIAL, "not_after": "2030-03-17T17:46:40Z", "renewal_error": ""}
    assert doc["listeners"] == sent["listeners"] and doc["addresses"] == sent["addresses"]
    assert doc["interception"] == {"applied": True, "backend": "nft"} and doc["agent_ready"] is True
    assert doc["probes"][0]["since"].endswith("Z") and doc["received_at"].endswith("Z")
    assert stored_report_doc(fleet.host(old_id), stored)["certificate"] is None  # type: ignore[index]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"certificate": "abc"}, "certificate must be an object"),
        ({"certificate": {"serial": "xyz", "not_after": 1.9e9}}, "certificate.serial must be hexadecimal"),
        ({"certificate": {"serial": "a" * 65, "not_after": 1.9e9}}, "certificate.serial is 65 characters"),
        (
            {"certificate": {"serial": "ab", "not_after": "tomorrow"}},
            "certificate.not_after must be a Unix time",
        ),
        ({"certificate": {"serial": "ab"}}, "certificate.not_after must be a Unix time"),
        (
            {"certificate": {"serial": "ab", "not_after": 1.9e9, "renewal_error": "e" * 1001}},
            "certificate.renewal_error is 1001 characters",
        ),
        (
            {"interception": {"applied": "yes", "backend": "nft"}},
            "interception.applied must be true or false",
        ),
        ({"interception": {"applied": True, "backend": "n" * 33}}, "interception.backend is 33 characters"),
        ({"interception": []}, "interception must be an object"),
        ({"listeners": ["inbound"]}, "listeners must be an object"),
        ({"listeners": {f"l{i}": "127.0.0.1:1" for i in range(9)}}, "listeners has 9 entries; at most 8"),
        ({"listeners": {"In Bound": "127.0.0.1:1"}}, "listeners: 'In Bound' is not a listener name"),
        ({"listeners": {"inbound": 4143}}, "listeners.inbound must be a string"),
        ({"listeners": {"inbound": "x" * 65}}, "listeners.inbound is 65 characters"),
        ({"last_error": "boom\x1b[2J"}, "last_error has control characters"),
        ({"last_error": "e" * 1001}, "last_error is 1001 characters"),
        ({"last_error": None}, "last_error must be a string"),
        ({"addresses": "198.18.0.10"}, "addresses must be a list"),
        ({"addresses": ["198.18.0.10"] * 65}, "addresses has 65 entries; at most 64"),
        ({"addresses": ["198.18.0.300"]}, "addresses[0] '198.18.0.300' is not an IP address"),
        ({"addresses": ["198.18.0.1", 7]}, "addresses[1] must be an IP address"),
    ],
)
def test_junk_in_a_new_field_is_refused_naming_the_field(change: dict[str, Any], words: str) -> None:
    with pytest.raises(RejectedError) as info:
        parse_report(_report(**change))
    assert info.value.code == "invalid_request" and words in info.value.message


def test_the_api_refuses_a_bad_field_with_400_naming_it(fleet: Fleet) -> None:
    host_id, token = fleet.enroll("h")
    bad = _report(addresses=["198.18.0.1", "not-an-address"])
    (answer,) = _post_reports(create_app(fleet.authority), [(token, bad)])
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_request" and "addresses[1]" in answer.json()["message"]
    assert host_id not in fleet.authority.registry.reports()  # refused whole, nothing stored


def test_the_largest_report_stays_bounded() -> None:
    big = _report(
        agent_version="v" * 64,
        reason="r" * 1000,
        probes=[
            {"port": p, "kind": "tcp", "ok": False, "detail": "d" * 300, "since": 1.7e9} for p in range(1, 33)
        ],
        certificate={"serial": "f" * 64, "not_after": 1.9e9, "renewal_error": "e" * 1000},
        listeners={f"listener{i}": "[2001:db8::1]:65535" for i in range(8)},
        last_error="e" * 1000,
        addresses=[f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}" for i in range(64)],
    )
    assert len(parse_report(big).to_json()) < 30_000


# --- the states, from real records ---------------------------------------------------------------


def _states(fleet: Fleet, now: datetime) -> dict[str, str]:
    reports = fleet.authority.registry.reports()
    return {
        h.host_name: stored_fleet_health(h, now, reports).text for h in fleet.authority.registry.list_hosts()
    }


def test_each_state_from_real_records(fleet: Fleet) -> None:
    ids = {
        name: fleet.enroll(name) for name in ("ok", "silent", "never", "notready", "probe", "renewal", "gone")
    }
    now = datetime.now(UTC)
    reports = {
        "ok": _report(),
        "silent": _report(),
        "notready": _report(ready=False, reason="intercept: rules not applied"),
        "probe": _report(
            probes=[
                {"port": 8080, "kind": "http", "ok": False, "detail": "status 503", "since": now.timestamp()}
            ]
        ),
        "renewal": _report(
            certificate={
                "serial": "ab",
                "not_after": 1.9e9,
                "renewal_error": "authority_unreachable: refused",
            }
        ),
        "gone": _report(),
    }
    # The silent host's report is stored as received 4 intervals (of its 30 s) ago.
    for name, doc in reports.items():
        at = now - timedelta(seconds=120) if name == "silent" else now
        fleet.authority.registry.record_report(ids[name][0], parse_report(doc).to_json(), at)
    fleet.authority.registry.revoke(ids["gone"][0], now)

    states = _states(fleet, now)
    assert states["ok"] == "healthy"
    assert states["silent"] == f"silent since {(now - timedelta(seconds=120)).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    assert states["never"] == "silent since enrollment (never reported)"
    assert states["notready"] == "not ready: intercept: rules not applied"
    assert states["probe"] == "not ready: http probe of port 8080 failing"
    assert (
        states["renewal"].startswith("expiring soon (")
        and "renewal failing: authority_unreachable" in states["renewal"]
    )
    assert states["gone"] == "revoked"
    # 3 intervals is the line: a report 89 s old (of 30 s intervals) is not silent yet.
    assert _states(fleet, now - timedelta(seconds=120) + timedelta(seconds=89))["silent"] == "healthy"


def test_a_short_certificate_is_expiring_soon_only_late_in_its_life(tmp_path: Path) -> None:
    """60 s certificates: healthy while an agent would not have renewed yet, expiring soon once
    past 80 % of the lifetime unrenewed, not ready once expired. 24 h ones (the default) are
    not "expiring soon" just for being within 24 h of expiry."""
    short = _fleet(tmp_path / "short", "--cert-lifetime", "60s")
    host_id, _ = short.enroll("short")
    host = short.host(host_id)
    received = datetime.now(UTC)
    short.authority.registry.record_report(host_id, parse_report(_report()).to_json(), received)
    issued_at = host.last_renewal or host.enrolled_at
    assert (host.not_after - issued_at).total_seconds() <= 61
    assert _states(short, issued_at + timedelta(seconds=30))["short"] == "healthy"
    late = _states(short, host.not_after - timedelta(seconds=5))["short"]
    assert late.startswith("expiring soon (") and host.not_after.strftime("%H:%M:%S") in late
    assert _states(short, host.not_after + timedelta(seconds=1))["short"].startswith(
        "not ready: certificate expired at"
    )
    counts = fleet_counts(short.authority.registry.list_hosts(), short.authority.registry.reports(), received)
    assert counts.expiring_24h == 1

    day = _fleet(tmp_path / "day")
    day_host = day.host(day.enroll("day")[0])
    assert not expiring_soon(day_host, received + timedelta(hours=2))
    assert not expiring_soon(day_host, day_host.not_after - timedelta(hours=5))
    assert expiring_soon(day_host, day_host.not_after - timedelta(hours=4))


def test_authority_hosts_shows_the_health_column_and_json_the_whole_record(fleet: Fleet) -> None:
    ok_id, _ = fleet.enroll("ok")
    fleet.enroll("never")
    fleet.authority.registry.record_report(ok_id, parse_report(_report()).to_json(), datetime.now(UTC))
    table = run_cli("authority", "hosts", "--dir", str(fleet.directory), check=True).stdout
    header, *rows = table.splitlines()
    assert "HEALTH" in header
    row = {r.split()[2]: r for r in rows if r.startswith("h-")}
    assert row["ok"].rstrip().endswith("healthy") and "silent since enrollment" in row["never"]
    docs = json.loads(
        run_cli("authority", "hosts", "--dir", str(fleet.directory), "--json", check=True).stdout
    )
    by_name = {d["host_name"]: d for d in docs}
    assert by_name["ok"]["health"]["state"] == "healthy"
    assert by_name["ok"]["report"]["certificate"]["serial"] == SERIAL
    assert by_name["ok"]["report"]["addresses"] == ["198.18.0.10", "2001:db8::7"]
    assert by_name["never"]["health"]["state"] == "silent" and by_name["never"]["report"] is None


# --- /metrics ------------------------------------------------------------------------------------


def _enroll_via_api(app: Any, fleet: Fleet, name: str) -> tuple[str, str]:
    secret = fleet.authority.create_tokens("shop/web", "https://127.0.0.1:1", timedelta(minutes=5))[0].secret
    body = {
        "token_secret": secret,
        "csr": make_csr(generate_key()).decode(),
        "host_name": name,
        "addresses": [],
    }

    async def run() -> httpx.Response:
        async with _http(app) as http:
            return await http.post("/v1/enroll", json=body)

    answer = asyncio.run(run())
    assert answer.status_code == 200, answer.text
    return answer.json()["host_id"], answer.json()["api_token"]


def test_metrics_count_a_fleet_filled_through_the_api(fleet: Fleet) -> None:
    app = create_app(fleet.authority)
    wanted = {"healthy": 3, "not_ready": 2, "silent": 2, "expiring": 1, "revoked": 1}
    tokens = {
        s: [_enroll_via_api(app, fleet, f"{s.replace('_', '-')}-{i}") for i in range(n)]
        for s, n in wanted.items()
    }
    docs = {
        "healthy": _report(),
        "not_ready": _report(ready=False, reason="proxy: listeners not up"),
        "expiring": _report(
            certificate={"serial": "ab", "not_after": 1.9e9, "renewal_error": "clock_skew: 10 min"}
        ),
        "revoked": _report(),
    }
    posts = [(token, docs[s]) for s, hosts in tokens.items() if s in docs for _, token in hosts]
    assert {r.status_code for r in _post_reports(app, posts)} == {204}  # (silent ones never report)
    fleet.authority.registry.revoke(tokens["revoked"][0][0], datetime.now(UTC))

    async def scrape(headers: dict[str, str]) -> httpx.Response:
        async with _http(app) as http:
            return await http.get("/metrics", headers=headers)

    # Protected as /v1/prometheus/targets is: the discovery token (`authority init` makes one).
    anonymous = asyncio.run(scrape({}))
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthenticated")
    path, _ = discovery.ensure_token(fleet.directory)
    assert asyncio.run(scrape({"authorization": "Bearer wrong"})).status_code == 401
    answer = asyncio.run(scrape({"authorization": f"Bearer {path.read_text().strip()}"}))
    assert answer.status_code == 200 and answer.headers["content-type"].startswith(
        "text/plain; version=0.0.4"
    )
    samples = metric_samples(answer.text)
    assert {s: samples[f'meshagent_authority_hosts{{state="{s}"}}'] for s in STATES} == wanted
    # Default 24 h certificates all expire within 24 h; the revoked one is not counted.
    assert samples["meshagent_authority_certificates_expiring_24h"] == sum(wanted.values()) - 1
    assert samples['meshagent_authority_requests_total{path="/v1/host/report",status="204"}'] == len(posts)
    assert samples['meshagent_authority_requests_total{path="/metrics",status="401"}'] == 2
    assert samples['meshagent_authority_requests_total{path="/v1/enroll",status="200"}'] == sum(
        wanted.values()
    )
    assert re.search(r"^# TYPE meshagent_authority_hosts gauge$", answer.text, re.M)
