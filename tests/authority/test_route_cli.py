"""`meshagent authority route apply|list|remove|show` (issue #21) through the real CLI against an
authority directory with enrolled hosts: the whole file stored or nothing (exit 3, every
problem named), upserts, dry runs, what the hosts would be served."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.authority.service import Authority
from agent.authority.storage import Registration
from agent.errors import ExitCode
from agent.identity.certinfo import utcnow
from agent.identity.pki import generate_key, make_csr
from tests.support import MESHAGENT, init_authority, run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "routes"
ROUTES_YAML = FIXTURES / "routes.yaml"

BAD = """\
apiVersion: v1
kind: Foo
metadata: {namespace: shop, name: a}
---
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {namespace: shop, name: b}
spec:
  service: billing
  backends: [{service: billing, weight: 0}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: shop, name: c}
spec:
  parentRefs: [{group: meshagent.io, kind: Host, name: billing, port: 8080}]
  rules:
    - timeouts: {request: -5s}
    - backendRefs: [{name: ghost, port: 8080}]
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An authority with the hosts of fixtures/routes/known.json enrolled (in-process)."""
    directory = tmp_path_factory.mktemp("route-cli") / "authority"
    init_authority(directory)
    auth = Authority.open(directory)
    for host in json.loads((FIXTURES / "known.json").read_text())["hosts"]:
        ports = tuple((n, p, proto) for n, p, proto in host["ports"])
        token = auth.create_tokens(
            host["identity"],
            "https://127.0.0.1:1",
            timedelta(minutes=5),
            registration=Registration(ports=ports),
        )[0]
        auth.enroll(token.secret, make_csr(generate_key()).decode(), host["id"], host["addresses"])
    auth.registry.close()
    return directory


@pytest.fixture
def authority_dir(template: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "authority"
    shutil.copytree(template, directory)
    return directory


def route(directory: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if stdin is None:
        return run_cli("authority", "route", *args, "--dir", str(directory))
    return subprocess.run(
        [*MESHAGENT, "authority", "route", *args, "--dir", str(directory)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def stored(directory: Path) -> list[dict[str, Any]]:
    proc = route(directory, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    docs: list[dict[str, Any]] = json.loads(proc.stdout)
    return docs


def without_created(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The wire items without `created` (objects without a creationTimestamp get apply time)."""
    return [
        {**i, "routes": [{k: v for k, v in r.items() if k != "created"} for r in i["routes"]]} for i in items
    ]


def test_dry_run_prints_the_table_and_stores_nothing(authority_dir: Path) -> None:
    proc = route(authority_dir, "apply", "-f", str(ROUTES_YAML), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "PARENT",
        "PORT",
        "ROUTE",
        "MATCHES",
        "BACKENDS",
        "TIMEOUT",
        "RETRY",
        "SOURCE",
    ]
    row = "Host shop/billing 8080 [default] * billing=90,Service billing-v2=10 3s 1x 502-504"
    row += " TrafficSplit shop/billing-canary"
    assert any(line.split() == row.split(" ") for line in lines), proc.stdout
    assert "would store 2 HTTPRoute, 3 Service, 1 ServiceProfile, 1 TrafficSplit" in proc.stderr
    assert "(resolved by discovery" in proc.stderr
    assert stored(authority_dir) == []


def test_apply_stores_and_serves_what_the_fixture_expects(authority_dir: Path) -> None:
    proc = route(authority_dir, "apply", "-f", str(ROUTES_YAML), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["dry_run"] is False and doc["skipped"] == []
    expected = json.loads((FIXTURES / "expected.json").read_text())
    # The host endpoints come from the real registry rendered as Authority.catalog does.
    assert without_created(doc["routes"]) == without_created(expected)
    kinds = sorted((o["kind"], o["namespace"], o["name"]) for o in stored(authority_dir))
    assert kinds == [
        ("HTTPRoute", "shop", "orders-admin"),
        ("HTTPRoute", "shop", "orders-api"),
        ("Service", "shop", "billing-v2"),
        ("Service", "shop", "orders"),
        ("Service", "shop", "orders-v2"),
        ("ServiceProfile", "shop", "orders.shop.svc.cluster.local"),
        ("TrafficSplit", "shop", "billing-canary"),
    ]
    # Applying again: upsert, same rows, first-apply times kept.
    before = {(o["kind"], o["name"]): o["created_at"] for o in stored(authority_dir)}
    assert route(authority_dir, "apply", "-f", str(ROUTES_YAML)).returncode == 0
    assert {(o["kind"], o["name"]): o["created_at"] for o in stored(authority_dir)} == before
    # show: the wire item the hosts get.
    shown = route(authority_dir, "show", "Host/shop/billing:8080", "--json")
    assert shown.returncode == 0, shown.stderr
    assert without_created(json.loads(shown.stdout)) == [
        i for i in without_created(expected) if i["parent"]["name"] == "billing"
    ]


def test_bad_input_exits_3_naming_each_field_and_stores_nothing(authority_dir: Path) -> None:
    assert route(authority_dir, "apply", "-f", str(ROUTES_YAML)).returncode == 0
    before = stored(authority_dir)
    proc = route(authority_dir, "apply", "-f", "-", stdin=ROUTES_YAML.read_text() + "---\n" + BAD)
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    err = proc.stderr
    assert "error: 3 problem(s); nothing was applied:" in err
    assert 'Foo shop/a: kind "Foo" is not a route object meshagent reads' in err
    assert "TrafficSplit shop/b: spec.backends: every weight is 0: no request could be routed" in err
    assert 'HTTPRoute shop/c: spec.rules[0].timeouts.request "-5s" is not a Gateway API duration' in err
    assert "hint: fix the objects named and apply the whole file again" in err
    assert stored(authority_dir) == before
    # The unknown backend, alone (the bad duration stops that object's checks first).
    ghost = BAD.split("---\n")[2].replace("    - timeouts: {request: -5s}\n", "")
    proc = route(authority_dir, "apply", "-f", "-", stdin=ghost)
    assert proc.returncode == ExitCode.CONFIG
    assert (
        "HTTPRoute shop/c: spec.rules[0].backendRefs[0] Service shop/ghost is not in this file "
        "and no enrolled host has identity shop/ghost" in proc.stderr
    )
    assert stored(authority_dir) == before


def test_bad_input_json_error(authority_dir: Path) -> None:
    proc = route(authority_dir, "apply", "-f", "-", "--json", stdin=BAD)
    assert proc.returncode == ExitCode.CONFIG
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "route_refused" and "spec.backends: every weight is 0" in error["message"]


def test_remove_and_show(authority_dir: Path) -> None:
    assert route(authority_dir, "apply", "-f", str(ROUTES_YAML)).returncode == 0
    proc = route(authority_dir, "remove", "TrafficSplit", "shop/billing-canary")
    assert proc.returncode == 0 and "removed TrafficSplit shop/billing-canary" in proc.stdout
    assert ("TrafficSplit", "billing-canary") not in {(o["kind"], o["name"]) for o in stored(authority_dir)}
    again = route(authority_dir, "remove", "TrafficSplit", "shop/billing-canary")
    assert (
        again.returncode == ExitCode.FAILURE and "no stored TrafficSplit shop/billing-canary" in again.stderr
    )
    gone = route(authority_dir, "show", "Host/shop/billing")
    assert (
        gone.returncode == ExitCode.FAILURE
        and "no route policy is served for Host/shop/billing" in gone.stderr
    )
    table = route(authority_dir, "show", "shop/orders")
    assert table.returncode == 0, table.stderr
    assert "Service shop/orders-v2: (resolved by discovery)" in table.stdout
    assert "shop/orders-api" in table.stdout and "shop/orders-admin" in table.stdout


def test_a_revoked_host_leaves_only_its_routes_out(authority_dir: Path) -> None:
    assert route(authority_dir, "apply", "-f", str(ROUTES_YAML)).returncode == 0
    auth = Authority.open(authority_dir)
    auth.registry.revoke("h-orders-vm", utcnow(), "test")
    auth.registry.close()
    proc = route(authority_dir, "show", "Service/shop/orders:8080", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["name"] for r in json.loads(proc.stdout)[0]["routes"]] == ["orders-admin"]
    assert "warning: stored object not served: HTTPRoute shop/orders-api" in proc.stderr
    # The rest of the file still applies; a route to the revoked identity is refused.
    proc = route(authority_dir, "apply", "-f", str(ROUTES_YAML))
    assert proc.returncode == ExitCode.CONFIG
    assert "Host shop/orders-vm: no enrolled host has identity shop/orders-vm" in proc.stderr


def test_help_teaches() -> None:
    proc = run_cli("authority", "route", "apply", "--help")
    assert proc.returncode == 0
    for text in ("Worked example", "kind: TrafficSplit", "--dry-run", "kubectl get svc", "exit 3"):
        assert text in proc.stdout, text
    group = run_cli("authority", "route", "--help").stdout
    for text in (
        "apply",
        "list",
        "remove",
        "show",
        "meshagent authority route apply --dir DIR -f routes.yaml",
    ):
        assert text in group, text
