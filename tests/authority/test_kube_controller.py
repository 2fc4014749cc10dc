"""The controller (`authority serve --kubernetes`) against the test API server (issue #17).

A real Authority (initialised by the CLI once, copied per test; hosts enrolled through
`Authority.enroll` with real CSRs), the controller's real client (lightkube's configuration and
transport, kube_client's requests) and tests/kube/apiserver.py: a TEST STAND-IN for the
Kubernetes API server that enforces list/watch with resourceVersion, 409 on stale writes,
410 on expired watches, the status subresource and preconditions on delete. It is not a
Kubernetes API server; nothing here ran against a real one.

Timings are shortened (Lease 2 s, retry 0.2 s, registry poll 0.1 s); every wait is a bounded
poll for a state, never an assertion on how long something took.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.authority.kube_client import (
    EXTERNAL_WORKLOAD,
    SERVICE,
    KubeApiError,
    KubeClient,
    KubeConfigError,
    ObjectList,
    WatchEvent,
    api_error,
)
from agent.authority.kube_controller import ApiState, Controller, ControllerSettings, Informer
from agent.authority.kube_export import ServiceRequest, check_registration
from agent.authority.kube_objects import HOST_ID_LABEL, WorkloadPort
from agent.authority.service import Authority
from agent.authority.storage import HostRecord
from agent.errors import MeshagentError
from agent.identity.pki import generate_key, make_csr
from tests.kube.apiserver import ApiServerHandle, start_apiserver
from tests.support import init_authority

WAIT_S = 15.0  # an upper bound for a state to be reached; never asserted as a duration


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
    handle = start_apiserver(tmp_path / "kubeconfig")
    try:
        yield handle
    finally:
        handle.stop()


def settings(api: ApiServerHandle, identity: str = "replica-a", **kw: Any) -> ControllerSettings:
    base = ControllerSettings(
        kubeconfig=api.kubeconfig_path,
        identity=identity,
        lease_namespace="meshagent",
        lease_duration=timedelta(seconds=2),
        renew_deadline=timedelta(seconds=1),
        retry_period=timedelta(seconds=0.2),
        registry_poll_s=0.1,
        debounce_s=0.05,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        discovery=False,
    )
    return replace(base, **kw)


def enroll(authority: Authority, name: str, address: str, labels: dict[str, str] | None = None) -> str:
    reg = check_registration(labels or {"app": "billing"}, [WorkloadPort("http", 8080)], None)
    token = authority.create_tokens(
        "shop/billing", "https://authority.test", timedelta(hours=1), registration=reg
    )
    result = authority.enroll(token[0].secret, make_csr(generate_key()).decode(), name, [address])
    report(authority, result.host.id)
    return result.host.id


def report(authority: Authority, host_id: str, *, agent_ready: bool = True) -> None:
    """The host's agent reporting (POST /v1/host/report, stored as the API stores it)."""
    now = authority.clock().timestamp()
    doc = {"agent_version": "test", "ready": agent_ready, "reason": "" if agent_ready else "starting",
           "directory_updated_at": now, "refresh_interval_s": 30, "probes": []}  # fmt: skip
    authority.registry.record_report(host_id, json.dumps(doc), now)


def host_objects(api: ApiServerHandle, host_id: str | None = None) -> list[dict[str, Any]]:
    objs = api.objects("ExternalWorkload")
    return [
        o for o in objs if host_id is None or o["metadata"].get("labels", {}).get(HOST_ID_LABEL) == host_id
    ]


def ready(obj: dict[str, Any]) -> str | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return str(c.get("status"))
    return None


async def until(what: str, check: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {WAIT_S} s: {what}")
        await asyncio.sleep(0.05)


class Running:
    """A controller task in the test's event loop."""

    def __init__(self, authority: Authority, s: ControllerSettings) -> None:
        self.controller = Controller(authority, s)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.controller.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, WAIT_S)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


# --- registration ------------------------------------------------------------------------------


def test_host_lifecycle_create_update_restore_delete(authority: Authority, api: ApiServerHandle) -> None:
    """New host -> ExternalWorkload with Ready=True; label and address changes -> updated in
    place (same uid); a hand edit of its spec -> restored; revoked -> deleted."""

    async def scenario() -> None:
        host = enroll(authority, "vm-1", "198.18.0.5")
        c = Running(authority, settings(api, services=(ServiceRequest.parse("billing=app=billing"),)))
        try:
            await until(
                "object created and Ready", lambda: [ready(o) for o in host_objects(api, host)] == ["True"]
            )
            obj = host_objects(api, host)[0]
            uid = obj["metadata"]["uid"]
            assert obj["spec"]["workloadIPs"] == [{"ip": "198.18.0.5"}]
            assert obj["spec"]["meshTLS"]["identity"] == "spiffe://cluster.local/ns/shop/sa/billing"
            await until("Service created", lambda: len(api.objects("Service", "shop")) == 1)
            svc = api.objects("Service", "shop")[0]
            assert svc["spec"]["selector"] == {"app": "billing"}

            # A label change (the operator's `host label`): an Update of the same object.
            authority.registry.update_registration(
                host,
                lambda h: check_registration(
                    {"app": "billing", "tier": "db"}, [WorkloadPort("http", 8080)], None
                ),
            )
            await until(
                "label updated", lambda: host_objects(api, host)[0]["metadata"]["labels"].get("tier") == "db"
            )

            # An address change (written in the registry as a re-enrolment of the same row would).
            with sqlite3.connect(authority.material.directory / "registry.db") as db:
                db.execute("UPDATE hosts SET addresses = ? WHERE id = ?", (json.dumps(["198.18.0.9"]), host))
            await until(
                "address updated",
                lambda: host_objects(api, host)[0]["spec"]["workloadIPs"] == [{"ip": "198.18.0.9"}],
            )
            # A hand edit of the spec (kubectl edit): restored.
            edited = host_objects(api, host)[0]
            edited["spec"]["workloadIPs"] = [{"ip": "198.18.7.7"}]
            api.put(edited)
            await until(
                "hand edit restored",
                lambda: host_objects(api, host)[0]["spec"]["workloadIPs"] == [{"ip": "198.18.0.9"}],
            )
            # The agent reports not ready: Ready flips through /status only, and back.
            report(authority, host, agent_ready=False)
            await until("Ready=False", lambda: ready(host_objects(api, host)[0]) == "False")
            report(authority, host)
            await until("Ready=True again", lambda: ready(host_objects(api, host)[0]) == "True")
            # A hand edit of the status (Ready flipped): patched back through /status.
            api.patch_status(
                "ExternalWorkload", edited["metadata"]["name"], {"conditions": []}, namespace="shop"
            )
            await until("status restored", lambda: ready(host_objects(api, host)[0]) == "True")
            assert host_objects(api, host)[0]["metadata"]["uid"] == uid

            authority.registry.revoke(host, authority.clock())
            await until("object deleted", lambda: host_objects(api, host) == [])
            # The Service selected only that host: nothing left to serve, so it goes too.
            await until("Service deleted", lambda: api.objects("Service", "shop") == [])
            deletes = api.requests("DELETE")
            assert len(deletes) == 2 and all(
                set(r.body["preconditions"]) == {"uid", "resourceVersion"} for r in deletes
            )
        finally:
            await c.close()
        counts = c.controller.status()["actions"]  # after close: every write has been counted
        assert counts["create"] == 2 and counts["delete"] == 2
        assert counts["update"] >= 3 and counts["status"] >= 4

    run(scenario)


def test_istio_flavor_writes_workload_entries_with_healthy(
    authority: Authority, api: ApiServerHandle
) -> None:
    async def scenario() -> None:
        host = enroll(authority, "vm-9", "198.18.0.14")
        c = Running(authority, settings(api, flavor="istio"))
        try:

            def healthy() -> list[str]:
                return [
                    cond["status"]
                    for o in api.objects("WorkloadEntry")
                    for cond in (o.get("status") or {}).get("conditions") or []
                    if cond["type"] == "Healthy"
                ]

            await until("entry Healthy", lambda: healthy() == ["True"])
            entry = api.objects("WorkloadEntry")[0]
            assert entry["spec"]["address"] == "198.18.0.14"
            assert entry["spec"]["serviceAccount"] == "billing"
            assert api.objects("ExternalWorkload") == []
            authority.registry.revoke(host, authority.clock())
            await until("entry deleted", lambda: api.objects("WorkloadEntry") == [])
        finally:
            await c.close()

    run(scenario)


def test_someone_elses_object_of_our_name_is_never_touched(
    authority: Authority, api: ApiServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        host = enroll(authority, "vm-2", "198.18.0.6")
        probe = Running(authority, settings(api))
        await until("our object", lambda: len(host_objects(api, host)) == 1)
        name = host_objects(api, host)[0]["metadata"]["name"]
        await probe.close()
        # Replace ours by a hand-made object of the same name, without our owner labels.
        api.delete("ExternalWorkload", name, namespace="shop")
        foreign = {
            "apiVersion": "workload.linkerd.io/v1beta1",
            "kind": "ExternalWorkload",
            "metadata": {"name": name, "namespace": "shop", "labels": {"team": "dba"}},
            "spec": {
                "meshTLS": {"identity": "spiffe://x/y", "serverName": "y.x"},
                "workloadIPs": [{"ip": "198.18.9.9"}],
            },
        }
        before = api.put(foreign)
        caplog.set_level(logging.INFO, logger="meshagent.authority.kube")
        c = Running(authority, settings(api))
        try:
            await until("conflict seen", lambda: c.controller.status()["actions"].get("conflict", 0) >= 2)
            await until("a later pass", lambda: c.controller.status()["reconciled_at"] is not None)
            after = api.get("ExternalWorkload", name, namespace="shop")
            assert after == before
            assert [r for r in caplog.records if r.getMessage() == "kube.conflict"]
            assert c.controller.status()["actions"].get("delete", 0) == 0
        finally:
            await c.close()

    run(scenario)


@pytest.mark.parametrize("holder_exit", ["released", "vanished"])
def test_only_the_lease_holder_writes_and_the_other_takes_over(
    authority: Authority, api: ApiServerHandle, holder_exit: str
) -> None:
    """Released: the standby takes over at its next retry. Vanished (a crash: no release): the
    standby waits out the Lease's duration by its own clock, then takes over."""

    async def no_release(client: object) -> None:
        return None

    async def scenario() -> None:
        enroll(authority, "vm-3", "198.18.0.7")
        a = Running(authority, settings(api, "replica-a"))
        await until("a leads", lambda: a.controller.status()["leader"])
        b = Running(authority, settings(api, "replica-b"))
        try:
            await until("object created", lambda: len(host_objects(api)) == 1)
            await until("b sees a as holder", lambda: b.controller.status()["lease"]["holder"] == "replica-a")
            second = enroll(authority, "vm-4", "198.18.0.8")
            await until("a creates the second", lambda: len(host_objects(api, second)) == 1)
            assert not b.controller.status()["leader"]
            assert b.controller.status()["actions"] == {}
            lease = api.get("Lease", "meshagent-authority-default", namespace="meshagent")
            assert lease is not None and lease["spec"]["holderIdentity"] == "replica-a"

            if holder_exit == "vanished":
                a.controller._release = no_release  # type: ignore[method-assign]
            await a.close()
            lease = api.get("Lease", "meshagent-authority-default", namespace="meshagent")
            assert lease is not None
            assert lease["spec"]["holderIdentity"] == ("" if holder_exit == "released" else "replica-a")
            third = enroll(authority, "vm-5", "198.18.0.10")
            await until("b leads", lambda: b.controller.status()["leader"])
            await until("b creates the third", lambda: len(host_objects(api, third)) == 1)
        finally:
            await b.close()
        assert b.controller.status()["actions"]["create"] == 1

    run(scenario)


def test_killed_and_restarted_api_server_converges(authority: Authority, api: ApiServerHandle) -> None:
    async def scenario() -> None:
        first = enroll(authority, "vm-6", "198.18.0.11")
        c = Running(authority, settings(api))
        try:
            await until("created", lambda: len(host_objects(api, first)) == 1)
            api.stop()  # mid-watch: every connection cut
            await until("unreachable", lambda: c.controller.status()["api"] == "unreachable")
            # The registry moves on while the API server is away.
            second = enroll(authority, "vm-7", "198.18.0.12")
            authority.registry.revoke(first, authority.clock())
            # Restarted with a fresh watch cache: resuming gets 410, the controller re-lists.
            api.restart(keep_history=False)
            await until("first deleted", lambda: host_objects(api, first) == [])
            await until("second Ready", lambda: [ready(o) for o in host_objects(api, second)] == ["True"])
            await until("reachable", lambda: c.controller.status()["api"] == "ok")
            # Without discovery, hosts are served no Services: their directory has no state for it.
            assert "discovery" not in authority.host_config(host_record(authority, second))
        finally:
            await c.close()

    run(scenario)


def test_expired_watch_relists_and_sees_changes_made_meanwhile(
    authority: Authority, api: ApiServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshagent.authority.kube")

    async def scenario() -> None:
        host = enroll(authority, "vm-8", "198.18.0.13")
        c = Running(authority, settings(api))
        try:
            await until("created", lambda: len(host_objects(api, host)) == 1)
            await until("watching", lambda: api.open_watches() >= 2)
            name = host_objects(api, host)[0]["metadata"]["name"]
            api.expire_watches()
            # Deleted behind the controller's back: only a re-list (not a resumed watch) sees it.
            api.delete("ExternalWorkload", name, namespace="shop")
            await until("re-created", lambda: len(host_objects(api, host)) == 1)
            assert any(r.getMessage() == "kube.relist" for r in caplog.records)
        finally:
            await c.close()

    run(scenario)


def test_lightkube_is_loaded_only_in_controller_mode() -> None:
    """`authority serve` without --kubernetes imports the controller module, never lightkube."""
    code = (
        "import sys, agent.cli.authority, agent.authority.kube_controller\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightkube', 'httpx2')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


# --- errors the operator can act on ------------------------------------------------------------


def test_unreadable_kubeconfig_is_an_error_with_a_hint(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("clusters: [not, a, kubeconfig")
    for path in (bad, tmp_path / "missing"):
        with pytest.raises(KubeConfigError) as exc:
            KubeClient.connect(path)
        assert str(path) in exc.value.message and exc.value.hint


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"flavor": "consul"}, "neither linkerd nor istio"),
        ({"authority_name": "Not Valid"}, "label value"),
        ({"lease_namespace": "Bad_NS"}, "namespace"),
        ({"renew_deadline": timedelta(seconds=20)}, "longer than the renew deadline"),
        ({"identity": ""}, "identity is empty"),
    ],
)
def test_settings_refused_with_what_is_wrong(change: dict[str, Any], words: str) -> None:
    with pytest.raises(MeshagentError) as exc:
        ControllerSettings(**change)
    assert words in exc.value.message and exc.value.hint


def test_forbidden_and_missing_crd_name_what_to_fix() -> None:
    forbidden = api_error(
        403,
        {"reason": "Forbidden", "message": "no"},
        method="PUT",
        res=EXTERNAL_WORKLOAD,
        name="x",
        sub="status",
    )
    assert "'update'" in forbidden.hint and "externalworkloads.workload.linkerd.io/status" in forbidden.hint
    assert "ClusterRole" in forbidden.hint
    watch = api_error(403, {}, method="GET", res=SERVICE, name=None, sub=None, watch=True)
    assert "'watch'" in watch.hint and "'services'" in watch.hint
    missing = api_error(404, {"reason": "NotFound"}, method="GET", res=EXTERNAL_WORKLOAD, name=None, sub=None)
    assert "install externalworkloads.workload.linkerd.io" in missing.hint
    assert isinstance(missing, KubeApiError) and missing.status == 404


def test_wrong_token_is_reported_not_fatal(
    authority: Authority, api: ApiServerHandle, tmp_path: Path
) -> None:
    """401: the controller keeps running, says what is wrong in status() and the log."""
    text = api.kubeconfig_path.read_text().replace(api.token, "wrong-token")
    bad = tmp_path / "bad-kubeconfig"
    bad.write_text(text)

    async def scenario() -> None:
        c = Running(authority, settings(api, kubeconfig=bad))
        try:
            await until(
                "error shown", lambda: any("401" in e for e in c.controller.status()["errors"].values())
            )
            assert not c.controller.status()["leader"]
        finally:
            await c.close()

    run(scenario)


# --- discovery ---------------------------------------------------------------------------------

MESHED = {"linkerd.io/control-plane-ns": "linkerd"}


def cluster_objects() -> list[dict[str, Any]]:
    """A Service with two meshed pods behind it, as the cluster's own controllers write them."""

    def pod(name: str, ip: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "orders", **MESHED}},
            "spec": {"serviceAccountName": "orders", "containers": [{"name": "app", "image": "orders"}]},
            "status": {"podIP": ip, "phase": "Running"},
        }

    def endpoint(name: str, ip: str) -> dict[str, Any]:
        return {
            "addresses": [ip],
            "conditions": {"ready": True},
            "targetRef": {"kind": "Pod", "name": name, "namespace": "shop"},
        }

    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "198.19.0.10",
                "clusterIPs": ["198.19.0.10"],
                "selector": {"app": "orders"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        },
        pod("orders-1", "198.18.5.2"),
        pod("orders-2", "198.18.5.3"),
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "orders-x1",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "orders"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [endpoint("orders-1", "198.18.5.2"), endpoint("orders-2", "198.18.5.3")],
        },
    ]


def endpoints_of(authority: Authority, name: str) -> dict[str, str | None] | None:
    for svc in authority.discovered():
        if (svc["namespace"], svc["name"]) == ("shop", name):
            return {e["address"]: e["identity"] for e in svc["endpoints"]}
    return None


def host_record(authority: Authority, host_id: str) -> HostRecord:
    return next(h for h in authority.registry.list_hosts() if h.id == host_id)


def test_discovery_serves_ready_endpoints_and_keeps_them_while_the_api_is_away(
    authority: Authority, api: ApiServerHandle
) -> None:
    host = host_record(authority, enroll(authority, "vm-20", "198.18.0.30"))

    def state() -> dict[str, Any]:
        doc: dict[str, Any] = authority.host_config(host)["discovery"]
        return doc

    async def scenario() -> None:
        c = Running(authority, settings(api, discovery=True))
        try:
            await until("discovery synced", lambda: c.controller.status()["discovery"]["synced"])
            await until("first result", lambda: state()["updated_at"] is not None)
            assert state()["source"] == "kubernetes"
            assert (state()["state"], state()["since"]) == ("ok", None)
            assert endpoints_of(authority, "orders") is None
            for obj in cluster_objects():
                api.put(obj)
            identity = "spiffe://cluster.local/ns/shop/sa/orders"
            both = {"198.18.5.2": identity, "198.18.5.3": identity}
            await until("both pods served", lambda: endpoints_of(authority, "orders") == both)
            svc = next(s for s in authority.discovered() if s["name"] == "orders")
            assert svc["cluster_ips"] == ["198.19.0.10"]
            assert svc["endpoints"][0]["ports"] == {"80": 8080}

            # The EndpointSlice controller marks orders-2 not ready: it leaves the catalog.
            eps = api.get("EndpointSlice", "orders-x1", namespace="shop")
            assert eps is not None
            eps["endpoints"][1]["conditions"] = {"ready": False}
            api.put(eps)
            await until(
                "not-ready pod gone", lambda: endpoints_of(authority, "orders") == {"198.18.5.2": identity}
            )

            # The API server goes away: the last catalog is kept, the state says so.
            served_at = state()["updated_at"]
            before = authority.render_host_config(host).etag
            api.stop()
            await until("unreachable", lambda: c.controller.status()["api"] == "unreachable")
            assert endpoints_of(authority, "orders") == {"198.18.5.2": identity}
            # Hosts are told: the document says since when, and that its Services are the last known.
            await until("hosts told", lambda: state()["state"] == "unreachable")
            assert state()["since"] == c.controller.status()["unreachable_since"]
            assert state()["updated_at"] == served_at
            down = authority.render_host_config(host).etag
            assert down != before
            # Only the transition is news: told again (same outage), nothing changes for hosts.
            version = authority.version()
            authority.set_discovery_state(False, state()["since"])
            assert authority.version() == version
            assert authority.render_host_config(host).etag == down
            api.restart(keep_history=False)
            api.delete("Service", "orders", namespace="shop")
            await until(
                "service removed after the re-list", lambda: endpoints_of(authority, "orders") is None
            )
            assert c.controller.status()["api"] == "ok"
            assert (state()["state"], state()["since"]) == ("ok", None)
            assert state()["updated_at"] != served_at  # the re-listed Services differ
        finally:
            await c.close()

    run(scenario)


# --- faults the controller survives -----------------------------------------------------------


def test_a_pass_that_raises_is_logged_and_retried_not_the_end_of_registration(
    authority: Authority, api: ApiServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one pass (here: the registry raising once) used to end the controller task,
    releasing the Lease and leaving the authority serving with no registration."""
    host = enroll(authority, "vm-1", "198.18.0.5")
    real = authority.registry.list_hosts
    calls = {"n": 0}

    def list_hosts_failing_once() -> list[HostRecord]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("registry hiccup")
        return real()

    monkeypatch.setattr(authority.registry, "list_hosts", list_hosts_failing_once)

    async def scenario() -> None:
        c = Running(authority, settings(api))
        try:
            await until("object created after the failed pass", lambda: len(host_objects(api, host)) == 1)
            assert not c.task.done()
            # The pass that created it clears its error when it ends, a moment after the create.
            errors = lambda: c.controller.status()["errors"]  # noqa: E731
            await until("the error cleared", lambda: "pass:registration" not in errors())
        finally:
            await c.close()
        assert calls["n"] >= 2
        assert c.controller.status()["actions"]["pass_failed"] == 1

    run(scenario)


class _OneWatchClient:
    """A client whose list is empty and whose first watch yields `events`, then stays quiet."""

    def __init__(self, events: list[tuple[str, Any]]) -> None:
        self.events, self.watches = events, 0

    async def list(self, res: Any, *, label_selector: str | None = None) -> ObjectList:
        return ObjectList([], "1")

    async def watch(self, res: Any, **kw: Any) -> AsyncIterator[WatchEvent]:
        self.watches += 1
        if self.watches == 1:
            for kind, obj in self.events:
                yield WatchEvent(kind, obj)
        await asyncio.Event().wait()


def test_a_malformed_object_is_skipped_and_the_informer_keeps_watching() -> None:
    good = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "web",
            "resourceVersion": "3"}}  # fmt: skip
    client = _OneWatchClient(
        [("ADDED", {"metadata": "oops"}), ("ADDED", {"kind": "Service"}), ("ADDED", good)]
    )

    async def scenario() -> None:
        s = ControllerSettings(kubeconfig=None, identity="replica-a", backoff_initial_s=0.05)
        informer = Informer(client, SERVICE, s, ApiState(), lambda: None)  # type: ignore[arg-type]
        task = asyncio.create_task(informer.run())
        try:
            await until("the good object seen", lambda: ("shop", "web") in informer.objects)
            assert not task.done()
            assert list(informer.objects) == [("shop", "web")]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario)


def test_an_informer_whose_list_raises_lists_again() -> None:
    class Failing(_OneWatchClient):
        lists = 0

        async def list(self, res: Any, *, label_selector: str | None = None) -> ObjectList:
            self.lists += 1
            if self.lists == 1:
                raise ValueError("unexpected")
            return ObjectList([{"metadata": {"namespace": "shop", "name": "web"}}], "1")

    client = Failing([])

    async def scenario() -> None:
        api_state = ApiState()
        s = ControllerSettings(kubeconfig=None, identity="replica-a", backoff_initial_s=0.05)
        informer = Informer(client, SERVICE, s, api_state, lambda: None)  # type: ignore[arg-type]
        task = asyncio.create_task(informer.run())
        try:
            await until("listed after the failure", lambda: informer.synced)
            assert list(informer.objects) == [("shop", "web")]
            assert not task.done() and api_state.errors == {}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario)
