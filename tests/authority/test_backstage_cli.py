"""`meshagent authority backstage export` as a real process, on a real registry (hosts enrolled
in-process, metadata set through the registry), without Prometheus and with a dead one.
dependsOn from a real Prometheus: tests/authority/test_backstage_prometheus.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.authority.host_meta import parse_meta
from agent.authority.prom_query import PROMETHEUS_ENV
from agent.authority.service import Authority
from agent.identity.pki import generate_key, make_csr
from tests.authority.test_backstage import assert_backstage_valid, assert_location_valid
from tests.support import free_port, init_authority, run_cli

SCRIPT = '<script>alert("x")</script>'
META = {
    "owner_team": "Team A",
    "owner_contact": "team-a@example.com",
    "description": f"billing database {SCRIPT}",
    "system": "payments",
    "tier": "1",
    "links": [
        {"title": "runbook", "url": "https://runbooks.example.com/db"},
        {"title": "repository", "url": "https://git.example.com/db"},
        {"title": "dashboard", "url": "https://grafana.example.com/d/db"},
    ],
}


@dataclass
class Fleet:
    directory: Path
    ids: dict[str, str]


def _enroll(authority: Authority, identity: str, name: str) -> str:
    secret = authority.create_tokens(identity, "https://127.0.0.1:1", timedelta(minutes=5))[0].secret
    return authority.enroll(secret, make_csr(generate_key()).decode(), name, ["198.18.0.10"]).host.id


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """legacy-db-1 (full metadata), "LEGACY-DB-1" (enrolled later: its name collides), bare (no
    metadata), old (revoked)."""
    directory = tmp_path_factory.mktemp("backstage") / "authority"
    init_authority(directory)
    authority = Authority.open(directory)
    ids = {}
    for name, identity in (
        ("legacy-db-1", "shop/billing"),
        ("LEGACY-DB-1", "shop/billing"),
        ("bare", "ops/bare"),
        ("old", "ops/old"),
    ):
        ids[name] = _enroll(authority, identity, name)
    authority.registry.set_host_meta(ids["legacy-db-1"], parse_meta(META), "cli:test")
    authority.registry.revoke(ids["old"], authority.clock())
    authority.registry.close()
    return Fleet(directory, ids)


@pytest.fixture(autouse=True)
def _no_prometheus_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(PROMETHEUS_ENV, raising=False)
    yield


def export(fleet: Fleet, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if k != PROMETHEUS_ENV}
    return run_cli("authority", "backstage", "export", "--dir", str(fleet.directory), *args, env=env)


def test_stream_to_stdout_without_prometheus(fleet: Fleet) -> None:
    proc = export(fleet)
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    names = [d["metadata"]["name"] for d in docs]
    suffix = fleet.ids["LEGACY-DB-1"].removeprefix("h-")[:6]
    assert names == ["bare", "legacy-db-1", f"legacy-db-1-{suffix}"]  # sorted; revoked left out
    for doc in docs:
        assert_backstage_valid(doc)
        assert "dependsOn" not in doc["spec"]
    db = docs[1]
    assert db["metadata"]["description"] == f"billing database {SCRIPT}"  # a string, as given
    assert db["spec"] == {
        "type": "service",
        "lifecycle": "production",
        "owner": "group:default/team-a",
        "system": "system:default/payments",
    }
    assert [link["title"] for link in db["metadata"]["links"]] == ["dashboard", "repository", "runbook"]
    annotations = db["metadata"]["annotations"]
    assert annotations["meshagent.io/host-id"] == fleet.ids["legacy-db-1"]
    assert annotations["meshagent.io/identity"] == "shop/billing"
    assert annotations["meshagent.io/spiffe-id"] == "spiffe://cluster.local/ns/shop/sa/billing"
    assert docs[2]["metadata"]["title"] == "LEGACY-DB-1"
    assert docs[0]["spec"]["owner"] == "unknown"
    # Said on stderr: why there is no dependsOn, which hosts have no owner, what was left out.
    assert "dependsOn left out: no Prometheus" in proc.stderr, proc.stderr
    assert f"warning: bare ({fleet.ids['bare']}): no owner team" in proc.stderr
    assert "3 components (1 revoked hosts left out)" in proc.stderr


def test_output_dir_writes_one_file_per_host_then_only_changes(fleet: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "catalog"
    proc = export(fleet, "--output-dir", str(out), "--json", "--lifecycle", "experimental")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    paths = sorted(c["path"] for c in report["components"])
    assert sorted(report["written"]) == sorted([*paths, "catalog-info.yaml"]) and len(paths) == 3
    assert report["unchanged"] == []
    # The directory's own catalog-info.yaml: the Location to register once in Backstage.
    location = yaml.safe_load((out / "catalog-info.yaml").read_text())
    assert_location_valid(location)
    assert location["spec"]["targets"] == sorted(f"./{p}" for p in paths)
    assert report["skipped"] == [{"host_id": fleet.ids["old"], "reason": "revoked"}]
    assert report["depends_on"].startswith("omitted: no Prometheus")
    for rel in paths:
        doc = yaml.safe_load((out / rel).read_text())
        assert_backstage_valid(doc)
        assert doc["spec"]["lifecycle"] == "experimental"
        assert rel == f"{doc['metadata']['name']}/catalog-info.yaml"
    # no temp files left
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.split("/")[0] for p in paths), "catalog-info.yaml"]
    )

    # Again: nothing rewritten. A stray earlier export of a gone host is reported, then pruned;
    # a file this export did not write is never touched.
    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in paths}
    (out / "gone").mkdir()
    (out / "gone" / "catalog-info.yaml").write_text((out / paths[0]).read_text())
    (out / "theirs").mkdir()
    (out / "theirs" / "catalog-info.yaml").write_text("apiVersion: backstage.io/v1alpha1\nkind: Component\n")
    report = json.loads(
        export(fleet, "--output-dir", str(out), "--json", "--lifecycle", "experimental").stdout
    )
    assert report["written"] == [] and sorted(report["unchanged"]) == sorted([*paths, "catalog-info.yaml"])
    assert report["stale"] == ["gone/catalog-info.yaml"] and report["pruned"] == []
    assert {rel: (out / rel).stat().st_mtime_ns for rel in paths} == mtimes
    proc = export(fleet, "--output-dir", str(out), "--lifecycle", "experimental", "--prune")
    assert proc.returncode == 0, proc.stderr
    assert "pruned gone/catalog-info.yaml" in proc.stdout
    assert not (out / "gone").exists() and (out / "theirs" / "catalog-info.yaml").exists()
    # A different lifecycle changes every file.
    proc = export(fleet, "--output-dir", str(out))
    assert proc.returncode == 0
    assert proc.stdout.count("wrote ") == 3 and "3 files written, 1 unchanged" in proc.stdout


def test_output_file_is_the_same_stream(fleet: Fleet, tmp_path: Path) -> None:
    target = tmp_path / "all.yaml"
    proc = export(fleet, "--output", str(target), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"] == str(target)
    assert target.read_text() == export(fleet).stdout


def test_unreachable_prometheus_exports_without_depends_on_unless_required(
    fleet: Fleet, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = export(fleet, "--prometheus", dead)
    assert proc.returncode == 0, proc.stderr
    assert "dependsOn left out" in proc.stderr and "did not answer" in proc.stderr, proc.stderr
    assert all("dependsOn" not in d["spec"] for d in yaml.safe_load_all(proc.stdout))

    out = tmp_path / "catalog"
    proc = export(fleet, "--prometheus", dead, "--require-edges", "--output-dir", str(out))
    assert proc.returncode == 5, proc.stderr
    assert "dependsOn needs Prometheus" in proc.stderr
    assert not out.exists()
    proc = export(fleet, "--require-edges")
    assert proc.returncode == 5 and "no Prometheus" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json"], "--json reports what was written"),
        (["--output", "-", "--output-dir", "x"], "not both"),
        (["--prune"], "--prune needs --output-dir"),
        (["--lifecycle", "in production"], "--lifecycle"),
        # the catalog URL lands in every Component's links (review L5)
        (["--catalog-url", "javascript:alert(1)//"], "--catalog-url"),
        (["--catalog-url", "authority.example:8443"], "--catalog-url"),
        (["--catalog-url", "https://authority.example/?next=//evil.example"], "--catalog-url"),
        (["--catalog-url", "https://user:pw@authority.example"], "--catalog-url"),
        (["--catalog-url", "https://authority.example/#x"], "--catalog-url"),
        (["--catalog-url", "https://authority.example:99999"], "--catalog-url"),
    ],
)
def test_usage_errors(fleet: Fleet, args: list[str], message: str) -> None:
    proc = export(fleet, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
