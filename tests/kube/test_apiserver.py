"""The test stand-in API server (tests/kube/apiserver.py) enforces the semantics the controller
relies on, proven with the real client library (lightkube's AsyncClient) and raw HTTP where
lightkube has no call (DELETE with DeleteOptions). Not a Kubernetes API server: see the module."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2  # lightkube's HTTP client (its own fork of httpx)
import pytest
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Namespace, Service
from lightkube.types import OnErrorAction, OnErrorResult, PatchType

from tests.kube.apiserver import ApiServerHandle, parse_selector, start_apiserver

EW = create_namespaced_resource("workload.linkerd.io", "v1beta1", "ExternalWorkload", "externalworkloads")
ROOT = Path(__file__).resolve().parents[2]
BOUND = 10.0  # a hang guard, never an assertion on time


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServerHandle]:
    with start_apiserver(tmp_path / "kubeconfig") as handle:
        yield handle


def run(api: ApiServerHandle, body: Callable[[AsyncClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = AsyncClient(KubeConfig.from_file(api.kubeconfig_path), trust_env=False)
        try:
            return await asyncio.wait_for(body(client), BOUND)
        finally:
            await client.close()

    return asyncio.run(main())


def ew(name: str, ns: str = "shop", **labels: str) -> Any:
    return EW(
        metadata=ObjectMeta(name=name, namespace=ns, labels=labels or None),
        spec={"meshTLS": {"identity": f"spiffe://td/ns/{ns}/sa/{name}"}},
        status={"conditions": [{"type": "Ready", "status": "True"}]},
    )


def ew_dict(name: str, ns: str = "shop", **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels}
    return {
        "apiVersion": "workload.linkerd.io/v1beta1",
        "kind": "ExternalWorkload",
        "metadata": meta,
        "spec": {},
    }


async def take(events: AsyncIterable[tuple[str, Any]], n: int) -> list[tuple[str, str, str]]:
    out = []
    async for kind, obj in events:
        out.append((kind, obj.metadata.name, obj.metadata.resourceVersion))
        if len(out) == n:
            break
    return out


def test_list_with_selector_then_watch_from_its_version_sees_each_later_change_once(
    api: ApiServerHandle,
) -> None:
    async def body(c: AsyncClient) -> None:
        await c.create(ew("a", app="billing"))
        await c.create(ew("b", app="other"))
        await c.create(ew("c", ns="elsewhere", app="billing"))
        listed = c.list(EW, namespace="shop", labels={"app": "billing"})
        assert [o.metadata.name async for o in listed] == ["a"]
        rv = listed.resourceVersion
        assert rv == "3"  # one global counter: three creates

        await c.patch(
            EW,
            "b",
            {"metadata": {"labels": {"app": "billing"}}},
            namespace="shop",
            patch_type=PatchType.MERGE,
        )
        api.put(ew_dict("d", app="billing"))  # another actor
        await c.patch(
            EW, "a", {"metadata": {"labels": {"app": "gone"}}}, namespace="shop", patch_type=PatchType.MERGE
        )
        await c.create(ew("e", ns="elsewhere", app="billing"))  # other namespace: not seen
        events = c.watch(EW, namespace="shop", labels={"app": "billing"}, resource_version=rv)
        got = await take(events, 3)
        # b entering the selection is ADDED, a leaving it is DELETED (as the watch cache does)
        assert got == [("ADDED", "b", "4"), ("ADDED", "d", "5"), ("DELETED", "a", "6")]

        every = c.list(EW, namespace="*", labels={"app": "billing"})
        assert sorted([o.metadata.name async for o in every]) == ["b", "c", "d", "e"]
        assert every.resourceVersion == "7"

    run(api, body)
    assert api.requests("GET", "/apis/workload.linkerd.io/v1beta1/externalworkloads")[0].query == {
        "labelSelector": "app=billing"
    }


def test_watch_without_version_lists_current_objects_then_streams(api: ApiServerHandle) -> None:
    api.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})

    async def body(c: AsyncClient) -> None:
        events = c.watch(Namespace)
        first = await take(events, 1)
        api.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "two"}})
        assert first + await take(events, 1) == [("ADDED", "shop", "1"), ("ADDED", "two", "2")]

    run(api, body)


def test_watch_from_a_compacted_version_is_410_expired_as_an_error_event(api: ApiServerHandle) -> None:
    api.put(ew_dict("a"))
    api.expire_watches()

    response = httpx.get(
        f"{api.url}/apis/workload.linkerd.io/v1beta1/namespaces/shop/externalworkloads",
        params={"watch": "1", "resourceVersion": "1"},
        headers={"Authorization": f"Bearer {api.token}"},
    )
    assert response.status_code == 200  # the real server answers 200, then one ERROR event
    (line,) = response.text.splitlines()
    event = json.loads(line)
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")

    async def body(c: AsyncClient) -> None:
        with pytest.raises(ApiError) as err:
            await take(c.watch(EW, namespace="shop", resource_version="1"), 1)
        assert err.value.status.code == 410

        # lightkube on RETRY after a 410 drops the version: the current objects come as ADDED
        def retry(exc: Exception, count: int) -> OnErrorResult:
            return OnErrorResult(OnErrorAction.RETRY if count < 2 else OnErrorAction.RAISE)

        assert await take(c.watch(EW, namespace="shop", resource_version="1", on_error=retry), 1) == [
            ("ADDED", "a", "1")
        ]

    run(api, body)


def test_an_open_watch_ended_by_compaction_resumes_into_410(api: ApiServerHandle) -> None:
    api.put(ew_dict("a"))

    async def body(c: AsyncClient) -> None:
        events = c.watch(EW, namespace="shop", resource_version="1")
        reader = asyncio.ensure_future(take(events, 1))
        await asyncio.to_thread(api.wait_for_watches, 1)
        api.expire_watches()  # the stream ends cleanly; lightkube resumes from "1": too old now
        with pytest.raises(ApiError) as err:
            await reader
        assert (err.value.status.code, err.value.status.reason) == (410, "Expired")

    run(api, body)


def test_replace_with_a_stale_resource_version_is_409_conflict(api: ApiServerHandle) -> None:
    async def body(c: AsyncClient) -> None:
        created = await c.create(ew("a"))
        first = await c.get(EW, "a", namespace="shop")
        first.spec["meshTLS"]["identity"] = "spiffe://td/ns/shop/sa/first"
        updated = await c.replace(first)
        assert int(updated.metadata.resourceVersion) > int(created.metadata.resourceVersion)
        assert updated.metadata.generation == 2
        first.spec["meshTLS"]["identity"] = "spiffe://td/ns/shop/sa/second"
        with pytest.raises(ApiError) as err:
            await c.replace(first)  # still carries the old resourceVersion
        assert (err.value.status.code, err.value.status.reason) == (409, "Conflict")
        assert "the object has been modified" in err.value.status.message
        now = await c.get(EW, "a", namespace="shop")
        assert now.spec["meshTLS"]["identity"] == "spiffe://td/ns/shop/sa/first"

        with pytest.raises(ApiError) as err:
            await c.create(ew("a"))
        assert (err.value.status.code, err.value.status.reason) == (409, "AlreadyExists")
        with pytest.raises(ApiError) as err:
            await c.get(EW, "missing", namespace="shop")
        status = err.value.status
        assert (status.code, status.reason, status.details.kind) == (404, "NotFound", "externalworkloads")
        assert status.message == 'externalworkloads.workload.linkerd.io "missing" not found'

    run(api, body)


def test_status_subresource_only_status_there_and_never_status_on_the_object(api: ApiServerHandle) -> None:
    async def body(c: AsyncClient) -> None:
        created = await c.create(ew("a"))  # carries a Ready condition
        assert created.status is None and created.metadata.generation == 1

        ready = {"conditions": [{"type": "Ready", "status": "True"}]}
        patched = await c.patch(EW.Status, "a", {"status": ready, "spec": {"x": 1}}, namespace="shop",
                                patch_type=PatchType.MERGE)  # fmt: skip
        assert patched.status == ready and patched.spec == created.spec
        assert patched.metadata.generation == 1

        current = await c.get(EW, "a", namespace="shop")
        current["status"] = {"conditions": []}
        current["spec"] = {"meshTLS": {"identity": "spiffe://td/ns/shop/sa/new"}}
        replaced = await c.replace(current)
        assert replaced.status == ready  # status in a main-resource write is ignored
        assert replaced.metadata.generation == 2  # spec changed
        bare = await c.create(ew("bare"))
        bare["status"] = ready
        assert (await c.replace(bare)).status is None  # nor in a replace of an object without status
        merged = await c.patch(
            EW, "a", {"status": {"conditions": []}}, namespace="shop", patch_type=PatchType.MERGE
        )
        assert merged.status == ready
        assert merged.metadata.resourceVersion == replaced.metadata.resourceVersion  # a no-op is not a write

        stale = {
            "metadata": {"resourceVersion": created.metadata.resourceVersion},
            "status": {"conditions": []},
        }
        with pytest.raises(ApiError) as err:
            await c.patch(EW.Status, "a", stale, namespace="shop", patch_type=PatchType.MERGE)
        assert err.value.status.code == 409
        with pytest.raises(ApiError) as err:  # this stand-in serves JSON merge patch only
            await c.patch(EW, "a", {"spec": {}}, namespace="shop")
        assert err.value.status.code == 415

    run(api, body)
    assert api.objects("ExternalWorkload")[0]["status"] == {
        "conditions": [{"type": "Ready", "status": "True"}]
    }


def test_delete_honours_uid_and_resource_version_preconditions(api: ApiServerHandle) -> None:
    obj = api.put(ew_dict("a"))
    url = f"{api.url}/apis/workload.linkerd.io/v1beta1/namespaces/shop/externalworkloads/a"
    auth = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"}

    def delete(preconditions: dict[str, str]) -> httpx.Response:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": preconditions}
        return httpx.request("DELETE", url, json=body, headers=auth)

    wrong_uid = delete({"uid": "00000000-0000-0000-0000-000000000000"})
    assert (wrong_uid.status_code, wrong_uid.json()["reason"]) == (409, "Conflict")
    assert "Precondition failed: UID in precondition" in wrong_uid.json()["message"]
    stale = delete({"uid": obj["metadata"]["uid"], "resourceVersion": "0"})
    assert stale.status_code == 409
    assert api.get("ExternalWorkload", "a", "shop") is not None

    gone = delete({"uid": obj["metadata"]["uid"], "resourceVersion": obj["metadata"]["resourceVersion"]})
    assert gone.status_code == 200 and gone.json()["metadata"]["name"] == "a"
    assert api.objects("ExternalWorkload") == []
    assert delete({}).status_code == 404

    async def body(c: AsyncClient) -> None:
        await c.delete(EW, "missing", namespace="shop")

    with pytest.raises(ApiError) as err:
        run(api, body)
    assert err.value.status.code == 404


def test_two_replicas_racing_for_a_lease_get_exactly_one_409_each_round(api: ApiServerHandle) -> None:
    def lease(holder: str) -> Lease:
        return Lease(metadata=ObjectMeta(name="meshagent", namespace="mesh"),
                     spec=LeaseSpec(holderIdentity=holder, leaseDurationSeconds=15))  # fmt: skip

    async def attempt(write: Awaitable[Any]) -> int:
        try:
            await write
        except ApiError as err:
            return err.status.code
        return 200

    async def body(c: AsyncClient) -> None:
        other = AsyncClient(KubeConfig.from_file(api.kubeconfig_path), trust_env=False)
        try:
            created = await asyncio.gather(
                attempt(c.create(lease("one"))), attempt(other.create(lease("two")))
            )
            assert sorted(created) == [200, 409]
            mine = await c.get(Lease, "meshagent", namespace="mesh")
            theirs = await other.get(Lease, "meshagent", namespace="mesh")
            mine.spec.holderIdentity, theirs.spec.holderIdentity = "one", "two"
            mine.spec.leaseTransitions = theirs.spec.leaseTransitions = 1  # both really change it
            updated = await asyncio.gather(attempt(c.replace(mine)), attempt(other.replace(theirs)))
            assert sorted(updated) == [200, 409]
        finally:
            await other.close()

    run(api, body)
    assert [r.status for r in api.requests("PUT")].count(409) == 1


def test_restart_mid_watch_cuts_the_stream_and_history_decides_resume_or_410(api: ApiServerHandle) -> None:
    api.put(ew_dict("a"))

    async def body(c: AsyncClient) -> None:
        reader = asyncio.ensure_future(take(c.watch(EW, namespace="shop", resource_version="1"), 1))
        await asyncio.to_thread(api.wait_for_watches, 1)
        await asyncio.to_thread(api.restart)
        with pytest.raises(httpx2.RemoteProtocolError):  # the server went away mid-stream
            await reader
        api.put(ew_dict("b"))  # written while nobody watched
        assert await take(c.watch(EW, namespace="shop", resource_version="1"), 1) == [("ADDED", "b", "2")]
        api.restart(keep_history=False)  # a fresh watch cache: an earlier version is too old
        with pytest.raises(ApiError) as err:
            await take(c.watch(EW, namespace="shop", resource_version="2"), 1)
        assert err.value.status.code == 410
        assert [o.metadata.name async for o in c.list(EW, namespace="shop")] == ["a", "b"]

    run(api, body)


def test_services_list_like_the_real_server_and_bad_tokens_are_401(api: ApiServerHandle) -> None:
    api.put({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders", "namespace": "shop"},
             "spec": {"clusterIP": "198.19.0.10"}, "status": {"loadBalancer": {}}})  # fmt: skip
    listed = httpx.get(f"{api.url}/api/v1/services", headers={"Authorization": f"Bearer {api.token}"}).json()
    assert listed["kind"] == "ServiceList" and listed["metadata"]["resourceVersion"] == "1"
    assert "kind" not in listed["items"][0]  # built-in types' items carry no kind/apiVersion
    assert httpx.get(f"{api.url}/api/v1/services").status_code == 401

    async def body(c: AsyncClient) -> list[str]:
        return [s.spec.clusterIP async for s in c.list(Service, namespace="shop")]

    assert run(api, body) == ["198.19.0.10"]


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("app=a,tier", {"app": "a", "tier": "x"}, True),
        ("app=a,tier", {"app": "a"}, False),
        ("!legacy,app!=b", {"app": "a"}, True),
        ("!legacy", {"legacy": ""}, False),
        ("app in (a, b),env notin (prod)", {"app": "b", "env": "dev"}, True),
        ("app in (a, b)", {"app": "c"}, False),
        ("app==a", {"app": "a"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert all(p(labels) for p in parse_selector(selector)) is expected


def test_as_a_process_it_serves_the_objects_file_and_accepts_new_ones(tmp_path: Path) -> None:
    objects = tmp_path / "objects.yaml"
    objects.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n"
        "apiVersion: v1\nkind: List\nitems:\n"
        "- {apiVersion: v1, kind: Service, metadata: {name: orders, namespace: shop},\n"
        "   spec: {clusterIP: 198.19.0.10}}\n"
    )
    kubeconfig = tmp_path / "kubeconfig"
    cmd = [
        sys.executable,
        "-m",
        "tests.kube.apiserver",
        "--listen",
        "127.0.0.1:0",
        "--kubeconfig",
        str(kubeconfig),
    ]
    with subprocess.Popen(
        [*cmd, "--objects", str(objects)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())

            async def main() -> list[str]:
                client = AsyncClient(KubeConfig.from_file(kubeconfig), trust_env=False)
                try:
                    await client.create(ew("a"))
                    return [o.metadata.name async for o in client.list(Service, namespace="*")] + [
                        o.metadata.name async for o in client.list(EW, namespace="shop")
                    ]
                finally:
                    await client.close()

            assert asyncio.run(asyncio.wait_for(main(), BOUND)) == ["orders", "a"]
            assert ready["url"].startswith("http://127.0.0.1:")
        finally:
            proc.terminate()
        assert proc.wait(timeout=BOUND) == 0


def test_bookmarks_only_when_asked_and_a_clean_end_of_stream(api: ApiServerHandle) -> None:
    api.put(ew_dict("a"))
    url = f"{api.url}/apis/workload.linkerd.io/v1beta1/namespaces/shop/externalworkloads"
    headers = {"Authorization": f"Bearer {api.token}"}
    query = {"watch": "true", "resourceVersion": "1"}
    with (
        httpx.stream("GET", url, params=query | {"allowWatchBookmarks": "true"}, headers=headers) as asked,
        httpx.stream("GET", url, params=query, headers=headers) as plain,
    ):
        api.wait_for_watches(2)
        api.put(ew_dict("b"))
        api.bookmark()
        api.close_watches()
        events = [[json.loads(line) for line in r.iter_lines()] for r in (asked, plain)]
    got = [[(e["type"], e["object"]["metadata"]["resourceVersion"]) for e in stream] for stream in events]
    assert got == [[("ADDED", "2"), ("BOOKMARK", "2")], [("ADDED", "2")]]
    assert api.open_watches() == 0


def test_create_in_a_missing_namespace_is_404_when_namespaces_are_required(tmp_path: Path) -> None:
    with start_apiserver(tmp_path / "kubeconfig", require_namespaces=True) as api:

        async def body(c: AsyncClient) -> None:
            with pytest.raises(ApiError) as err:
                await c.create(ew("a"))
            assert (err.value.status.code, err.value.status.message) == (404, 'namespaces "shop" not found')
            await c.create(Namespace(metadata=ObjectMeta(name="shop")))
            await c.create(ew("a"))

        run(api, body)
        assert [o["metadata"]["name"] for o in api.objects("externalworkloads", "shop")] == ["a"]


def test_a_cleanly_ended_watch_ends_its_connection(api: ApiServerHandle) -> None:
    """A watch's response says Connection: close and the server hangs up after its last chunk:
    no read for the client's hang-up is left pending to race (or eat) a next request on a
    kept-alive connection (it made the controller's tests flaky)."""
    path = "/apis/workload.linkerd.io/v1beta1/namespaces/shop/externalworkloads?watch=true"
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.token}\r\n\r\n"
    for end in (api.close_watches, api.expire_watches):
        with socket.create_connection((api.host, api.port), timeout=BOUND) as sock:
            sock.sendall(request.encode())
            api.wait_for_watches(1)
            end()
            received = b""
            while chunk := sock.recv(65536):  # b"": the server closed the connection
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert b"\r\nConnection: close" in head and body.endswith(b"0\r\n\r\n")
        assert api.open_watches() == 0


def test_a_watch_sees_only_its_own_resource_and_policy_crds_are_served(tmp_path: Path) -> None:
    """Live events of other resources (here another policy kind with the same name) never reach
    a watch; a kind served as absent (its CRD not installed) is 404 as on the real server."""
    with start_apiserver(tmp_path / "kubeconfig", absent=("TrafficTarget",)) as api:
        headers = {"Authorization": f"Bearer {api.token}"}
        url = f"{api.url}/apis/policy.linkerd.io/v1beta3/servers"
        meta = {"namespace": "shop", "name": "billing"}
        with httpx.stream("GET", url, params={"watch": "true"}, headers=headers) as watch:
            api.wait_for_watches(1)
            api.put({"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "MeshTLSAuthentication",
                     "metadata": meta, "spec": {"identities": ["*"]}})  # fmt: skip
            api.put({"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server", "metadata": meta,
                     "spec": {"externalWorkloadSelector": {}, "port": 80}})  # fmt: skip
            api.close_watches()
            events = [json.loads(line) for line in watch.iter_lines()]
        assert [(e["type"], e["object"]["kind"]) for e in events] == [("ADDED", "Server")]
        gone = httpx.get(f"{api.url}/apis/access.smi-spec.io/v1alpha3/traffictargets", headers=headers)
        assert gone.status_code == 404
