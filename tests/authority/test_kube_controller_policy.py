"""Policy from the cluster's own objects in controller mode (issue #17): Linkerd's Server,
AuthorizationPolicy and MeshTLSAuthentication (and SMI's TrafficTarget) put into the API are the
enrolled hosts' stored policy, exactly as `meshagent authority policy apply -f` stores the same
YAML; edits and deletions follow; a set that cannot be honoured leaves the stored policy as it
was and says why; only the Lease holder writes.

A real Authority, the controller's real client and tests/kube/apiserver.py: a TEST STAND-IN for
the Kubernetes API server (not one; nothing here ran against a real cluster). Every wait is a
bounded poll for a state, never an assertion on how long something took.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from agent.authority.kube_controller import (
    Controller,
    ControllerSettings,
    policy_diff,
    policy_scope,
)
from agent.authority.kube_export import check_registration
from agent.authority.kube_objects import KubeObjectError, WorkloadPort
from agent.authority.service import Authority
from agent.authority.storage import PolicyRecord
from agent.cli.authority import authority as authority_cli
from agent.identity.pki import generate_key, make_csr
from agent.logs import _FIELDS as FIELDS
from tests.authority.test_kube_controller import Running, settings, until
from tests.kube.apiserver import ApiServerHandle, start_apiserver
from tests.support import init_authority

FIXTURES = Path(__file__).parent / "policy_fixtures"
BILLING_YAML = FIXTURES / "linkerd_billing.yaml"
S = "spiffe://cluster.local"


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("authority-template")
    init_authority(directory)
    return directory


@pytest.fixture
def authority(initialised: Path, tmp_path: Path) -> Authority:
    directory = tmp_path / "authority"
    shutil.copytree(initialised, directory)
    return Authority.open(directory)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServerHandle]:
    with start_apiserver(tmp_path / "kubeconfig") as handle:
        yield handle


BILLING_PORTS = (WorkloadPort("http", 8080), WorkloadPort("metrics", 9100))


def enroll(
    authority: Authority,
    identity: str,
    name: str,
    address: str,
    labels: dict[str, str],
    ports: tuple[WorkloadPort, ...] = BILLING_PORTS,
) -> str:
    reg = check_registration(labels, list(ports), None)
    token = authority.create_tokens(identity, "https://authority.test", timedelta(hours=1), registration=reg)
    return authority.enroll(token[0].secret, make_csr(generate_key()).decode(), name, [address]).host.id


def fleet(authority: Authority) -> None:
    """test_policy_apply.py's fleet: shop/billing (app=billing) and shop/ledger (app=ledger)."""
    enroll(authority, "shop/billing", "vm-1", "198.18.0.5", {"app": "billing"})
    enroll(authority, "shop/ledger", "vm-2", "198.18.0.6", {"app": "ledger"})


def documents(path: Path = BILLING_YAML) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def policy_settings(api: ApiServerHandle, **kw: Any) -> ControllerSettings:
    return settings(api, policy=True, **kw)


def records(authority: Authority) -> list[PolicyRecord]:
    return authority.registry.policies()


def record(authority: Authority, identity: str, port: int) -> PolicyRecord | None:
    return next((r for r in records(authority) if (r.identity, r.port) == (identity, port)), None)


def apply_by_hand(directory: Path, path: Path, *extra: str) -> None:
    """`meshagent authority policy apply --dir DIR -f FILE`, the real command, in-process."""
    args = ["policy", "apply", "--dir", str(directory), "-f", str(path), *extra]
    result = CliRunner().invoke(authority_cli, args)
    assert result.exit_code == 0, result.output


def copy_authority(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("registry.db*"))
    with sqlite3.connect(src / "registry.db") as a, sqlite3.connect(dst / "registry.db") as b:
        a.backup(b)
    a.close()
    b.close()


def test_cluster_objects_are_stored_as_policy_apply_stores_them_and_follow_edits_and_deletes(
    authority: Authority, api: ApiServerHandle, tmp_path: Path
) -> None:
    """The fixture put into the API = `policy apply -f` of the same file; a MeshTLSAuthentication
    edit changes the grant; deleting the AuthorizationPolicy leaves the Server's port deny;
    deleting the Server removes its record. Cluster wins: a hand record of an enrolled identity
    is removed, one of an identity no host is enrolled as is left alone."""
    fleet(authority)
    authority.set_policy("shop/billing", 7000, "deny", ())  # by hand, before controller mode
    authority.set_policy("shop/retired", 0, "deny", ())
    by_hand = tmp_path / "by-hand"
    copy_authority(authority.material.directory, by_hand)
    with sqlite3.connect(by_hand / "registry.db") as db:  # `policy apply -f` on the same fleet
        db.execute("DELETE FROM policies")
    apply_by_hand(by_hand, BILLING_YAML)
    expected = Authority.open(by_hand).registry.policies()
    assert record(Authority.open(by_hand), "shop/billing", 8080) == PolicyRecord(
        "shop/billing", 8080, "deny", (f"{S}/ns/shop/sa/web", f"{S}/ns/checkout/sa/*")
    )
    for doc in documents():
        api.put(doc)

    async def scenario() -> None:
        c = Running(authority, policy_settings(api))
        try:
            await until(
                "the cluster's policy stored", lambda: c.controller.status()["policy"]["records"] == 4
            )
            stored = records(authority)
            assert [r for r in stored if r.identity != "shop/retired"] == expected
            assert record(authority, "shop/retired", 0) == PolicyRecord("shop/retired", 0, "deny", ())
            status = c.controller.status()["policy"]
            assert status | {"updated_at": None} == {
                "enabled": True, "synced": True, "records": 4, "refused": [], "missing": [],
                "updated_at": None,
            }  # fmt: skip
            # A pass with nothing new writes nothing (its own write does not make it write again).
            written = c.controller.counts["policy_set"]
            again = await c.controller.sync_policy()
            assert (again.to_set, again.to_remove, c.controller.counts["policy_set"]) == ((), (), written)

            mtls = api.get("MeshTLSAuthentication", "billing-clients", "shop")
            assert mtls is not None
            mtls["spec"]["identities"] = ["api.shop.serviceaccount.identity.linkerd.cluster.local"]
            api.put(mtls)
            await until(
                "the edited identities",
                lambda: (
                    record(authority, "shop/billing", 8080)
                    == PolicyRecord("shop/billing", 8080, "deny", (f"{S}/ns/shop/sa/api",))
                ),
            )
            api.delete("AuthorizationPolicy", "billing-http", "shop")
            await until(
                "the grant gone: the Server's port denies everyone",
                lambda: (
                    record(authority, "shop/billing", 8080) == PolicyRecord("shop/billing", 8080, "deny", ())
                ),
            )
            api.delete("Server", "billing-http", "shop")
            await until(
                "the Server's record removed", lambda: record(authority, "shop/billing", 8080) is None
            )
            assert record(authority, "shop/billing", 9100) is not None  # the other Servers' stay
            # A hand write to a governed identity is undone at the next pass (cluster wins).
            authority.set_policy("shop/billing", 9100, "all-unauthenticated", ())
            await until(
                "the hand write undone",
                lambda: record(authority, "shop/billing", 9100).default_policy == "audit",
            )
        finally:
            await c.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fixture", "hosts", "default"),
    [
        (
            "linkerd_billing.yaml",
            [("shop/billing", {"app": "billing"}, BILLING_PORTS), ("shop/ledger", {"app": "ledger"}, ())],
            "all-unauthenticated",
        ),
        (
            "linkerd_namespace.yaml",
            [("legacy/erp", {"tier": "erp"}, (WorkloadPort("health", 8081), WorkloadPort("https", 8443)))],
            "deny",
        ),
        ("smi_traffic_target.yaml", [("data/pg", {}, (WorkloadPort("postgres", 5432),))], None),
    ],
    ids=["linkerd", "namespace-target", "smi"],
)
def test_each_fixture_is_stored_as_policy_apply_stores_it(
    authority: Authority,
    api: ApiServerHandle,
    tmp_path: Path,
    fixture: str,
    hosts: list[tuple[str, dict[str, str], tuple[WorkloadPort, ...]]],
    default: str | None,
) -> None:
    for i, (identity, labels, ports) in enumerate(hosts):
        enroll(authority, identity, f"vm-{i}", f"198.18.0.{i + 5}", labels, ports)
    by_hand = tmp_path / "by-hand"
    copy_authority(authority.material.directory, by_hand)
    apply_by_hand(by_hand, FIXTURES / fixture, *(["--default", default] if default else []))
    expected = Authority.open(by_hand).registry.policies()
    assert expected
    for doc in documents(FIXTURES / fixture):
        api.put(doc)

    async def scenario() -> None:
        c = Running(authority, policy_settings(api, policy_default=default))
        try:
            await until("stored", lambda: c.controller.status()["policy"]["records"] is not None)
            assert c.controller.status()["policy"]["refused"] == []
            assert records(authority) == expected
        finally:
            await c.close()

    asyncio.run(scenario())


def test_an_object_that_cannot_be_honoured_keeps_the_stored_policy_and_is_reported(
    authority: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NetworkAuthentication required by the hosts' AuthorizationPolicy refuses the whole set:
    the stored policy stays as it was, the refusal names the object and field (status and log);
    fixing it applies. A pod-side object meshagent could not honour does not block anything, and
    missing policy CRDs are absent kinds, not a failure."""
    caplog.set_level(logging.INFO, logger="meshagent.authority.kube")
    fleet(authority)
    with start_apiserver(tmp_path / "kubeconfig", absent=("TrafficTarget", "TCPRoute")) as api:
        for doc in documents():
            api.put(doc)
        # Pods' policy in another namespace, through a route (#21): not the hosts' business.
        api.put({
            "apiVersion": "policy.linkerd.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "web", "name": "by-route"},
            "spec": {"targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"},
                     "requiredAuthenticationRefs": []},
        })  # fmt: skip

        async def scenario() -> None:
            c = Running(authority, policy_settings(api))
            try:
                await until("applied", lambda: c.controller.status()["policy"]["records"] == 4)
                assert c.controller.status()["policy"]["missing"] == ["TCPRoute", "TrafficTarget"]
                before = records(authority)
                api.put({
                    "apiVersion": "policy.linkerd.io/v1alpha1", "kind": "NetworkAuthentication",
                    "metadata": {"namespace": "shop", "name": "office"},
                    "spec": {"networks": [{"cidr": "198.18.0.0/15"}]},
                })  # fmt: skip
                policy = api.get("AuthorizationPolicy", "billing-http", "shop")
                assert policy is not None
                good = copy.deepcopy(policy)
                # Applied without its network part, this would admit shop/api on 8080: refused whole.
                policy["spec"]["requiredAuthenticationRefs"] = [
                    {"kind": "ServiceAccount", "name": "api"},
                    {"group": "policy.linkerd.io", "kind": "NetworkAuthentication", "name": "office"},
                ]
                api.put(policy)
                await until("refused", lambda: c.controller.status()["policy"]["refused"] != [])
                refused = c.controller.status()["policy"]["refused"]
                assert any(
                    p.startswith(
                        "AuthorizationPolicy shop/billing-http: spec.requiredAuthenticationRefs[1].kind"
                    )
                    and "NetworkAuthentication" in p
                    for p in refused
                ), refused
                assert records(authority) == before
                logged = [r for r in caplog.records if r.getMessage() == "kube.policy_refused"]
                fields = [getattr(r, FIELDS, {}) for r in logged]
                assert {"object": "AuthorizationPolicy shop/billing-http"}.items() <= fields[0].items(), (
                    fields
                )

                api.put(good | {"metadata": policy["metadata"]})  # fixed: applied again
                await until("accepted", lambda: c.controller.status()["policy"]["refused"] == [])
                assert records(authority) == before
            finally:
                await c.close()

        asyncio.run(scenario())


def test_a_replica_that_does_not_hold_the_lease_writes_no_policy(
    authority: Authority, api: ApiServerHandle
) -> None:
    """Another replica holds the Lease: this one reads no policy object and writes nothing;
    once the Lease is free it takes it and writes the cluster's policy."""
    fleet(authority)
    for doc in documents():
        api.put(doc)
    api.put({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"namespace": "meshagent", "name": "meshagent-authority-default"},
        "spec": {"holderIdentity": "replica-b", "leaseDurationSeconds": 3600,
                 "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 0},
    })  # fmt: skip

    async def scenario() -> None:
        c = Running(authority, policy_settings(api))
        try:
            await until("standing by", lambda: c.controller.holder == "replica-b")
            await until("a second election round", lambda: len(api.requests("GET", "/leases/")) >= 2)
            assert not c.controller.leading()
            assert api.requests(path_contains="/servers") == []
            assert records(authority) == []
            api.delete("Lease", "meshagent-authority-default", "meshagent")
            await until("leading and applied", lambda: len(records(authority)) == 4)
            assert c.controller.leading()
        finally:
            await c.close()

    asyncio.run(scenario())


# --- the pure parts -----------------------------------------------------------------------------


def _obj(kind: str, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"namespace": ns, "name": name}, "spec": spec}


def test_policy_scope_keeps_what_reaches_hosts() -> None:
    ext = _obj("Server", "shop", "ext", {"externalWorkloadSelector": {}, "port": 80})
    pod = _obj("Server", "web", "pod", {"podSelector": {}, "port": 80})
    mtls = _obj("MeshTLSAuthentication", "shop", "m", {"identities": ["*"]})
    unused = _obj("MeshTLSAuthentication", "shop", "unused", {"identities": ["bad*"]})
    net = _obj("NetworkAuthentication", "web", "n", {})
    on_ext = _obj(
        "AuthorizationPolicy", "shop", "a",
        {"targetRef": {"group": "policy.linkerd.io", "kind": "Server", "name": "ext"},
         "requiredAuthenticationRefs": [
             {"group": "policy.linkerd.io", "kind": "MeshTLSAuthentication", "name": "m"}]},
    )  # fmt: skip
    on_ns = _obj("AuthorizationPolicy", "shop", "ns", {"targetRef": {"kind": "Namespace", "name": "shop"}})
    on_pod = _obj(
        "AuthorizationPolicy", "web", "p",
        {"targetRef": {"group": "policy.linkerd.io", "kind": "Server", "name": "pod"},
         "requiredAuthenticationRefs": [
             {"group": "policy.linkerd.io", "kind": "NetworkAuthentication", "name": "n"}]},
    )  # fmt: skip
    tt = _obj("TrafficTarget", "shop", "t", {"destination": {"kind": "ServiceAccount", "name": "billing"},
                                              "rules": [{"kind": "TCPRoute", "name": "r"}]})  # fmt: skip
    tt_pod = _obj("TrafficTarget", "shop", "u", {"destination": {"kind": "ServiceAccount", "name": "web"}})
    route = _obj("TCPRoute", "shop", "r", {})
    objects = {
        "Server": [ext, pod], "AuthorizationPolicy": [on_ext, on_ns, on_pod],
        "MeshTLSAuthentication": [mtls, unused], "NetworkAuthentication": [net],
        "TrafficTarget": [tt, tt_pod], "TCPRoute": [route],
    }  # fmt: skip
    assert policy_scope(objects, {"shop/billing"}) == [ext, on_ext, on_ns, mtls, tt, route]


def test_policy_diff_sets_what_changed_and_removes_only_governed_identities() -> None:
    a = PolicyRecord("shop/a", 80, "deny", ("spiffe://td/ns/x/sa/y",))
    stored = [
        PolicyRecord("shop/a", 80, "deny", ()),
        PolicyRecord("shop/a", 0, "deny", ()),
        PolicyRecord("other/b", 0, "deny", ()),
    ]
    assert policy_diff([a], stored, {"shop/a"}) == ([a], [("shop/a", 0)])
    assert policy_diff(stored[:1], stored, {"shop/a", "other/b"}) == ([], [("other/b", 0), ("shop/a", 0)])


def test_settings_refuse_a_default_meshagent_cannot_honour() -> None:
    with pytest.raises(KubeObjectError, match="cluster-authenticated"):
        ControllerSettings(policy=True, policy_default="cluster-authenticated")
    assert ControllerSettings(policy=True, policy_default="audit").policy_default == "audit"
    assert Controller  # imported for the type's users
