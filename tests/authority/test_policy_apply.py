"""`meshagent authority policy apply -f FILE` (issue #17): Linkerd/SMI policy objects applied to
the enrolled hosts through the real CLI, read back with `policy list` and as the hosts are
served it (/v1/host/config). The mapping itself is tested in test_kube_policy.py."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.authority.kube_policy import MAX_BYTES
from agent.authority.service import Authority
from agent.authority.storage import PolicyRecord
from agent.authority.tokens import parse_token
from agent.errors import ExitCode, RejectedError
from agent.identity.client import AuthorityClient
from agent.identity.pki import generate_key, make_csr
from agent.identity.store import IdentityStore
from tests.support import MESHAGENT, AuthorityProcess, cli_json, run_cli, running_authority

FIXTURES = Path(__file__).parent / "policy_fixtures"
BILLING_YAML = FIXTURES / "linkerd_billing.yaml"
S = "spiffe://cluster.local"

# linkerd_billing.yaml on a host labelled app=billing with ports http=8080, metrics=9100
# (the expectations of test_kube_policy.py's "billing" case), then shop/ledger (app=ledger):
# only the 5432 Server's matchExpressions select it.
BILLING_RECORDS = [
    {"identity": "shop/billing", "port": 0, "default_policy": "all-unauthenticated", "allow": []},
    {"identity": "shop/billing", "port": 5432, "default_policy": "all-authenticated", "allow": []},
    {
        "identity": "shop/billing",
        "port": 8080,
        "default_policy": "deny",
        "allow": [f"{S}/ns/shop/sa/web", f"{S}/ns/checkout/sa/*"],
    },
    {
        "identity": "shop/billing",
        "port": 9100,
        "default_policy": "audit",
        "allow": [f"{S}/ns/monitoring/sa/prometheus"],
    },
    {"identity": "shop/ledger", "port": 0, "default_policy": "all-unauthenticated", "allow": []},
    {"identity": "shop/ledger", "port": 5432, "default_policy": "all-authenticated", "allow": []},
]


@dataclass
class Fleet:
    auth: AuthorityProcess
    billing: IdentityStore  # one of the two hosts enrolled as shop/billing
    pristine: Path  # a copy of the authority directory as enrolled, before any policy


def _token(auth: AuthorityProcess, identity: str, *extra: str) -> str:
    proc = run_cli(
        "authority", "token", "create", "--dir", str(auth.directory), "--identity", identity,
        "--url", auth.url, *extra, check=True,
    )  # fmt: skip
    return proc.stdout.strip()


def _copy_authority(src: Path, dst: Path) -> None:
    """The directory, its registry copied with SQLite's backup (the server may hold it open)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("registry.db*"))
    with sqlite3.connect(src / "registry.db") as a, sqlite3.connect(dst / "registry.db") as b:
        a.backup(b)
    a.close()
    b.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two hosts as shop/billing (app=billing, http=8080, metrics=9100), one as shop/ledger
    (app=ledger) enrolled without an address (no ExternalWorkload: its labels still count),
    and a revoked shop/other (app=billing) that gets nothing."""
    base = tmp_path_factory.mktemp("policy-apply")
    with running_authority(base / "authority") as auth:
        billing = ("--label", "app=billing", "--port", "http=8080", "--port", "metrics=9100")
        for i in (1, 2):
            tok = _token(auth, "shop/billing", *billing)
            run_cli(
                "enroll", tok, "--state-dir", str(base / f"b{i}"), "--host-name", f"billing-{i}",
                "--address", f"198.18.0.1{i}", check=True,
            )  # fmt: skip
        secret = parse_token(_token(auth, "shop/ledger", "--label", "app=ledger")).secret
        r = httpx.post(
            f"{auth.url}/v1/enroll",
            verify=auth.tls,
            json={"token_secret": secret, "csr": make_csr(generate_key()).decode(), "host_name": "ledger",
                  "addresses": []},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        tok = _token(auth, "shop/other", *billing)
        run_cli(
            "enroll",
            tok,
            "--state-dir",
            str(base / "o"),
            "--host-name",
            "other",
            "--address",
            "198.18.0.20",
            check=True,
        )
        run_cli("authority", "revoke", "other", "--dir", str(auth.directory), check=True)
        pristine = base / "pristine"
        _copy_authority(auth.directory, pristine)
        yield Fleet(auth, IdentityStore(base / "b1"), pristine)


@pytest.fixture
def authority_dir(fleet: Fleet, tmp_path: Path) -> Path:
    """A private copy of the enrolled fleet's authority: tests that write do not meet."""
    d = tmp_path / "authority"
    _copy_authority(fleet.pristine, d)
    return d


def apply(directory: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*MESHAGENT, "authority", "policy", "apply", "--dir", str(directory), *args],
        capture_output=True,
        input=stdin,
        timeout=60,
    )


def policies(directory: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = cli_json("authority", "policy", "list", "--dir", str(directory))
    return docs


def test_apply_stores_every_hosts_records_and_the_hosts_are_served_them(fleet: Fleet) -> None:
    d = fleet.auth.directory
    proc = apply(d, "-f", str(BILLING_YAML), "--default", "all-unauthenticated", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    shown = json.loads(proc.stdout)
    assert [{k: v for k, v in doc.items() if k != "source"} for doc in shown] == BILLING_RECORDS
    sources = {(doc["identity"], doc["port"]): doc["source"] for doc in shown}
    assert sources[("shop/billing", 8080)] == "Server shop/billing-http"
    assert sources[("shop/billing", 0)] == "cluster default"
    assert policies(d) == BILLING_RECORDS  # the revoked shop/other got nothing

    # What the enrolled host is served, from the running authority (no restart).
    with AuthorityClient(fleet.billing.load_authority()) as client:
        served = client.host_config(fleet.billing.api_token())["policy"]
    assert served == {
        "default": {"default": "all-unauthenticated", "allow": []},
        "ports": {
            "5432": {"default": "all-authenticated", "allow": []},
            "8080": {"default": "deny", "allow": [f"{S}/ns/shop/sa/web", f"{S}/ns/checkout/sa/*"]},
            "9100": {"default": "audit", "allow": [f"{S}/ns/monitoring/sa/prometheus"]},
        },
    }


def test_the_table_dry_run_and_no_default(authority_dir: Path) -> None:
    proc = apply(authority_dir, "-f", str(BILLING_YAML), "--dry-run")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert out.split("\n")[0].split() == ["IDENTITY", "PORT", "DEFAULT", "ALLOW", "SOURCE"]
    assert "Server shop/billing-metrics" in out and "default" not in out.split("\n", 1)[1].split()
    assert "would store 4 record(s) for 3 host(s)" in proc.stderr.decode()
    assert policies(authority_dir) == []
    # Without --default no port-0 record: the hosts keep their own default.
    proc = apply(authority_dir, "-f", str(BILLING_YAML), "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert policies(authority_dir) == [r for r in BILLING_RECORDS if r["port"]]


def test_apply_adds_and_replaces_but_never_removes(authority_dir: Path) -> None:
    d = str(authority_dir)
    run_cli("authority", "policy", "set", "--dir", d, "--identity", "shop/billing", "--port", "22",
            "--default", "deny", check=True)  # fmt: skip
    run_cli("authority", "policy", "set", "--dir", d, "--identity", "shop/billing", "--port", "8080",
            "--default", "all-unauthenticated", check=True)  # fmt: skip
    assert apply(authority_dir, "-f", str(BILLING_YAML)).returncode == 0
    got = {(r["identity"], r["port"]): r["default_policy"] for r in policies(authority_dir)}
    assert got[("shop/billing", 22)] == "deny"  # kept
    assert got[("shop/billing", 8080)] == "deny"  # replaced by the Server's


def test_the_help_example_does_what_it_says(authority_dir: Path) -> None:
    from agent.cli.authority import policy_apply_cmd

    doc = policy_apply_cmd.help or ""
    yaml_lines = doc.split("policy.yaml holding\n", 1)[1].split("\x08", 1)[0]
    text = textwrap.dedent(yaml_lines)
    proc = apply(authority_dir, "-f", "-", "--default", "all-authenticated", "--json", stdin=text.encode())
    assert proc.returncode == 0, proc.stderr.decode()
    billing = [
        (r["port"], r["default_policy"], r["allow"])
        for r in policies(authority_dir)
        if r["identity"] == "shop/billing"
    ]
    assert billing == [(0, "all-authenticated", []), (8080, "deny", [f"{S}/ns/shop/sa/web"])]
    assert "stores shop/billing port 8080: deny, allow spiffe://cluster.local/ns/shop/sa/web" in " ".join(
        doc.split()
    )


def test_a_refused_file_lists_the_field_and_stores_nothing(authority_dir: Path) -> None:
    bad = (
        BILLING_YAML.read_text()
        + """---
apiVersion: policy.linkerd.io/v1alpha1
kind: NetworkAuthentication
metadata: {namespace: shop, name: office}
spec:
  networks: [{cidr: 10.1.0.0/16}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: shop, name: office-db}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: billing-db}
  requiredAuthenticationRefs:
    - {group: policy.linkerd.io, kind: NetworkAuthentication, name: office}
"""
    )
    proc = apply(authority_dir, "-f", "-", "--default", "deny", stdin=bad.encode())
    assert proc.returncode == ExitCode.CONFIG, proc.stderr.decode()
    err = proc.stderr.decode()
    assert err.startswith("error: 1 problem(s); nothing was applied:\n")  # one problem a line
    assert (
        'AuthorizationPolicy shop/office-db: spec.requiredAuthenticationRefs[0].kind "NetworkAuthentication"'
        in err
    )
    assert policies(authority_dir) == []


def test_an_oversized_file_is_refused_before_parsing(authority_dir: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * MAX_BYTES + b"\n")
    for args, stdin in (([str(big)], None), (["-"], big.read_bytes())):
        proc = apply(authority_dir, "-f", *args, stdin=stdin)
        assert proc.returncode == ExitCode.CONFIG
        assert f"larger than {MAX_BYTES} bytes" in proc.stderr.decode()
    assert policies(authority_dir) == []


def test_policy_set_accepts_audit(authority_dir: Path) -> None:
    doc = cli_json(
        "authority", "policy", "set", "--dir", str(authority_dir), "--identity", "shop/billing",
        "--default", "audit", "--allow", f"{S}/ns/shop/*",
    )  # fmt: skip
    assert doc == {
        "identity": "shop/billing",
        "port": 0,
        "default_policy": "audit",
        "allow": [f"{S}/ns/shop/*"],
    }
    assert policies(authority_dir) == [doc]


def test_set_policies_stores_all_or_nothing(authority_dir: Path) -> None:
    auth = Authority.open(authority_dir)
    good = PolicyRecord("shop/billing", 8080, "deny", (f"{S}/ns/shop/sa/web",))
    with pytest.raises(RejectedError, match="is not a SPIFFE ID or glob"):
        auth.set_policies([good, PolicyRecord("shop/billing", 9100, "deny", ("spiffe://a b",))])
    assert auth.registry.policies() == []
    # A failure inside the transaction (here: a constraint) rolls back the records before it.
    with pytest.raises(sqlite3.IntegrityError):
        auth.registry.set_policies([good, PolicyRecord("shop/billing", 1, None, ())])  # type: ignore[arg-type]
    assert auth.registry.policies() == []
    assert auth.set_policies([good]) == [good] and auth.registry.policies() == [good]
