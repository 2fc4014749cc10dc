"""`meshagent authority host set`, `token create`'s metadata flags, `hosts --json` and `changes`
as an operator runs them (real processes on a real authority directory)."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.authority.service import Authority
from agent.identity.pki import generate_key, make_csr
from tests.support import MESHAGENT, free_port, init_authority, run_cli

EVIL = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An authority with one host, enrolled with a token that carried metadata: (dir, host id)."""
    directory = tmp_path_factory.mktemp("meta") / "authority"
    init_authority(directory)
    proc = run_cli(
        "authority", "token", "create", "--dir", str(directory), "--identity", "shop/web",
        "--url", "https://127.0.0.1:8443", "--owner-team", "payments", "--tier", "1",
        "--slo", "availability=99.9", "--link", "runbook=https://wiki.example/web", "--json",
        check=True,
    )  # fmt: skip
    created = json.loads(proc.stdout)
    assert created["meta"]["owner_team"] == "payments" and created["meta"]["slos"][0]["objective"] == 99.9
    authority = Authority.open(directory)
    token = created["tokens"][0]["token"].rsplit(".", 1)[1]
    host = authority.enroll(token, make_csr(generate_key()).decode(), "web-1", ["198.18.0.1"]).host
    authority.registry.close()
    return directory, host.id


def cli(fleet: tuple[Path, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("authority", *args, "--dir", str(fleet[0]))


def test_set_then_hosts_json_shows_it_html_as_text(fleet: tuple[Path, str]) -> None:
    _, host_id = fleet
    [listed] = json.loads(cli(fleet, "hosts", "--json").stdout)
    assert listed["meta"]["owner_team"] == "payments"  # from the token, at enrollment
    proc = cli(
        fleet, "host", "set", "web-1", "--owner-contact", "#payments", "--description", EVIL,
        "--slo", "latency=99:300ms,port=8080", "--link", "repo=https://git.example/web", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)["meta"]
    assert json.loads(proc.stdout)["changed"] is True
    assert meta["description"] == EVIL and meta["owner_team"] == "payments"  # kept: not given
    assert [s["name"] for s in meta["slos"]] == ["availability", "latency"]
    assert [link["title"] for link in meta["links"]] == ["runbook", "repo"]
    [listed] = json.loads(cli(fleet, "hosts", "--json").stdout)
    assert listed["id"] == host_id and listed["meta"] == meta
    text = cli(
        fleet, "host", "set", host_id, "--clear-slos", "--slo", "availability=99.5", "--link", "runbook="
    )
    assert text.returncode == 0, text.stderr
    same = cli(fleet, "host", "set", host_id, "--slo", "availability=99.5", "--json")
    assert json.loads(same.stdout)["changed"] is False
    assert text.stdout.rstrip().endswith("SLOs availability=99.5") and "links repo;" in text.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--slo", "availability=100"], "--slo.objective: must be between 50 and 100 (exclusive), got 100"),
        (["--slo", "latency=99:250ms"], "--slo.threshold_ms: 250 ms is not a bucket bound"),
        (
            ["--link", "runbook=javascript:alert(1)"],
            "--link runbook: 'javascript:alert(1)' is not an absolute",
        ),
        (["--owner-team", "x" * 201], "owner_team: is 201 characters long, at most 200 allowed"),
        (["--owner-team", "a\x1b[31mb"], "owner_team: holds a control character"),
    ],
)
def test_bad_input_is_refused_naming_the_field(fleet: tuple[Path, str], args: list[str], words: str) -> None:
    proc = cli(fleet, "host", "set", "web-1", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert words in proc.stderr and "hint:" in proc.stderr


def test_a_bad_file_is_refused_naming_its_field(fleet: tuple[Path, str], tmp_path: Path) -> None:
    bad = tmp_path / "meta.yaml"
    bad.write_text(
        "owner_team: ledger\nslos:\n  - availability=99.9\n"
        "  - {kind: availability, objective: 100, name: b}\n"
    )
    before = json.loads(cli(fleet, "hosts", "--json").stdout)[0]["meta"]
    proc = cli(fleet, "host", "set", "web-1", "--from-file", str(bad), "--owner-team", "other", "--json")
    assert proc.returncode == 2
    assert json.loads(cli(fleet, "hosts", "--json").stdout)[0]["meta"] == before  # nothing stored
    assert json.loads(proc.stdout)["error"]["message"] == (
        "slos[1].objective: must be between 50 and 100 (exclusive), got 100"
    )
    good = tmp_path / "meta.json"
    good.write_text(
        json.dumps({"system": "billing", "links": {"dashboard": "https://grafana.example/d/web"}})
    )
    proc = cli(fleet, "host", "set", "web-1", "--from-file", str(good), "--json")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)["meta"]
    assert meta["system"] == "billing" and meta["links"] == [
        {"title": "dashboard", "url": "https://grafana.example/d/web"}
    ]
    assert cli(fleet, "host", "set", "web-1").returncode == 2  # nothing to set: usage


def test_changes_newest_first_with_actors(fleet: tuple[Path, str]) -> None:
    _, host_id = fleet
    assert cli(fleet, "host", "set", "web-1", "--tier", "critical").returncode == 0
    assert cli(fleet, "revoke", host_id).returncode == 0
    events = json.loads(cli(fleet, "changes", host_id, "--json").stdout)
    me = f"cli:{getpass.getuser()}"
    assert [(e["kind"], e["actor"]) for e in events[:2]] == [("revoked", me), ("metadata_changed", me)]
    assert "tier: '1' -> 'critical'" in events[1]["detail"]
    assert events[-1]["kind"] == "enrolled" and events[-1]["actor"].startswith("token:")
    assert all(e["host_name"] == "web-1" for e in events)
    times = [e["at"] for e in events]
    assert times == sorted(times, reverse=True)
    assert len(json.loads(cli(fleet, "changes", "--limit", "2", "--json").stdout)) == 2
    table = cli(fleet, "changes", "--limit", "1").stdout.splitlines()
    assert table[0].split() == ["TIME", "HOST", "KIND", "DETAIL", "ACTOR"] and "revoked" in table[1]
    unknown = cli(fleet, "changes", "nobody")
    assert unknown.returncode != 0 and "no enrolled host" in unknown.stderr


def test_serve_records_its_prometheus(tmp_path: Path) -> None:
    directory = tmp_path / "authority"
    init_authority(directory)
    bad = run_cli("authority", "serve", "--dir", str(directory), "--prometheus", "ftp://x")
    assert bad.returncode != 0 and not (directory / "prometheus.url").exists()
    proc = subprocess.Popen(
        [*MESHAGENT, "authority", "serve", "--dir", str(directory), "--listen", f"127.0.0.1:{free_port()}",
         "--prometheus", "http://127.0.0.1:9090"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "MESHAGENT_PROMETHEUS_URL"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (directory / "prometheus.url").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert (directory / "prometheus.url").read_text().strip() == "http://127.0.0.1:9090"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def test_token_metadata_refused_before_any_token_is_made(tmp_path: Path) -> None:
    directory = tmp_path / "authority"
    init_authority(directory)
    proc = run_cli(
        "authority", "token", "create", "--dir", str(directory), "--identity", "shop/web",
        "--url", "https://127.0.0.1:8443", "--slo", "availability=99.9,window=365d",
    )  # fmt: skip
    assert proc.returncode == 2 and "--slo.window_days: must be between 1 and 90 days, got 365" in proc.stderr
    assert json.loads(run_cli("authority", "token", "list", "--dir", str(directory), "--json").stdout) == []
