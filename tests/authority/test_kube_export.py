"""`meshagent authority kube export` and the labels/ports behind it (issue #17, the export way).

A real `meshagent authority serve` process, hosts enrolled with the real CLI from tokens that
carry labels and ports, then the exported YAML read back with PyYAML and every object checked
against the CRD schemas in tests/authority/schemas/ (the helpers of test_kube_objects.py).
Nothing here runs against a Kubernetes API server (none can be installed here)."""

from __future__ import annotations

import json
import shlex
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.authority import kube_export as kx
from agent.authority import kube_objects as ko
from agent.authority.health import parse_report
from agent.authority.kube_objects import KubeObjectError, WorkloadPort
from agent.authority.storage import HostRecord, Registration, SqliteRegistry
from agent.authority.tokens import parse_token
from agent.identity.names import WorkloadIdentity
from agent.identity.pki import generate_key, make_csr
from tests.authority.test_kube_objects import ISTIO, LINKERD, _find_workload_port, _istio_cel, _meta_ok
from tests.support import AuthorityProcess, cli_json, init_authority, run_cli, running_authority

TD = "cluster.local"


def token(auth: AuthorityProcess, identity: str, *extra: str) -> str:
    proc = run_cli(
        "authority", "token", "create", "--dir", str(auth.directory), "--identity", identity,
        "--url", auth.url, *extra, check=True,
    )  # fmt: skip
    return proc.stdout.strip()


def enroll(auth: AuthorityProcess, state: Path, tok: str, name: str, *addresses: str) -> dict[str, Any]:
    args = [a for address in addresses for a in ("--address", address)]
    doc: dict[str, Any] = cli_json("enroll", tok, "--state-dir", str(state), "--host-name", name, *args)
    return doc


def kube(auth: AuthorityProcess, *args: str) -> Any:
    return run_cli("authority", "kube", "export", "--dir", str(auth.directory), *args)


def objects(auth: AuthorityProcess, *args: str) -> list[dict[str, Any]]:
    proc = kube(auth, *args)
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    assert all(isinstance(d, dict) for d in docs)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Host objects by their host name annotation, Services by name."""
    out = {}
    for d in docs:
        if d["kind"] == kind:
            meta = d["metadata"]
            out[meta.get("annotations", {}).get(ko.HOST_NAME_ANNOTATION, meta["name"])] = d
    return out


def status_commands(auth: AuthorityProcess, *args: str) -> list[list[str]]:
    proc = kube(auth, "--status", *args)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "set -e"
    return [shlex.split(line) for line in lines[1:]]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthorityProcess]:
    """legacy-db-1 and legacy-db-2 (shop/billing, app=billing), legacy-web (other/web, revoked),
    and noaddr (shop/cache, enrolled without an address through the API)."""
    base = tmp_path_factory.mktemp("kube-export")
    with running_authority(base / "authority") as auth:
        t1 = token(
            auth, "shop/billing", "--label", "app=billing", "--label", "tier=web",
            "--port", "http=8080", "--port", "redis=6379/TCP", "--proxy-port", "4300",
        )  # fmt: skip
        enroll(auth, base / "h1", t1, "legacy-db-1", "198.18.0.10", "2001:db8::10", "198.18.0.11")
        t2 = token(auth, "shop/billing", "--label", "app=billing", "--port", "http=8080")
        enroll(auth, base / "h2", t2, "legacy-db-2", "198.18.0.12")
        t3 = token(auth, "other/web", "--label", "app=web", "--port", "http=80")
        enroll(auth, base / "h3", t3, "legacy-web", "198.18.0.13")
        run_cli("authority", "revoke", "legacy-web", "--dir", str(auth.directory), check=True)
        secret = parse_token(token(auth, "shop/cache", "--label", "app=cache")).secret
        r = httpx.post(
            f"{auth.url}/v1/enroll",
            verify=auth.tls,
            json={"token_secret": secret, "csr": make_csr(generate_key()).decode(), "host_name": "noaddr",
                  "addresses": []},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        yield auth


def _host_ids(auth: AuthorityProcess) -> dict[str, str]:
    return {h["host_name"]: h["id"] for h in cli_json("authority", "hosts", "--dir", str(auth.directory))}


def test_linkerd_export_carries_labels_ports_identity_and_addresses(fleet: AuthorityProcess) -> None:
    proc = kube(fleet)
    assert proc.returncode == 0, proc.stderr
    # The host with no address is left out, said on stderr; the others still export.
    ids = _host_ids(fleet)
    assert f"warning: {ids['noaddr']} not exported" in proc.stderr and "has no address" in proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    ews = by_kind(docs, "ExternalWorkload")
    assert sorted(ews) == ["legacy-db-1", "legacy-db-2"]  # the revoked host is absent
    assert len(docs) == 2
    for ew in docs:
        LINKERD.validate(ew)
        _meta_ok(ew)
        assert "status" not in ew  # applied without: the subresource ignores it on apply
    one, two = ews["legacy-db-1"], ews["legacy-db-2"]
    assert one["metadata"]["namespace"] == "shop"
    assert one["metadata"]["labels"] == {
        "app": "billing",
        "tier": "web",
        ko.MANAGED_BY_LABEL: "meshagent",
        ko.AUTHORITY_LABEL: "default",
        ko.HOST_ID_LABEL: ids["legacy-db-1"],
    }
    assert one["spec"]["meshTLS"] == {
        "identity": f"spiffe://{TD}/ns/shop/sa/billing",
        "serverName": f"billing.shop.serviceaccount.identity.linkerd.{TD}",
    }
    # One IPv4 and one IPv6, the first of each in the host's order.
    assert one["spec"]["workloadIPs"] == [{"ip": "198.18.0.10"}, {"ip": "2001:db8::10"}]
    assert one["spec"]["ports"] == [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "redis", "port": 6379, "protocol": "TCP"},
        {"name": "linkerd-proxy", "port": 4300, "protocol": "TCP"},
    ]
    assert two["spec"]["workloadIPs"] == [{"ip": "198.18.0.12"}]
    assert two["spec"]["ports"][-1] == {"name": "linkerd-proxy", "port": 4143, "protocol": "TCP"}
    assert "tier" not in two["metadata"]["labels"]


def test_service_selects_the_labelled_hosts_and_resolves_their_ports(fleet: AuthorityProcess) -> None:
    docs = objects(fleet, "--service", "billing=app=billing", "--service", "web-tier=app=billing,tier=web")
    services = by_kind(docs, "Service")
    ews = by_kind(docs, "ExternalWorkload")
    billing, web = services["billing"], services["web-tier"]
    assert billing["metadata"]["namespace"] == "shop"
    assert billing["metadata"]["labels"] == ko.owner_labels("default")
    assert billing["spec"]["selector"] == {"app": "billing"}
    assert web["spec"]["selector"] == {"app": "billing", "tier": "web"}
    # The union of the selected hosts' ports, by name; each resolves on a host that has it.
    assert [(p["name"], p["port"], p["targetPort"]) for p in billing["spec"]["ports"]] == [
        ("http", 8080, "http"),
        ("redis", 6379, "redis"),
    ]
    for svc_port in billing["spec"]["ports"]:
        assert _find_workload_port(ews["legacy-db-1"], svc_port) == svc_port["port"]
    assert _find_workload_port(ews["legacy-db-2"], billing["spec"]["ports"][0]) == 8080


def test_istio_flavor_writes_valid_workload_entries(fleet: AuthorityProcess) -> None:
    docs = objects(fleet, "--flavor", "istio", "--service", "billing=app=billing")
    wes = by_kind(docs, "WorkloadEntry")
    assert sorted(wes) == ["legacy-db-1", "legacy-db-2"]
    for we in wes.values():
        ISTIO.validate(we)
        _istio_cel(we)
        _meta_ok(we)
        assert we["metadata"]["annotations"][ko.ISTIO_HEALTH_ANNOTATION] == "true"
    one = wes["legacy-db-1"]["spec"]
    assert one == {
        "address": "198.18.0.10",
        "labels": {"app": "billing", "tier": "web"},
        "serviceAccount": "billing",
        "ports": {"http": 8080, "redis": 6379},  # no proxy port: Istio has no such port
    }
    assert by_kind(docs, "Service")["billing"]["spec"]["selector"] == {"app": "billing"}


@pytest.mark.parametrize(
    ("flavor", "resource", "condition"),
    [
        ("linkerd", "externalworkloads.workload.linkerd.io", "Ready"),
        ("istio", "workloadentries.networking.istio.io", "Healthy"),
    ],
)
def test_status_prints_one_subresource_patch_per_host(
    fleet: AuthorityProcess, flavor: str, resource: str, condition: str
) -> None:
    docs = objects(fleet, "--flavor", flavor, "--service", "billing=app=billing")
    names = {(d["metadata"]["name"], d["metadata"]["namespace"]): d for d in docs if d["kind"] != "Service"}
    commands = status_commands(fleet, "--flavor", flavor, "--service", "billing=app=billing")
    assert len(commands) == 2  # the hosts only: a Service has no status of ours
    health = {h["id"]: h["ready"] for h in cli_json("authority", "hosts", "--dir", str(fleet.directory))}
    validator = LINKERD if flavor == "linkerd" else ISTIO
    for argv in commands:
        assert argv[:2] == ["kubectl", "patch"] and argv[2] == resource
        name, ns = argv[3], argv[5]
        assert argv[4] == "-n" and argv[6:9] == ["--subresource=status", "--type=merge", "-p"]
        body = json.loads(argv[9])
        assert list(body) == ["status"]
        obj = names.pop((name, ns))
        validator.validate({**obj, **body})  # the object as the API server holds it after the patch
        (cond,) = body["status"]["conditions"]
        # The health `hosts` shows, from the agents' stored reports (none here: NeverReported).
        ready = health[obj["metadata"]["labels"][ko.HOST_ID_LABEL]]
        assert cond["type"] == condition and cond["status"] == ("True" if ready["status"] else "False")
        assert (cond["reason"], cond["message"]) == (ready["reason"], ready["message"])
    assert names == {}


def test_export_one_host_and_the_refusals(fleet: AuthorityProcess) -> None:
    ids = _host_ids(fleet)
    only = objects(fleet, "--host", "legacy-db-2")
    assert [d["metadata"]["annotations"][ko.HOST_NAME_ANNOTATION] for d in only] == ["legacy-db-2"]
    assert len(objects(fleet, "--host", ids["legacy-db-1"], "--host", "legacy-db-2")) == 2
    assert len(objects(fleet, "--namespace", "shop")) == 2

    cases = [
        (["--host", "nope"], "no enrolled host with id or name 'nope'", "meshagent authority hosts"),
        (["--host", "legacy-web"], "is revoked: revoked hosts are not exported", "kubectl delete"),
        (["--host", "noaddr"], "has no address", "--address"),
        (["--namespace", "other"], "no host to export in namespace 'other'", "meshagent enroll"),
        (["--service", "web=app=web"], "selects no exported host (app=web)", "host label"),
        (["--service", "Bad=app=x"], "is not a valid Service name", "starting with a letter"),
        (["--service", "billing"], "is not NAME=KEY=VALUE", "--service billing=app=billing"),
        (["--namespace", "shop", "--host", "legacy-web"], "is revoked", "meshagent.io/host-id="),
        (["--namespace", "other", "--host", "legacy-db-1"], "is in namespace 'shop', not 'other'", "drop"),
        (["--namespace", "Shop"], "is not a valid namespace name", "lowercase"),
    ]
    for args, message, hint in cases:
        proc = kube(fleet, *args)
        assert proc.returncode == 1, (args, proc.stdout)
        assert proc.stdout == ""  # nothing half-written for kubectl to apply
        assert message in proc.stderr and hint in proc.stderr, (args, proc.stderr)


def test_hosts_lists_labels_ports_and_readiness(fleet: AuthorityProcess) -> None:
    hosts = {h["host_name"]: h for h in cli_json("authority", "hosts", "--dir", str(fleet.directory))}
    one = hosts["legacy-db-1"]
    assert one["labels"] == {"app": "billing", "tier": "web"}
    assert one["ports"] == [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "redis", "port": 6379, "protocol": "TCP"},
    ]
    assert one["proxy_port"] == 4300
    # No agent has reported: not Ready, and the listing says why (the agent's health reports).
    assert one["ready"]["status"] is False and one["ready"]["reason"] == "NeverReported"
    assert one["report"] is None
    assert hosts["legacy-db-2"]["proxy_port"] is None
    assert (hosts["legacy-web"]["ready"]["status"], hosts["legacy-web"]["ready"]["reason"]) == (
        False,
        "Revoked",
    )
    tokens = cli_json("authority", "token", "list", "--dir", str(fleet.directory))
    assert tokens[0]["labels"] == one["labels"] and tokens[0]["ports"] == one["ports"]
    assert tokens[0]["proxy_port"] == 4300 and tokens[0]["host_id"] == one["id"]
    table = run_cli("authority", "hosts", "--dir", str(fleet.directory), check=True).stdout
    line = next(row for row in table.splitlines() if "legacy-db-1" in row)
    assert "app=billing,tier=web" in line and "http=8080/TCP,redis=6379/TCP" in line
    assert "no (NeverReported)" in line
    why = next(row for row in table.splitlines() if row.startswith(f"{one['id']} (legacy-db-1) not ready"))
    assert "NeverReported: no health report from the agent on legacy-db-1" in why


def test_hosts_shows_the_reported_health(fleet: AuthorityProcess) -> None:
    d = str(fleet.directory)
    ids = _host_ids(fleet)
    now = datetime.now(UTC).timestamp()
    report = {
        "agent_version": "0.1.0",
        "ready": True,
        "reason": "",
        "directory_updated_at": now,
        "refresh_interval_s": 30.0,
        "probes": [
            {"port": 8080, "kind": "http", "ok": False, "detail": "GET /healthz: status 503", "since": now}
        ],
    }
    registry = SqliteRegistry(fleet.directory / "registry.db")
    try:
        registry.record_report(ids["legacy-db-2"], parse_report(report).to_json(), now)
        report["probes"] = []
        registry.record_report(ids["legacy-db-1"], parse_report(report).to_json(), now)
    finally:
        registry.close()
    hosts = {h["host_name"]: h for h in cli_json("authority", "hosts", "--dir", d)}
    assert hosts["legacy-db-1"]["ready"]["status"] is True
    assert hosts["legacy-db-1"]["ready"]["reason"] == "AgentReady"
    two = hosts["legacy-db-2"]
    assert (two["ready"]["status"], two["ready"]["reason"]) == (False, "ProbeFailed")
    assert two["report"]["probes"][0]["detail"] == "GET /healthz: status 503"
    table = run_cli("authority", "hosts", "--dir", d, check=True).stdout
    assert "yes (AgentReady)" in next(row for row in table.splitlines() if "legacy-db-1" in row)
    why = next(row for row in table.splitlines() if row.startswith(f"{ids['legacy-db-2']} (legacy-db-2) not"))
    assert "ProbeFailed: the app's http probe of port 8080 on legacy-db-2 is failing since" in why
    assert why.endswith("GET /healthz: status 503")


def test_host_label_and_port_edits_reach_the_export(authority: AuthorityProcess, tmp_path: Path) -> None:
    d = str(authority.directory)
    enroll(authority, tmp_path / "h", token(authority, "shop/db", "--label", "app=db"), "db-1", "198.18.0.20")
    doc = cli_json(
        "authority", "host", "label", "db-1", "tier=primary", "canary=", "--remove", "app", "--dir", d
    )
    assert doc["labels"] == {"canary": "", "tier": "primary"}
    doc = cli_json(
        "authority", "host", "port", "db-1", "pg=5432", "metrics=9187", "--proxy-port", "4200", "--dir", d
    )
    assert [p["name"] for p in doc["ports"]] == ["pg", "metrics"] and doc["proxy_port"] == 4200
    doc = cli_json("authority", "host", "port", "db-1", "pg=6432", "--remove", "metrics", "--dir", d)
    assert doc["ports"] == [{"name": "pg", "port": 6432, "protocol": "TCP"}]

    (ew,) = objects(authority)
    LINKERD.validate(ew)
    assert {k: v for k, v in ew["metadata"]["labels"].items() if "/" not in k} == {
        "canary": "",
        "tier": "primary",
    }
    assert ew["spec"]["ports"] == [
        {"name": "pg", "port": 6432, "protocol": "TCP"},
        {"name": "linkerd-proxy", "port": 4200, "protocol": "TCP"},
    ]

    refusals = [
        (["label", "db-1", "meshagent.io/host-id=h-x"], "is meshagent's own"),
        (["label", "db-1", "--remove", "app"], "the host has no label 'app'"),
        (["label", "db-1", "app=a b"], "is not a Kubernetes label value"),
        (["label", "db-1", "x=1", "x=2"], "a label key is given twice"),
        (["port", "db-1", "web=4200"], "is the proxy's"),
        (["port", "db-1", "--remove", "http"], "the host has no port named 'http'"),
        (["port", "db-1", "Web=80"], "is not a valid port name"),
        (["label", "nope", "a=b"], "no enrolled host with id or name 'nope'"),
    ]
    for args, message in refusals:
        proc = run_cli("authority", "host", *args, "--dir", d, "--json")
        assert proc.returncode != 0, args
        assert message in json.loads(proc.stdout)["error"]["message"], (args, proc.stdout)
    # Nothing a refusal touched was written.
    (after,) = cli_json("authority", "hosts", "--dir", d)
    assert (after["labels"], after["ports"], after["proxy_port"]) == (doc["labels"], doc["ports"], 4200)

    run_cli("authority", "revoke", "db-1", "--dir", d, check=True)
    proc = run_cli("authority", "host", "label", after["id"], "a=b", "--dir", d)
    assert proc.returncode != 0 and "is revoked" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label", "meshagent.io/authority=evil"], "label 'meshagent.io/authority' is meshagent's own"),
        (["--label", "app.kubernetes.io/managed-by=me"], "is meshagent's own"),
        (["--label", "app=has space"], "is not a Kubernetes label value"),
        (["--label", "-app=x"], "is not a Kubernetes label key"),
        (["--label", "app"], "is not KEY=VALUE"),
        (["--label", "app=a", "--label", "app=b"], "a label key is given twice"),
        (["--port", "http"], "is not NAME=PORT[/PROTOCOL]"),
        (["--port", "http=99999"], "is not a port number"),
        (["--port", "http=80/SCTP"], "is not TCP or UDP"),
        (["--port", "a=80", "--port", "b=80"], "is given twice"),
        (["--port", "linkerd-proxy=4143"], "is the proxy's"),
        (["--port", "web=4300", "--proxy-port", "4300"], "is the proxy's"),
    ],
)
def test_bad_labels_and_ports_are_refused_at_token_time(
    tmp_path: Path, args: list[str], message: str
) -> None:
    d = tmp_path / "authority"
    if not (d / "authority.json").exists():
        init_authority(d)
    proc = run_cli(
        "authority", "token", "create", "--dir", str(d), "--identity", "shop/billing",
        "--url", "https://127.0.0.1:1", *args, "--json",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    error = json.loads(proc.stdout)["error"]
    assert message in error["message"] and error["hint"], error
    assert error["code"] == "kube_object_invalid"
    assert cli_json("authority", "token", "list", "--dir", str(d)) == []  # nothing stored


# --- the registry and the pure parts ------------------------------------------------------------

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
BILLING = WorkloadIdentity(TD, "shop", "billing")


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


def test_a_registry_from_before_labels_is_upgraded_at_open(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    old = sqlite3.connect(path)
    with old:  # tokens and hosts as the first registries created them (no later columns at all)
        old.execute(
            "CREATE TABLE tokens (hash TEXT PRIMARY KEY, identity TEXT NOT NULL, created_at REAL NOT NULL,"
            " expires_at REAL NOT NULL, used_at REAL, used_by_key TEXT, host_id TEXT)"
        )
        old.execute(
            "CREATE TABLE hosts (id TEXT PRIMARY KEY, identity TEXT NOT NULL, host_name TEXT NOT NULL,"
            " addresses TEXT NOT NULL, serial TEXT NOT NULL, previous_serial TEXT, not_after REAL NOT NULL,"
            " cert_pem TEXT NOT NULL, enrolled_at REAL NOT NULL, last_renewal REAL, revoked_at REAL)"
        )
        old.execute(
            "INSERT INTO hosts VALUES ('h-0000000000aa', 'shop/billing', 'old-1', '[\"198.18.0.30\"]', 'aa',"
            " NULL, ?, '', ?, NULL, NULL)",
            (T0.timestamp() + 86400, T0.timestamp()),
        )
        old.execute("INSERT INTO tokens VALUES ('t0', 'shop/billing', 1.0, 2.0, NULL, NULL, NULL)")
    old.close()

    registry = SqliteRegistry(path)
    try:
        (host,) = registry.list_hosts()
        assert host.registration == Registration()
        assert registry.list_tokens()[0].registration == Registration()
        reg = kx.check_registration({"app": "old"}, [WorkloadPort("http", 80)], None)
        registry.add_token("t1", "shop/billing", T0, T0 + timedelta(hours=1), reg)
        assert registry.list_tokens()[1].registration == reg
        updated = registry.update_registration("old-1", lambda h: reg)
        assert updated.registration.labels == (("app", "old"),)
        # The old host exports like a new one.
        result = kx.export(registry.list_hosts(), trust_domain=TD, mesh="linkerd", now=T0)
        (ew,) = result.objects
        LINKERD.validate(ko.without_status(ew))
        LINKERD.validate(ew)
        assert ew["spec"]["ports"][0] == {"name": "http", "port": 80, "protocol": "TCP"}
    finally:
        registry.close()
    again = SqliteRegistry(path)  # a second open finds the columns and leaves them
    try:
        assert again.list_hosts()[0].registration.labels == (("app", "old"),)
    finally:
        again.close()


def test_a_hand_altered_row_is_listed_but_not_exported(tmp_path: Path) -> None:
    registry = SqliteRegistry(tmp_path / "registry.db")
    try:
        registry.add_token("t", "shop/billing", T0, T0 + timedelta(hours=1))
        registry._db.execute("UPDATE tokens SET kube_labels = '{not json'")
        assert registry.list_tokens()[0].registration.unreadable
    finally:
        registry.close()
    bad = _record(registration=Registration(unreadable=True))
    result = kx.export(
        [bad, _record(id="h-0123456789ac", host_name="ok")], trust_domain=TD, mesh="linkerd", now=T0
    )
    assert [s.host for s in result.skipped] == ["h-0123456789ab"]
    assert "unreadable" in result.skipped[0].reason
    assert len(result.objects) == 1


@pytest.mark.parametrize(
    ("record", "ready", "reason", "since"),
    [
        (_record(), True, "CertificateValid", T0),
        (
            _record(not_after=T0 + timedelta(minutes=1)),
            False,
            "CertificateExpired",
            T0 + timedelta(minutes=1),
        ),
        (_record(revoked_at=T0 + timedelta(minutes=2)), False, "Revoked", T0 + timedelta(minutes=2)),
    ],
)
def test_health_from_the_record(record: HostRecord, ready: bool, reason: str, since: datetime) -> None:
    now = T0 + timedelta(minutes=5)
    health = kx.host_health(record, now)
    assert (health.ready, health.reason, health.since) == (ready, reason, since)
    ew = ko.external_workload(kx.host_workload(record, BILLING, now), "default")
    LINKERD.validate(ew)
    (cond,) = ew["status"]["conditions"]
    assert (cond["status"], cond["reason"]) == ("True" if ready else "False", reason)


def test_status_script_quotes_what_the_shell_would_read() -> None:
    record = _record()
    obj = ko.external_workload(kx.host_workload(record, BILLING, T0), "default")
    obj["status"]["conditions"][0]["message"] = "it's $(rm -rf /) `x`"
    (line,) = [x for x in kx.status_script([obj]).splitlines() if x.startswith("kubectl")]
    argv = shlex.split(line)
    assert json.loads(argv[-1])["status"]["conditions"][0]["message"] == "it's $(rm -rf /) `x`"


def test_edit_registration_keeps_the_rest_and_refuses_as_a_whole() -> None:
    reg = kx.check_registration({"app": "a"}, [WorkloadPort("http", 80)], 4300)
    edited = kx.edit_registration(reg, set_labels={"tier": "t"})
    assert edited == Registration((("app", "a"), ("tier", "t")), (("http", 80, "TCP"),), 4300)
    with pytest.raises(KubeObjectError, match="is the proxy's"):
        kx.edit_registration(reg, set_labels={"x": "y"}, proxy_port=80)
    with pytest.raises(KubeObjectError, match="given twice"):
        kx.edit_registration(reg, set_ports=[WorkloadPort("web", 80)])
    assert kx.parse_port("dns=53/udp") == WorkloadPort("dns", 53, "UDP")
    assert kx.ServiceRequest.parse("web=tier=web,app=shop").selector == (("app", "shop"), ("tier", "web"))
    with pytest.raises(KubeObjectError, match="one label key twice"):
        kx.ServiceRequest.parse("web=app=a,app=b")


def test_service_port_conflict_between_hosts_is_refused() -> None:
    a = _record(registration=kx.check_registration({"app": "x"}, [WorkloadPort("http", 80)], None))
    b = _record(
        id="h-0123456789ac",
        host_name="b",
        registration=kx.check_registration({"app": "x"}, [WorkloadPort("http", 8080)], None),
    )
    with pytest.raises(kx.KubeExportError, match="'http' is 80/TCP on one host and 8080/TCP on another"):
        kx.export(
            [a, b], trust_domain=TD, mesh="linkerd", now=T0, services=[kx.ServiceRequest.parse("x=app=x")]
        )
