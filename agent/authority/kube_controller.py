"""`meshagent authority serve --kubernetes`: the controller loop (issue #17, docs/kubernetes.md §2).

Three concurrent parts inside the authority's event loop:

- **Election** (every replica): one `coordination.k8s.io` Lease, decided by `kube_lease.decide`
  every retry period; only the holder runs registration, and every write checks it still is.
- **Registration** (the Lease holder): list + watch our own ExternalWorkloads (or
  WorkloadEntries) and Services (`owner_selector`); desired objects from the registry (enrolled,
  unrevoked hosts, Ready from their agents' reports); `kube_reconcile.reconcile` -> one request per
  action. Runs on every watch event, on a registry or report change (polled every
  `registry_poll_s`), at least every `health_interval_s` (health ages: a host whose reports
  stopped turns AgentStale) and re-lists every `resync_interval_s`.
- **Discovery** (every replica, read-only, no Lease): list + watch Services, EndpointSlices,
  Pods, Namespaces and ExternalWorkloads in all namespaces; on change (debounced) build the
  hosts' service catalog (`kube_discovery.build_services`) and hand it to the authority.

- **Policy** (the Lease holder, with `policy=True`): list + watch Linkerd's Server,
  AuthorizationPolicy, MeshTLSAuthentication, NetworkAuthentication and SMI's TrafficTarget and
  TCPRoute in all namespaces; the objects that reach enrolled hosts (`policy_scope`) go through
  `kube_policy` exactly as `policy apply -f` does, and the result is written to the registry.
  The cluster's objects are then the whole stored policy of every enrolled host's identity
  (cluster wins): records they no longer yield are removed, hand-written ones replaced. A set of
  objects meshagent cannot honour exactly is refused whole (`kube.policy_refused`, each object
  and field; `status()["policy"]["refused"]`) and the stored policy stays as it was.
- **Routes** (the Lease holder, with `routes=True`; issue #21): list + watch Gateway API and
  Linkerd HTTPRoutes, SMI TrafficSplits and Linkerd ServiceProfiles, and read the Services
  (discovery's, else its own watch); the objects that can reach hosts (`route_scope`) go through
  `kube_routes.resolve` exactly as `route apply -f` reads a file, and are stored with source
  "cluster": rows the cluster no longer has are deleted, `route apply` rows stay (a cluster
  object of the same kind and name replaces one: cluster wins). A refused object keeps its
  stored row and the rest applies (`kube.routes_refused`, `status()["routes"]["refused"]`);
  HTTPRoutes meshagent does not implement are skipped (`kube.route_skipped`,
  `status()["routes"]["skipped"]`); without `routes` the stored cluster rows stay (named once,
  `kube.cluster_routes_kept`). Route `status` is never
  written (Linkerd's policy controller owns it).

The API server going away is expected: the last listed objects (and so the last discovered
catalog) are kept, `kube.unreachable` is logged once per outage, watches resume from their last
resourceVersion (re-list on 410 Gone) with a capped back-off. A 409 on a write means someone
else wrote since we read: re-read that object and decide again, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import MeshagentError
from agent.identity.names import WorkloadIdentity
from agent.logs import get_logger

from . import kube_export, kube_routes
from .kube_lease import (
    CreateLease,
    ElectionState,
    LeaseConfig,
    StandBy,
    StepDown,
    UpdateLease,
    decide,
    is_leader,
    release,
    written,
)
from .kube_objects import (
    Flavor,
    KubeObject,
    KubeObjectError,
    host_object,
    is_owned,
    owner_selector,
    validate_authority_name,
    validate_namespace,
)
from .kube_policy import (
    LINKERD_GROUP,
    ClusterSettings,
    HostView,
    KubePolicyError,
    plan,
    resolve,
)
from .kube_reconcile import (
    FIELD_MANAGER,
    Action,
    Conflict,
    ConflictReason,
    Create,
    Delete,
    ObjectKey,
    PatchStatus,
    Update,
    describe,
    reconcile,
)
from .kube_routes import RouteObject, RouteRefused, RouteSettings, known_refs
from .storage import HostRecord, PolicyRecord

if TYPE_CHECKING:
    from .kube_client import KubeClient, Resource
    from .service import Authority

log = get_logger("meshagent.authority.kube")


def election_identity() -> str:
    """The pod name (POD_NAME, from the downward API), else the host name, and the process id:
    unique per process, so several server workers in one pod never share a Lease holder name
    (client-go adds a random suffix for the same reason)."""
    return f"{os.environ.get('POD_NAME') or os.uname().nodename}_{os.getpid()}"


POLICY_DEFAULTS = ("all-unauthenticated", "all-authenticated", "deny", "audit")


@dataclass(frozen=True)
class ControllerSettings:
    """What `serve --kubernetes` is told. `kubeconfig` None: the in-cluster service account."""

    kubeconfig: Path | None = None
    flavor: Flavor = "linkerd"
    authority_name: str = "default"
    lease_namespace: str = ""  # "": the kubeconfig context's namespace, in a pod its own
    lease_name: str = ""  # "": meshagent-authority-<authority_name>
    identity: str = field(default_factory=election_identity)
    services: tuple[kube_export.ServiceRequest, ...] = ()
    resync_interval_s: float = 300.0
    registry_poll_s: float = 2.0
    health_interval_s: float = 10.0  # a full pass at least this often: reports age into AgentStale
    lease_duration: timedelta = timedelta(seconds=15)
    renew_deadline: timedelta = timedelta(seconds=10)
    retry_period: timedelta = timedelta(seconds=2)
    discovery: bool = True
    debounce_s: float = 0.2
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    watch_timeout_s: int = 300
    # Policy from the cluster's objects (opt-in: they then replace every enrolled identity's
    # stored policy, hand-written records included).
    policy: bool = False
    policy_default: str | None = None  # Linkerd's proxy.defaultInboundPolicy; None: hosts' own
    # Traffic policy (#21) from the cluster's route objects (opt-in: they then replace the
    # stored objects of source "cluster"; `route apply` ones stay).
    routes: bool = False
    # ServiceProfile names are SERVICE.NS.svc.DOMAIN; None: any DOMAIN (the API holds one
    # cluster's objects, whatever its domain: a wrong guess would refuse every ServiceProfile).
    cluster_domain: str | None = None

    def __post_init__(self) -> None:
        validate_authority_name(self.authority_name)
        if self.policy_default is not None and self.policy_default not in POLICY_DEFAULTS:
            raise KubeObjectError(
                f"default policy {self.policy_default!r} is not one of {', '.join(POLICY_DEFAULTS)}",
                "give the cluster's proxy.defaultInboundPolicy, or none to keep each host's own "
                "(cluster-* policies need network rules meshagent does not have)",
            )
        if self.flavor not in ("linkerd", "istio"):
            raise KubeObjectError(
                f"flavor {self.flavor!r} is neither linkerd nor istio", "--flavor linkerd|istio"
            )
        if self.lease_namespace:
            validate_namespace(self.lease_namespace)
        self.lease()  # the timings, checked now (LeaseConfigError says which rule)

    def lease(self, default_namespace: str = "default") -> LeaseConfig:
        return LeaseConfig(
            name=self.lease_name or f"meshagent-authority-{self.authority_name}",
            namespace=self.lease_namespace or default_namespace,
            identity=self.identity,
            lease_duration=self.lease_duration,
            renew_deadline=self.renew_deadline,
            retry_period=self.retry_period,
        )


def host_reports(authority: Authority) -> Mapping[str, tuple[float, str]] | None:
    """The hosts' last reports, which make their Ready condition the agent's (interfaces.md §5);
    None would mean the certificate alone."""
    return authority.registry.reports()


class Backoff:
    """Capped exponential back-off with jitter (so replicas do not retry in step)."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s, self._next = initial_s, max_s, initial_s

    def next(self) -> float:
        delay = self._next
        self._next = min(self.max_s, self._next * 2)
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 (jitter, not a secret)

    def reset(self) -> None:
        self._next = self.initial_s


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _meta(obj)
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _well_formed(obj: Any) -> bool:
    """An object the informer can key: a mapping with a metadata mapping naming it."""
    if not isinstance(obj, dict):
        return False
    meta = obj.get("metadata")
    return isinstance(meta, dict) and isinstance(meta.get("name"), str) and bool(meta["name"])


class ApiState:
    """Whether the API server answers, and the last error of each source; logs each outage and
    each distinct error once (a retry loop must not flood the log)."""

    def __init__(self, on_change: Callable[[bool, float | None], None] | None = None) -> None:
        self.reachable: bool | None = None  # None: not tried yet
        self.down_since: float | None = None
        self.errors: dict[str, str] = {}
        # Told (reachable, down_since) on each transition only: ok() runs on every request.
        self._on_change = on_change

    def ok(self, source: str) -> None:
        if self.reachable is False and self.down_since is not None:
            log.info("kube.reachable", source=source, down_s=round(time.time() - self.down_since, 1))
        changed = self.reachable is not True
        self.reachable, self.down_since = True, None
        self.errors.pop(source, None)
        if changed and self._on_change is not None:
            self._on_change(True, None)

    def unreachable(self, source: str, exc: Exception) -> None:
        if self.reachable is not False:
            log.warning(
                "kube.unreachable", source=source, error=getattr(exc, "message", str(exc)),
                hint=getattr(exc, "hint", ""), kept="the last listed objects and discovered services",
            )  # fmt: skip
            self.down_since = time.time()
            self.reachable = False
            if self._on_change is not None:
                self._on_change(False, self.down_since)

    def error(self, source: str, exc: Exception) -> None:
        message = getattr(exc, "message", str(exc))
        if self.errors.get(source) != message:
            log.error("kube.api_error", source=source, error=message, hint=getattr(exc, "hint", ""))
        self.errors[source] = message


class Informer:
    """One resource kept in memory by list + watch: `objects` by (namespace, name).

    Re-lists on 410 Gone and every `resync_s`; a broken watch is resumed from the last
    resourceVersion after a back-off. `optional`: a resource whose CRD may be absent (404 on
    the list) counts as synced and empty, and is tried again at the longest back-off."""

    def __init__(
        self,
        client: KubeClient,
        res: Resource,
        settings: ControllerSettings,
        api: ApiState,
        on_change: Callable[[], None],
        *,
        label_selector: str | None = None,
        optional: bool = False,
        resync_s: float | None = None,
    ) -> None:
        self.client, self.res, self.settings, self.api = client, res, settings, api
        self.on_change, self.label_selector, self.optional = on_change, label_selector, optional
        self.resync_s = resync_s
        self.objects: dict[tuple[str, str], KubeObject] = {}
        self.synced = False
        self.source = f"{'watch' if label_selector is None else 'owned'}:{res.qualified}"
        self._missing_logged = False
        self._malformed_logged = False
        self._failed: str | None = None  # the last unexpected failure, logged once
        self._primary = res
        self._fallbacks_logged: set[str] = set()

    @property
    def missing(self) -> bool:
        """An optional resource whose CRD is not installed (as of the last try)."""
        return self._missing_logged

    def put(self, obj: KubeObject) -> None:
        self.objects[_key(obj)] = obj

    def forget(self, namespace: str, name: str) -> None:
        self.objects.pop((namespace, name), None)

    async def run(self) -> None:
        from .kube_client import KubeApiError, KubeUnreachable

        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        rv: str | None = None  # None: list first
        listed_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if rv is None or (self.resync_s is not None and loop.time() - listed_at >= self.resync_s):
                    rv = await self._list()
                    listed_at = loop.time()
                started = loop.time()
                timeout = self.settings.watch_timeout_s
                if self.resync_s is not None:
                    timeout = max(1, min(timeout, int(self.resync_s)))
                async for event in self.client.watch(
                    self.res, resource_version=rv, label_selector=self.label_selector, timeout_s=timeout
                ):
                    rv = str(_meta(event.object).get("resourceVersion") or rv)
                    self._apply(event.type, event.object)
                    self.api.ok(self.source)
                # The server ended the watch (its timeout): resume at once, unless it did so
                # straight away (a misbehaving server must not make this a busy loop).
                if loop.time() - started < 1.0:
                    await asyncio.sleep(backoff.next())
                else:
                    backoff.reset()
            except KubeApiError as exc:
                if exc.status == 410:
                    log.info("kube.relist", resource=self.res.qualified, reason="410 Gone")
                    rv = None
                    continue
                rv = None
                if exc.status == 404 and self.optional:
                    if self._older_version():
                        continue
                    self.res = self._primary  # (tried again from the newest version)
                    self._missing(exc)
                    await asyncio.sleep(self.settings.backoff_max_s)
                    continue
                self.api.error(self.source, exc)
                await asyncio.sleep(backoff.next())
            except KubeUnreachable as exc:
                self.api.unreachable(self.source, exc)
                await asyncio.sleep(backoff.next())
            except Exception as exc:  # a bug must not freeze this resource for good
                self._failure(exc)
                rv = None  # re-list: the view may be half-applied
                await asyncio.sleep(backoff.next())

    def _failure(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if message != self._failed:
            log.error(
                "kube.informer_failed", resource=self.res.qualified, error_type=type(exc).__name__,
                error=str(exc), kept="the last listed objects; listing again after a back-off",
            )  # fmt: skip
            self._failed = message
        self.api.errors[self.source] = message

    def _malformed(self, obj: Any) -> None:
        if not self._malformed_logged:
            log.warning(
                "kube.malformed_object", resource=self.res.qualified,
                metadata=type(obj.get("metadata")).__name__ if isinstance(obj, dict) else type(obj).__name__,
                kept="skipped; the other objects are used",
            )  # fmt: skip
            self._malformed_logged = True

    async def _list(self) -> str:
        listed = await self.client.list(self.res, label_selector=self.label_selector)
        for obj in listed.items:
            if not _well_formed(obj):
                self._malformed(obj)
        self.objects = {_key(o): o for o in listed.items if _well_formed(o)}
        self._failed = None
        self.synced = True
        self._missing_logged = False
        self.api.ok(self.source)
        self.on_change()
        return listed.resource_version

    def _apply(self, kind: str, obj: KubeObject) -> None:
        if kind == "BOOKMARK":
            return
        if not _well_formed(obj):
            self._malformed(obj)
            return
        if kind == "DELETED":
            self.objects.pop(_key(obj), None)
        elif kind in ("ADDED", "MODIFIED"):
            self.objects[_key(obj)] = obj
        else:
            return
        self.on_change()

    def _older_version(self) -> bool:
        """After a 404: read the next older version the CRD may serve instead, if any."""
        versions = (self._primary.version, *self._primary.fallback_versions)
        at = versions.index(self.res.version)
        if at + 1 >= len(versions):
            return False
        self.res = replace(self._primary, version=versions[at + 1])
        if self.res.version not in self._fallbacks_logged:
            self._fallbacks_logged.add(self.res.version)
            log.info(
                "kube.crd_version_fallback", resource=self.res.qualified, unserved=versions[at],
                version=self.res.version,
            )  # fmt: skip
        return True

    def _missing(self, exc: Exception) -> None:
        if not self._missing_logged:
            log.warning("kube.crd_missing", resource=self.res.qualified, hint=getattr(exc, "hint", ""))
            self._missing_logged = True
        if not self.synced or self.objects:
            self.objects, self.synced = {}, True
            self.on_change()


# --- policy from the cluster's objects (pure) ------------------------------------------------


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def _ref(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def policy_scope(
    objects: Mapping[str, Sequence[KubeObject]], identities: Collection[str]
) -> list[KubeObject]:
    """The policy objects that reach meshagent's hosts, for `kube_policy.resolve`: Servers with
    an `externalWorkloadSelector`, the AuthorizationPolicies targeting one of them (or their
    namespace, or a route in it: refused there, routes are #21), the authentications those
    require, the TrafficTargets whose destination is an enrolled identity (`identities`,
    NAMESPACE/NAME) and the TCPRoutes they use. The rest is the pods' policy: Linkerd's
    business, and an object of it meshagent cannot honour must not freeze the hosts' policy."""
    servers = [o for o in objects.get("Server", ()) if "externalWorkloadSelector" in _spec(o)]
    server_keys = {_key(o) for o in servers}
    server_namespaces = {ns for ns, _ in server_keys}
    policies = []
    for obj in objects.get("AuthorizationPolicy", ()):
        ns = _key(obj)[0]
        target = _ref(_spec(obj).get("targetRef"))
        kind = str(target.get("kind") or "").lower()
        group = str(target.get("group") or "").lower()
        if kind == "server" and group == LINKERD_GROUP:
            wanted = (ns, target.get("name")) in server_keys
        else:  # a Namespace, a route, or something resolve refuses, in a namespace with hosts' Servers
            wanted = ns in server_namespaces
        if wanted:
            policies.append(obj)
    required: set[tuple[str, str, str]] = set()
    for obj in policies:
        ns = _key(obj)[0]
        refs = _spec(obj).get("requiredAuthenticationRefs")
        for ref in refs if isinstance(refs, list) else []:
            r = _ref(ref)
            required.add((str(r.get("kind")), str(r.get("namespace") or ns), str(r.get("name"))))
    authentications = [
        o
        for kind in ("MeshTLSAuthentication", "NetworkAuthentication")
        for o in objects.get(kind, ())
        if (kind, *_key(o)) in required
    ]
    targets = []
    for obj in objects.get("TrafficTarget", ()):
        dest = _ref(_spec(obj).get("destination"))
        if f"{dest.get('namespace') or _key(obj)[0]}/{dest.get('name')}" in identities:
            targets.append(obj)
    routes: set[tuple[str, str]] = set()
    for obj in targets:
        rules = _spec(obj).get("rules")
        for rule in rules if isinstance(rules, list) else []:
            if _ref(rule).get("kind") == "TCPRoute":
                routes.add((_key(obj)[0], str(_ref(rule).get("name"))))
    tcp_routes = [o for o in objects.get("TCPRoute", ()) if _key(o) in routes]
    return [*servers, *policies, *authentications, *targets, *tcp_routes]


def host_views(
    hosts: Sequence[HostRecord], trust_domain: str, mesh: str, authority_name: str, now: datetime
) -> list[HostView]:
    """Every enrolled, unrevoked host as a Server selects it (the labels and ports of its
    ExternalWorkload), exactly as `policy apply -f` reads them."""
    views = []
    for h in hosts:
        if h.revoked:
            continue
        ident = WorkloadIdentity.parse_short(h.identity, trust_domain, mesh)
        try:
            views.append(HostView.from_workload(kube_export.host_workload(h, ident, now), authority_name))
        except KubeObjectError:
            # No address (or unreadable labels): its labels and ports still say what Servers select.
            views.append(
                HostView(ident, dict(h.registration.labels), kube_export.workload_ports(h.registration))
            )
    return views


def policy_diff(
    desired: Sequence[PolicyRecord], stored: Sequence[PolicyRecord], governed: Collection[str]
) -> tuple[list[PolicyRecord], list[tuple[str, int]]]:
    """What to write so the stored policy of every `governed` identity is `desired` exactly:
    (records to set, (identity, port) keys to remove). Other identities' records are left."""
    want = {(r.identity, r.port): r for r in desired}
    have = {(r.identity, r.port): r for r in stored}
    to_set = [r for key, r in sorted(want.items()) if have.get(key) != r]
    to_remove = sorted(key for key in have if key[0] in governed and key not in want)
    return to_set, to_remove


@dataclass(frozen=True)
class PolicyPlan:
    """One policy pass's decision: the desired records and the difference from the registry,
    or the problems that refuse it."""

    desired: tuple[PolicyRecord, ...] = ()
    to_set: tuple[PolicyRecord, ...] = ()
    to_remove: tuple[tuple[str, int], ...] = ()
    objects: int = 0
    problems: tuple[str, ...] = ()


# --- routes from the cluster's objects (pure) ------------------------------------------------

# Service annotations that make a Service a route input on its own (Linkerd's default route:
# retries, timeouts, failure accrual on every port).
_ROUTE_ANNOTATION_PREFIXES = ("retry.linkerd.io/", "timeout.linkerd.io/", "balancer.linkerd.io/")


def _list_of(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _route_refs(
    route: Mapping[str, Any],
) -> tuple[bool, set[tuple[str, str]], set[tuple[str, str]]]:
    """An HTTPRoute's reach: whether a parent is a Service or a meshagent Host (GAMMA), the
    (namespace, name) of its parents and of the Services it names (parents and backends).
    Loose on purpose: resolve names every malformed field."""
    ns = _key(route)[0]
    spec = _spec(route)
    attached, parents, services = False, set(), set()
    for raw in _list_of(spec.get("parentRefs")):
        ref = _ref(raw)
        group = str(ref.get("group", "gateway.networking.k8s.io"))
        group = "" if group == "core" else group
        kind = str(ref.get("kind", "Gateway"))
        where = (str(ref.get("namespace") or ns), str(ref.get("name")))
        if (group, kind) == ("", "Service"):
            attached = True
            parents.add(where)
            services.add(where)
        elif (group, kind) == ("meshagent.io", "Host"):
            attached = True
            parents.add(where)
    for rule in _list_of(spec.get("rules")):
        for raw in _list_of(_ref(rule).get("backendRefs")):
            ref = _ref(raw)
            group = str(ref.get("group") or "")
            if group in ("", "core") and ref.get("kind", "Service") == "Service":
                services.add((str(ref.get("namespace") or ns), str(ref.get("name"))))
    return attached, parents, services


def _unimplemented(route: Mapping[str, Any]) -> str | None:
    """Why meshagent leaves an attached HTTPRoute out (None: it reads it). These are ordinary
    in Linkerd clusters; refusing them would block every other route (review21b C1)."""
    ns = _key(route)[0]
    spec = _spec(route)
    gateway = False
    for raw in _list_of(spec.get("parentRefs")):
        ref = _ref(raw)
        group = str(ref.get("group", "gateway.networking.k8s.io"))
        group = "" if group == "core" else group
        kind = str(ref.get("kind", "Gateway"))
        if (group, kind) in (("", "Service"), ("meshagent.io", "Host")):
            if str(ref.get("namespace") or ns) != ns:
                # One `routes` member is served to every host: a route for one namespace's
                # clients cannot be honoured per client.
                return (
                    "consumer route: a parent in another namespace (applies only to that namespace's clients)"
                )
        else:
            gateway = True
    if gateway:
        return "a Gateway parent next to a Service or Host parent"
    if spec.get("hostnames"):
        return "hostnames are not implemented"
    for rule in _list_of(spec.get("rules")):
        if _ref(rule).get("filters") or any(
            _ref(b).get("filters") for b in _list_of(_ref(rule).get("backendRefs"))
        ):
            return "filters are not implemented"
    return None


def route_scope(
    objects: Mapping[str, Sequence[KubeObject]],
    services: Sequence[KubeObject],
    skipped: list[tuple[str, str]] | None = None,
) -> list[KubeObject]:
    """The route objects that can reach meshagent's hosts, for `kube_routes.resolve`:
    HTTPRoutes with a Service (or meshagent.io Host) parent (GAMMA; one whose parents are all
    Gateways is ingress, not the hosts' business), every TrafficSplit, the ServiceProfiles of
    those parents (their retry budget; a ServiceProfile of any other Service changes nothing
    served), and the Services they name or that carry Linkerd's retry/timeout/accrual
    annotations (Linkerd's default route). `objects` by resource (any keys; kinds read from
    the objects), `services` the cluster's Services. Attached HTTPRoutes meshagent does not
    implement (consumer routes, filters, hostnames, a Gateway parent too) and a
    policy.linkerd.io HTTPRoute shadowed by a gateway.networking.k8s.io one of the same
    namespace/name (one stored row per kind/namespace/name) are left out: `skipped` gets
    (label, reason) for each."""
    routes, splits, profiles = [], [], []
    parents: set[tuple[str, str]] = set()
    named: set[tuple[str, str]] = set()
    attached_routes = []
    for listed in objects.values():
        for obj in listed:
            kind = obj.get("kind")
            if kind == "HTTPRoute":
                attached, its_parents, its_services = _route_refs(obj)
                if attached:
                    attached_routes.append((obj, its_parents, its_services))
            elif kind == "TrafficSplit":
                splits.append(obj)
                ns, spec = _key(obj)[0], _spec(obj)
                root = (ns, str(spec.get("service")))
                parents.add(root)
                named.add(root)
                for backend in _list_of(spec.get("backends")):
                    named.add((ns, str(_ref(backend).get("service"))))
            elif kind == "ServiceProfile":
                profiles.append(obj)
    gateway_names = {
        _key(o)
        for o, _, _ in attached_routes
        if str(o.get("apiVersion", "")).startswith("gateway.networking.k8s.io/")
    }
    for obj, its_parents, its_services in attached_routes:
        reason = _unimplemented(obj)
        if (
            reason is None
            and _key(obj) in gateway_names
            and not str(obj.get("apiVersion", "")).startswith("gateway.networking.k8s.io/")
        ):
            reason = "shadowed by the gateway.networking.k8s.io HTTPRoute of the same namespace/name"
        if reason is not None:
            if skipped is not None:
                ns, name = _key(obj)
                skipped.append((f"HTTPRoute {ns}/{name} ({obj.get('apiVersion')})", reason))
            continue
        routes.append(obj)
        parents |= its_parents
        named |= its_services
    chosen_services = []
    for svc in services:
        annotations = _meta(svc).get("annotations")
        annotated = isinstance(annotations, dict) and any(
            isinstance(k, str) and k.startswith(_ROUTE_ANNOTATION_PREFIXES) for k in annotations
        )
        if _key(svc) in named or annotated:
            chosen_services.append(svc)
            parents.add(_key(svc))
    chosen_profiles = [p for p in profiles if (_key(p)[0], _key(p)[1].partition(".")[0]) in parents]

    def order(obj: KubeObject) -> tuple[str, str, str, str]:
        return (str(obj.get("kind")), str(obj.get("apiVersion")), *_key(obj))

    return sorted([*routes, *splits, *chosen_profiles, *chosen_services], key=order)


def route_diff(desired: Sequence[RouteObject], stored: Sequence[RouteObject]) -> tuple[bool, int]:
    """Whether the stored objects differ from `desired` (the cluster's, all of source
    "cluster"), and how many stored cluster objects it no longer has (deleted by the write).
    Objects of other sources are compared only where the cluster has their namesake."""

    def row(o: RouteObject) -> tuple[str, dict[str, Any], str, float]:
        return o.api_version, o.body, o.source, o.created_at

    want = {o.key: row(o) for o in desired}
    have = {o.key: row(o) for o in stored if o.source == "cluster" or o.key in want}
    return want != have, sum(1 for k in have if k not in want)


@dataclass(frozen=True)
class RoutePlan:
    """One route pass's decision: the cluster's objects as stored, whether that is a write and
    how many stored cluster objects it deletes. `problems`: the objects refused (each keeps
    its stored row, if it had one; the rest is written), or, with `whole`, the problems that
    refuse the whole set (nothing written). `skipped`: (label, reason) of the objects left out
    as not implemented (route_scope)."""

    desired: tuple[RouteObject, ...] = ()
    write: bool = False
    removed: int = 0
    objects: int = 0
    problems: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    whole: bool = False


def _doc_label(doc: KubeObject) -> str:
    meta = _meta(doc)
    return f"{doc.get('kind')} {meta.get('namespace')}/{meta.get('name')}"


class Controller:
    """The controller; `run(stop)` until `stop` is set. `status()` for `check` and `hosts`."""

    def __init__(
        self, authority: Authority, settings: ControllerSettings, client: KubeClient | None = None
    ) -> None:
        self.authority, self.settings = authority, settings
        self._client = client
        self.lease_config = settings.lease(client.namespace if client is not None else "default")
        # Hosts are told (their directory's `discovery` key) whether the Services they are
        # served are current or the last known ones.
        self.api = ApiState(authority.set_discovery_state if settings.discovery else None)
        self.counts: Counter[str] = Counter()
        self.election = ElectionState()
        self.holder: str | None = None
        self._lead_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._informers: dict[str, Informer] = {}  # registration, by kind
        self._foreign: dict[ObjectKey, KubeObject] = {}  # objects of our names that are not ours
        self._conflicts: set[tuple[ObjectKey | None, ConflictReason]] = set()
        self._failed_writes: dict[ObjectKey, str] = {}
        self._skipped: set[tuple[str, str]] = set()
        self._discovery: dict[str, Informer] = {}
        self._discovered_at: float | None = None
        self._discovered_count = 0
        self._reconciled_at: float | None = None
        self._policy_informers: dict[str, Informer] = {}
        self._policy_refused: tuple[str, ...] = ()
        self._policy_records: int | None = None  # stored from the cluster at the last pass
        self._policy_at: float | None = None
        self._policy_dirty = True
        self._route_informers: dict[str, Informer] = {}  # by resource (plural.group)
        self._route_services: Informer | None = None  # our own Service watch, without discovery
        self._routes_refused: tuple[str, ...] = ()
        self._routes_skipped: tuple[str, ...] = ()
        self._routes_skipped_logged: set[tuple[str, str]] = set()
        self._route_objects: int | None = None  # stored from the cluster at the last pass
        self._routes_at: float | None = None
        self._routes_dirty = True
        self._route_services_seen: int | None = None  # discovery's Services, as last compared
        self._pass_backoff: dict[str, Backoff] = {}

    # --- status ---------------------------------------------------------------------------

    def leading(self) -> bool:
        return is_leader(self.election, datetime.now(UTC), self.lease_config)

    def status(self) -> dict[str, Any]:
        """What `check` and `hosts` show: leadership, API reachability, actions, discovery."""
        informers = list(self._discovery.values())
        return {
            "identity": self.settings.identity,
            "leader": self.leading(),
            "lease": {
                "namespace": self.lease_config.namespace,
                "name": self.lease_config.name,
                "holder": self.holder,
            },
            "api": {None: "connecting", True: "ok", False: "unreachable"}[self.api.reachable],
            "unreachable_since": self.api.down_since,
            "errors": dict(self.api.errors),
            "actions": dict(self.counts),
            "reconciled_at": self._reconciled_at,
            "policy": {
                "enabled": self.settings.policy,
                "synced": bool(self._policy_informers)
                and all(i.synced for i in self._policy_informers.values()),
                "records": self._policy_records,
                "refused": list(self._policy_refused),
                "missing": sorted(k for k, i in self._policy_informers.items() if i.missing),
                "updated_at": self._policy_at,
            },
            "routes": {
                "enabled": self.settings.routes,
                "synced": self._routes_synced(),
                "objects": self._route_objects,
                "refused": list(self._routes_refused),
                "skipped": list(self._routes_skipped),
                "missing": sorted(k for k, i in self._route_informers.items() if i.missing),
                "updated_at": self._routes_at,
            },
            "discovery": {
                "enabled": self.settings.discovery,
                "synced": bool(informers) and all(i.synced for i in informers),
                "services": self._discovered_count,
                "updated_at": self._discovered_at,
            },
        }

    # --- the whole loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        from .kube_client import KubeClient

        client = self._client or KubeClient.connect(self.settings.kubeconfig)
        self._client = client
        self.lease_config = self.settings.lease(client.namespace)
        log.info(
            "kube.controller_started", server=client.url, identity=self.settings.identity,
            flavor=self.settings.flavor, authority=self.settings.authority_name,
            lease=f"{self.lease_config.namespace}/{self.lease_config.name}",
        )  # fmt: skip
        if not self.settings.routes:
            self._note_cluster_rows_kept()
        tasks = [asyncio.create_task(self._elect(client), name="kube-election")]
        if self.settings.discovery:
            tasks.append(asyncio.create_task(self._discover(client), name="kube-discovery"))
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopping:
                    task.result()  # a loop that ended on its own is a bug: raise it
        finally:
            stopping.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._stop_leading()
            # Bounded: a slow API server must not hold up the authority's shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.lease_config.renew_deadline.total_seconds()):
                    await self._release(client)
            await client.close()
            log.info("kube.controller_stopped", actions=dict(self.counts))

    def _note_cluster_rows_kept(self) -> None:
        """Without --routes-from-cluster nothing deletes the rows an earlier run stored from
        the cluster: they stay served as they are (said once, so an operator can remove them)."""
        kept = [o for o in self.authority.registry.route_objects() if o.source == "cluster"]
        if kept:
            log.warning(
                "kube.cluster_routes_kept", rows=len(kept),
                objects=", ".join(o.label for o in kept[:10]) + (" ..." if len(kept) > 10 else ""),
                hint="served as stored until removed: `meshagent authority route list` (SOURCE cluster), "
                "`meshagent authority route remove KIND NAMESPACE/NAME`; or serve with --routes-from-cluster",
            )  # fmt: skip

    # --- election -------------------------------------------------------------------------

    async def _elect(self, client: KubeClient) -> None:
        from .kube_client import LEASE, KubeApiError, KubeUnreachable

        cfg = self.lease_config
        source = f"lease:{cfg.namespace}/{cfg.name}"
        while True:
            now = datetime.now(UTC)
            try:
                lease = await client.get(LEASE, cfg.namespace, cfg.name)
                action, self.election = decide(now, lease, self.election, cfg)
                if isinstance(action, CreateLease):
                    self.election = written(
                        self.election,
                        now,
                        await client.create(LEASE, action.body, field_manager=FIELD_MANAGER),
                    )
                elif isinstance(action, UpdateLease):
                    self.election = written(
                        self.election,
                        now,
                        await client.replace(LEASE, action.body, field_manager=FIELD_MANAGER),
                    )
                elif isinstance(action, StepDown):
                    log.warning("kube.lease_lost", reason=action.reason)
                elif isinstance(action, StandBy):
                    self.holder = action.holder or None
                if isinstance(action, CreateLease | UpdateLease):
                    self.holder = cfg.identity
                self.api.ok(source)
            except KubeApiError as exc:
                if exc.status == 409:
                    log.info("kube.lease_race_lost", lease=f"{cfg.namespace}/{cfg.name}")
                else:
                    self.api.error(source, exc)
            except KubeUnreachable as exc:
                self.api.unreachable(source, exc)
            except Exception as exc:  # a bug must not end the election (and the Lease) for good
                self._pass_failed("election", exc)
            if self.leading():
                if self._lead_task is not None and self._lead_task.done():
                    # Registration ended on its own (a bug past its own guard): log, start again.
                    ended, self._lead_task = self._lead_task, None
                    failure = None if ended.cancelled() else ended.exception()
                    self._pass_failed("registration", failure or RuntimeError("ended on its own"))
                if self._lead_task is None:
                    log.info("kube.leading", identity=cfg.identity, lease=f"{cfg.namespace}/{cfg.name}")
                    self._lead_task = asyncio.create_task(self._lead(client), name="kube-registration")
            else:
                await self._stop_leading()
            await asyncio.sleep(cfg.retry_period.total_seconds())

    async def _stop_leading(self) -> None:
        task, self._lead_task = self._lead_task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._informers = {}
        log.info("kube.standby", identity=self.settings.identity)

    async def _release(self, client: KubeClient) -> None:
        """Hand the Lease over on shutdown, so another replica takes over at once."""
        from .kube_client import LEASE, KubeError

        cfg = self.lease_config
        if self.election.renewed_at is None:
            return
        try:
            lease = await client.get(LEASE, cfg.namespace, cfg.name)
            action = release(datetime.now(UTC), lease, self.election, cfg)
            if action is not None:
                await client.replace(LEASE, action.body, field_manager=FIELD_MANAGER)
                log.info("kube.lease_released", lease=f"{cfg.namespace}/{cfg.name}")
        except KubeError as exc:
            log.warning("kube.lease_release_failed", error=exc.message)
        self.election = ElectionState()

    # --- registration (the Lease holder) --------------------------------------------------

    def _host_resource(self) -> Resource:
        from .kube_client import EXTERNAL_WORKLOAD, WORKLOAD_ENTRY

        return EXTERNAL_WORKLOAD if self.settings.flavor == "linkerd" else WORKLOAD_ENTRY

    async def _lead(self, client: KubeClient) -> None:
        from .kube_client import SERVICE

        selector = owner_selector(self.settings.authority_name)
        host_res = self._host_resource()
        self._informers = {
            res.kind: Informer(
                client,
                res,
                self.settings,
                self.api,
                self._wake.set,
                label_selector=selector,
                resync_s=self.settings.resync_interval_s,
            )
            for res in (host_res, SERVICE)
        }
        self._foreign.clear()
        tasks = [asyncio.create_task(i.run(), name=f"kube-owned-{k}") for k, i in self._informers.items()]
        policy_version: int | None = None  # the registry as of the last policy pass
        if self.settings.policy:
            from .kube_client import POLICY_RESOURCES

            # The Lease holder only: it alone writes the registry's policy; a new holder lists
            # afresh and recomputes (nothing is remembered between holders).
            self._policy_informers = {
                res.kind: Informer(
                    client,
                    res,
                    self.settings,
                    self.api,
                    self._policy_changed,
                    optional=True,
                    resync_s=self.settings.resync_interval_s,
                )
                for res in POLICY_RESOURCES
            }
            tasks += [
                asyncio.create_task(i.run(), name=f"kube-policy-{k}")
                for k, i in self._policy_informers.items()
            ]
        routes_version: int | None = None
        if self.settings.routes:
            tasks += self._start_routes(client)
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self.settings.resync_interval_s
        last: tuple[int, int] | None = None  # the registry as of the last pass
        last_pass = 0.0
        try:
            while True:
                woken = True
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
                # arrives as the event is set, and the registration task would never stop.
                try:
                    async with asyncio.timeout(self.settings.registry_poll_s):
                        await self._wake.wait()
                except TimeoutError:
                    woken = False
                else:
                    await asyncio.sleep(min(self.settings.debounce_s, 0.05))  # coalesce a burst
                self._wake.clear()
                if loop.time() >= next_resync:
                    # Foreign objects are seen only through a 409: forget them, find them again.
                    self._foreign.clear()
                    next_resync = loop.time() + self.settings.resync_interval_s
                    woken = True
                registration = all(i.synced for i in self._informers.values())
                policy = bool(self._policy_informers) and all(
                    i.synced for i in self._policy_informers.values()
                )
                routes = self._routes_synced()
                if not (registration or policy or routes):
                    continue
                try:
                    # A pass costs ~0.2 ms per host: skip it when neither the cluster (no event),
                    # the registry nor the reports moved, until health may have aged.
                    now_print = await asyncio.to_thread(self._fingerprint)
                    aged = loop.time() - last_pass >= self.settings.health_interval_s
                    if woken or aged or now_print != last:
                        last, last_pass = now_print, loop.time()
                        # Policy depends on its objects and the registry only (not on reports or
                        # time): planned again when either moved.
                        if policy and (self._policy_dirty or now_print[0] != policy_version):
                            self._policy_dirty, policy_version = False, now_print[0]
                            try:
                                await self.sync_policy()
                            except Exception as exc:  # the registration pass still runs
                                self._policy_dirty = True
                                self._pass_failed("policy", exc)
                            else:
                                self._pass_ok("policy")
                        if routes and (self._routes_dirty or now_print[0] != routes_version):
                            self._routes_dirty, routes_version = False, now_print[0]
                            try:
                                await self.sync_routes()
                            except Exception as exc:  # the registration pass still runs
                                self._routes_dirty = True
                                self._pass_failed("routes", exc)
                            else:
                                self._pass_ok("routes")
                        if registration:
                            await self.reconcile_once(client)
                    self._pass_ok("registration")
                except Exception as exc:  # a bug in one pass must not end registration for good
                    last = None  # the next pass runs whatever moved
                    await asyncio.sleep(self._pass_failed("registration", exc))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._policy_informers = {}
            self._route_informers, self._route_services = {}, None

    def _pass_failed(self, what: str, exc: BaseException) -> float:
        """Log and count a pass that raised (a bug or an unexpected object); the seconds to
        wait before the next try, growing to the back-off cap while it keeps failing."""
        source = f"pass:{what}"
        message = f"{type(exc).__name__}: {exc}"
        self.counts["pass_failed"] += 1
        if self.api.errors.get(source) != message:  # each distinct failure once, not every retry
            log.error(
                "kube.pass_failed", what=what, error_type=type(exc).__name__, error=str(exc),
                hint="a bug in meshagent or an object it cannot read; retried after a back-off",
            )  # fmt: skip
        self.api.errors[source] = message
        backoff = self._pass_backoff.setdefault(
            what, Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        )
        return backoff.next()

    def _pass_ok(self, what: str) -> None:
        if self.api.errors.pop(f"pass:{what}", None) is not None:
            log.info("kube.pass_recovered", what=what)
        backoff = self._pass_backoff.get(what)
        if backoff is not None:
            backoff.reset()

    def _fingerprint(self) -> tuple[int, int]:
        registry = self.authority.registry
        return registry.data_version(), hash(frozenset(registry.reports().items()))

    def desired(self) -> list[KubeObject]:
        """The objects the registry asks for now: a host object per enrolled, unrevoked host with
        an address (others are logged once, with why), then the `--service` Services."""
        authority, s = self.authority, self.settings
        now = authority.clock()
        settings = authority.material.settings
        workloads, skipped = kube_export.desired_workloads(
            authority.registry.list_hosts(),
            trust_domain=settings.trust_domain,
            mesh=settings.mesh,
            now=now,
            reports=host_reports(authority),
        )
        for skip in skipped:
            self._skip_once(f"host:{skip.host}", skip.reason, skip.hint)
        objects = [host_object(w, s.flavor, s.authority_name) for w in workloads]
        for request in s.services:
            try:
                objects.extend(kube_export._services(request, workloads, s.authority_name))
            except KubeObjectError as exc:
                self._skip_once(f"service:{request.name}", exc.message, exc.hint)
        return objects

    def _skip_once(self, source: str, reason: str, hint: str) -> None:
        if (source, reason) not in self._skipped:
            self._skipped.add((source, reason))
            log.warning("kube.skipped", source=source, reason=reason, hint=hint)

    def observed(self) -> list[KubeObject]:
        objects = [o for i in self._informers.values() for o in i.objects.values()]
        return objects + list(self._foreign.values())

    async def reconcile_once(self, client: KubeClient) -> int:
        """One pass: decide, then write until done or until a write says our view is stale
        (then the caller's next pass decides again). Returns the number of writes made."""
        from .kube_client import KubeApiError, KubeUnreachable

        observed = self.observed()
        # Reading the registry and comparing is CPU work (~0.2 ms per host): off the loop.
        actions = await asyncio.to_thread(
            lambda: reconcile(self.desired(), observed, self.settings.authority_name)
        )
        self._log_conflicts([a for a in actions if isinstance(a, Conflict)])
        versions: dict[ObjectKey, str] = {}  # resourceVersion our last write in this pass returned
        writes = 0
        for action in actions:
            if isinstance(action, Conflict):
                continue
            if not self.leading():
                return writes
            try:
                await self._act(client, action, versions)
                writes += 1
                self._failed_writes.pop(action.key, None)
            except KubeApiError as exc:
                if exc.status in (404, 409):
                    # Our view was stale: read the object again and decide again.
                    self.counts["conflict"] += 1
                    log.info("kube.conflict", object=str(action.key), status=exc.status, error=exc.message)
                    await self._reread(client, action.key)
                    self._wake.set()
                    return writes
                self.counts["error"] += 1
                if self._failed_writes.get(action.key) != exc.message:
                    log.error("kube.write_failed", **describe(action), error=exc.message, hint=exc.hint)
                self._failed_writes[action.key] = exc.message
            except KubeUnreachable as exc:
                self.api.unreachable("registration", exc)
                return writes
        self._reconciled_at = time.time()
        return writes

    def _log_conflicts(self, conflicts: list[Conflict]) -> None:
        current = {(c.key, c.reason) for c in conflicts}
        for c in conflicts:
            if (c.key, c.reason) not in self._conflicts:
                self.counts["conflict"] += 1
                log.warning("kube.conflict", **describe(c))
        self._conflicts = current

    async def _act(self, client: KubeClient, action: Action, versions: dict[ObjectKey, str]) -> None:
        from .kube_client import BY_KIND

        key = action.key
        assert key is not None
        res = BY_KIND[key.kind]
        informer = self._informers.get(key.kind)
        if isinstance(action, Create):
            made = await client.create(res, action.body, field_manager=FIELD_MANAGER)
            self._remember(informer, made, versions, key)
            self.counts["create"] += 1
            log.info("kube.create", **describe(action))
        elif isinstance(action, Update):
            body = {
                **action.body,
                "metadata": {**action.body["metadata"], "resourceVersion": action.resource_version},
            }
            made = await client.replace(res, body, field_manager=FIELD_MANAGER)
            self._remember(informer, made, versions, key)
            self.counts["update"] += 1
            log.info("kube.update", **describe(action))
        elif isinstance(action, PatchStatus):
            body = action.body
            rv = action.resource_version or versions.get(key)
            if rv is not None:
                body = {**body, "metadata": {**body["metadata"], "resourceVersion": rv}}
            made = await client.patch_status(res, key.namespace, key.name, body, field_manager=FIELD_MANAGER)
            self._remember(informer, made, versions, key)
            self.counts["status"] += 1
            log.info("kube.status", **describe(action))
        elif isinstance(action, Delete):
            await client.delete(
                res, key.namespace, key.name, uid=action.uid, resource_version=action.resource_version
            )
            if informer is not None:
                informer.forget(key.namespace, key.name)
            self.counts["delete"] += 1
            log.info("kube.delete", **describe(action))

    def _remember(
        self, informer: Informer | None, obj: KubeObject, versions: dict[ObjectKey, str], key: ObjectKey
    ) -> None:
        """Our write's result is the newest we know of the object (the watch confirms it)."""
        from .kube_client import BY_KIND

        obj.setdefault("apiVersion", BY_KIND[key.kind].api_version)
        obj.setdefault("kind", key.kind)
        rv = _meta(obj).get("resourceVersion")
        if isinstance(rv, str):
            versions[key] = rv
        if informer is not None:
            informer.put(obj)

    async def _reread(self, client: KubeClient, key: ObjectKey | None) -> None:
        """After a 409/404: the object as it is now, where the next pass will look for it."""
        from .kube_client import BY_KIND, KubeError

        if key is None:
            return
        informer = self._informers.get(key.kind)
        try:
            obj = await client.get(BY_KIND[key.kind], key.namespace, key.name)
        except KubeError as exc:
            log.warning("kube.reread_failed", object=str(key), error=exc.message)
            return
        self._foreign.pop(key, None)
        if obj is None:
            if informer is not None:
                informer.forget(key.namespace, key.name)
            return
        res = BY_KIND[key.kind]
        obj.setdefault("apiVersion", res.api_version)
        obj.setdefault("kind", res.kind)
        if is_owned(obj, self.settings.authority_name):
            if informer is not None:
                informer.put(obj)
        else:
            # Invisible to our selector's watch: kept here so the next pass reports a Conflict.
            self._foreign[key] = obj

    # --- policy (the Lease holder) ---------------------------------------------------------

    def _policy_changed(self) -> None:
        self._policy_dirty = True
        self._wake.set()

    def plan_policy(self, objects: Mapping[str, Sequence[KubeObject]]) -> PolicyPlan:
        """The policy the cluster's objects give the enrolled hosts, read exactly as `policy
        apply -f` reads a file (kube_policy.resolve + plan), and what to write for it."""
        authority, ms = self.authority, self.authority.material.settings
        views = host_views(
            authority.registry.list_hosts(), ms.trust_domain, ms.mesh, self.settings.authority_name,
            authority.clock(),
        )  # fmt: skip
        governed = {v.identity.short for v in views}
        docs = policy_scope(objects, governed)
        try:
            policy = resolve(docs, ClusterSettings(ms.trust_domain, ms.mesh, self.settings.policy_default))
            desired = [p.record for p in plan(policy, views)]
        except KubePolicyError as exc:
            return PolicyPlan(objects=len(docs), problems=exc.problems)
        to_set, to_remove = policy_diff(desired, authority.registry.policies(), governed)
        return PolicyPlan(tuple(desired), tuple(to_set), tuple(to_remove), len(docs))

    async def sync_policy(self) -> PolicyPlan:
        """One policy pass: plan off the loop, then (still the Lease holder) write the
        difference, or keep the stored policy and report the refusal."""
        objects = {kind: list(i.objects.values()) for kind, i in self._policy_informers.items()}
        decided = await asyncio.to_thread(self.plan_policy, objects)
        if not decided.problems and (decided.to_set or decided.to_remove):
            if not self.leading():
                return decided
            try:
                await asyncio.to_thread(self._write_policy, decided)
            except MeshagentError as exc:  # a record the registry refuses: nothing was stored
                decided = PolicyPlan(objects=decided.objects, problems=(f"{exc.message} ({exc.hint})",))
        self._policy_at = time.time()
        if decided.problems:
            if decided.problems != self._policy_refused:
                self.counts["policy_refused"] += 1
                for problem in decided.problems:
                    what, _, detail = problem.partition(": ")
                    log.warning(
                        "kube.policy_refused", object=what if detail else "", problem=detail or problem,
                        kept="the stored policy, unchanged", hint="fix the object named, or delete it",
                    )  # fmt: skip
            self._policy_refused = decided.problems
            return decided
        if self._policy_refused:
            log.info("kube.policy_accepted", objects=decided.objects)
            self._policy_refused = ()
        self._policy_records = len(decided.desired)
        return decided

    def _write_policy(self, decided: PolicyPlan) -> None:
        # Every changed record in one transaction (Authority.set_policies checks them all
        # first); then the records the objects no longer yield. Each state in between is,
        # per (identity, port), either the old or the new policy.
        if decided.to_set:
            self.authority.set_policies(list(decided.to_set))
        for identity, port in decided.to_remove:
            with contextlib.suppress(MeshagentError):  # already gone (a hand `policy remove`)
                self.authority.registry.remove_policy(identity, port, actor="controller")
            log.info("kube.policy_removed", identity=identity, port=port)
        self.counts["policy_set"] += len(decided.to_set)
        self.counts["policy_removed"] += len(decided.to_remove)
        log.info(
            "kube.policy_applied", set=len(decided.to_set), removed=len(decided.to_remove),
            records=len(decided.desired), objects=decided.objects,
        )  # fmt: skip

    # --- routes (the Lease holder) ----------------------------------------------------------

    def _routes_changed(self) -> None:
        self._routes_dirty = True
        self._wake.set()

    def _start_routes(self, client: KubeClient) -> list[asyncio.Task[None]]:
        """The route informers (CRDs optional: absent is "none of that kind"), and a Service
        watch of our own unless discovery already keeps every Service."""
        from .kube_client import ROUTE_RESOURCES, SERVICE

        def informer(res: Resource, optional: bool) -> Informer:
            return Informer(
                client, res, self.settings, self.api, self._routes_changed, optional=optional,
                resync_s=self.settings.resync_interval_s,
            )  # fmt: skip

        self._route_informers = {res.qualified: informer(res, True) for res in ROUTE_RESOURCES}
        tasks = [
            asyncio.create_task(i.run(), name=f"kube-routes-{k}") for k, i in self._route_informers.items()
        ]
        if not self.settings.discovery:
            self._route_services = informer(SERVICE, False)
            self._route_services.source = "routes:services"  # (discovery's is watch:services)
            tasks.append(asyncio.create_task(self._route_services.run(), name="kube-routes-services"))
        return tasks

    def _route_services_moved(self) -> None:
        """After discovery published: a route pass if a Service changed (route inputs), not on
        every endpoint or pod change."""
        services = self._discovery.get("Service")
        if not self._route_informers or services is None:
            return
        seen = hash(frozenset((k, str(_meta(o).get("resourceVersion"))) for k, o in services.objects.items()))
        if seen != self._route_services_seen:
            self._route_services_seen = seen
            self._routes_changed()

    def _services_informer(self) -> Informer | None:
        return self._discovery.get("Service") if self.settings.discovery else self._route_services

    def _routes_synced(self) -> bool:
        services = self._services_informer()
        return (
            bool(self._route_informers)
            and services is not None
            and services.synced
            and all(i.synced for i in self._route_informers.values())
        )

    def plan_routes(
        self, objects: Mapping[str, Sequence[KubeObject]], services: Sequence[KubeObject]
    ) -> RoutePlan:
        """The cluster's route objects read exactly as `route apply -f` reads a file
        (kube_routes.resolve, source "cluster", checked together with the other sources'
        stored objects), and whether the registry needs a write for them. An object refused
        is left out and keeps its stored row (if any); the rest is resolved again without it.
        A problem that names no object of the set refuses the whole set."""
        authority = self.authority
        hosts = authority.registry.list_hosts()
        stored = authority.registry.route_objects()
        others = [o for o in stored if o.source != "cluster"]
        stored_cluster = {o.key: o for o in stored if o.source == "cluster"}
        skipped: list[tuple[str, str]] = []
        docs = route_scope(objects, services, skipped)
        known = known_refs(authority.catalog(hosts), hosts, authority.discovered(), others)
        settings = RouteSettings(cluster_domain=self.settings.cluster_domain)
        refused: list[str] = []
        kept: list[RouteObject] = []  # the stored rows of refused objects
        remaining = list(docs)
        while True:
            try:
                desired = kube_routes.resolve(
                    remaining, known, settings,
                    authority.clock().timestamp(), source="cluster", stored=others + kept,
                )  # fmt: skip
                break
            except RouteRefused as exc:
                labels = {_doc_label(d) for d in remaining}
                named = {p.partition(": ")[0] for p in exc.problems}
                if not named <= labels:  # a problem of no one object: the whole set waits
                    return RoutePlan(
                        objects=len(docs), problems=exc.problems, skipped=tuple(skipped), whole=True
                    )
                refused.extend(exc.problems)
                for doc in [d for d in remaining if _doc_label(d) in named]:
                    remaining.remove(doc)
                    row = stored_cluster.get((str(doc.get("kind")), *_key(doc)))
                    if row is not None:
                        kept.append(row)
        desired = [*desired, *kept]
        write, removed = route_diff(desired, stored)
        return RoutePlan(tuple(desired), write, removed, len(docs), tuple(sorted(refused)), tuple(skipped))

    async def sync_routes(self) -> RoutePlan:
        """One route pass: plan off the loop, then (still the Lease holder) store the cluster's
        objects but those refused, or keep the stored ones and report a whole refusal."""
        services = self._services_informer()
        objects = {k: list(i.objects.values()) for k, i in self._route_informers.items()}
        listed = list(services.objects.values()) if services is not None else []
        decided = await asyncio.to_thread(self.plan_routes, objects, listed)
        self._note_skipped(decided.skipped)
        if not decided.whole and decided.write:
            if not self.leading():
                return decided
            try:
                await asyncio.to_thread(self._write_routes, decided)
            except MeshagentError as exc:  # the registry refused the write: nothing was stored
                decided = RoutePlan(
                    objects=decided.objects, problems=(f"{exc.message} ({exc.hint})",),
                    skipped=decided.skipped, whole=True,
                )  # fmt: skip
        self._routes_at = time.time()
        if decided.problems != self._routes_refused:
            if decided.problems:
                self.counts["routes_refused"] += 1
            for problem in decided.problems:
                if problem in self._routes_refused:
                    continue
                what, _, detail = problem.partition(": ")
                kept = "the stored route objects, unchanged" if decided.whole else "its stored row, if any"
                log.warning(
                    "kube.routes_refused", object=what if detail else "", problem=detail or problem,
                    kept=kept, hint="fix the object named, or delete it",
                )  # fmt: skip
            if not decided.problems:
                log.info("kube.routes_accepted", objects=decided.objects)
            self._routes_refused = decided.problems
        if not decided.whole:
            self._route_objects = len(decided.desired)
        return decided

    def _note_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Log each object left out once per reason; the status lists the current ones."""
        for label, reason in skipped:
            if (label, reason) not in self._routes_skipped_logged:
                self._routes_skipped_logged.add((label, reason))
                what, _, version = label.partition(" (")
                kind, _, name = what.partition(" ")
                log.info(
                    "kube.route_skipped", kind=kind, name=name, api_version=version.rstrip(")"),
                    reason=reason,
                )  # fmt: skip
        self._routes_skipped = tuple(f"{label}: {reason}" for label, reason in skipped)

    def _write_routes(self, decided: RoutePlan) -> None:
        # One transaction: the cluster's objects upserted, its rows no longer there deleted;
        # `route apply` rows (source "file") are left.
        self.authority.registry.put_route_objects(list(decided.desired), replace_source="cluster")
        self.counts["routes_written"] += 1
        log.info(
            "kube.routes_applied", objects=len(decided.desired), removed=decided.removed,
            read=decided.objects,
        )  # fmt: skip

    # --- discovery (every replica, read-only) ---------------------------------------------

    async def _discover(self, client: KubeClient) -> None:
        from .kube_client import ENDPOINT_SLICE, EXTERNAL_WORKLOAD, NAMESPACE, POD, SERVICE

        dirty = asyncio.Event()
        self._discovery = {
            res.kind: Informer(
                client,
                res,
                self.settings,
                self.api,
                dirty.set,
                optional=res is EXTERNAL_WORKLOAD,
                # No periodic re-list: thousands of pods per replica; a watch misses nothing
                # until it expires, and then 410 makes it re-list.
                resync_s=None,
            )
            for res in (SERVICE, ENDPOINT_SLICE, POD, NAMESPACE, EXTERNAL_WORKLOAD)
        }
        tasks = [asyncio.create_task(i.run(), name=f"kube-discovery-{k}") for k, i in self._discovery.items()]
        try:
            while True:
                await dirty.wait()
                # Debounce: a rollout's thousands of endpoint events make one rebuild, not thousands.
                await asyncio.sleep(self.settings.debounce_s)
                dirty.clear()
                if all(i.synced for i in self._discovery.values()):
                    try:
                        await self._publish()
                    except Exception as exc:  # hosts keep the last services; try again
                        dirty.set()
                        await asyncio.sleep(self._pass_failed("discovery", exc))
                    else:
                        self._pass_ok("discovery")
                        self._route_services_moved()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _publish(self) -> None:
        from . import kube_discovery

        objects = {kind: list(informer.objects.values()) for kind, informer in self._discovery.items()}
        mesh_settings = self.authority.material.settings
        # Building from thousands of objects is pure CPU: off the event loop.
        result = await asyncio.to_thread(
            kube_discovery.build_services,
            objects["Service"],
            objects["EndpointSlice"],
            objects["Pod"],
            objects["Namespace"],
            objects["ExternalWorkload"],
            mesh_settings.trust_domain,
            mesh=mesh_settings.mesh,
        )
        self.authority.set_discovered(result.services)
        self._discovered_at = time.time()
        self._discovered_count = len(result.services)
        log.info(
            "kube.discovered", services=len(result.services), skipped=len(result.skipped),
            notes=len(result.notes),
        )  # fmt: skip


async def run_controller(authority: Authority, settings: ControllerSettings, stop: asyncio.Event) -> None:
    """Run the controller until `stop` is set (see the module doc). A kubeconfig that cannot be
    read raises KubeConfigError at once; everything later is retried and logged."""
    await Controller(authority, settings).run(stop)
