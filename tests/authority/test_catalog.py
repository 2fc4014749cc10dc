"""Catalog and policy served to enrolled hosts, authenticated by their current key."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import httpx

from agent.authority.storage import SqliteRegistry
from agent.authority.tokens import parse_token
from agent.errors import ExitCode, RejectedError
from agent.identity.client import AuthorityClient
from agent.identity.pki import generate_key, make_csr
from agent.identity.store import IdentityStore
from agent.proxy.catalog import CatalogEntry
from tests.support import AuthorityProcess, cli_json, run_cli


def _enroll(
    auth: AuthorityProcess, state: Path, identity: str, address: str, token: str | None = None
) -> IdentityStore:
    token = token or auth.token(identity)
    run_cli("enroll", token, "--state-dir", str(state), "--address", address, check=True)
    return IdentityStore(state)


def test_hosts_get_the_catalog_and_their_policy(authority: AuthorityProcess, tmp_path: Path) -> None:
    d = str(authority.directory)
    web = _enroll(authority, tmp_path / "web", "shop/web", "198.18.0.10")
    db = _enroll(authority, tmp_path / "db", "shop/db", "198.18.0.20")
    cli_json(
        "authority",
        "catalog",
        "add",
        "--dir",
        d,
        "--cidr",
        "10.96.0.0/12",
        "--port",
        "5432",
        "--identity",
        "orders/api",
    )
    cli_json(
        "authority",
        "policy",
        "set",
        "--dir",
        d,
        "--identity",
        "shop/db",
        "--port",
        "5432",
        "--default",
        "deny",
        "--allow",
        "spiffe://cluster.local/ns/shop/*",
    )
    cli_json(
        "authority", "policy", "set", "--dir", d, "--identity", "shop/db", "--default", "all-authenticated"
    )

    with AuthorityClient(db.load_authority()) as client:
        config = client.host_config(db.api_token())
    catalog = {(e["cidr"], tuple(e["ports"])): e["identity"] for e in config["catalog"]}
    assert catalog == {
        ("198.18.0.10/32", ()): "spiffe://cluster.local/ns/shop/sa/web",
        ("198.18.0.20/32", ()): "spiffe://cluster.local/ns/shop/sa/db",
        ("10.96.0.0/12", (5432,)): "spiffe://cluster.local/ns/orders/sa/api",
    }
    assert config["policy"] == {
        "default": {"default": "all-authenticated", "allow": []},
        "ports": {"5432": {"default": "deny", "allow": ["spiffe://cluster.local/ns/shop/*"]}},
    }
    with AuthorityClient(web.load_authority()) as client:
        assert client.host_config(web.api_token())["policy"] == {"ports": {}}  # policies are per identity

    # Revocation: the host leaves the catalog, and its requests are refused, at once.
    hosts = cli_json("authority", "hosts", "--dir", d)
    web_id = next(h["id"] for h in hosts if h["identity"] == "shop/web")
    cli_json("authority", "revoke", web_id, "--dir", d)
    with AuthorityClient(db.load_authority()) as client:
        cidrs = {e["cidr"] for e in client.host_config(db.api_token())["catalog"]}
    assert "198.18.0.10/32" not in cidrs
    with AuthorityClient(web.load_authority()) as client:
        try:
            client.host_config(web.api_token())
            raise AssertionError("a revoked host was served")
        except RejectedError as exc:
            assert exc.code == "host_revoked"


def test_host_config_needs_the_current_host_token(authority: AuthorityProcess, tmp_path: Path) -> None:
    r = httpx.get(f"{authority.url}/v1/host/config", verify=authority.tls)
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    store = _enroll(authority, tmp_path / "h", "shop/web", "198.18.0.10")
    first = store.api_token()
    ok = httpx.get(
        f"{authority.url}/v1/host/config", verify=authority.tls, headers={"Authorization": f"Bearer {first}"}
    )
    assert ok.status_code == 200
    # A renewal brings a new token and retires the old one.
    run_cli("renew", "--state-dir", str(tmp_path / "h"), check=True)
    assert store.api_token() != first
    old = httpx.get(
        f"{authority.url}/v1/host/config", verify=authority.tls, headers={"Authorization": f"Bearer {first}"}
    )
    assert old.status_code == 401


def test_prometheus_discovery_lists_unrevoked_hosts(authority: AuthorityProcess, tmp_path: Path) -> None:
    token_file = authority.directory / "prometheus-token"  # made by `authority init`
    assert token_file.stat().st_mode & 0o777 == 0o600

    def targets(query: str = "", token: str | None = None) -> httpx.Response:
        secret = token_file.read_text().strip() if token is None else token
        auth = {"Authorization": f"Bearer {secret}"}
        return httpx.get(f"{authority.url}/v1/prometheus/targets{query}", verify=authority.tls, headers=auth)

    # The list names every host: it is served only with the authority's discovery token.
    bare = httpx.get(f"{authority.url}/v1/prometheus/targets", verify=authority.tls)
    assert (bare.status_code, bare.json()["code"]) == (401, "unauthenticated")
    assert targets(token="wrong").status_code == 401
    bare_token = {"Authorization": token_file.read_text().strip()}  # as Prometheus 2.42 sends it
    url = f"{authority.url}/v1/prometheus/targets"
    assert httpx.get(url, verify=authority.tls, headers=bare_token).is_success
    assert targets(token=f"{token_file.read_text().strip()} extra").status_code == 401
    empty = targets()  # the whole list each time, `[]` when there is nobody (http_sd_configs)
    assert (empty.status_code, empty.headers["content-type"], empty.json()) == (200, "application/json", [])
    _enroll(authority, tmp_path / "web", "shop/web", "198.18.0.10")
    _enroll(authority, tmp_path / "db", "shop/db", "2001:db8::20")
    hosts = {h["identity"]: h for h in cli_json("authority", "hosts", "--dir", str(authority.directory))}
    doc = targets("?port=9191").json()
    assert sorted(group["targets"][0] for group in doc) == ["198.18.0.10:9191", "[2001:db8::20]:9191"]
    db = next(group["labels"] for group in doc if group["labels"]["serviceaccount"] == "db")
    assert db == {
        "namespace": "shop",
        "serviceaccount": "db",
        "identity": "spiffe://cluster.local/ns/shop/sa/db",
        "host": hosts["shop/db"]["host_name"],
        "host_id": hosts["shop/db"]["id"],
        "deployment": "db",  # Linkerd's dashboards: the service account's hosts are its pods
        "pod": hosts["shop/db"]["host_name"],
    }
    cli_json("authority", "revoke", hosts["shop/web"]["id"], "--dir", str(authority.directory))
    assert [group["labels"]["serviceaccount"] for group in targets().json()] == ["db"]

    # Rotation: the old token is refused at once, without a restart; no token file: discovery off.
    old_token = token_file.read_text().strip()
    rotated = cli_json("authority", "prometheus-token", "--rotate", "--dir", str(authority.directory))
    assert rotated["prometheus_token_file"] == str(token_file)
    assert targets(token=old_token).status_code == 401 and targets().status_code == 200
    # A blank token file is no token (an empty Authorization must not match it), nor is none.
    token_file.write_text("\n")
    for header in ({}, {"Authorization": ""}, {"Authorization": "Bearer"}):
        off = httpx.get(url, verify=authority.tls, headers=header)
        assert (off.status_code, off.json()["code"]) == (404, "discovery_disabled"), header
    token_file.unlink()
    off = targets(token=old_token)
    assert (off.status_code, off.json()["code"]) == (404, "discovery_disabled")
    assert "meshagent authority prometheus-token" in off.json()["hint"]
    # `prometheus-token` makes a new one in place of a blank or missing file.
    token_file.write_text("")
    made = cli_json("authority", "prometheus-token", "--dir", str(authority.directory))
    assert made["created"] and len(token_file.read_text().strip()) >= 40
    assert targets().status_code == 200


def test_enrollment_refuses_bad_claims_and_keeps_the_token(
    authority: AuthorityProcess, tmp_path: Path
) -> None:
    """A bad address or host name is refused before anything is stored: the token stays usable."""
    token = authority.token("shop/web")
    secret = parse_token(token).secret
    csr = make_csr(generate_key()).decode()
    for host_name, addresses in (
        ("web-1", ["not-an-ip"]),
        ("web-1", ["10.0.0.0/8"]),
        ("web-1", ["127.0.0.1"]),
        ("web-1", ["169.254.169.254"]),
        ("web\x1b[31m-1", ["198.18.0.10"]),
        ("web-1\r\nforged=1", ["198.18.0.10"]),
    ):
        r = httpx.post(
            f"{authority.url}/v1/enroll",
            verify=authority.tls,
            json={"token_secret": secret, "csr": csr, "host_name": host_name, "addresses": addresses},
        )
        assert (r.status_code, r.json()["code"]) == (400, "invalid_request"), (host_name, addresses, r.text)
        assert r.json()["hint"]
    proc = run_cli("enroll", token, "--state-dir", str(tmp_path / "w"), "--address", "not-an-ip", "--json")
    assert proc.returncode == ExitCode.REJECTED
    assert json.loads(proc.stdout)["error"]["code"] == "invalid_request"
    assert "not-an-ip" in proc.stderr
    assert cli_json("authority", "hosts", "--dir", str(authority.directory)) == []
    # The same token, with good claims, still enrolls.
    store = _enroll(authority, tmp_path / "w", "shop/web", "198.18.0.10", token=token)
    with AuthorityClient(store.load_authority()) as client:
        assert [e["cidr"] for e in client.host_config(store.api_token())["catalog"]] == ["198.18.0.10/32"]


def test_a_stored_bad_record_is_left_out_of_the_catalog(authority: AuthorityProcess, tmp_path: Path) -> None:
    """Rows from before validation (an address that is no IP, an identity with a newline) must not
    poison the catalog every host reads: they are skipped, and logged once."""
    good = _enroll(authority, tmp_path / "good", "shop/web", "198.18.0.10")
    _enroll(authority, tmp_path / "bad1", "shop/db", "198.18.0.20")
    _enroll(authority, tmp_path / "bad2", "shop/api", "198.18.0.30")
    db = sqlite3.connect(authority.directory / "registry.db")
    with db:
        db.execute(
            "UPDATE hosts SET addresses = ? WHERE identity = 'shop/db'",
            (json.dumps(["not-an-ip", "198.18.0.20"]),),
        )
        db.execute("UPDATE hosts SET identity = 'shop/api\n' WHERE identity = 'shop/api'")
    db.close()
    for _ in range(2):
        with AuthorityClient(good.load_authority()) as client:
            catalog = client.host_config(good.api_token())["catalog"]
        assert sorted(e["cidr"] for e in catalog) == ["198.18.0.10/32", "198.18.0.20/32"]
    assert authority.log_path is not None
    log = authority.log_path.read_text()
    skipped = [line for line in log.splitlines() if "catalog.record_skipped" in line]
    assert len(skipped) == 2, log  # one per bad record, not one per request
    assert any("not-an-ip" in line for line in skipped)
    assert all("\n" not in line.replace("\\n", "") for line in skipped)


def test_a_static_entry_carries_its_opaque_port_to_the_hosts(
    authority: AuthorityProcess, tmp_path: Path
) -> None:
    """`catalog add --opaque-port` is stored, listed and served as `opaque_port`, which the data
    plane reads back; an entry without it is served without the key (plain mTLS, as before)."""
    d = str(authority.directory)
    host = _enroll(authority, tmp_path / "h", "shop/web", "198.18.0.10")
    base = ("authority", "catalog", "add", "--dir", d, "--identity", "orders/api")
    opaque = cli_json(*base, "--cidr", "10.244.1.0/24", "--port", "6379", "--opaque-port", "4143")
    plain = cli_json(*base, "--cidr", "10.244.2.0/24")
    assert (opaque["opaque_port"], plain["opaque_port"]) == (4143, None)
    said = run_cli(*base, "--cidr", "10.244.3.0/24", "--opaque-port", "4143", check=True).stdout
    assert "via transport header on port 4143" in said

    listed = {e["cidr"]: e for e in cli_json("authority", "catalog", "list", "--dir", d)}
    assert listed["10.244.1.0/24"]["opaque_port"] == 4143
    assert "opaque_port" not in listed["10.244.2.0/24"]
    assert "opaque_port" not in listed["198.18.0.10/32"]  # enrolled hosts: plain mTLS
    text = run_cli("authority", "catalog", "list", "--dir", d, check=True).stdout.splitlines()
    assert text[0].split()[-2:] == ["OPAQUE", "PORT"]
    rows = {line.split()[1]: line.split() for line in text[1:]}
    assert (rows["10.244.1.0/24"][-1], rows["10.244.2.0/24"][-1]) == ("4143", "-")

    with AuthorityClient(host.load_authority()) as client:
        served = {e["cidr"]: e for e in client.host_config(host.api_token())["catalog"]}
    assert served["10.244.1.0/24"]["opaque_port"] == 4143
    assert "opaque_port" not in served["10.244.2.0/24"]
    entry = CatalogEntry.from_doc(served["10.244.1.0/24"])
    assert (entry.opaque_port, entry.ports, entry.identity) == (
        4143,
        frozenset({6379}),
        "spiffe://cluster.local/ns/orders/sa/api",
    )
    assert CatalogEntry.from_doc(served["10.244.2.0/24"]).opaque_port is None

    spec = httpx.get(f"{authority.url}/v1/openapi.json", verify=authority.tls).json()
    field = spec["components"]["schemas"]["CatalogEntry"]["properties"]["opaque_port"]
    assert (field["minimum"], field["maximum"]) == (1, 65535)


def test_an_opaque_port_out_of_range_is_refused(authority: AuthorityProcess) -> None:
    d = str(authority.directory)
    for bad in ("0", "65536", "-1"):
        proc = run_cli(
            "authority", "catalog", "add", "--dir", d, "--cidr", "10.244.1.0/24",
            "--identity", "orders/api", f"--opaque-port={bad}", "--json",
        )  # fmt: skip
        assert proc.returncode == ExitCode.REJECTED, (bad, proc.stderr)
        assert f"opaque port {bad} is not a port number (1-65535)" in proc.stderr
        assert json.loads(proc.stdout)["error"]["code"] == "invalid_request"
    assert cli_json("authority", "catalog", "list", "--dir", d) == []  # nothing stored


def test_a_registry_from_before_opaque_ports_is_upgraded_at_open(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    old = sqlite3.connect(path)
    with old:  # the catalog table as registries created it before the column
        old.execute(
            "CREATE TABLE catalog (id TEXT PRIMARY KEY, cidr TEXT NOT NULL, ports TEXT NOT NULL,"
            " identity TEXT NOT NULL, created_at REAL NOT NULL)"
        )
        old.execute("INSERT INTO catalog VALUES ('c-old', '10.96.0.0/12', '[5432]', 'orders/api', 1.0)")
    old.close()

    registry = SqliteRegistry(path)
    try:
        added = registry.add_static_entry("10.244.0.0/16", (), "orders/api", datetime.now(UTC), 4143)
        assert [(e.id, e.ports, e.opaque_port) for e in registry.static_entries()] == [
            ("c-old", (5432,), None),
            (added.id, (), 4143),
        ]
    finally:
        registry.close()
    again = SqliteRegistry(path)  # a second open finds the column and leaves it
    try:
        assert [e.opaque_port for e in again.static_entries()] == [None, 4143]
    finally:
        again.close()
