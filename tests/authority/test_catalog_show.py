"""`meshagent authority catalog show`: the fleet list and the host card, from a real registry,
without Prometheus (the registry's facts) and with an unreachable one (said, not hidden)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from agent.authority.host_meta import HostMeta, parse_meta
from agent.authority.prom_query import PROMETHEUS_ENV
from agent.authority.service import Authority
from agent.identity.pki import generate_key, make_csr
from tests.support import free_port, init_authority, run_cli

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = '"><img src=x onerror=alert(2)>'

WEB_META = {
    "owner_team": "team-web",
    "owner_contact": "web-oncall@example.com",
    "description": "The shop's storefront",
    "system": "shop",
    "tier": "1",
    "links": [{"title": "runbook", "url": "https://runbooks.example.com/web"}],
    "slos": [{"name": "availability", "kind": "availability", "objective": 99.9}],
}
DB_META = {
    "owner_team": XSS_IMG,
    "owner_contact": XSS_IMG,
    "description": f"orders database {XSS_SCRIPT}",
    "system": "shop",
    "tier": "2",
    "links": [{"title": XSS_SCRIPT, "url": "https://example.com/?q=%22%3E%3Cscript%3E"}],
    "slos": [{"name": "availability", "kind": "availability", "objective": 99.0}],
}


@dataclass
class Fleet:
    directory: Path
    ids: dict[str, str]  # host name -> id
    identities: dict[str, str]  # host name -> mesh DNS identity


def enroll(authority: Authority, identity: str, name: str, addresses: list[str]) -> str:
    secret = authority.create_tokens(identity, "https://127.0.0.1:1", timedelta(minutes=5))[0].secret
    return authority.enroll(secret, make_csr(generate_key()).decode(), name, addresses).host.id


def make_fleet(directory: Path, addresses: dict[str, str] | None = None) -> Fleet:
    """An initialized authority with a discovery token and three hosts: web-1 (full metadata and
    an SLO), db-1 (metadata full of HTML) and legacy (none), plus old-1 revoked."""
    init_authority(directory)
    run_cli("authority", "prometheus-token", "--dir", str(directory), check=True)
    addresses = addresses or {}
    authority = Authority.open(directory)
    ids, identities = {}, {}
    for name, identity in (
        ("web-1", "shop/web"),
        ("db-1", "shop/db"),
        ("legacy", "ops/legacy"),
        ("old-1", "ops/old"),
    ):
        ids[name] = enroll(authority, identity, name, [addresses.get(name, "198.18.0.10")])
        identities[name] = authority.identity(identity).dns_name
    authority.registry.set_host_meta(ids["web-1"], parse_meta(WEB_META), "cli:test")
    authority.registry.set_host_meta(ids["db-1"], parse_meta(DB_META), "cli:test")
    authority.registry.revoke(ids["old-1"], authority.clock())
    authority.registry.close()
    return Fleet(directory, ids, identities)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return make_fleet(tmp_path_factory.mktemp("catalog") / "authority")


@pytest.fixture(autouse=True)
def _no_prometheus_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(PROMETHEUS_ENV, raising=False)
    yield


def show(fleet: Fleet, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != PROMETHEUS_ENV}
    proc = run_cli("authority", "catalog", "show", "--dir", str(fleet.directory), *args, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def show_json(fleet: Fleet, *args: str) -> dict[str, object]:
    code, out, err = show(fleet, *args, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


def test_fleet_without_prometheus_lists_what_the_registry_knows(fleet: Fleet) -> None:
    doc = show_json(fleet)
    rows = {r["host"]["host_name"]: r for r in doc["hosts"]}  # type: ignore[union-attr, index]
    assert set(rows) == {"web-1", "db-1", "legacy", "old-1"}
    web = rows["web-1"]
    assert (web["owner_team"], web["tier"], web["state"]) == ("team-web", "1", "silent")
    assert web["slo_status"] == "unknown" and web["budget_remaining"] is None  # an SLO, no Prometheus
    assert rows["legacy"]["slo_status"] == "none" and rows["legacy"]["owner_team"] == ""
    assert rows["old-1"]["state"] == "revoked"
    assert web["last_change"]["kind"] == "metadata_changed"
    assert rows["legacy"]["last_change"]["kind"] == "enrolled"
    assert rows["old-1"]["last_change"]["kind"] == "revoked"
    assert "no Prometheus configured" in str(doc["prometheus_error"])
    assert doc["edges"] == []
    # The graph's nodes: every unrevoked host's identity, with its host.
    nodes = {n["identity"]: n["hosts"] for n in doc["nodes"]}  # type: ignore[union-attr, index]
    assert nodes == {fleet.identities[n]: [fleet.ids[n]] for n in ("web-1", "db-1", "legacy")}

    code, out, _ = show(fleet)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "HOST",
        "ID",
        "OWNER",
        "TIER",
        "STATE",
        "SLO",
        "BUDGET",
        "LEFT",
        "LAST",
        "CHANGE",
    ]
    web_line = next(line for line in lines if line.startswith("web-1 "))
    assert web_line.split()[1:6] == [fleet.ids["web-1"], "team-web", "1", "silent", "unknown"]
    assert "metadata_changed" in web_line
    assert "edges and budgets unavailable: no Prometheus configured" in out


def test_the_card_shows_owner_links_slos_and_changes(fleet: Fleet) -> None:
    doc = show_json(fleet, "web-1")
    assert doc["host"]["id"] == fleet.ids["web-1"]  # type: ignore[index]
    assert doc["host"]["identity"] == fleet.identities["web-1"]  # type: ignore[index]
    assert doc["meta"] == HostMeta.to_doc(parse_meta(WEB_META))
    assert [c["kind"] for c in doc["changes"]] == ["metadata_changed", "enrolled"]  # type: ignore[union-attr]
    assert doc["budgets"] == [] and doc["edges_in"] == [] and doc["edges_out"] == []

    code, out, _ = show(fleet, fleet.ids["web-1"])
    assert code == 0
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for expected in (
        "owner team-web",
        "contact web-oncall@example.com",
        "link runbook https://runbooks.example.com/web",
        "state silent since enrollment (never reported)",
        "availability: availability 99.9% over 28d (inbound): budget unknown",
    ):
        assert expected in lines, (expected, out)
    assert any(line.startswith("edges and budgets unavailable: no Prometheus configured") for line in lines)
    changes = lines[lines.index("recent changes:") + 1 :]
    assert [line.split()[2] for line in changes] == ["metadata_changed", "enrolled"]
    # By its name too (unique among unrevoked hosts), the same card.
    assert show_json(fleet, "web-1") == show_json(fleet, fleet.ids["web-1"])


def test_html_in_metadata_is_printed_as_the_text_it_is(fleet: Fleet) -> None:
    code, out, _ = show(fleet, "db-1")
    assert code == 0
    assert f"owner {XSS_IMG}" in [" ".join(line.split()) for line in out.splitlines()]
    assert f"orders database {XSS_SCRIPT}" in out
    assert show_json(fleet, "db-1")["meta"]["owner_team"] == XSS_IMG  # type: ignore[index]


def test_prometheus_unreachable_is_said_and_the_registry_still_shown(fleet: Fleet) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    doc = show_json(fleet, "web-1", "--prometheus", dead)
    error = str(doc["prometheus_error"])
    assert error.startswith(f"Prometheus at {dead}") and "did not answer" in error
    assert doc["meta"]["owner_team"] == "team-web"  # type: ignore[index]
    assert doc["budgets"] == [] and doc["changes"]

    fleet_doc = show_json(fleet, "--prometheus", dead)
    assert "did not answer" in str(fleet_doc["prometheus_error"])
    assert len(fleet_doc["hosts"]) == 4  # type: ignore[arg-type]

    code, out, _ = show(fleet, "--prometheus", dead)
    assert code == 0 and f"edges and budgets unavailable: Prometheus at {dead}" in out


def test_an_unknown_host_is_refused_with_a_hint(fleet: Fleet) -> None:
    code, out, err = show(fleet, "nope", "--json")
    assert code != 0
    error = json.loads(out)["error"]
    assert error["code"] == "not_found"
    assert "no enrolled host with id or name 'nope'" in error["message"]
    code, _, err = show(fleet, "nope")
    assert code != 0 and "no enrolled host with id or name 'nope'" in err
