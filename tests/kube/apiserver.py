"""A TEST STAND-IN for the Kubernetes API server. It is NOT a Kubernetes API server.

No API server can be installed on these machines (#17, "Proof"), so this module serves, over plain
HTTP/1.1 on a loopback (or netns) address, the slice of the API semantics meshagent's controller
relies on, so that the real client library (lightkube) can be run against it:

- list (namespaced and all-namespaces paths) with labelSelector / fieldSelector (metadata.name,
  metadata.namespace), returning `<Kind>List` with `metadata.resourceVersion`; built-in types'
  list items carry no kind/apiVersion, as the real server's (custom resources' do);
- watch (`watch=true|1`) from a resourceVersion: ADDED/MODIFIED/DELETED newline-delimited JSON,
  BOOKMARK when `allowWatchBookmarks=true` and the test asks; no resourceVersion (or "0"): ADDED
  for every current object first; an object leaving the selector is a DELETED event (as the watch
  cache); a resourceVersion older than the retained history: HTTP 200 then an ERROR event holding
  a Status 410 reason Expired, then end of stream (what the real watch cache sends);
- create (201; 409 AlreadyExists; uid, resourceVersion, creationTimestamp, generation set;
  500 when resourceVersion is set, as etcd3's storage), replace (409 Conflict on a stale
  resourceVersion; unconditional without one; 404 when missing), JSON merge patch of the object or
  of `/status`, delete (200; DeleteOptions body preconditions uid/resourceVersion -> 409);
- a status subresource: writes to the object ignore `status`, writes to `/status` change only
  `status`; generation bumped when anything but metadata/status changes; a write that changes
  nothing is not a write (same resourceVersion, no event), as etcd's GuaranteedUpdate;
- one global resourceVersion counter (etcd's revision); Status error bodies shaped as the real
  server's (kind Status, reason, code, details) with `Content-Type: application/json`;
- bearer token authentication (401 otherwise), a kubeconfig for it.

Not modelled (the controller must not rely on this module for them): strategic merge patch
(415, as for custom resources), JSON patch and server-side apply (415), managedFields, list
pagination (`limit` is ignored, as the real watch cache does for resourceVersion=0), consistent
list at a resourceVersion, finalizers and graceful deletion (deletes are immediate),
admission and schema validation, defaulting, RBAC, TLS, HTTP/2, discovery (/api, /apis).

The test-side API is `start_apiserver(...) -> ApiServerHandle`; as a process:
`python -m tests.kube.apiserver --listen HOST:PORT --kubeconfig PATH [--objects FILE.yaml]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import json
import re
import secrets
import signal
import string
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

Obj = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool
    custom: bool  # a CRD: list items keep kind/apiVersion, DELETE returns the object

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:  # how the real server names the resource in messages
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("workload.linkerd.io", "v1beta1", "externalworkloads", "ExternalWorkload", True, True, True),
    ResourceType("networking.istio.io", "v1", "workloadentries", "WorkloadEntry", True, True, True),
    ResourceType("", "v1", "services", "Service", True, True, False),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, False, False),
    ResourceType("", "v1", "pods", "Pod", True, True, False),
    ResourceType("", "v1", "namespaces", "Namespace", False, True, False),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True, False, False),
    # Policy CRDs (Linkerd's linkerd-crds b24cd405 and SMI's): none has a status subresource.
    ResourceType("policy.linkerd.io", "v1beta3", "servers", "Server", True, False, True),
    ResourceType(
        "policy.linkerd.io", "v1alpha1", "authorizationpolicies", "AuthorizationPolicy", True, False, True
    ),
    ResourceType(
        "policy.linkerd.io", "v1alpha1", "meshtlsauthentications", "MeshTLSAuthentication", True, False, True
    ),
    ResourceType(
        "policy.linkerd.io", "v1alpha1", "networkauthentications", "NetworkAuthentication", True, False, True
    ),
    ResourceType("access.smi-spec.io", "v1alpha3", "traffictargets", "TrafficTarget", True, False, True),
    ResourceType("specs.smi-spec.io", "v1alpha4", "tcproutes", "TCPRoute", True, False, True),
    # Route CRDs (#21): both HTTPRoutes have a status subresource, TrafficSplit and ServiceProfile
    # none. Two kinds are named HTTPRoute: name them `httproutes.<group>` to tell them apart.
    ResourceType("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", True, True, True),
    ResourceType("policy.linkerd.io", "v1beta3", "httproutes", "HTTPRoute", True, True, True),
    ResourceType("split.smi-spec.io", "v1alpha2", "trafficsplits", "TrafficSplit", True, False, True),
    ResourceType("linkerd.io", "v1alpha2", "serviceprofiles", "ServiceProfile", True, False, True),
    # Gateway API before v1.0 (a CRD serving v1beta1 only: start_apiserver's `absent` names
    # "httproutes.gateway.networking.k8s.io/v1"). Kept apart from v1's objects (the real server
    # converts between versions; the tests use one or the other).
    ResourceType("gateway.networking.k8s.io", "v1beta1", "httproutes", "HTTPRoute", True, True, True),
)


class ApiFailure(Exception):
    """A request the real server would refuse: becomes a Status body."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
        body |= {"message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(rt: ResourceType, name: str) -> Obj:
    return (
        {"name": name, "group": rt.group, "kind": rt.plural}
        if rt.group
        else {"name": name, "kind": rt.plural}
    )


def not_found(rt: ResourceType, name: str) -> ApiFailure:
    return ApiFailure(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def conflict(rt: ResourceType, name: str, why: str) -> ApiFailure:
    message = f'Operation cannot be fulfilled on {rt.qualified} "{name}": {why}'
    return ApiFailure(409, "Conflict", message, _details(rt, name))


STALE = "the object has been modified; please apply your changes to the latest version and try again"


# --- selectors ---------------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_CMP_RE = re.compile(r"^\s*([\w./-]+)\s*(==|!=|=)\s*([\w.-]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([\w./-]+)\s*$")

Predicate = Callable[[Mapping[str, str]], bool]


def parse_selector(text: str) -> list[Predicate]:
    """Kubernetes label selector syntax: `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a)`."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    preds: list[Predicate] = []
    for term in (t for t in terms if t.strip()):
        if m := _SET_RE.match(term):
            key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",")}
            preds.append(_set_pred(key, values, op == "in"))
        elif m := _CMP_RE.match(term):
            key, op, value = m[1], m[2], m[3]
            preds.append(_cmp_pred(key, value, op != "!="))
        elif m := _EXISTS_RE.match(term):
            key, negate = m[2], m[1] == "!"
            preds.append(_exists_pred(key, negate))
        else:
            raise ApiFailure(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return preds


def _exists_pred(key: str, negate: bool) -> Predicate:
    return lambda labels: (key in labels) != negate


def _set_pred(key: str, values: set[str], inside: bool) -> Predicate:
    return lambda labels: (labels.get(key) in values) if inside else (labels.get(key) not in values)


def _cmp_pred(key: str, value: str, equal: bool) -> Predicate:
    return lambda labels: (labels.get(key) == value) if equal else (labels.get(key) != value)


def _field_view(obj: Obj) -> dict[str, str]:
    meta = obj.get("metadata", {})
    return {"metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", "")}


def make_filter(query: Mapping[str, str]) -> Callable[[Obj], bool]:
    labels = parse_selector(query.get("labelSelector", ""))
    fields = parse_selector(query.get("fieldSelector", ""))
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        if re.split(r"!=|==|=", term)[0].strip() not in ("metadata.name", "metadata.namespace"):
            raise ApiFailure(400, "BadRequest", f'field label not supported: "{term}"')

    def matches(obj: Obj) -> bool:
        lab = obj.get("metadata", {}).get("labels") or {}
        view = _field_view(obj)
        return all(p(lab) for p in labels) and all(p(view) for p in fields)

    return matches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- the store: objects, history, watchers ----------------------------------------------------


@dataclass
class Event:
    rv: int
    rt: ResourceType
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    prev: Obj | None


Listener = Callable[[Event], None]
Key = tuple[ResourceType, str, str]  # (type, namespace or "", name)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _body_of(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


class Store:
    """Objects at one global resourceVersion, the event history since `compacted`, the watchers.
    Thread-safe: the server's loop and the test's thread both write."""

    def __init__(self, max_history: int = 10_000) -> None:
        self.lock = threading.RLock()
        self.objects: dict[Key, Obj] = {}
        self.rv = 0
        self.compacted = 0  # events with rv > compacted are retained
        self.history: list[Event] = []
        self.max_history = max_history
        self.listeners: set[Listener] = set()
        self.watchers_changed = threading.Condition(self.lock)
        self.require_namespaces = False
        self.absent: frozenset[str] = frozenset()  # kinds whose CRD is "not installed": 404

    def _emit(self, rt: ResourceType, kind: str, obj: Obj, prev: Obj | None) -> None:
        event = Event(self.rv, rt, kind, copy.deepcopy(obj), copy.deepcopy(prev))
        self.history.append(event)
        if len(self.history) > self.max_history:
            self.compacted = self.history.pop(0).rv
        for listener in list(self.listeners):
            listener(event)

    def compact(self) -> None:
        """Forget all history, as etcd compaction: resuming from any earlier version is 410."""
        with self.lock:
            self.rv += 1  # a write elsewhere (any other resource): etcd's revision moves on
            self.compacted, self.history = self.rv, []

    def get(self, rt: ResourceType, ns: str, name: str) -> Obj:
        with self.lock:
            obj = self.objects.get((rt, ns, name))
            if obj is None:
                raise not_found(rt, name)
            return copy.deepcopy(obj)

    def list_objects(
        self, rt: ResourceType, ns: str | None, keep: Callable[[Obj], bool]
    ) -> tuple[list[Obj], int]:
        with self.lock:
            items = [
                copy.deepcopy(o)
                for (t, n, _), o in sorted(self.objects.items(), key=lambda kv: kv[0][1:])
                if t == rt and (ns is None or n == ns) and keep(o)
            ]
            return items, self.rv

    def subscribe(self, rt: ResourceType, since: int | None, listener: Listener) -> list[Event]:
        """Registers `listener` and returns the events it missed since `since` (None: all objects as
        ADDED). Atomic with writes, so no event is lost or repeated."""
        with self.lock:
            if since is None:
                backlog = [
                    Event(self.rv, t, "ADDED", copy.deepcopy(o), None)
                    for (t, _, _), o in self.objects.items()
                ]
            elif since < self.compacted:
                raise ApiFailure(410, "Expired", f"too old resource version: {since} ({self.compacted + 1})")
            else:
                backlog = [e for e in self.history if e.rv > since]
            self.listeners.add(listener)
            self.watchers_changed.notify_all()
            return [e for e in backlog if e.rt == rt]

    def unsubscribe(self, listener: Listener) -> None:
        with self.lock:
            self.listeners.discard(listener)
            self.watchers_changed.notify_all()

    def create(self, rt: ResourceType, ns: str, body: Obj, *, keep_status: bool = False) -> Obj:
        with self.lock:
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(
                    secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5)
                )
            name = meta.get("name")
            if not name:
                raise ApiFailure(
                    422, "Invalid", "metadata.name: Required value: name or generateName is required"
                )
            if meta.get("resourceVersion") and not keep_status:
                raise ApiFailure(
                    500, "InternalError", "resourceVersion should not be set on objects to be created"
                )
            if (rt, ns, name) in self.objects:
                raise ApiFailure(
                    409, "AlreadyExists", f'{rt.qualified} "{name}" already exists', _details(rt, name)
                )
            if self.require_namespaces and rt.namespaced and (RESOURCES[5], "", ns) not in self.objects:
                raise ApiFailure(
                    404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"}
                )
            if rt.status_subresource and not keep_status:
                obj.pop("status", None)
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
            if rt.namespaced:
                meta["namespace"] = ns
            self.rv += 1
            meta |= {"uid": str(uuid.uuid4()), "resourceVersion": str(self.rv), "generation": 1}
            meta["creationTimestamp"] = _now()
            self.objects[(rt, ns, name)] = obj
            self._emit(rt, "ADDED", obj, None)
            return copy.deepcopy(obj)

    def update(
        self,
        rt: ResourceType,
        ns: str,
        name: str,
        change: Callable[[Obj], Obj],
        *,
        status: bool,
        actor: bool = False,
    ) -> Obj:
        """One write: `change(current)` gives the wanted object; the rules of the endpoint (object or
        /status) decide what of it is kept. Preconditions from the wanted object's metadata."""
        with self.lock:
            old = self.objects.get((rt, ns, name))
            if old is None:
                raise not_found(rt, name)
            want = change(copy.deepcopy(old))
            wmeta = want.get("metadata") or {}
            if wmeta.get("name", name) != name:
                msg = f"the name of the object ({wmeta['name']}) does not match the name on the URL ({name})"
                raise ApiFailure(400, "BadRequest", msg)
            if not actor and wmeta.get("resourceVersion") not in (
                None,
                "",
                old["metadata"]["resourceVersion"],
            ):
                raise conflict(rt, name, STALE)
            if not actor and wmeta.get("uid") not in (None, "", old["metadata"]["uid"]):
                raise conflict(rt, name, f"Precondition failed: UID in precondition: {wmeta['uid']}")
            if status:  # /status: only status changes
                new = copy.deepcopy(old)
                new["status"] = copy.deepcopy(want.get("status"))
                if new["status"] is None:
                    del new["status"]
            else:
                new = copy.deepcopy(want)
                new["metadata"] = copy.deepcopy(wmeta)
                for key in (
                    "uid",
                    "creationTimestamp",
                    "namespace",
                    "name",
                    "generation",
                    "deletionTimestamp",
                ):
                    if key in old["metadata"]:
                        new["metadata"][key] = old["metadata"][key]
                if rt.status_subresource and not actor:
                    new.pop("status", None)
                    if "status" in old:
                        new["status"] = copy.deepcopy(old["status"])
                if _body_of(new) != _body_of(old):
                    new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            new["apiVersion"], new["kind"] = rt.api_version, rt.kind
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if new == old:  # etcd's GuaranteedUpdate: an identical object is not written
                return copy.deepcopy(old)
            self.rv += 1
            new["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[(rt, ns, name)] = new
            self._emit(rt, "MODIFIED", new, old)
            return copy.deepcopy(new)

    def delete(
        self, rt: ResourceType, ns: str, name: str, preconditions: Mapping[str, str] | None = None
    ) -> Obj:
        with self.lock:
            old = self.objects.get((rt, ns, name))
            if old is None:
                raise not_found(rt, name)
            for field_name, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
                want = (preconditions or {}).get(field_name)
                have = old["metadata"][field_name]
                if want is not None and want != have:
                    why = f"Precondition failed: {label} in precondition: {want}, "
                    why += f"{label} in object meta: {have}"
                    raise conflict(rt, name, why)
            del self.objects[(rt, ns, name)]
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)  # etcd: the deletion's revision
            self._emit(rt, "DELETED", gone, old)
            return gone


def resource_for(api_version: str, kind: str) -> ResourceType:
    for rt in RESOURCES:
        if rt.api_version == api_version and rt.kind == kind:
            return rt
    raise ValueError(f"the test API server does not serve {api_version} {kind}")


def resource_named(kind: str) -> ResourceType:
    for rt in RESOURCES:
        if kind in (rt.kind, rt.plural, rt.qualified):
            return rt
    raise ValueError(f"the test API server does not serve {kind}")


# --- HTTP ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request as the server saw it, for assertions."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int


_PHRASES = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}
_PHRASES |= {405: "Method Not Allowed", 409: "Conflict", 410: "Gone", 415: "Unsupported Media Type"}
_PHRASES |= {422: "Unprocessable Entity", 500: "Internal Server Error"}


@dataclass
class _Route:
    rt: ResourceType
    ns: str | None  # None: all namespaces (list/watch only) or cluster-scoped
    name: str | None
    status: bool


def _route(path: str) -> _Route:
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiFailure(404, "NotFound", "the server could not find the requested resource")
    by_plural = {rt.plural: rt for rt in RESOURCES if rt.group == group and rt.version == version}
    ns = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in by_plural and by_plural[rest[2]].namespaced:
        ns, rest = rest[1], rest[2:]
    rt = by_plural.get(rest[0]) if rest else None
    if (
        rt is None
        or len(rest) > 3
        or (len(rest) == 3 and rest[2] != "status")
        or (ns is None and rt.namespaced and len(rest) > 1)
    ):
        raise ApiFailure(404, "NotFound", "the server could not find the requested resource")
    return _Route(rt, ns if rt.namespaced else None, rest[1] if len(rest) > 1 else None, len(rest) == 3)


class _Server:
    """asyncio-streams HTTP/1.1 (no framework: the test must be able to drop connections mid-watch)."""

    def __init__(self, store: Store, token: str, log: list[Request]) -> None:
        self.store, self.token, self.log = store, token, log
        self.writers: set[asyncio.StreamWriter] = set()
        self.watch_queues: set[asyncio.Queue[Event | tuple[str, bool]]] = set()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client or stop() hung up: nothing to answer
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        line = await reader.readline()
        if not line.strip():
            return False
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (h := await reader.readline()).strip():
            key, _, value = h.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        url = urlsplit(target)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        body: Any = None
        try:
            body = json.loads(raw) if raw else None
            if headers.get("authorization") != f"Bearer {self.token}":
                raise ApiFailure(401, "Unauthorized", "Unauthorized")
            route = _route(url.path)
            if (
                route.rt.kind in self.store.absent
                or route.rt.qualified in self.store.absent
                or f"{route.rt.qualified}/{route.rt.version}" in self.store.absent
            ):  # as the real server without the CRD (or a CRD not serving that version)
                raise ApiFailure(404, "NotFound", "the server could not find the requested resource")
            if method == "GET" and route.name is None and query.get("watch") in ("true", "1"):
                self.log.append(Request(method, url.path, query, body, 200))
                await self._watch(route, query, reader, writer)
                # The connection ends with the watch (its response said Connection: close): the
                # watch's pending read for the client's hang-up must not race the next request.
                return False
            code, answer = self._handle(method, route, query, body, headers.get("content-type", ""))
        except ApiFailure as failure:
            code, answer = failure.code, failure.status()
        except json.JSONDecodeError as exc:
            code, answer = 400, ApiFailure(400, "BadRequest", f"invalid JSON: {exc}").status()
        self.log.append(Request(method, url.path, query, body, code))
        data = json.dumps(answer).encode()
        head = f"HTTP/1.1 {code} {_PHRASES.get(code, 'Error')}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        return True

    def _handle(
        self, method: str, route: _Route, query: dict[str, str], body: Any, ctype: str
    ) -> tuple[int, Any]:
        rt, ns, name, store = route.rt, route.ns or "", route.name, self.store
        if method == "GET" and name is None:
            items, rv = store.list_objects(rt, route.ns, make_filter(query))
            if not rt.custom:  # built-in types' list items come without kind/apiVersion
                items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
            meta = {"resourceVersion": str(rv)}
            return 200, {
                "kind": f"{rt.kind}List",
                "apiVersion": rt.api_version,
                "metadata": meta,
                "items": items,
            }
        if method == "GET":
            assert name is not None
            return 200, store.get(rt, ns, name)
        if not isinstance(body, dict) and method in ("POST", "PUT", "PATCH"):
            raise ApiFailure(400, "BadRequest", "the request body must be a JSON object")
        if method in ("POST", "PUT"):
            if (
                body.get("apiVersion", rt.api_version) != rt.api_version
                or body.get("kind", rt.kind) != rt.kind
            ):
                msg = f"the API version in the data ({body.get('apiVersion')}) does not match "
                msg += f"the expected API version ({rt.api_version})"
                raise ApiFailure(400, "BadRequest", msg)
            if rt.namespaced and body.get("metadata", {}).get("namespace", ns) != ns:
                msg = "the namespace of the provided object does not match the namespace sent on the request"
                raise ApiFailure(400, "BadRequest", msg)
        if method == "POST" and name is None:
            return 201, store.create(rt, ns, body)
        if method == "PUT" and name is not None:
            return 200, store.update(rt, ns, name, lambda _old: body, status=route.status)
        if method == "PATCH" and name is not None:
            if ctype.split(";")[0].strip() != "application/merge-patch+json":
                msg = "the body of the request was in an unknown format - accepted media types include: "
                msg += "application/merge-patch+json (this test stand-in serves only JSON merge patch)"
                raise ApiFailure(415, "UnsupportedMediaType", msg)
            return 200, store.update(rt, ns, name, lambda old: merge_patch(old, body), status=route.status)
        if method == "DELETE" and name is not None and not route.status:
            gone = store.delete(rt, ns, name, (body or {}).get("preconditions"))
            if rt.custom:
                return 200, gone
            details = _details(rt, name) | {"uid": gone["metadata"]["uid"]}
            return 200, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            }
        raise ApiFailure(
            405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
        )

    async def _watch(
        self, route: _Route, query: dict[str, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        keep = make_filter(query)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | tuple[str, bool]] = asyncio.Queue()
        bookmarks = query.get("allowWatchBookmarks") == "true"

        def listener(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        rv = query.get("resourceVersion", "")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )

        async def send(kind: str, obj: Obj) -> None:
            line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
            writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            await writer.drain()

        try:
            backlog = self.store.subscribe(route.rt, int(rv) if rv not in ("", "0") else None, listener)
        except ApiFailure as expired:  # the real watch cache: 200, then one ERROR event, then the end
            await send("ERROR", expired.status())
            writer.write(b"0\r\n\r\n")
            return
        self.watch_queues.add(queue)
        for event in backlog:
            queue.put_nowait(event)
        eof = asyncio.ensure_future(reader.read(1))  # the client hanging up ends the watch
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        deadline = loop.time() + timeout if timeout else None
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                left = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait({get, eof}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if eof in done:
                        return
                    break  # timeoutSeconds
                item = get.result()
                if isinstance(item, tuple):  # ("close", send a bookmark first) or ("bookmark", _)
                    if item[1] and bookmarks:
                        meta = {"resourceVersion": str(self.store.rv)}
                        await send(
                            "BOOKMARK",
                            {"kind": route.rt.kind, "apiVersion": route.rt.api_version, "metadata": meta},
                        )
                    if item[0] == "close":
                        break
                    continue
                translated = self._translate(item, route, keep)
                if translated is not None:
                    await send(*translated)
        finally:
            eof.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await eof
            self.watch_queues.discard(queue)
            self.store.unsubscribe(listener)
        writer.write(b"0\r\n\r\n")  # a clean end, once the watch is gone from the server
        await writer.drain()

    @staticmethod
    def _translate(event: Event, route: _Route, keep: Callable[[Obj], bool]) -> tuple[str, Obj] | None:
        """The watch cache's view through a namespace and selectors: leaving the selection is DELETED."""

        def ok(obj: Obj | None) -> bool:
            if obj is None:
                return False
            return (route.ns is None or obj["metadata"].get("namespace") == route.ns) and keep(obj)

        if event.rt != route.rt:  # every write reaches every watcher: only its resource's count
            return None
        now, before = ok(event.obj), ok(event.prev)
        if event.type == "MODIFIED" and now != before:
            if now:
                return "ADDED", event.obj
            gone = copy.deepcopy(event.prev) or {}
            gone["metadata"]["resourceVersion"] = str(event.rv)
            return "DELETED", gone
        return (event.type, event.obj) if now else None


# --- the test-side handle ------------------------------------------------------------------------


def write_kubeconfig(path: Path, url: str, token: str, namespace: str = "default") -> Path:
    """A kubeconfig lightkube (and kubectl) accept: plain http, bearer token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test-apiserver", "cluster": {"server": url}}],
        "users": [{"name": "test-user", "user": {"token": token}}],
        "contexts": [
            {
                "name": "test",
                "context": {"cluster": "test-apiserver", "user": "test-user", "namespace": namespace},
            }
        ],
        "current-context": "test",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_objects(path: Path) -> list[Obj]:
    """Objects from a YAML file: documents, each an object or a `List` of items."""
    out: list[Obj] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if isinstance(doc, dict):
            out.extend(doc.get("items") or [] if doc.get("kind", "").endswith("List") else [doc])
    return out


@dataclass
class ApiServerHandle:
    """A running test API server (in a thread of this process, with its own event loop)."""

    host: str
    port: int
    kubeconfig_path: Path
    token: str
    store: Store
    _requests: list[Request] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: _Server | None = None
    _listener: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def resource_version(self) -> int:
        return self.store.rv

    # lifecycle
    def start(self) -> None:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._server = _Server(self.store, self.token, self._requests)

        async def bind() -> None:
            assert self._server is not None
            self._listener = await asyncio.start_server(self._server.connection, self.host, self.port)
            self.port = self._listener.sockets[0].getsockname()[1]

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(bind())
            finally:
                ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"test-apiserver-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if self._listener is None:
            self.stop()
            raise OSError(f"the test API server could not listen on {self.host}:{self.port}")

    def stop(self) -> None:
        """The server goes away: listener closed, every connection (open watches too) cut mid-stream."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._listener is not None:
                self._listener.close()
            assert self._server is not None
            for writer in list(self._server.writers):
                writer.transport.abort()
            others = asyncio.all_tasks() - {asyncio.current_task()}
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        self._loop = self._thread = self._server = self._listener = None

    def restart(self, *, keep_state: bool = True, keep_history: bool = True) -> None:
        """stop() then serve again on the same port. keep_history=False: as a real API server's
        fresh watch cache, resuming a watch from any earlier resourceVersion gets 410."""
        self.stop()
        if not keep_state:
            rv = self.store.rv
            self.store = Store()
            self.store.rv = self.store.compacted = rv  # etcd's revision never goes back
        elif not keep_history:
            self.store.compact()
        self.start()

    # watches
    def _to_watches(self, item: tuple[str, bool]) -> None:
        server, loop = self._server, self._loop
        if server is not None and loop is not None:  # in the loop: after every event already queued

            def broadcast() -> None:
                for queue in server.watch_queues:
                    queue.put_nowait(item)

            loop.call_soon_threadsafe(broadcast)

    def close_watches(self, *, bookmark: bool = False) -> None:
        """End every open watch cleanly (as the server's watch timeout does); clients resume."""
        self._to_watches(("close", bookmark))

    def bookmark(self) -> None:
        """A BOOKMARK at the current resourceVersion to every watch that allowed bookmarks."""
        self._to_watches(("bookmark", True))

    def expire_watches(self) -> None:
        """Compaction: history dropped and open watches ended, so each resume gets 410 Expired."""
        self.store.compact()
        self.close_watches()

    def open_watches(self) -> int:
        return len(self.store.listeners)

    def wait_for_watches(self, count: int = 1, timeout: float = 10.0) -> None:
        """Blocks until `count` watches are registered (any later write reaches them)."""
        with self.store.watchers_changed:
            if not self.store.watchers_changed.wait_for(lambda: len(self.store.listeners) >= count, timeout):
                raise TimeoutError(f"{len(self.store.listeners)} open watches, wanted {count}")

    # objects, as another actor writes them (no preconditions; status kept as given)
    def put(self, obj: Mapping[str, Any]) -> Obj:
        rt = resource_for(obj["apiVersion"], obj["kind"])
        meta = obj.get("metadata", {})
        ns = meta.get("namespace", "default") if rt.namespaced else ""
        with self.store.lock:
            if (rt, ns, meta["name"]) in self.store.objects:
                return self.store.update(
                    rt, ns, meta["name"], lambda _old: dict(obj), status=False, actor=True
                )
            return self.store.create(rt, ns, dict(obj), keep_status=True)

    def patch_status(self, kind: str, name: str, status: Any, namespace: str = "default") -> Obj:
        rt = resource_named(kind)
        ns = namespace if rt.namespaced else ""
        return self.store.update(rt, ns, name, lambda old: old | {"status": status}, status=True, actor=True)

    def delete(self, kind: str, name: str, namespace: str = "default") -> Obj:
        rt = resource_named(kind)
        return self.store.delete(rt, namespace if rt.namespaced else "", name)

    def get(self, kind: str, name: str, namespace: str = "default") -> Obj | None:
        rt = resource_named(kind)
        with contextlib.suppress(ApiFailure):
            return self.store.get(rt, namespace if rt.namespaced else "", name)
        return None

    def objects(self, kind: str, namespace: str | None = None) -> list[Obj]:
        """Stored objects of a kind ("Lease" or "leases"), sorted by namespace and name."""
        rt = resource_named(kind)
        return self.store.list_objects(rt, namespace if rt.namespaced else None, lambda _o: True)[0]

    # requests
    def requests(self, method: str | None = None, path_contains: str = "") -> list[Request]:
        return [
            r
            for r in list(self._requests)
            if (method is None or r.method == method) and path_contains in r.path
        ]

    def clear_requests(self) -> None:
        self._requests.clear()

    def __enter__(self) -> ApiServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_apiserver(
    kubeconfig_path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    objects: Iterable[Mapping[str, Any]] = (),
    token: str | None = None,
    namespace: str = "default",
    require_namespaces: bool = False,
    absent: Iterable[str] = (),
) -> ApiServerHandle:
    """Starts the test stand-in on host:port (0: a free port), loads `objects` (as put()) and
    writes a kubeconfig for it. `require_namespaces`: creating in a missing namespace is 404, as
    the NamespaceLifecycle admission plugin does. `absent`: kinds (or `plural.group`) served as if
    their CRD were not installed (404 on every path); `plural.group/version`: that version only."""
    store = Store()
    store.require_namespaces = require_namespaces
    store.absent = frozenset(absent)
    handle = ApiServerHandle(host, port, kubeconfig_path, token or secrets.token_urlsafe(16), store)
    for obj in objects:
        handle.put(obj)
    handle.start()
    write_kubeconfig(kubeconfig_path, handle.url, handle.token, namespace)
    return handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A TEST stand-in for the Kubernetes API server (not one).")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: a free one)")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="where to write the kubeconfig")
    parser.add_argument("--objects", type=Path, action="append", default=[], help="YAML objects to serve")
    parser.add_argument("--token", default=None)
    parser.add_argument("--namespace", default="default", help="the kubeconfig context's namespace")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    objects = [obj for path in args.objects for obj in load_objects(path)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    handle = start_apiserver(
        args.kubeconfig,
        host=host.strip("[]"),
        port=int(port),
        objects=objects,
        token=args.token,
        namespace=args.namespace,
    )
    print(json.dumps({"url": handle.url, "kubeconfig": str(args.kubeconfig)}), flush=True)
    stop.wait()
    handle.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
