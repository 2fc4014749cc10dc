"""Reconciliation as a pure function (agent/authority/kube_reconcile.py): a named table test per
case of issue #17's Proof list, and properties (hypothesis): applying the actions to what was
observed gives what is desired, and desired against itself needs nothing.

`FakeCluster` is a model of the API server semantics the actions rely on, written from the
Kubernetes API conventions, not from the code under test: POST fails on an existing name, PUT
and merge patch with a stale resourceVersion get 409, DELETE honours uid/resourceVersion
preconditions, the main resource ignores `status` and `/status` ignores the rest, and
managedFields move ownership of a changed label/annotation to whoever changed it (Update
operations). It is not a Kubernetes API server; nothing here ran against one."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.authority import kube_objects as ko
from agent.authority.kube_objects import Health, HostWorkload, WorkloadPort
from agent.authority.kube_reconcile import (
    FIELD_MANAGER,
    Action,
    Conflict,
    Create,
    Delete,
    ObjectKey,
    PatchStatus,
    Update,
    describe,
    object_key,
    reconcile,
)
from agent.identity.names import WorkloadIdentity

AUTH = "default"
T0 = datetime(2026, 12, 6, 9, 0, 0, tzinfo=UTC)
PROPERTY = settings(
    max_examples=200,
    derandomize=True,  # the project's CI profile (tests/fuzz/conftest.py): reproducible
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


class Rejected(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(f"{status} {why}")
        self.status = status


def _key(obj: Mapping[str, Any]) -> ObjectKey:
    key = object_key(obj)
    assert key is not None
    return key


class FakeCluster:
    """Objects by key, with the write semantics above."""

    def __init__(self, objects: Iterable[Mapping[str, Any]] = ()) -> None:
        self.objects: dict[ObjectKey, dict[str, Any]] = {}
        self._rv = 100
        self._uid = 0
        # (key) -> manager -> {"labels": {k...}, "annotations": {k...}}
        self.owners: dict[ObjectKey, dict[str, dict[str, set[str]]]] = {}
        for obj in objects:
            self.create(obj, manager="seed")
            if "status" in obj:
                self.objects[_key(obj)]["status"] = copy.deepcopy(obj["status"])

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def observe(self) -> list[dict[str, Any]]:
        out = []
        for key, obj in self.objects.items():
            o = copy.deepcopy(obj)
            o["metadata"]["managedFields"] = self._managed_fields(key)
            out.append(o)
        return out

    def _managed_fields(self, key: ObjectKey) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for manager, fields in sorted(self.owners.get(key, {}).items()):
            meta: dict[str, Any] = {
                f"f:{f}": {f"f:{k}": {} for k in sorted(keys)} for f, keys in fields.items() if keys
            }
            entries.append(
                {
                    "manager": manager,
                    "operation": "Update",
                    "apiVersion": "v1",
                    "fieldsV1": {"f:metadata": meta},
                }
            )
        return entries

    def _take_ownership(
        self, key: ObjectKey, old: Mapping[str, Any], new: Mapping[str, Any], manager: str
    ) -> None:
        owners = self.owners.setdefault(key, {})
        for field in ("labels", "annotations"):
            before = old.get("metadata", {}).get(field) or {}
            after = new.get("metadata", {}).get(field) or {}
            for k in set(before) | set(after):
                if before.get(k) == after.get(k) and k in before:
                    continue
                for m in owners.values():
                    m.get(field, set()).discard(k)
                if k in after:
                    owners.setdefault(manager, {"labels": set(), "annotations": set()})[field].add(k)

    def create(self, body: Mapping[str, Any], manager: str = FIELD_MANAGER) -> None:
        key = _key(body)
        if key in self.objects:
            raise Rejected(409, "AlreadyExists")
        obj = {k: copy.deepcopy(v) for k, v in body.items() if k != "status"}  # status ignored
        self._uid += 1
        obj["metadata"] = {**obj["metadata"], "uid": f"uid-{self._uid}", "resourceVersion": self._next_rv()}
        obj["metadata"].pop("managedFields", None)
        self.objects[key] = obj
        self.owners[key] = {}
        self._take_ownership(key, {}, obj, manager)

    def _check(self, key: ObjectKey, rv: str | None, uid: str | None = None) -> dict[str, Any]:
        if key not in self.objects:
            raise Rejected(404, "NotFound")
        live = self.objects[key]
        if rv is not None and live["metadata"]["resourceVersion"] != rv:
            raise Rejected(409, "Conflict: the object has been modified")
        if uid is not None and live["metadata"]["uid"] != uid:
            raise Rejected(409, "Conflict: uid precondition")
        return live

    def update(self, body: Mapping[str, Any], manager: str = FIELD_MANAGER) -> str:
        key = _key(body)
        live = self._check(key, body["metadata"].get("resourceVersion"))
        new = {k: copy.deepcopy(v) for k, v in body.items() if k != "status"}
        if "status" in live:
            new["status"] = live["status"]  # the main resource ignores status
        new["metadata"] = copy.deepcopy(body["metadata"])
        new["metadata"].pop("managedFields", None)  # omitted: kept as they were
        new["metadata"]["uid"] = live["metadata"]["uid"]
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._take_ownership(key, live, new, manager)
        self.objects[key] = new
        return str(new["metadata"]["resourceVersion"])

    def patch_status(self, key: ObjectKey, body: Mapping[str, Any], rv: str | None) -> str:
        live = self._check(key, rv)
        status = live.setdefault("status", {})
        for k, v in body["status"].items():  # JSON merge patch: lists are replaced whole
            status[k] = copy.deepcopy(v)
        live["metadata"]["resourceVersion"] = self._next_rv()
        return str(live["metadata"]["resourceVersion"])

    def delete(self, key: ObjectKey, uid: str, rv: str) -> None:
        self._check(key, rv, uid)
        del self.objects[key]
        del self.owners[key]

    def apply(self, actions: Iterable[Action]) -> None:
        """Execute actions as the controller will: one request each."""
        last_rv: dict[ObjectKey, str] = {}
        for action in actions:
            if isinstance(action, Create):
                self.create(action.body)
                last_rv[action.key] = self.objects[action.key]["metadata"]["resourceVersion"]
            elif isinstance(action, Update):
                assert action.body["metadata"]["resourceVersion"] == action.resource_version
                last_rv[action.key] = self.update(action.body)
            elif isinstance(action, PatchStatus):
                rv = action.resource_version if action.resource_version is not None else last_rv[action.key]
                if action.resource_version is not None:
                    assert action.body["metadata"]["resourceVersion"] == rv
                last_rv[action.key] = self.patch_status(action.key, action.body, rv)
            elif isinstance(action, Delete):
                self.delete(action.key, action.uid, action.resource_version)


# --- hosts ---------------------------------------------------------------------------------------


def host(
    n: int = 1,
    *,
    name: str | None = None,
    addresses: tuple[str, ...] = ("10.0.0.1",),
    ready: bool = True,
    labels: dict[str, str] | None = None,
    ports: tuple[WorkloadPort, ...] = (WorkloadPort("http", 8080),),
    since: datetime = T0,
) -> HostWorkload:
    health = Health(ready, "AgentReady" if ready else "AgentStale", "", since)
    return HostWorkload(
        host_id=f"h-{n:04d}",
        host_name=name or f"legacy-{n}",
        identity=WorkloadIdentity("cluster.local", "shop", "billing"),
        addresses=addresses,
        ports=ports,
        health=health,
        labels=tuple(sorted((labels if labels is not None else {"app": "billing"}).items())),
    )


def ew(h: HostWorkload, authority: str = AUTH) -> dict[str, Any]:
    return ko.external_workload(h, authority)


def svc(ports: tuple[WorkloadPort, ...] = (WorkloadPort("http", 8080),)) -> dict[str, Any]:
    return ko.service("billing", "shop", {"app": "billing"}, ports, AUTH)


def k(obj: Mapping[str, Any]) -> ObjectKey:
    return _key(obj)


def synced(desired: list[dict[str, Any]]) -> FakeCluster:
    """A cluster where the controller already wrote `desired`."""
    cluster = FakeCluster()
    cluster.apply(reconcile(desired, [], AUTH))
    assert reconcile(desired, cluster.observe(), AUTH) == []
    return cluster


def hand_edit(cluster: FakeCluster, key: ObjectKey, edit: Any, manager: str = "kubectl-edit") -> None:
    obj = cluster.observe()[[_key(o) for o in cluster.observe()].index(key)]
    edit(obj)
    cluster.update(obj, manager=manager)


def writes(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Conflict)]


# --- table: one test per case --------------------------------------------------------------------


def test_new_host_is_created_then_its_status_patched() -> None:
    d = ew(host())
    actions = reconcile([d], [], AUTH)
    assert [type(a) for a in actions] == [Create, PatchStatus]
    create, patch = actions
    assert isinstance(create, Create) and isinstance(patch, PatchStatus)
    assert create.body == ko.without_status(d)
    assert "status" not in create.body  # the main resource would ignore it
    assert patch.resource_version is None  # the version the create returns
    assert patch.body["status"] == d["status"]
    assert "resourceVersion" not in patch.body["metadata"]
    cluster = FakeCluster()
    cluster.apply(actions)
    assert cluster.objects[k(d)]["status"] == d["status"]


def test_address_change_is_one_update_carrying_the_observed_resource_version() -> None:
    cluster = synced([ew(host())])
    moved = ew(host(addresses=("10.0.0.9", "fd00::9")))
    observed = cluster.observe()
    rv = observed[0]["metadata"]["resourceVersion"]
    actions = reconcile([moved], observed, AUTH)
    assert len(actions) == 1 and isinstance(actions[0], Update)
    update = actions[0]
    assert update.changed == ("spec",)
    assert update.resource_version == rv == update.body["metadata"]["resourceVersion"]
    assert update.body["spec"]["workloadIPs"] == [{"ip": "10.0.0.9"}, {"ip": "fd00::9"}]
    assert "status" not in update.body and "managedFields" not in update.body["metadata"]
    # A write by anyone between our read and our update makes it a 409, not a lost update.
    hand_edit(cluster, update.key, lambda o: o["metadata"]["labels"].update(team="x"))
    with pytest.raises(Rejected) as err:
        cluster.apply(actions)
    assert err.value.status == 409
    cluster.apply(reconcile([moved], cluster.observe(), AUTH))
    assert cluster.objects[k(moved)]["spec"] == moved["spec"]
    assert cluster.objects[k(moved)]["metadata"]["labels"]["team"] == "x"


def test_revoked_host_is_deleted_with_uid_and_resource_version_preconditions() -> None:
    a, b = ew(host(1)), ew(host(2))
    cluster = synced([a, b])
    observed = cluster.observe()
    actions = reconcile([a], observed, AUTH)  # host 2 revoked
    gone = next(o for o in observed if k(o) == k(b))
    assert actions == [Delete(k(b), gone["metadata"]["uid"], gone["metadata"]["resourceVersion"])]
    cluster.apply(actions)
    assert set(cluster.objects) == {k(a)}


def test_host_deleted_from_the_registry_is_garbage_collected_with_its_service() -> None:
    # Nothing desired at all (registry emptied, --service removed): every object of ours goes,
    # another authority's and an operator's stay.
    ours = [ew(host(1)), svc()]
    cluster = synced(ours)
    theirs = ew(host(3), authority="other")
    handmade = ew(host(4))
    for label in (ko.MANAGED_BY_LABEL, ko.AUTHORITY_LABEL):
        del handmade["metadata"]["labels"][label]
    cluster.create(theirs, manager="other")
    cluster.create(handmade, manager="kubectl")
    actions = reconcile([], cluster.observe(), AUTH)
    assert [type(a) for a in actions] == [Delete, Delete]
    assert {a.key for a in actions} == {k(o) for o in ours}
    cluster.apply(actions)
    assert set(cluster.objects) == {k(theirs), k(handmade)}


def test_ready_flip_is_a_status_patch_only_keeping_other_conditions() -> None:
    cluster = synced([ew(host())])
    key = k(ew(host()))
    other = {
        "type": "Audited",
        "status": "True",
        "reason": "Seen",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    cluster.objects[key]["status"]["conditions"].insert(0, other)
    down = ew(host(ready=False, since=T0 + timedelta(seconds=30)))
    observed = cluster.observe()
    actions = reconcile([down], observed, AUTH)
    assert len(actions) == 1 and isinstance(actions[0], PatchStatus)
    patch = actions[0]
    assert patch.resource_version == observed[0]["metadata"]["resourceVersion"]
    assert patch.body["metadata"]["resourceVersion"] == patch.resource_version
    assert patch.body["status"]["conditions"] == [other, down["status"]["conditions"][0]]
    cluster.apply(actions)
    assert reconcile([down], cluster.observe(), AUTH) == []
    # and back
    up = ew(host(since=T0 + timedelta(seconds=90)))
    actions = reconcile([up], cluster.observe(), AUTH)
    assert [type(a) for a in actions] == [PatchStatus]
    cluster.apply(actions)
    assert cluster.objects[key]["status"]["conditions"][1]["status"] == "True"


def test_object_edited_by_hand_gets_our_fields_back_and_keeps_the_rest() -> None:
    d = ew(host())
    cluster = synced([d])
    key = k(d)

    def edit(o: dict[str, Any]) -> None:
        o["metadata"]["labels"]["app"] = "hijacked"  # ours: restored
        del o["metadata"]["annotations"][ko.HOST_NAME_ANNOTATION]  # ours: restored
        o["metadata"]["labels"]["team"] = "payments"  # not ours: kept
        o["metadata"]["annotations"]["note"] = "by hand"  # not ours: kept
        o["metadata"]["finalizers"] = ["example.com/keep"]  # never ours: kept
        o["spec"]["workloadIPs"] = [{"ip": "192.0.2.66"}]  # spec is ours: restored
        o["spec"]["meshTLS"]["serverName"] = "evil.example"

    hand_edit(cluster, key, edit)
    actions = reconcile([d], cluster.observe(), AUTH)
    assert len(actions) == 1 and isinstance(actions[0], Update)
    assert actions[0].changed == ("metadata.labels", "metadata.annotations", "spec")
    cluster.apply(actions)
    got = cluster.objects[key]
    assert got["spec"] == d["spec"]
    assert got["metadata"]["labels"] == {**d["metadata"]["labels"], "team": "payments"}
    assert got["metadata"]["annotations"] == {**d["metadata"]["annotations"], "note": "by hand"}
    assert got["metadata"]["finalizers"] == ["example.com/keep"]
    assert reconcile([d], cluster.observe(), AUTH) == []


def test_label_we_no_longer_want_is_removed_only_while_it_is_still_ours() -> None:
    before = ew(host(labels={"app": "billing", "tier": "gold", "zone": "a"}))
    cluster = synced([before])
    key = k(before)
    # Someone re-sets zone: the API server gives them that field; tier stays ours.
    hand_edit(cluster, key, lambda o: o["metadata"]["labels"].update(zone="b"))
    after = ew(host(labels={"app": "billing"}))  # the operator dropped tier and zone
    actions = reconcile([after], cluster.observe(), AUTH)
    assert [type(a) for a in actions] == [Update]
    cluster.apply(actions)
    labels = cluster.objects[key]["metadata"]["labels"]
    assert "tier" not in labels  # ours, dropped
    assert labels["zone"] == "b"  # theirs now, kept
    assert reconcile([after], cluster.observe(), AUTH) == []


def test_service_fields_of_the_api_server_are_kept() -> None:
    d = svc()
    cluster = synced([d])
    key = k(d)
    server_set = {
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10"],
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "sessionAffinity": "None",
        "internalTrafficPolicy": "Cluster",
    }
    cluster.objects[key]["spec"].update(server_set)
    assert reconcile([d], cluster.observe(), AUTH) == []
    wider = svc((WorkloadPort("http", 8080), WorkloadPort("grpc", 9090)))
    actions = reconcile([wider], cluster.observe(), AUTH)
    assert [type(a) for a in actions] == [Update]
    cluster.apply(actions)
    assert cluster.objects[key]["spec"] == {**wider["spec"], **server_set}


def test_object_of_our_name_owned_by_someone_else_is_never_touched() -> None:
    d = ew(host())
    handmade = copy.deepcopy(d)
    handmade["metadata"]["labels"] = {"app": "billing"}
    handmade["spec"]["workloadIPs"] = [{"ip": "192.0.2.1"}]
    other = ew(host(), authority="staging")
    for foreign in (handmade, other):
        cluster = FakeCluster([foreign])
        before = cluster.observe()
        actions = reconcile([d], before, AUTH)
        assert len(actions) == 1 and isinstance(actions[0], Conflict)
        assert actions[0].reason == "not_ours" and actions[0].key == k(d)
        assert describe(actions[0])["reason"] == "not_ours"
        cluster.apply(actions)
        assert cluster.observe() == before
    # And a create racing a hand-made object of the same name fails instead of merging into it.
    cluster = FakeCluster([handmade])
    with pytest.raises(Rejected) as err:
        cluster.apply(reconcile([d], [], AUTH))
    assert err.value.status == 409


def test_observed_object_without_our_labels_is_ignored() -> None:
    stranger = ew(host(7))
    stranger["metadata"]["labels"] = {"app": "billing"}
    assert reconcile([], [stranger], AUTH) == []
    assert reconcile([ew(host(1))], [stranger], AUTH) == reconcile([ew(host(1))], [], AUTH)


def test_managed_fields_of_other_managers_subresources_or_odd_shapes_are_not_ours() -> None:
    d = ew(host(labels={"app": "billing"}))
    observed = copy.deepcopy(d)
    observed["metadata"]["labels"].update(tier="gold", zone="a", rack="r1")
    observed["metadata"].update(resourceVersion="5", uid="u")
    observed["metadata"]["managedFields"] = [
        {"manager": "kubectl-label", "fieldsV1": {"f:metadata": {"f:labels": {"f:tier": {}}}}},
        {
            "manager": FIELD_MANAGER,
            "subresource": "status",
            "fieldsV1": {"f:metadata": {"f:labels": {"f:zone": {}}}},
        },
        {"manager": FIELD_MANAGER, "fieldsV1": "garbage"},
        {"manager": FIELD_MANAGER, "fieldsV1": {"f:metadata": {"f:labels": ["f:rack"]}}},
        "not an entry",
    ]
    assert reconcile([d], [observed], AUTH) == []
    observed["metadata"]["managedFields"].append(
        {"manager": FIELD_MANAGER, "fieldsV1": {"f:metadata": {"f:labels": {"f:rack": {}, ".": {}}}}}
    )
    (update,) = reconcile([d], [observed], AUTH)
    assert isinstance(update, Update) and update.changed == ("metadata.labels",)
    assert update.body["metadata"]["labels"] == {**d["metadata"]["labels"], "tier": "gold", "zone": "a"}


def test_duplicates() -> None:
    a = ew(host(1))
    # The same desired object twice: one write.
    assert reconcile([a, copy.deepcopy(a)], [], AUTH) == reconcile([a], [], AUTH)
    # Two different desired objects with one name: neither is written, nor the observed deleted.
    cluster = synced([a])
    a2 = ew(host(1, addresses=("10.0.0.2",)))
    actions = reconcile([a, a2], cluster.observe(), AUTH)
    assert actions == [Conflict(k(a), "duplicate_desired", f"{k(a)} is listed more than once, differently")]
    # The same observed object twice (an overlapping relist): as once.
    observed = cluster.observe()
    assert reconcile([a2], observed + observed, AUTH) == reconcile([a2], observed, AUTH)
    # Two different versions of one observed object: wait for the next list.
    older = copy.deepcopy(observed[0])
    older["metadata"]["resourceVersion"] = "1"
    actions = reconcile([a2], [*observed, older], AUTH)
    assert [(type(x), getattr(x, "reason", "")) for x in actions] == [(Conflict, "duplicate_observed")]


def test_terminating_object_is_left_to_finish() -> None:
    cluster = synced([ew(host())])
    observed = cluster.observe()
    observed[0]["metadata"]["deletionTimestamp"] = "2026-12-06T09:00:00Z"
    assert reconcile([], observed, AUTH) == []
    assert reconcile([ew(host(addresses=("10.0.0.5",)))], observed, AUTH) == []


def test_malformed_observed_objects_are_reported_not_written() -> None:
    no_name: dict[str, Any] = {
        "apiVersion": ko.LINKERD_API_VERSION,
        "kind": "ExternalWorkload",
        "metadata": {},
    }
    no_rv = ew(host(2))
    assert reconcile([], [no_name], AUTH) == [
        Conflict(None, "malformed", "an object without apiVersion, kind or name")
    ]
    actions = reconcile([], [no_rv], AUTH)
    assert [(type(x), getattr(x, "reason", "")) for x in actions] == [(Conflict, "malformed")]
    changed = ew(host(2, addresses=("10.0.0.3",)))
    actions = reconcile([changed], [no_rv], AUTH)
    assert [(type(x), getattr(x, "reason", "")) for x in actions] == [(Conflict, "malformed")]


def test_spec_and_status_change_together_update_then_patch_status_after_it() -> None:
    cluster = synced([ew(host())])
    d = ew(host(addresses=("10.0.0.2",), ready=False, since=T0 + timedelta(seconds=5)))
    actions = reconcile([d], cluster.observe(), AUTH)
    assert [type(a) for a in actions] == [Update, PatchStatus]
    assert isinstance(actions[1], PatchStatus) and actions[1].resource_version is None
    cluster.apply(actions)  # the status patch used the version the update returned
    assert reconcile([d], cluster.observe(), AUTH) == []


def test_order_is_creates_updates_status_deletes_conflicts_whatever_the_input_order() -> None:
    keep, move, flip, gone = ew(host(1)), ew(host(2)), ew(host(3)), ew(host(4))
    cluster = synced([keep, move, flip, gone])
    foreign = ew(host(6))
    foreign["metadata"]["labels"] = {}
    cluster.create(foreign, manager="kubectl")
    desired = [keep, ew(host(2, addresses=("10.0.0.7",))), ew(host(3, ready=False)), ew(host(5)), ew(host(6))]
    expected = reconcile(desired, cluster.observe(), AUTH)
    assert [type(a) for a in expected] == [Create, PatchStatus, Update, PatchStatus, Delete, Conflict]
    assert [a.key.name for a in expected if a.key] == [
        k(ew(host(5))).name,
        k(ew(host(5))).name,
        k(move).name,
        k(flip).name,
        k(gone).name,
        k(foreign).name,
    ]
    rng = random.Random(7)
    for _ in range(10):
        d, o = desired[:], cluster.observe()
        rng.shuffle(d)
        rng.shuffle(o)
        assert reconcile(d, o, AUTH) == expected


def test_renamed_host_is_created_before_the_old_object_is_deleted() -> None:
    old = ew(host(1, name="db-old"))
    cluster = synced([old])
    new = ew(host(1, name="db-new"))
    actions = reconcile([new], cluster.observe(), AUTH)
    assert [type(a) for a in actions] == [Create, PatchStatus, Delete]
    assert actions[0].key == k(new) and actions[2].key == k(old)


def test_istio_workload_entry_is_reconciled_the_same_way() -> None:
    h = host()
    d = ko.workload_entry(h, AUTH)
    cluster = synced([d])
    down = ko.workload_entry(host(ready=False), AUTH)
    actions = reconcile([down], cluster.observe(), AUTH)
    assert [type(a) for a in actions] == [PatchStatus]
    assert isinstance(actions[0], PatchStatus)
    assert actions[0].body["status"]["conditions"][0]["type"] == "Healthy"
    # Switching flavour: make the entry, then remove the ExternalWorkload.
    actions = reconcile([ew(h)], cluster.observe(), AUTH)
    assert [type(a) for a in actions] == [Create, PatchStatus, Delete]


def test_desired_against_itself_needs_nothing() -> None:
    desired = [ew(host(1)), ew(host(2, ready=False)), ko.workload_entry(host(3), AUTH), svc()]
    assert reconcile(desired, desired, AUTH) == []


# --- properties ----------------------------------------------------------------------------------

_ADDRS = ["10.0.0.1", "10.0.0.2", "fd00::1", "192.0.2.7"]
_LABELS = st.dictionaries(st.sampled_from(["app", "tier", "zone"]), st.sampled_from(["a", "b"]), max_size=3)


@st.composite
def hosts(draw: st.DrawFn) -> HostWorkload:
    n = draw(st.integers(1, 5))
    return host(
        n,
        name=draw(st.sampled_from([f"legacy-{n}", f"renamed-{n}"])),
        addresses=tuple(draw(st.lists(st.sampled_from(_ADDRS), min_size=1, max_size=2, unique=True))),
        ready=draw(st.booleans()),
        labels=draw(_LABELS),
        ports=tuple(draw(st.sampled_from([[WorkloadPort("http", 8080)], [], [WorkloadPort("db", 5432)]]))),
        since=T0 + timedelta(seconds=draw(st.integers(0, 3))),
    )


@st.composite
def desired_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    flavour = draw(st.sampled_from([ko.external_workload, ko.workload_entry]))
    objs = {}
    for h in draw(st.lists(hosts(), max_size=5)):
        o = flavour(h, AUTH)
        objs[_key(o)] = o  # one object per name (the registry has one host per id)
    if draw(st.booleans()):
        ports = draw(st.sampled_from([(WorkloadPort("http", 8080),), (WorkloadPort("db", 5432),)]))
        objs[_key(svc(ports))] = svc(ports)
    return list(objs.values())


def _edit(rng_choice: int, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    labels = meta.setdefault("labels", {})
    if rng_choice == 0:
        labels["team"] = "hand"
    elif rng_choice == 1 and labels:
        labels[sorted(labels)[0]] = "edited"
    elif rng_choice == 2:
        meta.setdefault("annotations", {})["note"] = "hand"
    elif rng_choice == 3 and "spec" in obj:
        obj["spec"] = {**obj["spec"], "extra": "hand"} if obj["kind"] != "Service" else obj["spec"]
    elif rng_choice == 4 and labels:
        labels.pop(sorted(labels)[-1])
    elif rng_choice == 5:
        meta["finalizers"] = ["example.com/hold"]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[dict[str, Any]], FakeCluster, list[dict[str, Any]]]:
    """(desired now, a cluster reached from an earlier desired state plus hand edits and
    strangers, the strangers)."""
    earlier = draw(desired_sets())
    cluster = FakeCluster()
    cluster.apply(reconcile(earlier, [], AUTH))
    for key in sorted(cluster.objects):
        choice = draw(st.integers(0, 8))
        if choice == 8:
            cluster.delete(
                key,
                cluster.objects[key]["metadata"]["uid"],
                cluster.objects[key]["metadata"]["resourceVersion"],
            )
        elif choice <= 5:
            hand_edit(cluster, key, lambda o, c=choice: _edit(c, o))
        elif choice == 6 and "status" in cluster.objects[key]:
            conds = cluster.objects[key]["status"]["conditions"]
            conds.append(
                {
                    "type": "Other",
                    "status": "True",
                    "reason": "X",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            )
    desired = draw(desired_sets())
    strangers = []
    for h in draw(st.lists(hosts(), max_size=2)):
        o = ew(h, authority=draw(st.sampled_from(["other", AUTH])))
        if o["metadata"]["labels"].get(ko.AUTHORITY_LABEL) == AUTH:
            del o["metadata"]["labels"][ko.MANAGED_BY_LABEL]  # looks like ours, is not
        if _key(o) not in cluster.objects:
            cluster.create(o, manager="stranger")
            strangers.append(cluster.observe()[[_key(x) for x in cluster.observe()].index(_key(o))])
    return desired, cluster, strangers


@PROPERTY
@given(worlds())
def test_property_applying_the_actions_gives_desired(world: Any) -> None:
    desired, cluster, _ = world
    before = cluster.observe()
    # Not ours: strangers, and objects whose owner labels a hand edit removed (handed over).
    foreign = {_key(o): o for o in before if not ko.is_owned(o, AUTH)}
    actions = reconcile(desired, before, AUTH)
    cluster.apply(actions)
    after = cluster.observe()
    # One round is enough: nothing more to write; only objects not ours stay in conflict.
    again = reconcile(desired, after, AUTH)
    assert writes(again) == []
    conflicted = {a.key for a in again}
    assert all(isinstance(a, Conflict) and a.reason == "not_ours" for a in again)
    assert conflicted == foreign.keys() & {_key(d) for d in desired}
    by_key = {_key(o): o for o in after}
    # Objects not ours are exactly as they were.
    for key, o in foreign.items():
        assert by_key[key] == o
    # Every desired object not blocked by a stranger holds our fields.
    for d in desired:
        if _key(d) in conflicted:
            continue
        got = by_key[_key(d)]
        for field in ("labels", "annotations"):
            assert d["metadata"].get(field, {}).items() <= got["metadata"].get(field, {}).items()
            # whatever the API server still records as ours is something we want
            mine = cluster.owners[_key(d)].get(FIELD_MANAGER, {}).get(field, set())
            assert mine <= d["metadata"].get(field, {}).keys()
        if d["kind"] == "Service":
            assert all(got["spec"][f] == d["spec"][f] for f in ("type", "selector", "ports"))
        else:
            assert got["spec"] == d["spec"]
            ours = {c["type"] for c in d["status"]["conditions"]}
            assert [c for c in got["status"]["conditions"] if c["type"] in ours] == d["status"]["conditions"]
    # Nothing of ours that is not desired survives.
    desired_keys = {_key(d) for d in desired}
    for key, o in by_key.items():
        if ko.is_owned(o, AUTH):
            assert key in desired_keys


@PROPERTY
@given(desired_sets(), st.randoms(use_true_random=False))
def test_property_desired_against_itself_is_empty_and_order_free(
    desired: list[dict[str, Any]], rng: Any
) -> None:
    assert reconcile(desired, desired, AUTH) == []
    cluster = FakeCluster()
    actions = reconcile(desired, [], AUTH)
    shuffled = desired[:]
    rng.shuffle(shuffled)
    assert reconcile(shuffled, [], AUTH) == actions
    cluster.apply(actions)
    assert reconcile(desired, cluster.observe(), AUTH) == []


def test_fake_cluster_enforces_what_the_actions_rely_on() -> None:
    """The model itself: a test that passed against a permissive fake would prove nothing."""
    cluster = FakeCluster()
    d = ew(host())
    cluster.create(d)
    assert "status" not in cluster.objects[k(d)]
    with pytest.raises(Rejected, match="409"):
        cluster.create(d)
    live = cluster.observe()[0]
    stale = copy.deepcopy(live)
    cluster.update(live)
    with pytest.raises(Rejected, match="409"):
        cluster.update(stale)
    with pytest.raises(Rejected, match="409"):
        cluster.patch_status(k(d), {"status": {}}, stale["metadata"]["resourceVersion"])
    with pytest.raises(Rejected, match="409"):
        cluster.delete(k(d), "uid-other", cluster.observe()[0]["metadata"]["resourceVersion"])
    with pytest.raises(Rejected, match="404"):
        cluster.delete(k(d)._replace(name="nope"), "u", "1")
