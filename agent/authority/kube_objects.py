"""The Kubernetes objects that make an enrolled host a workload of the cluster (issue #17).

Pure functions, no I/O: a `HostWorkload` (what the authority knows of one host) becomes

- a Linkerd `ExternalWorkload` (workload.linkerd.io/v1beta1),
- an Istio `WorkloadEntry` (networking.istio.io/v1),
- and, when the operator asks for one, a `Service` selecting a label set;

and `render_yaml` writes them as a multi-document stream for `kubectl apply -f -` or GitOps.
The controller (next session) applies the same dicts with server-side apply and patches their
`status` through the status subresource. Design, facts and their sources: docs/kubernetes.md.

What the consumers of these objects do with them, read from their source:

- Linkerd's destination service sends the endpoint's identity as a URI
  (`UriLikeIdentity{uri: spec.meshTLS.identity}`) with `server_name = spec.meshTLS.serverName`
  (linkerd2 controller/api/destination/endpoint_translator.go,
  createWeightedAddrForExternalWorkload): the identity is the SPIFFE ID, the server name the
  mesh DNS name. The proxy's inbound port is the port named `linkerd-proxy`, else 4143
  (getInboundPortFromExternalWorkload). An endpoint is ready only while `status.conditions` has
  `Ready=True` (external-workload/controller_util.go, IsEwReady). A Service's targetPort must
  match a port the workload lists, by name or number AND protocol (endpoints_reconciler.go,
  findWorkloadPort), so every port carries its protocol explicitly. For a headless Service
  the workload's name becomes the endpoint's hostname, so names are DNS-1123 labels.
- Istio builds the peer identity from the entry's namespace and `serviceAccount`
  (pilot/pkg/serviceregistry/serviceentry/conversion.go: spiffe.MustGenSpiffeURI), and a set
  `serviceAccount` means mutual TLS (getTLSModeFromWorkloadEntry). It honours the `Healthy`
  condition only on entries annotated `proxy.istio.io/health-checks-enabled: "true"`
  (pilot/pkg/model/status/workloadentry.go; conversion.go isHealthy): without it an unhealthy
  host keeps getting traffic.

Every object carries `app.kubernetes.io/managed-by: meshagent` and
`meshagent.io/authority: <name>`: a controller lists, changes and deletes only objects with
both (`is_owned`), never one an operator or another authority made.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from agent.errors import MeshagentError
from agent.identity.names import WorkloadIdentity, validate_host_addresses, validate_host_name

KubeObject = dict[str, Any]
Flavor = Literal["linkerd", "istio"]

LINKERD_API_VERSION = "workload.linkerd.io/v1beta1"
ISTIO_API_VERSION = "networking.istio.io/v1"
# Linkerd's names (linkerd2 pkg/k8s/labels.go ProxyPortName; endpoint_translator.go default).
LINKERD_PROXY_PORT_NAME = "linkerd-proxy"
LINKERD_DEFAULT_INBOUND_PORT = 4143
ISTIO_HEALTH_ANNOTATION = "proxy.istio.io/health-checks-enabled"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "meshagent"
AUTHORITY_LABEL = "meshagent.io/authority"
HOST_ID_LABEL = "meshagent.io/host-id"
HOST_NAME_ANNOTATION = "meshagent.io/host-name"
_RESERVED_PREFIXES = ("meshagent.io/",)
_RESERVED_KEYS = frozenset({MANAGED_BY_LABEL})

MAX_LABELS = 64  # Istio's WorkloadEntry takes 256; nobody selects on more than a few
PROTOCOLS = ("TCP", "UDP")  # what Linkerd's CRD allows for a workload port

# apimachinery's validation (k8s.io/apimachinery/pkg/util/validation/validation.go).
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_IANA_SVC_NAME = re.compile(r"[-a-z0-9]+")
# A condition's reason, as Linkerd's CRD (and metav1.Condition) constrain it.
_REASON = re.compile(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?")
_MAX_MESSAGE = 32768
_NAME_HASH_LEN = 10


class KubeObjectError(MeshagentError):
    code = "kube_object_invalid"


# --- names and labels, as the API server validates them ----------------------------------------


def validate_label_key(key: str) -> str:
    prefix, slash, name = key.rpartition("/")
    ok = bool(name) and len(name) <= 63 and _QUALIFIED_NAME.fullmatch(name) is not None
    if slash:
        ok = ok and 0 < len(prefix) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(prefix) is not None
    if not ok:
        raise KubeObjectError(
            f"label key {key[:300]!r} is not a Kubernetes label key",
            "use [PREFIX/]NAME: NAME 1-63 letters, digits, '-', '_', '.', starting and ending "
            "alphanumeric; PREFIX a lowercase DNS name, e.g. app or example.com/tier",
        )
    return key


def validate_label_value(value: str) -> str:
    if len(value) > 63 or (value and not _QUALIFIED_NAME.fullmatch(value)):
        raise KubeObjectError(
            f"label value {value[:300]!r} is not a Kubernetes label value",
            "use at most 63 letters, digits, '-', '_', '.', starting and ending alphanumeric",
        )
    return value


def validate_labels(labels: Mapping[str, str], *, allow_reserved: bool = False) -> dict[str, str]:
    """The operator's labels, checked; meshagent's own keys are refused (a host must not be
    able to claim, or disown, the labels garbage collection relies on)."""
    if len(labels) > MAX_LABELS:
        raise KubeObjectError(f"{len(labels)} labels given; at most {MAX_LABELS}")
    out: dict[str, str] = {}
    for key, value in labels.items():
        validate_label_key(key)
        validate_label_value(value)
        if not allow_reserved and (key in _RESERVED_KEYS or key.startswith(_RESERVED_PREFIXES)):
            raise KubeObjectError(
                f"label {key!r} is meshagent's own",
                f"choose another key: {MANAGED_BY_LABEL} and meshagent.io/* mark the objects "
                "the authority manages",
            )
        out[key] = value
    return dict(sorted(out.items()))


def validate_app_ports(
    ports: Sequence[WorkloadPort], proxy_port: int, hint: str = "list only the app's own ports"
) -> None:
    """An app's named ports: names and number/protocol pairs unique, none of them the proxy's
    (`linkerd-proxy` is added for Linkerd, on `proxy_port`)."""
    names: set[str] = set()
    numbers: set[tuple[int, str]] = set()
    for p in ports:
        if p.name == LINKERD_PROXY_PORT_NAME or p.port == proxy_port:
            raise KubeObjectError(
                f"port {p.name!r} ({p.port}) is the proxy's: {LINKERD_PROXY_PORT_NAME} is port "
                f"{proxy_port}, added by itself",
                hint,
            )
        if p.name in names or (p.port, p.protocol) in numbers:
            raise KubeObjectError(
                f"port {p.name!r} ({p.port}/{p.protocol}) is given twice",
                "give each port one name and each number/protocol one entry",
            )
        names.add(p.name)
        numbers.add((p.port, p.protocol))


def validate_port_name(name: str) -> str:
    """An IANA_SVC_NAME (apimachinery IsValidPortName): what a Service's targetPort names."""
    if (
        not 0 < len(name) <= 15
        or not _IANA_SVC_NAME.fullmatch(name)
        or not re.search(r"[a-z]", name)
        or "--" in name
        or name.startswith("-")
        or name.endswith("-")
    ):
        raise KubeObjectError(
            f"port name {name[:80]!r} is not a valid port name",
            "use 1-15 lowercase letters, digits and single inner '-', with at least one letter, "
            "e.g. http or grpc-api",
        )
    return name


def validate_service_name(name: str) -> str:
    if len(name) > 63 or not _DNS1035_LABEL.fullmatch(name):
        raise KubeObjectError(
            f"service name {name[:80]!r} is not a valid Service name",
            "use 1-63 lowercase letters, digits and '-', starting with a letter, e.g. billing",
        )
    return name


def validate_namespace(name: str) -> str:
    if len(name) > 63 or not _DNS1123_LABEL.fullmatch(name):
        raise KubeObjectError(
            f"namespace {name[:80]!r} is not a valid namespace name",
            "use 1-63 lowercase letters, digits and '-', starting and ending alphanumeric",
        )
    return name


def validate_authority_name(name: str) -> str:
    validate_label_value(name)
    if not name:
        raise KubeObjectError("the authority name is empty", "give a name such as default")
    return name


def _port_number(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise KubeObjectError(f"{what} {port!r} is not a port number", "use 1-65535")
    return port


# --- the host record ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadPort:
    """One port the host's app serves: `name` is what Services and Istio's ports map refer to."""

    name: str
    port: int
    protocol: str = "TCP"

    def __post_init__(self) -> None:
        validate_port_name(self.name)
        _port_number(self.port, f"port {self.name!r}:")
        if self.protocol not in PROTOCOLS:
            raise KubeObjectError(
                f"port {self.name!r}: protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}",
                "Linkerd's ExternalWorkload takes TCP or UDP (and meshagent meshes TCP)",
            )


# Reasons the authority gives; any CamelCase word is accepted.
REASON_AGENT_READY = "AgentReady"
REASON_AGENT_STALE = "AgentStale"
REASON_PROBE_FAILED = "ProbeFailed"
REASON_NOT_REPORTED = "NotReported"


@dataclass(frozen=True)
class Health:
    """Whether the host should get traffic, why, and since when (the condition's transition
    time: it changes only when `ready` does, so an unchanged host yields an unchanged object)."""

    ready: bool
    reason: str
    message: str
    since: datetime

    def __post_init__(self) -> None:
        if len(self.reason) > 1024 or not _REASON.fullmatch(self.reason):
            raise KubeObjectError(
                f"condition reason {self.reason[:80]!r} is not one CamelCase word",
                "e.g. AgentReady, AgentStale, ProbeFailed",
            )
        if len(self.message) > _MAX_MESSAGE:
            raise KubeObjectError(f"condition message is {len(self.message)} characters; at most 32768")
        if self.since.tzinfo is None:
            raise KubeObjectError("the health time has no time zone", "pass an aware datetime (UTC)")


@dataclass(frozen=True)
class HostWorkload:
    """What the objects are made from: one enrolled, unrevoked host.

    `host_id` is the authority's stable id (`h-...`); `labels` are the operator's (chosen at
    token time), kept sorted as pairs so the record stays hashable and comparable."""

    host_id: str
    host_name: str
    identity: WorkloadIdentity
    addresses: tuple[str, ...]
    ports: tuple[WorkloadPort, ...]
    health: Health
    labels: tuple[tuple[str, str], ...] = ()
    inbound_proxy_port: int = LINKERD_DEFAULT_INBOUND_PORT

    def __post_init__(self) -> None:
        if len(self.host_id) > 63 or not _DNS1123_LABEL.fullmatch(self.host_id):
            raise KubeObjectError(f"host id {self.host_id[:80]!r} is not a DNS-1123 label")
        validate_host_name(self.host_name)
        if not self.addresses:
            raise KubeObjectError(
                f"host {self.host_name!r} has no address: no cluster proxy could reach it",
                "enroll the host with --address",
            )
        object.__setattr__(self, "addresses", validate_host_addresses(list(self.addresses)))
        object.__setattr__(self, "labels", tuple(validate_labels(dict(self.labels)).items()))
        _port_number(self.inbound_proxy_port, "inbound proxy port")
        validate_app_ports(self.ports, self.inbound_proxy_port)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


# --- naming, ownership --------------------------------------------------------------------------


def object_name(host: HostWorkload) -> str:
    """A DNS-1123 label, the same for the host's whole life: its name (lowercased, '.' and
    anything else not allowed turned into '-') and a digest of its id, which keeps two hosts
    of one name apart and never changes when addresses, ports or labels do."""
    digest = hashlib.sha256(host.host_id.encode()).hexdigest()[:_NAME_HASH_LEN]
    base = re.sub(r"[^a-z0-9]+", "-", host.host_name.lower()).strip("-")
    base = base[: 63 - _NAME_HASH_LEN - 1].rstrip("-")
    return f"{base}-{digest}" if base else f"h-{digest}"


def owner_labels(authority: str) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY, AUTHORITY_LABEL: validate_authority_name(authority)}


def owner_selector(authority: str) -> str:
    """The label selector a controller lists and watches its own objects with."""
    return ",".join(f"{k}={v}" for k, v in owner_labels(authority).items())


def is_owned(obj: Mapping[str, Any], authority: str) -> bool:
    """True only for an object this authority made: anything else is never changed or deleted."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return isinstance(labels, Mapping) and all(labels.get(k) == v for k, v in owner_labels(authority).items())


def _metadata(host: HostWorkload, authority: str) -> dict[str, Any]:
    labels = {**host.label_map, **owner_labels(authority), HOST_ID_LABEL: host.host_id}
    return {
        "name": object_name(host),
        "namespace": host.identity.namespace,
        "labels": dict(sorted(labels.items())),
        "annotations": {HOST_NAME_ANNOTATION: host.host_name},
    }


def rfc3339(value: datetime) -> str:
    """metav1.Time's wire form: UTC, whole seconds, `Z`."""
    return value.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(kind: str, health: Health) -> dict[str, str]:
    cond = {
        "type": kind,
        "status": "True" if health.ready else "False",
        "reason": health.reason,
        "lastTransitionTime": rfc3339(health.since),
    }
    if health.message:
        cond["message"] = health.message
    return cond


# --- the objects --------------------------------------------------------------------------------


def workload_ips(addresses: Sequence[str]) -> list[str]:
    """The first IPv4 and the first IPv6 address, in the host's own order (Linkerd's CRD takes
    one address, or one of each family)."""
    seen: dict[int, str] = {}
    for address in addresses:
        seen.setdefault(ipaddress.ip_address(address).version, address)
    return [a for a in addresses if a in seen.values()]


def external_workload(host: HostWorkload, authority: str) -> KubeObject:
    """Linkerd's ExternalWorkload for the host, status included (apply it separately: the
    status subresource ignores `status` in a create, update or apply of the object itself)."""
    ports: list[dict[str, Any]] = [
        {"name": p.name, "port": p.port, "protocol": p.protocol} for p in host.ports
    ]
    ports.append({"name": LINKERD_PROXY_PORT_NAME, "port": host.inbound_proxy_port, "protocol": "TCP"})
    return {
        "apiVersion": LINKERD_API_VERSION,
        "kind": "ExternalWorkload",
        "metadata": _metadata(host, authority),
        "spec": {
            "meshTLS": {"identity": host.identity.spiffe_id, "serverName": host.identity.dns_name},
            "ports": ports,
            "workloadIPs": [{"ip": ip} for ip in workload_ips(host.addresses)],
        },
        "status": {"conditions": [_condition("Ready", host.health)]},
    }


def workload_entry(host: HostWorkload, authority: str) -> KubeObject:
    """Istio's WorkloadEntry for the host: its first address (an entry has one), the service
    account (so Istio expects mTLS with spiffe://TD/ns/NS/sa/SA), and a `Healthy` condition
    that Istio honours because of the health-checks annotation."""
    meta = _metadata(host, authority)
    meta["annotations"][ISTIO_HEALTH_ANNOTATION] = "true"
    spec: dict[str, Any] = {
        "address": host.addresses[0],
        "labels": host.label_map,
        "serviceAccount": host.identity.name,
    }
    if host.ports:
        spec["ports"] = {p.name: p.port for p in host.ports}
    return {
        "apiVersion": ISTIO_API_VERSION,
        "kind": "WorkloadEntry",
        "metadata": meta,
        "spec": spec,
        "status": {"conditions": [_condition("Healthy", host.health)]},
    }


def service(
    name: str,
    namespace: str,
    selector: Mapping[str, str],
    ports: Sequence[WorkloadPort],
    authority: str,
) -> KubeObject:
    """A ClusterIP Service selecting the hosts (and pods) with `selector`. Each port's name,
    number and protocol are the workloads' own and targetPort names the port: Linkerd matches
    it on the ExternalWorkload by name and protocol, Istio looks the name up in the entry's
    ports map."""
    validate_service_name(name)
    if not selector:
        raise KubeObjectError(
            f"service {name!r} selects nothing", "give the labels it selects, e.g. app=billing"
        )
    if not ports:
        raise KubeObjectError(f"service {name!r} has no ports", "give the ports the workloads serve")
    seen: set[str] = set()
    for p in ports:
        if p.name in seen:
            raise KubeObjectError(f"service {name!r}: port {p.name!r} is listed twice")
        seen.add(p.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": validate_namespace(namespace),
            "labels": owner_labels(authority),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": validate_labels(selector),
            "ports": [
                {"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.name} for p in ports
            ],
        },
    }


def host_object(host: HostWorkload, flavor: Flavor, authority: str) -> KubeObject:
    if flavor == "linkerd":
        return external_workload(host, authority)
    if flavor == "istio":
        return workload_entry(host, authority)
    raise KubeObjectError(f"flavor {flavor!r} is neither linkerd nor istio", "--flavor linkerd|istio")


def without_status(obj: Mapping[str, Any]) -> KubeObject:
    """The object as applied to its main resource (what `kubectl apply` keeps of it)."""
    return {k: v for k, v in obj.items() if k != "status"}


def status_patch(obj: Mapping[str, Any]) -> KubeObject:
    """The body for the status subresource: a merge patch (`kubectl patch --subresource=status
    --type=merge -p`), and, with apiVersion/kind/name, a server-side apply configuration."""
    meta = obj["metadata"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "status": obj.get("status", {}),
    }


# --- YAML ---------------------------------------------------------------------------------------

# A string written without quotes only if no YAML 1.1 or 1.2 reader could take it for anything
# else: a letter first, no ':' '#' or spaces, and not a word some reader makes a bool or null.
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9._/-]*")
_NOT_PLAIN = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


def _printable(ch: str) -> bool:
    """YAML's printable set (minus BOM, NEL and the line separators some readers break on)."""
    o = ord(ch)
    if o >= 0x10000:
        return True
    if o in (0x2028, 0x2029, 0xFEFF):
        return False
    return 0x20 <= o <= 0x7E or 0xA0 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _NOT_PLAIN:
            return value
        # A JSON string is a YAML double-quoted scalar; what YAML may not carry raw is escaped.
        quoted = json.dumps(value, ensure_ascii=False)
        return "".join(ch if _printable(ch) else f"\\u{ord(ch):04x}" for ch in quoted)
    raise KubeObjectError(f"cannot write a {type(value).__name__} as YAML")


def _block(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise KubeObjectError(f"mapping key {key!r} is not a string")
            k = _scalar(key)
            if isinstance(item, Mapping | list) and item:
                lines.append(f"{pad}{k}:")
                lines.extend(_block(item, indent + 2))
            else:
                lines.append(f"{pad}{k}: {_inline_empty(item)}")
        return lines
    if isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping | list) and item:
                child = _block(item, indent + 2)
                child[0] = f"{pad}- {child[0][indent + 2 :]}"
                lines.extend(child)
            else:
                lines.append(f"{pad}- {_inline_empty(item)}")
        return lines
    return [pad + _scalar(value)]


def _inline_empty(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def render_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream, one `---` document per object, keys in the order given.
    Written here (no YAML library at run time): the input is JSON-shaped, and every string
    that is not plainly a word is a JSON-quoted scalar, which both YAML 1.1 and 1.2 read back
    as the same string."""
    return "".join("---\n" + "\n".join(_block(obj, 0) if obj else ["{}"]) + "\n" for obj in objects)
