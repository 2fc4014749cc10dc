"""The controller's decisions as a pure function: desired objects + observed objects -> actions.

`reconcile(desired, observed, authority)` compares what the authority wants in the cluster
(`kube_objects` builders, status included) with what the API server last reported, and returns
the writes that make the cluster match, in a fixed order. No I/O, no clock: the controller
(`kube_client`, next) lists/watches, calls this, and performs each action with one request.

Verbs, and why not server-side apply for the writes (docs/kubernetes.md planned SSA):

- `Create` is a POST of the object without status. A POST fails with 409 AlreadyExists when an
  object of that name exists; an apply would merge into it, and with `force` take its fields.
  The controller watches with our label selector, so a foreign object of our name is invisible
  until that 409 (the executor then GETs it and passes it in `observed`: a `Conflict` follows).
- `Update` is a PUT of the observed object with our fields set, carrying the observed
  `resourceVersion`: anyone's write since our read makes it a 409 and we decide again. (After a
  POST our fields are owned by an `Update` entry in managedFields; a later `Apply` by the same
  manager name would be a second owner and could never remove a field we drop.)
- `PatchStatus` is a JSON merge patch of `/status` (the CRDs have a status subresource: the
  main resource ignores `status`). It carries `resourceVersion` too: the conditions list is
  atomic (no list-type in either CRD), so the patch writes the whole list and must not race.
- `Delete` carries `preconditions: {uid, resourceVersion}`: an object re-created or edited since
  we looked is not removed.

Which fields are ours (server-side apply's field ownership is the model; `OWNERSHIP` below):

- `metadata.labels` / `metadata.annotations`: the keys we set. A key we set before and no
  longer want is removed: we know it was ours from `metadata.managedFields` (the entries of
  `FIELD_MANAGER` for the main resource). Keys anyone else set, or changed since we set them
  (the API server moves ownership of a changed field to its writer), are left alone.
- `spec`: the whole spec of an ExternalWorkload or WorkloadEntry (it describes the host and
  nothing else has a reason to write it: a hand edit, or a field someone adds, is reverted).
  Of a Service only `type`, `selector` and `ports`; `clusterIP(s)`, `ipFamilies`,
  `sessionAffinity` and the rest are the API server's and kept.
- `status.conditions`: the condition types we set (Ready, or Istio's Healthy); other
  conditions and other status fields are kept.
- Everything else (finalizers, ownerReferences, ...) is never written.

An observed object without both owner labels (`is_owned`) is never touched; if we want an
object of its name, that is a `Conflict`. A terminating owned object (deletionTimestamp set) is
left to finish; it is created again once gone.

Order: creates, then updates, then status-only patches, then deletes (each sorted by key), then
conflicts. Make before break: a renamed host (its object name comes from its name) or a flavour
switch is a create and a delete, and an executor interrupted half-way leaves an extra object,
never a Service with no endpoint. A `PatchStatus` after its own `Create`/`Update` has
`resource_version=None`: send the version that write returned.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from agent.authority.kube_objects import KubeObject, is_owned, status_patch, without_status

FIELD_MANAGER = "meshagent-authority"

# Parts of `spec` that are ours, per kind; a kind not listed: the whole spec.
OWNERSHIP: Mapping[str, tuple[str, ...]] = {"Service": ("type", "selector", "ports")}
_MAPS = ("labels", "annotations")

ConflictReason = Literal["not_ours", "duplicate_desired", "duplicate_observed", "malformed"]


class ObjectKey(NamedTuple):
    """An object's identity across API versions: group, kind, namespace, name."""

    group: str
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        kind = f"{self.kind}.{self.group}" if self.group else self.kind
        return f"{kind}/{self.namespace}/{self.name}" if self.namespace else f"{kind}/{self.name}"


@dataclass(frozen=True)
class Create:
    """POST `body` (the object without status; a PatchStatus follows if it has one)."""

    key: ObjectKey
    body: KubeObject


@dataclass(frozen=True)
class Update:
    """PUT `body`: the observed object with our fields set, `metadata.resourceVersion` =
    `resource_version` (409 if stale). `changed` names what differed, for the log."""

    key: ObjectKey
    body: KubeObject
    resource_version: str
    changed: tuple[str, ...]


@dataclass(frozen=True)
class PatchStatus:
    """Merge-patch `/status` with `body`. `resource_version` None: this follows a Create or
    Update of the same object in this list; send the resourceVersion that write returned."""

    key: ObjectKey
    body: KubeObject
    resource_version: str | None


@dataclass(frozen=True)
class Delete:
    """DELETE with `preconditions: {uid, resourceVersion}`."""

    key: ObjectKey
    uid: str
    resource_version: str


@dataclass(frozen=True)
class Conflict:
    """Nothing is written for `key`; log it (event `kube.conflict`) and say why."""

    key: ObjectKey | None
    reason: ConflictReason
    detail: str


Action = Create | Update | PatchStatus | Delete | Conflict


def object_key(obj: Mapping[str, Any]) -> ObjectKey | None:
    """The object's key, or None if it has no kind or name."""
    meta = obj.get("metadata")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(meta, Mapping) or not isinstance(api_version, str) or not isinstance(kind, str):
        return None
    name, namespace = meta.get("name"), meta.get("namespace") or ""
    if not isinstance(name, str) or not name or not isinstance(namespace, str) or not kind:
        return None
    group = api_version.rpartition("/")[0]
    return ObjectKey(group, kind, namespace, name)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _map(obj: Mapping[str, Any], field: str) -> dict[str, Any]:
    value = _meta(obj).get(field)
    return dict(value) if isinstance(value, Mapping) else {}


def _child(value: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    child = value.get(key)
    return child if isinstance(child, Mapping) else {}


def owned_keys(obj: Mapping[str, Any], field: str) -> set[str]:
    """The keys of `metadata.<field>` (labels or annotations) that managedFields says we own."""
    owned: set[str] = set()
    entries = _meta(obj).get("managedFields")
    for entry in entries if isinstance(entries, list) else []:
        if (
            not isinstance(entry, Mapping)
            or entry.get("manager") != FIELD_MANAGER
            or entry.get("subresource")
        ):
            continue
        fields = _child(_child(_child(entry, "fieldsV1"), "f:metadata"), f"f:{field}")
        owned.update(k[2:] for k in fields if isinstance(k, str) and k.startswith("f:"))
    return owned


def _merged_map(desired: Mapping[str, Any], observed: Mapping[str, Any], field: str) -> dict[str, Any]:
    """Observed keys, minus those we own and no longer want, with ours set on top."""
    want = _map(desired, field)
    stale = owned_keys(observed, field) - want.keys()
    merged = {k: v for k, v in _map(observed, field).items() if k not in stale}
    merged.update(want)
    return merged


def _merged_spec(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> Any:
    want = desired.get("spec")
    fields = OWNERSHIP.get(str(desired.get("kind")))
    have = observed.get("spec")
    if fields is None or not isinstance(want, Mapping) or not isinstance(have, Mapping):
        return copy.deepcopy(want)
    spec = {k: copy.deepcopy(v) for k, v in have.items() if k not in fields}
    spec.update({k: copy.deepcopy(v) for k, v in want.items() if k in fields})
    # Keys of the desired spec that are not listed as ours are never sent.
    return spec


def _update(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> tuple[KubeObject, tuple[str, ...]]:
    """The PUT body and what differs ((), nothing to write)."""
    changed: list[str] = []
    meta = {k: copy.deepcopy(v) for k, v in _meta(observed).items() if k != "managedFields"}
    for field in _MAPS:
        merged = _merged_map(desired, observed, field)
        if merged != _map(observed, field):
            changed.append(f"metadata.{field}")
        if merged or field in meta:
            meta[field] = merged
    spec = _merged_spec(desired, observed)
    if spec != observed.get("spec"):
        changed.append("spec")
    body: KubeObject = {"apiVersion": desired["apiVersion"], "kind": desired["kind"], "metadata": meta}
    if spec is not None:
        body["spec"] = spec
    return body, tuple(changed)


def _conditions(obj: Mapping[str, Any]) -> list[Any]:
    status = obj.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    return list(conditions) if isinstance(conditions, list) else []


def _status(desired: Mapping[str, Any], observed: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `status` to merge-patch, or None when ours already holds."""
    want = desired.get("status")
    if not isinstance(want, Mapping):
        return None
    have = observed.get("status") if observed is not None else None
    have = have if isinstance(have, Mapping) else {}
    patch: dict[str, Any] = {}
    for k, v in want.items():
        if k != "conditions" and have.get(k) != v:
            patch[k] = copy.deepcopy(v)
    ours = {c["type"]: c for c in want.get("conditions") or [] if isinstance(c, Mapping)}
    current = _conditions(observed) if observed is not None else []
    in_sync = all(
        [c for c in current if isinstance(c, Mapping) and c.get("type") == t] == [ours[t]] for t in ours
    )
    if ours and not in_sync:
        merged: list[Any] = []
        for c in current:
            t = c.get("type") if isinstance(c, Mapping) else None
            if t not in ours:
                merged.append(copy.deepcopy(c))
            elif t not in {m.get("type") for m in merged if isinstance(m, Mapping)}:
                merged.append(copy.deepcopy(dict(ours[t])))
        seen = {m.get("type") for m in merged if isinstance(m, Mapping)}
        merged.extend(copy.deepcopy(dict(c)) for t, c in ours.items() if t not in seen)
        patch["conditions"] = merged
    return patch or None


def _status_body(desired: Mapping[str, Any], status: Mapping[str, Any], rv: str | None) -> KubeObject:
    body = status_patch({**desired, "status": status})
    if rv is not None:
        body["metadata"]["resourceVersion"] = rv
    return body


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _index(
    objects: Sequence[Mapping[str, Any]], reason: ConflictReason
) -> tuple[dict[ObjectKey, Mapping[str, Any]], set[ObjectKey], list[Conflict]]:
    """Objects by key; keys given twice differently are ambiguous (nothing is done for them)."""
    by_key: dict[ObjectKey, Mapping[str, Any]] = {}
    ambiguous: set[ObjectKey] = set()
    problems: list[Conflict] = []
    for obj in objects:
        key = object_key(obj)
        if key is None:
            problems.append(Conflict(None, "malformed", "an object without apiVersion, kind or name"))
            continue
        if key in by_key and by_key[key] != obj:
            ambiguous.add(key)
        by_key.setdefault(key, obj)
    for key in sorted(ambiguous):
        problems.append(Conflict(key, reason, f"{key} is listed more than once, differently"))
    return by_key, ambiguous, problems


def reconcile(
    desired: Sequence[Mapping[str, Any]],
    observed: Sequence[Mapping[str, Any]],
    authority: str,
) -> list[Action]:
    """The writes that make `observed` match `desired`; [] when in sync. See the module doc."""
    want, want_ambiguous, problems = _index(desired, "duplicate_desired")
    have, have_ambiguous, observed_problems = _index(observed, "duplicate_observed")
    problems += observed_problems
    creates: list[Action] = []
    updates: list[Action] = []
    patches: list[Action] = []
    deletes: list[Action] = []
    conflicts: list[Action] = []
    for key in sorted(want.keys() | have.keys()):
        if key in want_ambiguous or key in have_ambiguous:
            continue
        d, o = want.get(key), have.get(key)
        if o is not None and not is_owned(o, authority):
            if d is not None:
                conflicts.append(Conflict(key, "not_ours", f"{key} exists without our owner labels"))
            continue
        if o is not None and _meta(o).get("deletionTimestamp"):
            continue  # being deleted: created again once it is gone
        if d is None:
            assert o is not None
            uid, rv = _text(_meta(o).get("uid")), _text(_meta(o).get("resourceVersion"))
            if uid is None or rv is None:
                conflicts.append(Conflict(key, "malformed", f"{key} has no uid or resourceVersion"))
            else:
                deletes.append(Delete(key, uid, rv))
            continue
        if o is None:
            creates.append(Create(key, without_status(d)))
            status = _status(d, None)
            if status is not None:
                creates.append(PatchStatus(key, _status_body(d, status, None), None))
            continue
        body, changed = _update(d, o)
        status = _status(d, o)
        if not changed and status is None:
            continue
        rv = _text(_meta(o).get("resourceVersion"))
        if rv is None:
            conflicts.append(Conflict(key, "malformed", f"{key} has no resourceVersion"))
            continue
        if changed:
            updates.append(Update(key, body, rv, changed))
            if status is not None:
                updates.append(PatchStatus(key, _status_body(d, status, None), None))
        elif status is not None:
            patches.append(PatchStatus(key, _status_body(d, status, rv), rv))
    return creates + updates + patches + deletes + problems + conflicts


def describe(action: Action) -> dict[str, str]:
    """Log fields for an action (event name aside): what, which object, why."""
    fields = {"action": type(action).__name__.lower(), "object": str(action.key) if action.key else "-"}
    if isinstance(action, Update):
        fields["changed"] = ",".join(action.changed)
    elif isinstance(action, Conflict):
        fields["reason"] = action.reason
        fields["detail"] = action.detail
    return fields
