"""In-cluster Services as the hosts' directory sees them (issue #17, "Discovery"): pure.

`build_services` turns what the controller's watches hold (Services, EndpointSlices, Pods,
Namespaces, ExternalWorkloads, as the API's JSON dicts) into the `services` list of GET
/v1/host/config (contract: /tmp/team/interfaces.md §1). It follows Linkerd's destination
controller (linkerd2 controller/api/destination/watcher/port_publisher.go,
endpoint_translator.go, opaque_ports_watcher.go):

- an EndpointSlice belongs to the Service its `kubernetes.io/service-name` label names; an
  endpoint is used unless `conditions.ready` is false; a Service port's target port on an
  endpoint is the slice port of the same *name* (slices carry the Service port's name, so an
  unnamed port matches the unnamed one);
- a Pod endpoint has an identity only when the pod is meshed by this control plane (label
  `linkerd.io/control-plane-ns` = the mesh): `spiffe://TD/ns/NS/sa/SA`, server name in
  Linkerd's DNS form; its proxy's inbound port from the proxy container (env
  LINKERD2_PROXY_INBOUND_LISTEN_ADDR, else the port named `linkerd-proxy`, else 4143). An
  unmeshed or unknown pod is still served, without identity (Linkerd sends those plaintext);
- an ExternalWorkload endpoint has its `spec.meshTLS` identity and server name;
- a port is opaque by the Service's `config.linkerd.io/opaque-ports` annotation (present,
  even empty, it decides), else the namespace's (Linkerd's injector copies it onto Services,
  pkg/inject/inject.go), else Linkerd's default opaque ports (`default_opaque_ports`);
- a pod's target port in its `config.linkerd.io/skip-inbound-ports` bypasses its proxy: Linkerd
  sends no identity for it. An endpoint has one identity here, so it loses it only when all
  its target ports are skipped (a note says when some are).

Anything malformed (a missing field, a wrong type) leaves out that object, or that part of
it, with a reason in `Discovered.skipped`: one bad object never stops the rest. The output
order depends only on the input's content.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.identity.names import DEFAULT_MESH, InvalidName, WorkloadIdentity

from .kube_objects import LINKERD_DEFAULT_INBOUND_PORT, LINKERD_PROXY_PORT_NAME

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
CONTROL_PLANE_NS_LABEL = "linkerd.io/control-plane-ns"
OPAQUE_PORTS_ANNOTATION = "config.linkerd.io/opaque-ports"
SKIP_INBOUND_ANNOTATION = "config.linkerd.io/skip-inbound-ports"
# The destination controller's -default-opaque-ports for a Service without the annotation
# (charts/linkerd-control-plane/values.yaml proxy.opaquePorts).
LINKERD_DEFAULT_OPAQUE_PORTS = "25,587,3306,4444,5432,6379,9300,11211"
PROXY_CONTAINER = "linkerd-proxy"
INBOUND_LISTEN_ENV = "LINKERD2_PROXY_INBOUND_LISTEN_ADDR"
DEFAULT_SERVICE_ACCOUNT = "default"

# What the agents' SPIFFE check accepts: printable ASCII without spaces.
_SPIFFE = re.compile(r"spiffe://[!-~]{1,2000}")
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*"
)


@dataclass(frozen=True, order=True)
class Skipped:
    """Something left out (or, in `Discovered.notes`, served with a caveat), and why."""

    source: str  # "service:NS/NAME", "endpointslice:NS/NAME", "pod:NS/NAME", ...
    reason: str


@dataclass
class Discovered:
    services: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # Endpoints served without identity (unmeshed pod, pod not found, no targetRef): not
    # errors, but what an operator asks about when a call to them is plaintext.
    notes: list[Skipped] = field(default_factory=list)


class _Bad(Exception):
    """A malformed object or field; the message is the reason."""


# --- typed access to untrusted dicts --------------------------------------------------------


def _get(obj: Any, *path: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """obj[path...] if it is of `kind`, `default` when absent (or null); _Bad when mistyped."""
    value = obj
    for i, key in enumerate(path):
        if not isinstance(value, Mapping):
            raise _Bad(f"{'.'.join(path[:i]) or 'the object'} is not an object")
        value = value.get(key)
        if value is None:
            return default
    if kind is int and isinstance(value, bool):
        raise _Bad(f"{'.'.join(path)} is not an integer")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _Bad(f"{'.'.join(path)} is a {type(value).__name__}, not a {names}")
    return value


def _need(obj: Any, *path: str, kind: type) -> Any:
    value = _get(obj, *path, kind=kind)
    if value is None or value == "":
        raise _Bad(f"{'.'.join(path)} is missing")
    return value


def _meta(obj: Any) -> tuple[str, str]:
    """(namespace, name) of a namespaced object."""
    return _need(obj, "metadata", "namespace", kind=str), _need(obj, "metadata", "name", kind=str)


def _map_str(obj: Any, *path: str) -> dict[str, str]:
    """A labels/annotations map; entries that are not strings are dropped."""
    value = _get(obj, *path, kind=Mapping, default={})
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _port(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536 else None


def _items(value: Any) -> list[Any]:
    """A list field of a part only read for hints (the proxy's port): wrong types read as empty."""
    return value if isinstance(value, list) else []


def _ip(value: Any, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address written as one (ipaddress also takes integers and IPv6 scope ids)."""
    try:
        if isinstance(value, str) and "%" not in value:
            return ipaddress.ip_address(value)
    except ValueError:
        pass
    raise _Bad(f"{what} {str(value)[:60]!r} is not an IP address")


def _objects(given: Iterable[Any] | Mapping[Any, Any]) -> list[Any]:
    return list(given.values()) if isinstance(given, Mapping) else list(given)


def _name_of(obj: Any, kind: str) -> str:
    """The object's source string, as best it can be read (for a skip reason)."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return f"{kind}:?"
    ns, name = meta.get("namespace"), meta.get("name")
    ns = ns if isinstance(ns, str) else "?"
    name = name if isinstance(name, str) else "?"
    return f"{kind}:{ns}/{name}"[:300]


# --- opaque ports ---------------------------------------------------------------------------


def parse_opaque_ports(annotation: str, named: Mapping[str, int]) -> tuple[list[tuple[int, int]], list[str]]:
    """Linkerd's `config.linkerd.io/opaque-ports` (pkg/util/parsing.go GetPortRanges +
    opaque_ports_watcher.go parseServiceOpaquePorts): comma-separated ports, ranges LO-HI and
    Service port names (`named`). Returns the ranges (a port is (p, p)) and the entries that
    do not parse, which Linkerd ignores with a warning (here: returned, to be reported)."""
    ranges: list[tuple[int, int]] = []
    ignored: list[str] = []
    if not annotation:
        return ranges, ignored
    for token in (t.strip() for t in annotation.removesuffix(",").split(",")):
        if token in named:
            ranges.append((named[token], named[token]))
            continue
        bounds = token.split("-")
        if len(bounds) == 1:
            bounds.append(bounds[0])
        if len(bounds) != 2 or not all(b.isascii() and b.isdigit() and len(b) <= 5 for b in bounds):
            ignored.append(token)
            continue
        lower, upper = int(bounds[0]), int(bounds[1])
        if upper > 65535 or upper < lower:
            ignored.append(token)
            continue
        ranges.append((lower, upper))
    return ranges, ignored


# --- the parts --------------------------------------------------------------------------------


@dataclass
class _Service:
    namespace: str
    name: str
    cluster_ips: list[str]
    ports: list[dict[str, Any]]  # TCP only, in the Service's order
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # by address


def _service(
    obj: Any, namespaces: Mapping[str, dict[str, str]], default_opaque: str, skipped: list[Skipped]
) -> _Service | None:
    namespace, name = _meta(obj)
    source = f"service:{namespace}/{name}"
    spec = _get(obj, "spec", kind=Mapping, default={})
    kind = _get(spec, "type", kind=str, default="ClusterIP")
    if kind == "ExternalName":
        skipped.append(Skipped(source, "type ExternalName: a DNS alias, no addresses to route"))
        return None
    ips = _get(spec, "clusterIPs", kind=list, default=None)
    if ips is None:
        single = _get(spec, "clusterIP", kind=str, default="")
        ips = [single] if single else []
    cluster_ips: list[str] = []
    for ip in ips:
        if ip == "None":  # headless: endpoints only
            continue
        cluster_ips.append(str(_ip(ip, "cluster IP")))
    if len(cluster_ips) > 2:
        raise _Bad(f"{len(cluster_ips)} cluster IPs (at most one IPv4 and one IPv6)")

    raw_ports = _get(spec, "ports", kind=list, default=[])
    named: dict[str, int] = {}
    tcp: list[tuple[str, int]] = []
    for i, p in enumerate(raw_ports):
        port = _port(_get(p, "port", kind=int))
        if port is None:
            raise _Bad(f"spec.ports[{i}].port is missing or not 1-65535")
        port_name = _get(p, "name", kind=str, default="")
        protocol = _get(p, "protocol", kind=str, default="TCP")
        named.setdefault(port_name, port)
        if protocol != "TCP":
            skipped.append(Skipped(source, f"port {port}/{protocol}: only TCP is served"))
            continue
        if any(q == port for _, q in tcp):
            continue  # (the API refuses duplicates; a second one would be the same port)
        tcp.append((port_name, port))
    if not tcp:
        skipped.append(Skipped(source, "no TCP port"))
        return None

    annotations = _map_str(obj, "metadata", "annotations")
    annotation = annotations.get(OPAQUE_PORTS_ANNOTATION)
    if annotation is None:
        annotation = namespaces.get(namespace, {}).get(OPAQUE_PORTS_ANNOTATION, default_opaque)
    opaque, ignored = parse_opaque_ports(annotation, named)
    for token in ignored:
        skipped.append(
            Skipped(source, f"opaque-ports entry {token[:60]!r} ignored: not a port, range or port name")
        )
    ports = [
        {
            "port": port,
            "name": port_name,
            "protocol": "TCP",
            "opaque": any(lo <= port <= hi for lo, hi in opaque),
        }
        for port_name, port in tcp
    ]
    return _Service(namespace, name, cluster_ips, ports)


@dataclass(frozen=True)
class _Who:
    identity: str | None
    server_name: str | None
    proxy_port: int | None
    source: str
    note: str = ""  # why there is no identity
    skip_inbound: tuple[tuple[int, int], ...] = ()  # target ports that bypass the pod's proxy


class _Identities:
    """Who answers at an endpoint, from its targetRef; cached per pod / workload."""

    def __init__(
        self, pods: list[Any], workloads: list[Any], trust_domain: str, mesh: str, skipped: list[Skipped]
    ) -> None:
        self.trust_domain = trust_domain
        self.mesh = mesh
        self.pods = _index(pods, "pod", skipped)
        self.workloads = _index(workloads, "externalworkload", skipped)
        self._cache: dict[tuple[str, str, str], _Who | _Bad] = {}

    def of(self, kind: str, namespace: str, name: str) -> _Who:
        key = (kind, namespace, name)
        if key not in self._cache:
            try:
                self._cache[key] = (
                    self._pod(namespace, name) if kind == "Pod" else self._workload(namespace, name)
                )
            except _Bad as exc:
                self._cache[key] = exc
        who = self._cache[key]
        if isinstance(who, _Bad):
            raise who
        return who

    def _pod(self, namespace: str, name: str) -> _Who:
        source = f"pod:{namespace}/{name}"
        pod = self.pods.get((namespace, name))
        if pod is None:
            return _Who(None, None, None, source, "pod not found: served without identity")
        plane = _map_str(pod, "metadata", "labels").get(CONTROL_PLANE_NS_LABEL)
        if not plane:
            return _Who(
                None,
                None,
                None,
                source,
                "pod not meshed (no linkerd.io/control-plane-ns label): served without identity",
            )
        if plane != self.mesh:
            return _Who(
                None,
                None,
                None,
                source,
                f"pod meshed by control plane {plane[:63]!r}, not {self.mesh!r}: served without identity",
            )
        account = _get(pod, "spec", "serviceAccountName", kind=str, default="") or DEFAULT_SERVICE_ACCOUNT
        try:
            workload = WorkloadIdentity(self.trust_domain, namespace, account, self.mesh)
        except InvalidName as exc:
            raise _Bad(exc.message) from None
        skip, _ = parse_opaque_ports(
            _map_str(pod, "metadata", "annotations").get(SKIP_INBOUND_ANNOTATION, ""), {}
        )
        return _Who(
            workload.spiffe_id, workload.dns_name, _pod_proxy_port(pod), source, skip_inbound=tuple(skip)
        )

    def _workload(self, namespace: str, name: str) -> _Who:
        source = f"externalworkload:{namespace}/{name}"
        ew = self.workloads.get((namespace, name))
        if ew is None:
            raise _Bad(f"{source} not found: its identity is unknown")
        identity = _need(ew, "spec", "meshTLS", "identity", kind=str)
        server_name = _need(ew, "spec", "meshTLS", "serverName", kind=str)
        if not _SPIFFE.fullmatch(identity):
            raise _Bad(f"{source}: meshTLS.identity {identity[:80]!r} is not a SPIFFE ID")
        if not _DNS_NAME.fullmatch(server_name):
            raise _Bad(f"{source}: meshTLS.serverName {server_name[:80]!r} is not a DNS name")
        proxy_port = LINKERD_DEFAULT_INBOUND_PORT
        for p in _get(ew, "spec", "ports", kind=list, default=[]):
            if isinstance(p, Mapping) and p.get("name") == LINKERD_PROXY_PORT_NAME and _port(p.get("port")):
                proxy_port = p["port"]
        return _Who(identity, server_name, proxy_port, source)


def _index(objects: list[Any], kind: str, skipped: list[Skipped]) -> dict[tuple[str, str], Any]:
    index: dict[tuple[str, str], Any] = {}
    for obj in objects:
        try:
            index[_meta(obj)] = obj
        except _Bad as exc:
            skipped.append(Skipped(_name_of(obj, kind), str(exc)))
    return index


def _pod_proxy_port(pod: Any) -> int:
    """The pod proxy's inbound port: Linkerd reads the proxy container's
    LINKERD2_PROXY_INBOUND_LISTEN_ADDR (endpoint_translator.go getInboundPort); the injected
    container also names that port `linkerd-proxy`."""
    containers = [
        *_get(pod, "spec", "containers", kind=list, default=[]),
        *_get(pod, "spec", "initContainers", kind=list, default=[]),  # native sidecars
    ]
    named = None
    for c in containers:
        if not isinstance(c, Mapping):
            continue
        if c.get("name") == PROXY_CONTAINER:
            for env in _items(c.get("env")):
                if isinstance(env, Mapping) and env.get("name") == INBOUND_LISTEN_ENV:
                    value = env.get("value")
                    tail = value.rpartition(":")[2] if isinstance(value, str) else ""
                    if tail.isascii() and tail.isdigit() and _port(int(tail)):
                        return int(tail)
        for p in _items(c.get("ports")):
            if (
                isinstance(p, Mapping)
                and p.get("name") == LINKERD_PROXY_PORT_NAME
                and _port(p.get("containerPort"))
            ):
                named = named or p["containerPort"]
    return named or LINKERD_DEFAULT_INBOUND_PORT


def _slice(
    obj: Any,
    services: Mapping[tuple[str, str], _Service],
    who: _Identities,
    skipped: list[Skipped],
    notes: set[Skipped],
) -> None:
    namespace, name = _meta(obj)
    source = f"endpointslice:{namespace}/{name}"
    service_name = _map_str(obj, "metadata", "labels").get(SERVICE_NAME_LABEL)
    service = services.get((namespace, service_name)) if service_name else None
    if service is None:
        return  # another controller's slice, or a Service not served (skipped, with its reason)
    address_type = _need(obj, "addressType", kind=str)
    if address_type not in ("IPv4", "IPv6"):
        skipped.append(Skipped(source, f"addressType {address_type[:20]!r}: only IPv4 and IPv6 are served"))
        return
    version = 4 if address_type == "IPv4" else 6
    # Slice ports carry the Service port's name (unnamed: ""): the target port per Service port.
    by_name: dict[str, int] = {}
    for i, p in enumerate(_get(obj, "ports", kind=list, default=[])):
        if _get(p, "protocol", kind=str, default="TCP") != "TCP":
            continue
        port = _port(_get(p, "port", kind=int))
        if port is None:
            raise _Bad(f"ports[{i}].port is missing or not 1-65535")
        by_name.setdefault(_get(p, "name", kind=str, default=""), port)
    targets = {str(sp["port"]): by_name[sp["name"]] for sp in service.ports if sp["name"] in by_name}
    if not targets:
        skipped.append(
            Skipped(source, f"no port matches a TCP port of service:{namespace}/{service.name} by name")
        )
        return
    for i, endpoint in enumerate(_get(obj, "endpoints", kind=list, default=[])):
        try:
            _endpoint(endpoint, namespace, source, version, targets, service, who, notes)
        except _Bad as exc:
            skipped.append(Skipped(f"{source}#{i}", str(exc)))


def _endpoint(
    endpoint: Any,
    namespace: str,
    slice_source: str,
    version: int,
    targets: dict[str, int],
    service: _Service,
    who: _Identities,
    notes: set[Skipped],
) -> None:
    if _get(endpoint, "conditions", "ready", kind=bool, default=True) is False:
        return  # (unset means ready: the API's own rule, and Linkerd's)
    ref = _get(endpoint, "targetRef", kind=Mapping, default=None)
    kind = _get(ref, "kind", kind=str, default="") if ref is not None else ""
    if kind in ("Pod", "ExternalWorkload"):
        ref_ns = _get(ref, "namespace", kind=str, default="") or namespace
        found = who.of(kind, ref_ns, _need(ref, "name", kind=str))
    else:
        found = _Who(
            None,
            None,
            None,
            slice_source,
            "endpoint without a Pod or ExternalWorkload: served without identity",
        )
    if found.skip_inbound:
        found = _unskipped(found, targets, notes)
    if found.note:
        notes.add(Skipped(found.source, found.note))
    addresses = _get(endpoint, "addresses", kind=list, default=[])
    for address in addresses:
        ip = _ip(address, "address")
        if ip.version != version:
            raise _Bad(f"address {address} is not IPv{version} like its slice")
        key = str(ip)
        existing = service.endpoints.get(key)
        if existing is not None:
            # The same address in two slices (a slice being replaced): one endpoint.
            for port, target in targets.items():
                existing["ports"].setdefault(port, target)
            continue
        service.endpoints[key] = {
            "address": key,
            "ports": dict(targets),
            "identity": found.identity,
            "server_name": found.server_name,
            "proxy_port": found.proxy_port,
            "source": found.source,
        }


def _unskipped(found: _Who, targets: Mapping[str, int], notes: set[Skipped]) -> _Who:
    """`found` without identity if every target port skips the pod's proxy."""
    skipped = sorted({t for t in targets.values() if any(lo <= t <= hi for lo, hi in found.skip_inbound)})
    if not skipped:
        return found
    ports = ",".join(map(str, skipped))
    if len(skipped) == len(set(targets.values())):
        return _Who(
            None,
            None,
            None,
            found.source,
            f"target ports {ports} skip the pod's proxy (skip-inbound-ports): served without identity",
        )
    notes.add(
        Skipped(
            found.source,
            f"target ports {ports} skip the pod's proxy (skip-inbound-ports) "
            "but the endpoint keeps its identity for its other ports",
        )
    )
    return found


def build_services(
    services: Iterable[Any] | Mapping[Any, Any],
    slices: Iterable[Any] | Mapping[Any, Any],
    pods: Iterable[Any] | Mapping[Any, Any],
    namespaces: Iterable[Any] | Mapping[Any, Any],
    external_workloads: Iterable[Any] | Mapping[Any, Any],
    trust_domain: str,
    *,
    mesh: str = DEFAULT_MESH,
    default_opaque_ports: str = LINKERD_DEFAULT_OPAQUE_PORTS,
) -> Discovered:
    """The hosts' `services` from the cluster's objects (see the module doc). `mesh`: the
    Linkerd control plane's namespace, the `MESH` of identity names (linkerd).
    `default_opaque_ports`: the cluster's Linkerd `proxy.opaquePorts` setting."""
    skipped: list[Skipped] = []
    notes: set[Skipped] = set()

    ns_annotations: dict[str, dict[str, str]] = {}
    for obj in _objects(namespaces):
        try:
            ns_annotations[_need(obj, "metadata", "name", kind=str)] = _map_str(
                obj, "metadata", "annotations"
            )
        except _Bad as exc:
            skipped.append(Skipped(_name_of(obj, "namespace"), str(exc)))

    served: dict[tuple[str, str], _Service] = {}
    for obj in _objects(services):
        try:
            service = _service(obj, ns_annotations, default_opaque_ports, skipped)
        except _Bad as exc:
            skipped.append(Skipped(_name_of(obj, "service"), str(exc)))
            continue
        if service is not None:
            served[(service.namespace, service.name)] = service

    who = _Identities(_objects(pods), _objects(external_workloads), trust_domain, mesh, skipped)
    # Sorted: which of two slices holding one address is read first must not depend on the
    # order the watch delivered them.
    for obj in sorted(_objects(slices), key=lambda o: _name_of(o, "endpointslice")):
        try:
            _slice(obj, served, who, skipped, notes)
        except _Bad as exc:
            skipped.append(Skipped(_name_of(obj, "endpointslice"), str(exc)))

    docs = []
    for key in sorted(served):
        service = served[key]
        endpoints = [service.endpoints[a] for a in sorted(service.endpoints, key=_address_key)]
        docs.append(
            {
                "name": service.name,
                "namespace": service.namespace,
                "cluster_ips": service.cluster_ips,
                "ports": service.ports,
                "endpoints": endpoints,
            }
        )
    return Discovered(docs, sorted(set(skipped)), sorted(notes))


def _address_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)
