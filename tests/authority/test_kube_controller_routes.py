"""Traffic policy from the cluster's own route objects in controller mode (issue #21,
`serve --kubernetes --routes-from-cluster`): Gateway API / Linkerd HTTPRoutes, SMI TrafficSplits,
ServiceProfiles (their retry budget) and the Services they name put into the API are stored with
source "cluster", exactly as `meshagent authority route apply -f` reads the same objects, and
served in the directory's `routes` member; edits and deletions follow; `route apply` rows stay;
a set that cannot be honoured leaves the stored objects as they were and says why; a route CRD
that is not installed is "none of that kind".

A real Authority, the controller's real client and tests/kube/apiserver.py: a TEST STAND-IN for
the Kubernetes API server (not one; nothing here ran against a real cluster). Every wait is a
bounded poll for a state, never an assertion on how long something took.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.authority.kube_controller import RoutePlan, route_diff, route_scope
from agent.authority.kube_objects import WorkloadPort
from agent.authority.kube_routes import KnownRefs, RouteObject, ServiceInfo, resolve
from agent.authority.service import Authority
from agent.cli.authority import authority as authority_cli
from agent.logs import _FIELDS as FIELDS
from tests.authority.test_kube_controller import Running, settings, until
from tests.authority.test_kube_controller_policy import enroll
from tests.kube.apiserver import ApiServerHandle, start_apiserver
from tests.support import init_authority

HTTP = (WorkloadPort("http", 8080),)
GATEWAY_V1 = "gateway.networking.k8s.io/v1"
LINKERD_V1BETA3 = "policy.linkerd.io/v1beta3"


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("authority-template")
    init_authority(directory)
    return directory


@pytest.fixture
def authority(initialised: Path, tmp_path: Path) -> Authority:
    directory = tmp_path / "authority"
    shutil.copytree(initialised, directory)
    made = Authority.open(directory)
    for identity, name, address in (
        ("shop/billing", "billing-1", "198.18.0.5"),
        ("shop/billing-v1", "billing-v1", "198.18.0.6"),
        ("shop/billing-v2", "billing-v2", "198.18.0.7"),
        ("shop/web", "web-1", "198.18.0.8"),
    ):
        enroll(made, identity, name, address, {"app": name}, HTTP)
    return made


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServerHandle]:
    with start_apiserver(tmp_path / "kubeconfig") as handle:
        yield handle


def host_ref(name: str, weight: int | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"group": "meshagent.io", "kind": "Host", "name": name, "port": 8080}
    return ref if weight is None else ref | {"weight": weight}


def canary(v1: int = 90, v2: int = 10, api_version: str = GATEWAY_V1) -> dict[str, Any]:
    return {
        "apiVersion": api_version, "kind": "HTTPRoute",
        "metadata": {"namespace": "shop", "name": "billing-canary"},
        "spec": {
            "parentRefs": [host_ref("billing")],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                "backendRefs": [host_ref("billing-v1", v1), host_ref("billing-v2", v2)],
            }],
        },
    }  # fmt: skip


def service(name: str, namespace: str = "shop", **annotations: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {"clusterIP": "198.19.0.10", "selector": {"app": name},
                 "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]},
    }  # fmt: skip


def ledger_split(v1: int = 90, v2: int = 10) -> dict[str, Any]:
    return {
        "apiVersion": "split.smi-spec.io/v1alpha2", "kind": "TrafficSplit",
        "metadata": {"namespace": "shop", "name": "ledger-split"},
        "spec": {"service": "ledger", "backends": [{"service": "ledger", "weight": v1},
                                                   {"service": "ledger-v2", "weight": v2}]},
    }  # fmt: skip


# (A cluster whose domain is not cluster.local: the controller takes the cluster's own.)
LEDGER_PROFILE: dict[str, Any] = {
    "apiVersion": "linkerd.io/v1alpha2", "kind": "ServiceProfile",
    "metadata": {"namespace": "shop", "name": "ledger.shop.svc.k8s.example"},
    "spec": {"retryBudget": {"retryRatio": 0.1, "minRetriesPerSecond": 5, "ttl": "20s"}},
}  # fmt: skip

# The pods' business: never read, even though meshagent could not honour them.
INGRESS_ROUTE: dict[str, Any] = {
    "apiVersion": GATEWAY_V1, "kind": "HTTPRoute",
    "metadata": {"namespace": "web", "name": "ingress"},
    "spec": {"parentRefs": [{"name": "public-gateway"}],
             "rules": [{"filters": [{"type": "RequestHeaderModifier"}],
                        "backendRefs": [{"name": "frontend", "port": 80}]}]},
}  # fmt: skip
PODS_PROFILE: dict[str, Any] = {
    "apiVersion": "linkerd.io/v1alpha2", "kind": "ServiceProfile",
    "metadata": {"namespace": "web", "name": "frontend.web.svc.cluster.local"},
    "spec": {"routes": [{"name": "GET /", "condition": {"method": "GET", "pathRegex": "/"},
                         "isRetryable": True}]},
}  # fmt: skip

FILE_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: shop, name: web-by-hand}
spec:
  parentRefs: [{group: meshagent.io, kind: Host, name: web, port: 8080}]
  rules:
    - backendRefs: [{group: meshagent.io, kind: Host, name: web, port: 8080}]
      timeouts: {request: 5s}
"""


def apply_by_hand(authority: Authority, tmp_path: Path) -> None:
    """`meshagent authority route apply --dir DIR -f FILE`, the real command, in-process."""
    path = tmp_path / "by-hand.yaml"
    path.write_text(FILE_ROUTE)
    args = ["route", "apply", "--dir", str(authority.material.directory), "-f", str(path)]
    result = CliRunner().invoke(authority_cli, args)
    assert result.exit_code == 0, result.output


def rows(authority: Authority) -> dict[tuple[str, str, str], str]:
    """The stored route objects: key -> source."""
    return {o.key: o.source for o in authority.registry.route_objects()}


def served(authority: Authority) -> dict[tuple[str, str, int], list[list[tuple[str, int]]]]:
    """The directory's `routes` member as served: parent (kind, name, port) -> each route's
    first rule's backends (name, weight)."""
    out = {}
    for item in authority.routes_member():
        parent = item["parent"]
        out[(parent["kind"], parent["name"], parent["port"])] = [
            [(b["ref"]["name"], b["weight"]) for b in route["rules"][0]["backends"]]
            for route in item["routes"]
        ]
    return out


def budget(authority: Authority, kind: str, name: str) -> Any:
    item = next(
        i for i in authority.routes_member() if (i["parent"]["kind"], i["parent"]["name"]) == (kind, name)
    )
    return item.get("budget")


def routes_settings(api: ApiServerHandle, **kw: Any) -> Any:
    return settings(api, routes=True, **kw)


CLUSTER_ROWS = {
    ("HTTPRoute", "shop", "billing-canary"): "cluster",
    ("TrafficSplit", "shop", "ledger-split"): "cluster",
    ("ServiceProfile", "shop", "ledger.shop.svc.k8s.example"): "cluster",
    ("Service", "shop", "ledger"): "cluster",
    ("Service", "shop", "ledger-v2"): "cluster",
}
BY_HAND = {("HTTPRoute", "shop", "web-by-hand"): "file"}


def test_cluster_route_objects_are_stored_and_served_and_follow_edits_and_deletes(
    authority: Authority, api: ApiServerHandle, tmp_path: Path
) -> None:
    """An HTTPRoute, a TrafficSplit with its Services and a ServiceProfile put into the API are
    stored with source "cluster" and served in `routes`; objects of the pods (a Gateway's
    route, a ServiceProfile of another Service, an unnamed Service) are not read; a weight edit
    and a delete follow; the `route apply` row stays throughout; the routes' status is never
    written."""
    apply_by_hand(authority, tmp_path)
    for doc in (canary(), ledger_split(), LEDGER_PROFILE, service("ledger"), service("ledger-v2"),
                service("unrelated"), INGRESS_ROUTE, PODS_PROFILE):  # fmt: skip
        api.put(doc)

    async def scenario() -> None:
        c = Running(authority, routes_settings(api))
        try:
            await until(
                "the cluster's routes stored", lambda: c.controller.status()["routes"]["objects"] == 5
            )
            assert rows(authority) == CLUSTER_ROWS | BY_HAND
            status = c.controller.status()["routes"]
            assert status | {"updated_at": None} == {
                "enabled": True, "synced": True, "objects": 5, "refused": [], "skipped": [], "missing": [],
                "updated_at": None,
            }  # fmt: skip
            member = served(authority)
            assert member[("Host", "billing", 8080)] == [[("billing-v1", 90), ("billing-v2", 10)]]
            assert member[("Service", "ledger", 8080)] == [[("ledger", 90), ("ledger-v2", 10)]]
            assert ("Host", "web", 8080) in member  # the file's
            assert budget(authority, "Service", "ledger") == {"ratio": 0.1, "min_per_s": 5, "ttl_s": 20.0}
            # A pass with nothing new writes nothing.
            written = c.controller.counts["routes_written"]
            again = await c.controller.sync_routes()
            assert (again.write, again.removed, c.controller.counts["routes_written"]) == (False, 0, written)

            route = api.get("HTTPRoute", "billing-canary", "shop")
            assert route is not None
            route["spec"]["rules"][0]["backendRefs"] = canary(50, 50)["spec"]["rules"][0]["backendRefs"]
            api.put(route)
            await until(
                "the new weights served",
                lambda: (
                    served(authority)[("Host", "billing", 8080)] == [[("billing-v1", 50), ("billing-v2", 50)]]
                ),
            )
            api.put(ledger_split(0, 1))
            await until(
                "the split's new weights served",
                lambda: served(authority)[("Service", "ledger", 8080)] == [[("ledger", 0), ("ledger-v2", 1)]],
            )
            api.delete("TrafficSplit", "ledger-split", "shop")
            # Its Services and ServiceProfile name nothing routed any more: their rows go too.
            await until(
                "the split's rows deleted",
                lambda: rows(authority) == {("HTTPRoute", "shop", "billing-canary"): "cluster"} | BY_HAND,
            )
            assert ("Service", "ledger", 8080) not in served(authority)
            api.delete("HTTPRoute", "billing-canary", "shop")
            await until("every cluster row deleted", lambda: rows(authority) == BY_HAND)
            assert list(served(authority)) == [("Host", "web", 8080)]
            assert c.controller.status()["routes"]["objects"] == 0
        finally:
            await c.close()
        # Read, never written: no write of any kind to a route resource (status included).
        for plural in ("httproutes", "trafficsplits", "serviceprofiles"):
            assert [r for r in api.requests(path_contains=f"/{plural}") if r.method != "GET"] == []

    asyncio.run(scenario())


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS, {}) for r in caplog.records if r.getMessage() == event]


def test_a_refused_object_keeps_its_stored_row_and_the_rest_applies(
    authority: Authority, api: ApiServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """An object that cannot be honoured (a Host parent or backend no enrolled host has) is
    refused alone: it keeps its stored row if it had one (served as before), every other
    object of the set applies (an edit made meanwhile too); the refusal names the object
    (status and one log line); fixing or deleting it applies it."""
    caplog.set_level(logging.INFO, logger="meshagent.authority.kube")
    api.put(canary(api_version=LINKERD_V1BETA3))

    async def scenario() -> None:
        c = Running(authority, routes_settings(api))
        try:
            await until("applied", lambda: c.controller.status()["routes"]["objects"] == 1)
            orphan = canary(api_version=LINKERD_V1BETA3)
            orphan["metadata"]["name"] = "billing-orphan"
            orphan["spec"]["parentRefs"] = [host_ref("nobody")]
            api.put(orphan)
            api.put(canary(1, 1, api_version=LINKERD_V1BETA3))  # an edit of another object
            await until(
                "the edit applied next to the refused object",
                lambda: (
                    served(authority).get(("Host", "billing", 8080))
                    == [[("billing-v1", 1), ("billing-v2", 1)]]
                ),
            )
            await until("refused", lambda: c.controller.status()["routes"]["refused"] != [])
            refused = c.controller.status()["routes"]["refused"]
            assert [p.partition(": ")[0] for p in refused] == ["HTTPRoute shop/billing-orphan"], refused
            assert rows(authority) == {("HTTPRoute", "shop", "billing-canary"): "cluster"}

            # The stored object made unhonourable: its row (1:1) stays and is served.
            before_rows = authority.registry.route_objects()
            bad = canary(api_version=LINKERD_V1BETA3)
            bad["spec"]["rules"][0]["backendRefs"][1] = host_ref("nobody", 10)
            api.put(bad)
            await until("both refused", lambda: len(c.controller.status()["routes"]["refused"]) == 2)
            assert (await c.controller.sync_routes()).problems  # (one more pass: logged once each)
            assert authority.registry.route_objects() == before_rows
            assert served(authority)[("Host", "billing", 8080)] == [[("billing-v1", 1), ("billing-v2", 1)]]
            lines = logged(caplog, "kube.routes_refused")
            assert sorted(line["object"] for line in lines) == [
                "HTTPRoute shop/billing-canary", "HTTPRoute shop/billing-orphan",
            ], lines  # fmt: skip
            assert lines[0]["kept"] == "its stored row, if any"

            api.delete("httproutes.policy.linkerd.io", "billing-orphan", "shop")
            api.put(canary(api_version=LINKERD_V1BETA3))
            await until("accepted", lambda: c.controller.status()["routes"]["refused"] == [])
            await until(
                "the fixed object applied",
                lambda: (
                    served(authority)[("Host", "billing", 8080)] == [[("billing-v1", 90), ("billing-v2", 10)]]
                ),
            )
            assert len(logged(caplog, "kube.routes_accepted")) == 1
        finally:
            await c.close()

    asyncio.run(scenario())


def test_routes_meshagent_does_not_implement_are_skipped_not_refused(
    authority: Authority, api: ApiServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """Ordinary objects of a Linkerd cluster meshagent cannot honour do not block the others:
    a route with a filter, a consumer route (its Service parent in another namespace) and a
    policy.linkerd.io HTTPRoute with the namespace/name of a Gateway API one are left out,
    listed under `routes.skipped` and logged once each (kube.route_skipped); the rest is stored."""
    caplog.set_level(logging.INFO, logger="meshagent.authority.kube")
    filtered = canary(api_version=LINKERD_V1BETA3)
    filtered["metadata"]["name"] = "billing-headers"
    filtered["spec"]["parentRefs"] = [host_ref("billing-v1")]
    filtered["spec"]["rules"][0]["filters"] = [{"type": "RequestHeaderModifier"}]
    consumer = canary()
    consumer["metadata"] = {"namespace": "web", "name": "billing-for-web"}
    consumer["spec"]["parentRefs"] = [
        {"group": "", "kind": "Service", "namespace": "shop", "name": "billing"}
    ]
    for doc in (canary(), canary(1, 1, api_version=LINKERD_V1BETA3), filtered, consumer):
        api.put(doc)

    async def scenario() -> None:
        c = Running(authority, routes_settings(api))
        try:
            await until("applied", lambda: c.controller.status()["routes"]["objects"] == 1)
            await until("skipped", lambda: len(c.controller.status()["routes"]["skipped"]) == 3)
            await c.controller.sync_routes()  # one more pass: still logged once each
            status = c.controller.status()["routes"]
            assert status["refused"] == []
            assert sorted(s.partition(": ")[0] for s in status["skipped"]) == [
                f"HTTPRoute shop/billing-canary ({LINKERD_V1BETA3})",
                f"HTTPRoute shop/billing-headers ({LINKERD_V1BETA3})",
                f"HTTPRoute web/billing-for-web ({GATEWAY_V1})",
            ], status  # fmt: skip
            [row] = authority.registry.route_objects()
            assert (row.key, row.api_version) == (("HTTPRoute", "shop", "billing-canary"), GATEWAY_V1)
            assert served(authority)[("Host", "billing", 8080)] == [[("billing-v1", 90), ("billing-v2", 10)]]
            lines = logged(caplog, "kube.route_skipped")
            assert sorted(line["name"] for line in lines) == [
                "shop/billing-canary", "shop/billing-headers", "web/billing-for-web",
            ], lines  # fmt: skip
            reasons = {line["name"]: line["reason"] for line in lines}
            assert reasons["shop/billing-headers"] == "filters are not implemented"
            assert reasons["web/billing-for-web"].startswith("consumer route")
            assert reasons["shop/billing-canary"].startswith("shadowed by the gateway.networking.k8s.io")
            assert all(line["kind"] == "HTTPRoute" for line in lines)
        finally:
            await c.close()

    asyncio.run(scenario())


def test_a_gateway_crd_serving_only_v1beta1_is_read_at_v1beta1(
    authority: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Gateway API before v1.0: the v1 list is 404, so the informer reads v1beta1 (logged
    once) and the route is stored with that apiVersion; the kind is not "missing"."""
    caplog.set_level(logging.INFO, logger="meshagent.authority.kube")
    with start_apiserver(tmp_path / "kubeconfig", absent=("httproutes.gateway.networking.k8s.io/v1",)) as api:
        api.put(canary(api_version="gateway.networking.k8s.io/v1beta1"))

        async def scenario() -> None:
            c = Running(authority, routes_settings(api))
            try:
                await until("applied", lambda: c.controller.status()["routes"]["objects"] == 1)
                [row] = authority.registry.route_objects()
                assert row.api_version == "gateway.networking.k8s.io/v1beta1"
                assert (
                    "httproutes.gateway.networking.k8s.io" not in c.controller.status()["routes"]["missing"]
                )
                assert served(authority)[("Host", "billing", 8080)] == [
                    [("billing-v1", 90), ("billing-v2", 10)]
                ]
                [line] = logged(caplog, "kube.crd_version_fallback")
                assert (line["unserved"], line["version"]) == ("v1", "v1beta1")
                assert not [x for x in logged(caplog, "kube.crd_missing") if "gateway" in str(x["resource"])]
            finally:
                await c.close()

        asyncio.run(scenario())


def test_a_gateway_crd_serving_neither_version_is_missing_and_tried_again_from_v1(
    authority: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No Gateway HTTPRoute CRD at all: v1 then v1beta1 are 404, the kind is "missing" (logged
    once), and the next try starts from v1 again."""
    caplog.set_level(logging.INFO, logger="meshagent.authority.kube")
    with start_apiserver(tmp_path / "kubeconfig", absent=("httproutes.gateway.networking.k8s.io",)) as api:

        async def scenario() -> None:
            c = Running(authority, routes_settings(api))
            try:
                await until(
                    "missing",
                    lambda: (
                        "httproutes.gateway.networking.k8s.io" in c.controller.status()["routes"]["missing"]
                    ),
                )
                await until(
                    "tried again", lambda: len(api.requests("GET", "/gateway.networking.k8s.io/v1/")) >= 2
                )
                assert api.requests("GET", "/gateway.networking.k8s.io/v1beta1/")
                missing = [x for x in logged(caplog, "kube.crd_missing") if "gateway" in str(x["resource"])]
                assert len(missing) == 1
                assert len(logged(caplog, "kube.crd_version_fallback")) == 1
            finally:
                await c.close()

        asyncio.run(scenario())


def test_without_routes_from_cluster_the_cluster_rows_stay_served_and_are_named(
    authority: Authority, api: ApiServerHandle, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Serving without --routes-from-cluster deletes nothing: the rows an earlier run stored
    from the cluster stay served (a warning names them once at start), `route list` shows
    their source and `route remove` removes them."""
    caplog.set_level(logging.INFO, logger="meshagent.authority.kube")
    api.put(canary())

    async def first() -> None:
        c = Running(authority, routes_settings(api))
        try:
            await until("applied", lambda: c.controller.status()["routes"]["objects"] == 1)
        finally:
            await c.close()

    async def second() -> None:
        api.delete("httproutes.gateway.networking.k8s.io", "billing-canary", "shop")  # not read now
        c = Running(authority, settings(api))
        try:
            await until("warned", lambda: bool(logged(caplog, "kube.cluster_routes_kept")))
        finally:
            await c.close()

    asyncio.run(first())
    asyncio.run(second())
    [line] = logged(caplog, "kube.cluster_routes_kept")
    assert (line["rows"], line["objects"]) == (1, "HTTPRoute shop/billing-canary")
    assert rows(authority) == {("HTTPRoute", "shop", "billing-canary"): "cluster"}
    assert served(authority)[("Host", "billing", 8080)] == [[("billing-v1", 90), ("billing-v2", 10)]]
    directory = str(authority.material.directory)
    listed = CliRunner().invoke(authority_cli, ["route", "list", "--dir", directory])
    assert listed.exit_code == 0 and "cluster" in listed.output.splitlines()[-1], listed.output
    gone = CliRunner().invoke(
        authority_cli, ["route", "remove", "--dir", directory, "HTTPRoute", "shop/billing-canary"]
    )
    assert gone.exit_code == 0, gone.output
    assert rows(authority) == {}


def test_missing_route_crds_are_none_of_that_kind(
    authority: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the Gateway API's HTTPRoute is installed: its route is stored; the other three are
    listed as missing in the status, logged once each however often they are tried again, and
    are no error."""
    caplog.set_level(logging.INFO, logger="meshagent.authority.kube")
    absent = ("httproutes.policy.linkerd.io", "TrafficSplit", "ServiceProfile")
    with start_apiserver(tmp_path / "kubeconfig", absent=absent) as api:
        api.put(canary())

        async def scenario() -> None:
            c = Running(authority, routes_settings(api))
            try:
                await until("applied", lambda: c.controller.status()["routes"]["objects"] == 1)
                await until("tried again", lambda: len(api.requests("GET", "/trafficsplits")) >= 3)
                status = c.controller.status()
                assert status["routes"]["missing"] == [
                    "httproutes.policy.linkerd.io", "serviceprofiles.linkerd.io",
                    "trafficsplits.split.smi-spec.io",
                ]  # fmt: skip
                assert status["routes"]["refused"] == [] and status["errors"] == {}
                missing = [str(getattr(r, FIELDS, {}).get("resource")) for r in caplog.records
                           if r.getMessage() == "kube.crd_missing"]  # fmt: skip
                assert sorted(missing) == status["routes"]["missing"]
                assert rows(authority) == {("HTTPRoute", "shop", "billing-canary"): "cluster"}
            finally:
                await c.close()

        asyncio.run(scenario())


def test_with_discovery_the_services_are_discovery_s_and_their_edits_follow(
    authority: Authority, api: ApiServerHandle
) -> None:
    """With discovery on (serve's default) the route pass reads discovery's Services: a
    TrafficSplit and its Services are stored, and a Service's Linkerd annotation added later
    reaches the stored Service and the served route's timeouts."""
    for doc in (ledger_split(), service("ledger"), service("ledger-v2")):
        api.put(doc)

    def ledger_row() -> dict[str, Any]:
        row = next(o for o in authority.registry.route_objects() if o.key == ("Service", "shop", "ledger"))
        return row.body

    async def scenario() -> None:
        c = Running(authority, routes_settings(api, discovery=True))
        plans: list[RoutePlan] = []
        sync = c.controller.sync_routes

        async def recorded() -> RoutePlan:  # (installed before the controller's task first runs)
            plan = await sync()
            plans.append(plan)
            return plan

        c.controller.sync_routes = recorded  # type: ignore[method-assign]
        try:
            await until("the split stored", lambda: c.controller.status()["routes"]["objects"] == 3)
            assert "annotations" not in ledger_row()["metadata"]
            # The pass our own write causes (the registry's version moved) is over: only the
            # Service's edit can cause the next one.
            await until("a pass after the write", lambda: any(p.write for p in plans) and not plans[-1].write)
            ledger = api.get("Service", "ledger", "shop")
            assert ledger is not None
            ledger["metadata"]["annotations"] = {"timeout.linkerd.io/request": "7s"}
            api.put(ledger)
            await until(
                "the annotation stored",
                lambda: ledger_row()["metadata"].get("annotations") == {"timeout.linkerd.io/request": "7s"},
            )
            [item] = [i for i in authority.routes_member() if i["parent"]["name"] == "ledger"]
            assert item["routes"][0]["rules"][0]["timeouts"]["request_ms"] == 7000
        finally:
            await c.close()

    asyncio.run(scenario())


# --- the pure parts -----------------------------------------------------------------------------


def test_route_scope_keeps_what_can_reach_hosts() -> None:
    """GAMMA routes (Service or Host parents), every TrafficSplit, the ServiceProfiles of their
    parents and the Services they name or that carry Linkerd's route annotations; not a
    Gateway's route, another Service's ServiceProfile or a plain Service."""
    gamma = copy.deepcopy(canary())
    gamma["metadata"]["name"] = "orders"
    gamma["spec"]["parentRefs"] = [{"group": "", "kind": "Service", "name": "orders", "port": 8080}]
    gamma["spec"]["rules"][0]["backendRefs"] = [{"name": "orders-v2", "port": 8080}]
    orders_profile = copy.deepcopy(LEDGER_PROFILE)
    orders_profile["metadata"]["name"] = "orders.shop.svc.cluster.local"
    objects = {
        "httproutes": [canary(), gamma, INGRESS_ROUTE],
        "trafficsplits": [ledger_split()],
        "serviceprofiles": [LEDGER_PROFILE, orders_profile, PODS_PROFILE],
    }
    services = [service(n) for n in ("orders", "orders-v2", "ledger", "ledger-v2", "unrelated")]
    services.append(service("timed", **{"timeout.linkerd.io/request": "5s"}))
    services.append(service("frontend", "web"))
    chosen = {
        (o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in route_scope(objects, services)
    }
    assert chosen == {
        ("HTTPRoute", "shop", "billing-canary"), ("HTTPRoute", "shop", "orders"),
        ("TrafficSplit", "shop", "ledger-split"),
        ("ServiceProfile", "shop", "ledger.shop.svc.k8s.example"),
        ("ServiceProfile", "shop", "orders.shop.svc.cluster.local"),
        ("Service", "shop", "orders"), ("Service", "shop", "orders-v2"), ("Service", "shop", "ledger"),
        ("Service", "shop", "ledger-v2"), ("Service", "shop", "timed"),
    }  # fmt: skip


def test_route_scope_skips_what_meshagent_does_not_implement_with_the_reason() -> None:
    """Attached HTTPRoutes left out with a reason (never refused): a consumer route, filters on
    a rule or a backend, hostnames, a Gateway parent next to a Service parent, and the
    policy.linkerd.io namesake of a Gateway API route; the Services only they name are not read."""

    def route(name: str, api_version: str = GATEWAY_V1, **spec: Any) -> dict[str, Any]:
        doc = copy.deepcopy(canary(api_version=api_version))
        doc["metadata"]["name"] = name
        doc["spec"]["parentRefs"] = [{"group": "", "kind": "Service", "name": name, "port": 8080}]
        doc["spec"]["rules"][0]["backendRefs"] = [{"name": f"{name}-v2", "port": 8080}]
        doc["spec"].update(spec)
        return doc

    consumer = route("consumer")
    consumer["metadata"]["namespace"] = "web"
    consumer["spec"]["parentRefs"][0]["namespace"] = "shop"
    backend_filter = route("backend-filter")
    backend_filter["spec"]["rules"][0]["backendRefs"][0]["filters"] = [{"type": "RequestHeaderModifier"}]
    rule_filter = route("rule-filter")
    rule_filter["spec"]["rules"][0]["filters"] = [{"type": "RequestRedirect"}]
    both = route("both")
    both["spec"]["parentRefs"].append({"name": "public-gateway"})
    objects = {
        "gateway": [
            route("kept"),
            consumer,
            backend_filter,
            rule_filter,
            both,
            route("named", hostnames=["a.example"]),
        ],
        "linkerd": [route("kept", LINKERD_V1BETA3)],
    }
    services = [service(f"{n}{v}") for n in ("kept", "consumer", "both") for v in ("", "-v2")]
    skipped: list[tuple[str, str]] = []
    chosen = {
        (o["kind"], o["metadata"]["name"], o["apiVersion"]) for o in route_scope(objects, services, skipped)
    }
    assert chosen == {
        ("HTTPRoute", "kept", GATEWAY_V1), ("Service", "kept", "v1"), ("Service", "kept-v2", "v1"),
    }  # fmt: skip
    reasons = {label.partition(" (")[0]: reason.partition(":")[0] for label, reason in skipped}
    assert reasons == {
        "HTTPRoute web/consumer": "consumer route",
        "HTTPRoute shop/backend-filter": "filters are not implemented",
        "HTTPRoute shop/rule-filter": "filters are not implemented",
        "HTTPRoute shop/both": "a Gateway parent next to a Service or Host parent",
        "HTTPRoute shop/named": "hostnames are not implemented",
        "HTTPRoute shop/kept": "shadowed by the gateway.networking.k8s.io HTTPRoute of the same "
        "namespace/name",
    }  # fmt: skip
    assert len(skipped) == 6


def _obj(name: str, source: str, weight: int = 1) -> RouteObject:
    body = {"apiVersion": GATEWAY_V1, "kind": "HTTPRoute", "metadata": {"name": name}, "spec": {"w": weight}}
    return RouteObject("HTTPRoute", "shop", name, GATEWAY_V1, body, source, 1.0)


def test_route_diff_compares_cluster_rows_and_namesakes_only() -> None:
    stored = [_obj("a", "cluster"), _obj("b", "cluster"), _obj("f", "file")]
    assert route_diff([_obj("a", "cluster"), _obj("b", "cluster")], stored) == (False, 0)
    assert route_diff([_obj("a", "cluster", 2), _obj("b", "cluster")], stored) == (True, 0)
    assert route_diff([_obj("a", "cluster")], stored) == (True, 1)
    assert route_diff([], [_obj("f", "file")]) == (False, 0)
    # The cluster's namesake of a file row: written (the row becomes the cluster's).
    assert route_diff([_obj("a", "cluster"), _obj("b", "cluster"), _obj("f", "cluster")], stored) == (True, 0)


def test_serve_refuses_routes_from_cluster_without_kubernetes(tmp_path: Path) -> None:
    args = ["serve", "--dir", str(tmp_path / "none"), "--routes-from-cluster"]
    result = CliRunner().invoke(authority_cli, args)
    assert result.exit_code == 2, result.output
    assert "--routes-from-cluster apply to the controller: add --kubernetes" in result.output


def test_an_object_as_the_api_returns_it_is_read_and_its_status_never_kept() -> None:
    """What a real API server returns (CRD defaults filled in, uid, managedFields, a status the
    policy controller writes) reads as the object does, and a status change alone changes no
    stored row (so Linkerd's status writes make no registry write)."""
    known = KnownRefs(
        services={
            ("shop", n): ServiceInfo("shop", n, (("http", 8080),), frozenset(), {}, True)
            for n in ("orders", "orders-v2")
        }
    )

    def returned(status: str) -> dict[str, Any]:
        return {
            "apiVersion": GATEWAY_V1, "kind": "HTTPRoute",
            "metadata": {"namespace": "shop", "name": "orders", "uid": "u-1", "resourceVersion": "5",
                         "generation": 1, "creationTimestamp": "2026-12-01T00:00:00Z",
                         "managedFields": [{"manager": "kubectl"}],
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "orders", "port": 8080}],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"},
                                 "headers": [{"type": "Exact", "name": "x", "value": "1"}]}],
                    "backendRefs": [{"group": "", "kind": "Service", "name": "orders-v2", "port": 8080,
                                     "weight": 1}],
                }],
            },
            "status": {"parents": [{"parentRef": {"name": "orders"},
                                    "controllerName": "linkerd.io/policy-controller",
                                    "conditions": [{"type": "Accepted", "status": status}]}]},
        }  # fmt: skip

    [first] = resolve(route_scope({"httproutes": [returned("True")]}, []), known, source="cluster")
    [again] = resolve(route_scope({"httproutes": [returned("False")]}, []), known, source="cluster")
    assert set(first.body) == {"apiVersion", "kind", "metadata", "spec"}
    assert first.body["metadata"] == {
        "name": "orders", "namespace": "shop", "creationTimestamp": "2026-12-01T00:00:00Z"
    }  # fmt: skip
    assert (first.source, route_diff([again], [first])) == ("cluster", (False, 0))


def test_a_replica_that_does_not_hold_the_lease_reads_and_writes_no_routes(
    authority: Authority, api: ApiServerHandle
) -> None:
    """Another replica holds the Lease: this one lists no route object and stores nothing;
    once the Lease is free it takes it and stores the cluster's routes."""
    api.put(canary())
    api.put({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"namespace": "meshagent", "name": "meshagent-authority-default"},
        "spec": {"holderIdentity": "replica-b", "leaseDurationSeconds": 3600,
                 "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 0},
    })  # fmt: skip

    async def scenario() -> None:
        c = Running(authority, routes_settings(api))
        try:
            await until("standing by", lambda: c.controller.holder == "replica-b")
            await until("a second election round", lambda: len(api.requests("GET", "/leases/")) >= 2)
            assert not c.controller.leading()
            assert api.requests(path_contains="/httproutes") == []
            assert rows(authority) == {}
            assert c.controller.status()["routes"]["synced"] is False
            api.delete("Lease", "meshagent-authority-default", "meshagent")
            await until(
                "leading and stored",
                lambda: rows(authority) == {("HTTPRoute", "shop", "billing-canary"): "cluster"},
            )
            assert c.controller.leading()
        finally:
            await c.close()

    asyncio.run(scenario())
