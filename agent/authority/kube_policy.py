"""Inbound policy from the cluster's own objects (issue #17): Linkerd's `Server`,
`AuthorizationPolicy`, `MeshTLSAuthentication`, `NetworkAuthentication` and SMI's
`TrafficTarget`/`TCPRoute`, read from YAML, mapped onto meshagent's per-port policy
(agent/proxy/policy.py) as `PolicyRecord`s the authority stores and serves.

Pure functions, no I/O. `parse_policy` reads a multi-document YAML stream and refuses it whole,
every problem named by object and field path; `host_policy` computes one host's records;
`identity_policies` merges hosts that share an identity (records are stored per identity).

The meaning is Linkerd's, read from its policy controller (linkerd2 b24cd405):
- policy-controller/k8s/index/src/inbound/index.rs (ExternalWorkload::reindex_servers): a
  Server selects an external workload by `externalWorkloadSelector` (same namespace) and one of
  its ports by number or name (a name the workload lacks: the Server is skipped); when several
  Servers select one port the oldest wins (creationTimestamp, then name). Ports no Server
  selects take the cluster's default policy.
- index.rs (client_authzs): a Server's authorizations are every AuthorizationPolicy targeting it
  by name, or targeting its Namespace, plus its `accessPolicy` as a default authorization
  (inbound/defaults.rs). A client is admitted if ANY authorization admits it; none: denied.
  Policies targeting an HTTPRoute/GRPCRoute apply per route: refused here (routes are #21).
- index.rs (policy_client_authz): within one AuthorizationPolicy ALL required authentications
  must hold; at most one MeshTLSAuthentication or ServiceAccount (runtime/src/admission.rs);
  none: any client, TLS or not. A reference that does not resolve makes Linkerd ignore the
  policy: refused here, naming it.
- inbound/meshtls_authentication.rs, core/src/identity_match.rs: `identities` are exact names
  or `*.`-suffixes (`*` alone: any authenticated client); `identityRefs` of kind ServiceAccount
  (namespace defaults to the object's) or Namespace (`*.NS.serviceaccount.identity.MESH.TD`,
  cluster_info.rs).
- NetworkAuthentication restricts clients by source network: meshagent's policy has no network
  rules, so a policy that requires one is refused (never applied without its network part).
- `cluster-authenticated` / `cluster-unauthenticated` admit only clients from the cluster's
  networks (ClusterInfo.networks, `clusterNetworks` at install): meshagent knows no cluster
  networks and has no network rules, so these are refused, saying what to use instead.
- `audit`: admits everyone, flagging what the port would otherwise refuse (DefaultPolicy.AUDIT).

SMI (access.smi-spec.io/v1alpha3, specs.smi-spec.io/v1alpha4): a TrafficTarget admits its
`sources` (service accounts) to the hosts enrolled as its `destination` service account, on
`destination.port` and the ports its TCPRoutes match (none given: every port); ports a
TrafficTarget covers admit only the listed sources. HTTPRouteGroup/UDPRoute rules are refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml

from agent.authority.kube_objects import (
    HostWorkload,
    KubeObjectError,
    WorkloadPort,
    external_workload,
    validate_label_key,
    validate_label_value,
    validate_namespace,
    validate_port_name,
)
from agent.authority.storage import PolicyRecord
from agent.errors import ExitCode, MeshagentError
from agent.identity.names import DEFAULT_MESH, InvalidName, WorkloadIdentity, validate_trust_domain
from agent.proxy.policy import DefaultPolicy

MAX_BYTES = 1 << 20  # a policy file, not a cluster dump
MAX_DOCUMENTS = 1000
MAX_PROBLEMS_SHOWN = 50

LINKERD_GROUP = "policy.linkerd.io"
SMI_ACCESS_GROUP = "access.smi-spec.io"
SMI_SPECS_GROUP = "specs.smi-spec.io"
CORE_GROUP = ""
GATEWAY_GROUP = "gateway.networking.k8s.io"

SERVER_VERSIONS = ("v1beta2", "v1beta3")  # the versions with externalWorkloadSelector
# Linkerd's DefaultPolicy values (policy-controller/k8s/index/src/defaults.rs).
LINKERD_POLICIES = (
    "all-unauthenticated",
    "all-authenticated",
    "cluster-authenticated",
    "cluster-unauthenticated",
    "deny",
    "audit",
)
PROXY_PROTOCOLS = ("unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS")
_CLUSTER_HINT = (
    "it admits only clients from the cluster's networks, and meshagent has no network rules: "
    "use all-authenticated (or deny with an AuthorizationPolicy naming the clients)"
)


class ObjectsRefused(MeshagentError):
    """Cluster objects refused, all of them: `problems` names every object and field at fault
    (the shape shared by `policy apply` and `route apply`)."""

    exit_code = ExitCode.CONFIG  # the file given is at fault, as with a bad config

    def __init__(self, problems: Sequence[str]) -> None:
        shown = list(problems[:MAX_PROBLEMS_SHOWN])
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        super().__init__(
            f"{len(problems)} problem(s); nothing was applied:\n  " + "\n  ".join(shown),
            "fix the objects named and apply the whole file again",
        )
        self.problems = tuple(problems)


class KubePolicyError(ObjectsRefused):
    """The policy objects were refused, all of them."""

    code = "kube_policy_refused"


@dataclass(frozen=True)
class ClusterSettings:
    """What the objects are read against: the mesh's trust domain, its name (Linkerd's control
    plane namespace, the MESH label of identity names) and the cluster's default inbound policy
    for ports no Server selects (None: leave each host's own default alone)."""

    trust_domain: str
    mesh: str = DEFAULT_MESH
    default_policy: str | None = None


@dataclass(frozen=True)
class HostView:
    """One enrolled host as policy sees it: identity (its namespace is its ExternalWorkload's),
    labels and the app's named ports (kube_objects.WorkloadPort)."""

    identity: WorkloadIdentity
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[WorkloadPort, ...] = ()

    @property
    def namespace(self) -> str:
        return self.identity.namespace

    @classmethod
    def from_workload(cls, host: HostWorkload, authority: str) -> HostView:
        """What a Server selects on: the labels and ports of the host's ExternalWorkload
        exactly (the operator's labels plus meshagent's own, `linkerd-proxy` included)."""
        obj = external_workload(host, authority)
        ports = tuple(WorkloadPort(p["name"], p["port"], p["protocol"]) for p in obj["spec"]["ports"])
        return cls(host.identity, dict(obj["metadata"]["labels"]), ports)


# --- the objects, validated -------------------------------------------------------------------


@dataclass(frozen=True)
class _Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str]


@dataclass(frozen=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[_Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """metav1.LabelSelector: matchLabels and matchExpressions ANDed; empty selects all."""
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        for r in self.expressions:
            present = r.key in labels
            ok = {
                "In": present and labels.get(r.key) in r.values,
                "NotIn": not present or labels.get(r.key) not in r.values,
                "Exists": present,
                "DoesNotExist": not present,
            }[r.operator]
            if not ok:
                return False
        return True


@dataclass(frozen=True)
class Server:
    namespace: str
    name: str
    selector: LabelSelector | None  # None: a podSelector Server (never selects a host)
    port: int | str
    access_policy: str  # one of LINKERD_POLICIES minus cluster-*
    created_at: str  # "" when absent: sorts first, as Rust's None < Some


@dataclass(frozen=True)
class Grant:
    """One authorization, resolved: who it admits."""

    source: str  # "AuthorizationPolicy shop/web-clients", "Server shop/web accessPolicy"
    anyone: bool = False  # no identity required (plaintext clients too)
    any_identity: bool = False  # any authenticated client
    patterns: tuple[str, ...] = ()  # SPIFFE IDs and globs


@dataclass(frozen=True)
class _AuthzPolicy:
    namespace: str
    name: str
    target_server: str | None  # None: every Server of the namespace
    grant: Grant


@dataclass(frozen=True)
class _Target:
    name: str
    destination: WorkloadIdentity
    ports: frozenset[int] | None  # None: every port
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class PolicySet:
    """Every object of a file, validated and resolved."""

    cluster: ClusterSettings
    servers: tuple[Server, ...] = ()
    policies: tuple[_AuthzPolicy, ...] = ()
    targets: tuple[_Target, ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        return {
            "Server": len(self.servers),
            "AuthorizationPolicy": len(self.policies),
            "TrafficTarget": len(self.targets),
        }


class _Refused(Exception):
    """One problem with one field; collected, never raised out of this module."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path} {message}" if path else message)


def _q(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return '"' + text[:120].replace('"', '\\"') + '"'


def _map(doc: Any, path: str, required: bool = True) -> dict[str, Any]:
    if doc is None and not required:
        return {}
    if not isinstance(doc, dict):
        raise _Refused(path, "must be a mapping")
    return doc


def _list(doc: Any, path: str) -> list[Any]:
    if not isinstance(doc, list):
        raise _Refused(path, "must be a list")
    return doc


def _str(doc: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if value is None:
        raise _Refused(f"{path}{key}", "is required")
    if not isinstance(value, str):
        raise _Refused(f"{path}{key}", "must be a string")
    return value


def _name(value: str, path: str) -> str:
    try:
        return validate_namespace(value)  # a DNS-1123 label: what these names must be here
    except KubeObjectError:
        raise _Refused(path, f"{_q(value)} is not a valid name") from None


def _group_kind(ref: Mapping[str, Any], path: str) -> tuple[str, str]:
    group = ref.get("group") or CORE_GROUP
    kind = _str(ref, "kind", path)
    if not isinstance(group, str):
        raise _Refused(f"{path}group", "must be a string")
    return group.lower(), kind


# --- identities -------------------------------------------------------------------------------


def identity_pattern(value: str, cluster: ClusterSettings) -> tuple[str, bool]:
    """A MeshTLSAuthentication identity as an allow-list pattern: (SPIFFE ID or glob, False),
    or ("", True) for `*` (any authenticated client). Refused (ValueError, saying why) when the
    SPIFFE form would not match exactly the clients Linkerd's match does."""
    if value == "*":
        return "", True
    if value.startswith("spiffe://"):
        if set("*?[]") & set(value):
            raise ValueError("is a SPIFFE ID with a wildcard: Linkerd compares SPIFFE IDs exactly")
        try:
            return WorkloadIdentity.from_spiffe_id(value, cluster.mesh).spiffe_id, False
        except InvalidName as exc:
            raise ValueError(f"is not a workload SPIFFE ID: {exc.message}") from None
    if not value.startswith("*."):
        if "*" in value:
            raise ValueError("has a '*' that is not its whole first label: Linkerd matches it literally")
        try:
            ident = WorkloadIdentity.from_dns_name(value)
        except InvalidName as exc:
            raise ValueError(f"is not a mesh identity name: {exc.message}") from None
        _same_mesh(ident.mesh, cluster)
        return ident.spiffe_id, False
    # A suffix match (identity_match.rs): every identity whose labels end with these.
    suffix = value[2:].split(".")
    if any(set("*?[]") & set(label) for label in suffix) or not all(suffix):
        raise ValueError("has a wildcard or empty label after its first: Linkerd matches only a leading '*.'")
    middle = ["serviceaccount", "identity"]
    if len(suffix) >= 5 and suffix[1:3] == middle:  # *.NS.serviceaccount.identity.MESH.TD
        namespace, mesh, td = suffix[0], suffix[3], ".".join(suffix[4:])
    elif len(suffix) >= 4 and suffix[0:2] == middle:  # *.serviceaccount.identity.MESH.TD
        namespace, mesh, td = "*", suffix[2], ".".join(suffix[3:])
    elif len(suffix) >= 3 and suffix[0] == "identity":
        namespace, mesh, td = "*", suffix[1], ".".join(suffix[2:])
    elif ".".join(suffix) == f"{cluster.mesh}.{cluster.trust_domain}":
        namespace, mesh, td = "*", cluster.mesh, cluster.trust_domain
    else:
        raise ValueError(
            "is a suffix that does not name a namespace, or the mesh and trust domain "
            f"({cluster.mesh}.{cluster.trust_domain}): it has no exact SPIFFE equivalent"
        )
    _same_mesh(mesh, cluster)
    try:
        validate_trust_domain(td)
        if namespace != "*":
            validate_namespace(namespace)
    except (InvalidName, KubeObjectError) as exc:
        raise ValueError(f"is not a mesh identity suffix: {exc.message}") from None
    return f"spiffe://{td}/ns/{namespace}/sa/*", False


def _same_mesh(mesh: str, cluster: ClusterSettings) -> None:
    # The SPIFFE form has no mesh label: another mesh's name must not match this mesh's clients.
    if mesh != cluster.mesh:
        raise ValueError(f"names the mesh {mesh!r}, not this cluster's ({cluster.mesh!r})")


def _sa_pattern(namespace: str, name: str, cluster: ClusterSettings, path: str) -> str:
    try:
        return WorkloadIdentity(cluster.trust_domain, namespace, name, cluster.mesh).spiffe_id
    except InvalidName as exc:
        raise _Refused(path, exc.message) from None


# --- parsing ----------------------------------------------------------------------------------


class _NoAliases(yaml.SafeLoader):
    """Anchors and aliases are refused: a few bytes of them can expand to gigabytes to walk."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.MarkedYAMLError(None, None, "aliases are not accepted", event.start_mark)
        return super().compose_node(parent, index)


def load_documents(text: str | bytes) -> list[dict[str, Any]]:
    """The YAML stream's objects (empty documents skipped; a `kind: List` expanded)."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_BYTES:
        raise KubePolicyError([f"the file is {size} bytes; at most {MAX_BYTES}"])
    try:
        raw = list(yaml.load_all(text, Loader=_NoAliases))
    except (yaml.YAMLError, RecursionError) as exc:
        raise KubePolicyError([f"not valid YAML: {str(exc)[:300]}"]) from None
    docs: list[dict[str, Any]] = []
    problems: list[str] = []
    for i, doc in enumerate(raw):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            items = doc["items"]
        else:
            items = [doc]
        for item in items:
            if not isinstance(item, dict):
                problems.append(f"document {i + 1}: is not a Kubernetes object (a mapping)")
            else:
                docs.append(item)
    if len(docs) > MAX_DOCUMENTS:
        problems.append(f"{len(docs)} objects; at most {MAX_DOCUMENTS} in one file")
    if problems:
        raise KubePolicyError(problems)
    return docs


def parse_policy(text: str | bytes, cluster: ClusterSettings) -> PolicySet:
    """Every object of the stream, validated and resolved, or KubePolicyError naming each
    problem (`AuthorizationPolicy shop/web: spec.targetRef.kind "HTTPRoute" ...`)."""
    return resolve(load_documents(text), cluster)


def resolve(docs: Iterable[Mapping[str, Any]], cluster: ClusterSettings) -> PolicySet:
    """The objects (as the API returns them, or from YAML) validated and resolved."""
    problems: list[str] = []
    if cluster.default_policy is not None:
        try:
            _access_policy(cluster.default_policy, "the cluster default policy")
        except _Refused as exc:
            problems.append(str(exc))
    by_kind: dict[str, dict[tuple[str, str], tuple[str, Mapping[str, Any]]]] = {}
    for i, doc in enumerate(docs):
        kind = doc.get("kind")
        raw_meta = doc.get("metadata")
        meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        ns, name = meta.get("namespace"), meta.get("name")
        label = f"{kind} {ns}/{name}" if isinstance(kind, str) else f"object {i + 1}"
        try:
            kind = _check_kind(doc)
            if not isinstance(name, str) or not name:
                raise _Refused("metadata.name", "is required")
            if not isinstance(ns, str) or not ns:
                raise _Refused(
                    "metadata.namespace", "is required (meshagent cannot know kubectl's current namespace)"
                )
            _name(ns, "metadata.namespace")
            seen = by_kind.setdefault(kind, {})
            if (ns, name) in seen:
                raise _Refused("metadata.name", "is given twice for this kind and namespace")
            seen[(ns, name)] = (label, doc)
        except _Refused as exc:
            problems.append(f"{label}: {exc}")

    def each(kind: str) -> Iterable[tuple[str, str, str, Mapping[str, Any]]]:
        for (ns, name), (label, doc) in sorted(by_kind.get(kind, {}).items()):
            yield label, ns, name, doc

    meshtls: dict[tuple[str, str], Grant] = {}
    for label, ns, name, doc in each("MeshTLSAuthentication"):
        try:
            meshtls[(ns, name)] = _meshtls(label, ns, doc, cluster)
        except _Refused as exc:
            problems.append(f"{label}: {exc}")
    networks: set[tuple[str, str]] = set()
    for label, ns, name, doc in each("NetworkAuthentication"):
        try:
            _network(doc)
            networks.add((ns, name))
        except _Refused as exc:
            problems.append(f"{label}: {exc}")
    servers: list[Server] = []
    for label, ns, name, doc in each("Server"):
        try:
            servers.append(_server(ns, name, doc))
        except _Refused as exc:
            problems.append(f"{label}: {exc}")
    server_names = set(by_kind.get("Server", {}))  # an invalid one is reported already
    policies: list[_AuthzPolicy] = []
    for label, ns, name, doc in each("AuthorizationPolicy"):
        try:
            policies.append(_authz_policy(label, ns, name, doc, cluster, meshtls, networks, server_names))
        except _Refused as exc:
            problems.append(f"{label}: {exc}")
    routes: dict[tuple[str, str], frozenset[int] | None] = {}
    for label, ns, name, doc in each("TCPRoute"):
        try:
            routes[(ns, name)] = _tcp_route(doc)
        except _Refused as exc:
            problems.append(f"{label}: {exc}")
    route_names = set(by_kind.get("TCPRoute", {}))
    targets: list[_Target] = []
    for label, ns, name, doc in each("TrafficTarget"):
        try:
            targets.append(_traffic_target(ns, name, doc, cluster, routes, route_names))
        except _Refused as exc:
            problems.append(f"{label}: {exc}")
    if problems:
        raise KubePolicyError(problems)
    return PolicySet(cluster, tuple(servers), tuple(policies), tuple(targets))


_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Server": (LINKERD_GROUP, SERVER_VERSIONS),
    "AuthorizationPolicy": (LINKERD_GROUP, ("v1alpha1",)),
    "MeshTLSAuthentication": (LINKERD_GROUP, ("v1alpha1",)),
    "NetworkAuthentication": (LINKERD_GROUP, ("v1alpha1",)),
    "TrafficTarget": (SMI_ACCESS_GROUP, ("v1alpha3",)),
    "TCPRoute": (SMI_SPECS_GROUP, ("v1alpha3", "v1alpha4")),
}
_NOT_YET = {
    "ServerAuthorization": "is not read: use AuthorizationPolicy, Linkerd's successor to it",
    "HTTPRoute": "routes are not supported yet (#21): authorize the Server instead",
    "GRPCRoute": "routes are not supported yet (#21): authorize the Server instead",
    "HTTPRouteGroup": "HTTP routes are not supported yet (#21)",
}


def _check_kind(doc: Mapping[str, Any]) -> str:
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if not isinstance(kind, str):
        raise _Refused("kind", "is required")
    if not isinstance(api_version, str):
        raise _Refused("apiVersion", "is required")
    if kind in _NOT_YET:
        raise _Refused("kind", f"{_q(kind)} {_NOT_YET[kind]}")
    if kind not in _KINDS:
        raise _Refused("kind", f"{_q(kind)} is not a policy object meshagent reads (use {', '.join(_KINDS)})")
    group, versions = _KINDS[kind]
    got_group, _, version = api_version.rpartition("/")
    if got_group != group or version not in versions:
        want = " or ".join(f"{group}/{v}" for v in versions)
        raise _Refused("apiVersion", f"{_q(api_version)} is not supported for {kind} (use {want})")
    return kind


def _access_policy(value: Any, path: str) -> str:
    if not isinstance(value, str) or value not in LINKERD_POLICIES:
        raise _Refused(path, f"{_q(value)} is not one of {', '.join(LINKERD_POLICIES)}")
    if value.startswith("cluster-"):
        raise _Refused(path, f"{_q(value)} cannot be honoured: {_CLUSTER_HINT}")
    return value


def _selector(doc: Any, path: str) -> LabelSelector:
    sel = _map(doc, path, required=False)
    labels = _map(sel.get("matchLabels"), f"{path}.matchLabels", required=False)
    pairs = []
    for key, value in labels.items():
        where = f"{path}.matchLabels.{key}"
        if not isinstance(key, str) or not isinstance(value, str):
            raise _Refused(where, "must map a string to a string")
        try:
            pairs.append((validate_label_key(key), validate_label_value(value)))
        except KubeObjectError as exc:
            raise _Refused(where, exc.message) from None
    reqs = []
    exprs = sel.get("matchExpressions")
    for i, expr in enumerate(_list(exprs, f"{path}.matchExpressions") if exprs is not None else []):
        where = f"{path}.matchExpressions[{i}]"
        e = _map(expr, where)
        key, op = _str(e, "key", f"{where}."), _str(e, "operator", f"{where}.")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise _Refused(f"{where}.operator", f"{_q(op)} is not one of In, NotIn, Exists, DoesNotExist")
        values = e.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise _Refused(f"{where}.values", "must be a list of strings")
        if (op in ("In", "NotIn")) != bool(values):
            need = "must not be empty" if op in ("In", "NotIn") else "must be empty"
            raise _Refused(f"{where}.values", f"{need} for operator {op}")
        reqs.append(_Requirement(key, op, frozenset(values)))
    return LabelSelector(tuple(sorted(pairs)), tuple(reqs))


def _server(ns: str, name: str, doc: Mapping[str, Any]) -> Server:
    spec = _map(doc.get("spec"), "spec")
    has_pod, has_ext = "podSelector" in spec, "externalWorkloadSelector" in spec
    if has_pod == has_ext:
        raise _Refused("spec", "must have exactly one of podSelector and externalWorkloadSelector")
    port = spec.get("port")
    if isinstance(port, bool) or not isinstance(port, (int, str)):
        raise _Refused("spec.port", "is required: a port number or name")
    if isinstance(port, int) and not 0 < port < 65536:
        raise _Refused("spec.port", f"{port} is not a port number (1-65535)")
    if isinstance(port, str):
        try:
            validate_port_name(port)
        except KubeObjectError as exc:
            raise _Refused("spec.port", exc.message) from None
    version = str(doc.get("apiVersion")).rpartition("/")[2]
    # v1beta3's schema defaults accessPolicy to deny; v1beta2 has none (Linkerd: no default authz).
    access = _access_policy(spec.get("accessPolicy", "deny"), "spec.accessPolicy")
    if version == "v1beta2" and "accessPolicy" in spec:
        raise _Refused("spec.accessPolicy", "is not a field of policy.linkerd.io/v1beta2: use v1beta3")
    proto = spec.get("proxyProtocol", "unknown")
    if proto not in PROXY_PROTOCOLS:
        raise _Refused("spec.proxyProtocol", f"{_q(proto)} is not one of {', '.join(PROXY_PROTOCOLS)}")
    created = (doc.get("metadata") or {}).get("creationTimestamp") or ""
    if isinstance(created, datetime):  # YAML reads an unquoted timestamp as a datetime
        created = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    selector = (
        _selector(spec.get("externalWorkloadSelector"), "spec.externalWorkloadSelector") if has_ext else None
    )
    if has_pod:
        _selector(spec.get("podSelector"), "spec.podSelector")
    return Server(ns, name, selector, port, access, str(created))


def _meshtls(label: str, ns: str, doc: Mapping[str, Any], cluster: ClusterSettings) -> Grant:
    spec = _map(doc.get("spec"), "spec")
    if ("identities" in spec) == ("identityRefs" in spec):
        raise _Refused("spec", "must have exactly one of identities and identityRefs")
    patterns: list[str] = []
    any_identity = False
    if "identities" in spec:
        ids = _list(spec["identities"], "spec.identities")
        if not ids:
            raise _Refused("spec.identities", "must not be empty")
        for i, value in enumerate(ids):
            if not isinstance(value, str):
                raise _Refused(f"spec.identities[{i}]", "must be a string")
            try:
                pattern, anything = identity_pattern(value, cluster)
            except ValueError as exc:
                raise _Refused(f"spec.identities[{i}]", f"{_q(value)} {exc}") from None
            any_identity |= anything
            if pattern:
                patterns.append(pattern)
    else:
        refs = _list(spec["identityRefs"], "spec.identityRefs")
        if not refs:
            raise _Refused("spec.identityRefs", "must not be empty")
        for i, ref in enumerate(refs):
            path = f"spec.identityRefs[{i}]."
            r = _map(ref, path.rstrip("."))
            group, kind = _group_kind(r, path)
            name = _str(r, "name", path)
            if group == CORE_GROUP and kind == "ServiceAccount":
                sa_ns = _name(_str(r, "namespace", path, ns), f"{path}namespace")
                patterns.append(_sa_pattern(sa_ns, name, cluster, f"{path}name"))
            elif group == CORE_GROUP and kind == "Namespace":
                if "namespace" in r:
                    raise _Refused(f"{path}namespace", "must not be set: a Namespace is cluster-scoped")
                patterns.append(f"spiffe://{cluster.trust_domain}/ns/{_name(name, f'{path}name')}/sa/*")
            else:
                raise _Refused(
                    f"{path}kind", f"{_q(r['kind'])} is not supported (use ServiceAccount or Namespace)"
                )
    return Grant(label, any_identity=any_identity, patterns=tuple(dict.fromkeys(patterns)))


def _network(doc: Mapping[str, Any]) -> None:
    spec = _map(doc.get("spec"), "spec")
    nets = _list(spec.get("networks"), "spec.networks")
    if not nets:
        raise _Refused("spec.networks", "must not be empty")
    for i, net in enumerate(nets):
        n = _map(net, f"spec.networks[{i}]")
        for j, cidr in enumerate([_str(n, "cidr", f"spec.networks[{i}]."), *(n.get("except") or [])]):
            where = f"spec.networks[{i}]." + ("cidr" if j == 0 else f"except[{j - 1}]")
            try:
                ipaddress.ip_network(str(cidr), strict=False)
            except ValueError:
                raise _Refused(where, f"{_q(cidr)} is not an IP network") from None


def _authz_policy(
    label: str,
    ns: str,
    name: str,
    doc: Mapping[str, Any],
    cluster: ClusterSettings,
    meshtls: Mapping[tuple[str, str], Grant],
    networks: set[tuple[str, str]],
    servers: set[tuple[str, str]],
) -> _AuthzPolicy:
    spec = _map(doc.get("spec"), "spec")
    target = _map(spec.get("targetRef"), "spec.targetRef")
    group, kind = _group_kind(target, "spec.targetRef.")
    target_name = _str(target, "name", "spec.targetRef.")
    target_server: str | None
    if group == LINKERD_GROUP and kind.lower() == "server":
        if (ns, target_name) not in servers:
            raise _Refused(
                "spec.targetRef.name", f"{_q(target_name)}: no Server {ns}/{target_name} in this file"
            )
        target_server = target_name
    elif group == CORE_GROUP and kind == "Namespace":
        if target_name != ns:
            raise _Refused(
                "spec.targetRef.name", f"{_q(target_name)}: a policy cannot target another namespace"
            )
        target_server = None
    elif kind.lower() in ("httproute", "grpcroute") and group in (LINKERD_GROUP, GATEWAY_GROUP):
        raise _Refused("spec.targetRef.kind", f"{_q(target['kind'])}: routes are not supported yet (#21)")
    else:
        raise _Refused(
            "spec.targetRef.kind", f"{_q(target['kind'])} is not supported (use Server or Namespace)"
        )
    refs = _list(spec.get("requiredAuthenticationRefs"), "spec.requiredAuthenticationRefs")
    identity_grant: Grant | None = None
    for i, ref in enumerate(refs):
        path = f"spec.requiredAuthenticationRefs[{i}]."
        r = _map(ref, path.rstrip("."))
        rgroup, rkind = _group_kind(r, path)
        rname = _str(r, "name", path)
        rns = _name(_str(r, "namespace", path, ns), f"{path}namespace")
        if rgroup == LINKERD_GROUP and rkind == "NetworkAuthentication":
            why = "is in this file" if (rns, rname) in networks else "is not in this file"
            raise _Refused(
                f"{path}kind",
                f'"NetworkAuthentication" ({rns}/{rname}, which {why}) cannot be honoured: '
                "meshagent's policy has no network rules, and applying the rest would admit "
                "clients from any network",
            )
        if rgroup == LINKERD_GROUP and rkind == "MeshTLSAuthentication":
            if (rns, rname) not in meshtls:
                raise _Refused(
                    f"{path}name", f"{_q(rname)}: no valid MeshTLSAuthentication {rns}/{rname} in this file"
                )
            grant = meshtls[(rns, rname)]
        elif rgroup == CORE_GROUP and rkind == "ServiceAccount":
            grant = Grant(
                f"ServiceAccount {rns}/{rname}", patterns=(_sa_pattern(rns, rname, cluster, f"{path}name"),)
            )
        else:
            raise _Refused(
                f"{path}kind",
                f"{_q(r['kind'])} is not supported (use MeshTLSAuthentication or ServiceAccount)",
            )
        if identity_grant is not None:
            raise _Refused(
                path.rstrip("."),
                "is a second identity requirement: Linkerd takes one MeshTLSAuthentication or ServiceAccount",
            )
        identity_grant = grant
    if identity_grant is None:
        return _AuthzPolicy(ns, name, target_server, Grant(label, anyone=True))
    return _AuthzPolicy(
        ns,
        name,
        target_server,
        Grant(label, any_identity=identity_grant.any_identity, patterns=identity_grant.patterns),
    )


def _tcp_route(doc: Mapping[str, Any]) -> frozenset[int] | None:
    spec = _map(doc.get("spec"), "spec", required=False)
    matches = _map(spec.get("matches"), "spec.matches", required=False)
    if "ports" not in matches:
        return None
    ports = _list(matches["ports"], "spec.matches.ports")
    for i, p in enumerate(ports):
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
            raise _Refused(f"spec.matches.ports[{i}]", f"{_q(p)} is not a port number (1-65535)")
    return frozenset(ports) if ports else None


def _traffic_target(
    ns: str,
    name: str,
    doc: Mapping[str, Any],
    cluster: ClusterSettings,
    routes: Mapping[tuple[str, str], frozenset[int] | None],
    route_names: set[tuple[str, str]],
) -> _Target:
    spec = _map(doc.get("spec"), "spec")
    dest = _map(spec.get("destination"), "spec.destination")
    if _str(dest, "kind", "spec.destination.") != "ServiceAccount":
        raise _Refused(
            "spec.destination.kind", f"{_q(dest.get('kind'))} is not supported (use ServiceAccount)"
        )
    dns = _name(_str(dest, "namespace", "spec.destination.", ns), "spec.destination.namespace")
    try:
        destination = WorkloadIdentity(
            cluster.trust_domain, dns, _str(dest, "name", "spec.destination."), cluster.mesh
        )
    except InvalidName as exc:
        raise _Refused("spec.destination.name", exc.message) from None
    ports: frozenset[int] | None = None
    if "port" in dest:
        p = dest["port"]
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
            raise _Refused("spec.destination.port", f"{_q(p)} is not a port number (1-65535)")
        ports = frozenset({p})
    rules = _list(spec.get("rules"), "spec.rules")
    if not rules:
        raise _Refused("spec.rules", "must not be empty")
    matched: set[int] = set()
    every_port = False
    for i, rule in enumerate(rules):
        r = _map(rule, f"spec.rules[{i}]")
        kind = _str(r, "kind", f"spec.rules[{i}].")
        rname = _str(r, "name", f"spec.rules[{i}].")
        if kind != "TCPRoute":
            raise _Refused(
                f"spec.rules[{i}].kind", f"{_q(kind)} is not supported (use TCPRoute; HTTP routes are #21)"
            )
        if (ns, rname) not in route_names:
            raise _Refused(f"spec.rules[{i}].name", f"{_q(rname)}: no TCPRoute {ns}/{rname} in this file")
        if (ns, rname) not in routes:
            raise _Refused(f"spec.rules[{i}].name", f"{_q(rname)}: TCPRoute {ns}/{rname} is invalid")
        route_ports = routes[(ns, rname)]
        if route_ports is None:
            every_port = True
        else:
            matched |= route_ports
    if not every_port:
        ports = frozenset(matched) if ports is None else ports & matched
        if not ports:
            raise _Refused("spec.rules", "match no port of spec.destination.port")
    sources = _list(spec.get("sources"), "spec.sources")
    if not sources:
        raise _Refused("spec.sources", "must not be empty")
    patterns = []
    for i, src in enumerate(sources):
        s = _map(src, f"spec.sources[{i}]")
        if _str(s, "kind", f"spec.sources[{i}].") != "ServiceAccount":
            raise _Refused(
                f"spec.sources[{i}].kind", f"{_q(s.get('kind'))} is not supported (use ServiceAccount)"
            )
        sns = _name(_str(s, "namespace", f"spec.sources[{i}].", ns), f"spec.sources[{i}].namespace")
        patterns.append(
            _sa_pattern(sns, _str(s, "name", f"spec.sources[{i}]."), cluster, f"spec.sources[{i}].name")
        )
    return _Target(f"TrafficTarget {ns}/{name}", destination, ports, tuple(dict.fromkeys(patterns)))


# --- one host's policy ------------------------------------------------------------------------

_DEFAULT_GRANTS = {
    "all-unauthenticated": Grant("", anyone=True),
    "all-authenticated": Grant("", any_identity=True),
}


def combine(grants: Sequence[Grant], audit: bool, trust_domain: str) -> tuple[DefaultPolicy, tuple[str, ...]]:
    """A port's authorizations (any one admits) as meshagent's (default, allow-list).
    `any_identity` is this trust domain's authenticated clients (meshagent's all-authenticated);
    audit admits the rest, flagged."""
    if any(g.anyone for g in grants):
        return DefaultPolicy.ALL_UNAUTHENTICATED, ()
    patterns = list(dict.fromkeys(p for g in grants for p in g.patterns))
    own = f"spiffe://{trust_domain}/"
    if any(g.any_identity for g in grants):
        others = [p for p in patterns if not p.startswith(own)]
        if not others and not audit:
            return DefaultPolicy.ALL_AUTHENTICATED, ()
        patterns = [f"{own}*", *others]
    return (DefaultPolicy.AUDIT if audit else DefaultPolicy.DENY), tuple(patterns)


@dataclass(frozen=True)
class PortResult:
    """One port's policy and what it came from (for `policy apply` to show)."""

    port: int  # 0: the host's default
    default: DefaultPolicy
    allow: tuple[str, ...]
    source: str


def host_ports(policy: PolicySet, host: HostView) -> list[PortResult]:
    """The host's per-port policy, port 0 first when the cluster default or a port-less
    TrafficTarget sets one; KubePolicyError when two systems claim one port."""
    numbers = {p.name: p.port for p in host.ports}
    chosen: dict[int, Server] = {}
    servers = [s for s in policy.servers if s.namespace == host.namespace and s.selector is not None]
    for srv in sorted(servers, key=lambda s: (s.created_at, s.name)):  # oldest wins, as Linkerd
        assert srv.selector is not None
        if not srv.selector.matches(host.labels):
            continue
        port = srv.port if isinstance(srv.port, int) else numbers.get(srv.port)
        if port is not None and port not in chosen:
            chosen[port] = srv
    results: dict[int, PortResult] = {}
    td = policy.cluster.trust_domain
    for port, srv in sorted(chosen.items()):
        grants = [
            ap.grant
            for ap in policy.policies
            if ap.namespace == srv.namespace and ap.target_server in (None, srv.name)
        ]
        if srv.access_policy in _DEFAULT_GRANTS:
            grants.append(_DEFAULT_GRANTS[srv.access_policy])
        default, allow = combine(grants, srv.access_policy == "audit", td)
        results[port] = PortResult(port, default, allow, f"Server {srv.namespace}/{srv.name}")
    problems: list[str] = []
    targets = [t for t in policy.targets if t.destination.spiffe_id == host.identity.spiffe_id]
    # SMI is additive: a port's sources are those of every target naming it or every port.
    smi_ports = sorted({p for t in targets if t.ports is not None for p in t.ports})
    if any(t.ports is None for t in targets):
        smi_ports.insert(0, 0)
    for port in smi_ports:
        mine = [t for t in targets if t.ports is None or port in t.ports]
        clash = results.get(port) if port else next(iter(results.values()), None)
        if clash is not None:
            where = f"port {port}" if port else "every port"
            problems.append(
                f"{mine[0].name}: spec.destination selects host {host.identity.short} on {where}, "
                f"which {clash.source} also governs: use one policy system per port"
            )
            continue
        allow = tuple(dict.fromkeys(p for t in mine for p in t.patterns))
        results[port] = PortResult(port, DefaultPolicy.DENY, allow, ", ".join(t.name for t in mine))
    if problems:
        raise KubePolicyError(problems)
    if 0 not in results and policy.cluster.default_policy is not None:
        value = policy.cluster.default_policy
        if value == "deny":
            results[0] = PortResult(0, DefaultPolicy.DENY, (), "cluster default")
        elif value == "audit":
            results[0] = PortResult(0, DefaultPolicy.AUDIT, (), "cluster default")
        else:
            default, allow = combine([_DEFAULT_GRANTS[value]], False, td)
            results[0] = PortResult(0, default, allow, "cluster default")
    return [results[p] for p in sorted(results)]


def host_policy(policy: PolicySet, host: HostView) -> list[PolicyRecord]:
    """The PolicyRecords (stored per identity) that give `host` this policy."""
    return [
        PolicyRecord(host.identity.short, r.port, r.default.value, r.allow) for r in host_ports(policy, host)
    ]


@dataclass(frozen=True)
class Planned:
    """A record to store, and the objects it comes from (for the operator to read)."""

    record: PolicyRecord
    source: str


def plan(policy: PolicySet, hosts: Iterable[HostView]) -> list[Planned]:
    """Every host's records, merged by identity: hosts enrolled under one identity share one
    policy, so two of them that the objects give different policies are refused."""
    by_identity: dict[str, tuple[str, list[Planned]]] = {}
    problems: list[str] = []
    for host in hosts:
        try:
            records = [
                Planned(PolicyRecord(host.identity.short, r.port, r.default.value, r.allow), r.source)
                for r in host_ports(policy, host)
            ]
        except KubePolicyError as exc:
            problems.extend(exc.problems)
            continue
        seen = by_identity.setdefault(host.identity.short, (_host_label(host), records))
        if seen[1] != records:
            problems.append(
                f"hosts enrolled as {host.identity.short} get different policies "
                f"({seen[0]} and {_host_label(host)}): their labels or ports differ, and meshagent "
                "stores one policy per identity; give them the same labels and ports, or separate identities"
            )
    if problems:
        raise KubePolicyError(problems)
    return [r for _, (_, records) in sorted(by_identity.items()) for r in records]


def identity_policies(policy: PolicySet, hosts: Iterable[HostView]) -> list[PolicyRecord]:
    """`plan`'s records alone."""
    return [p.record for p in plan(policy, hosts)]


def _host_label(host: HostView) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(host.labels.items()))
    return f"labels {{{labels}}} ports {sorted(p.port for p in host.ports)}"
