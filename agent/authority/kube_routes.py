"""Outbound HTTP route policy from the cluster's own objects (issue #21): Gateway API /
Linkerd `HTTPRoute`, SMI `TrafficSplit`, Linkerd `ServiceProfile` (its retry budget only) and
`Service` objects (known references, port names, Linkerd's annotations), validated at apply
and compiled at render into the directory's shared `routes` member
(docs/design-21-traffic-policy.md §3).

Pure functions, no I/O. `parse_routes_file`/`resolve` validate a file's objects against the
references the registry knows (`KnownRefs`) and refuse the whole file, every problem named
`<Kind> <ns>/<name>: <field path> <what>` (exactly kube_policy's contract); `compile_routes`
turns the stored objects into the wire items, skipping (never raising for) an object that no
longer resolves (its hosts revoked, a Service gone).

Meaning, from upstream (design §1): Gateway API v1 HTTPRoute (GAMMA: parentRefs to a Service),
Linkerd's retry/timeout/failure-accrual annotations (linkerd2 policy-controller index.rs,
index/http.rs), SMI TrafficSplit v1alpha2, ServiceProfile.spec.retryBudget. meshagent's
extensions: `meshagent.io/Host` parents and backends (the enrolled hosts of an identity), the
accrual annotations on an HTTPRoute/TrafficSplit (for all its backends), a TrafficSplit root
naming hosts (`split.meshagent.io/ports` names their ports when none are registered).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.authority.kube_discovery import (
    LINKERD_DEFAULT_OPAQUE_PORTS,
    OPAQUE_PORTS_ANNOTATION,
    parse_opaque_ports,
)
from agent.authority.kube_objects import KubeObjectError, validate_namespace
from agent.authority.kube_policy import KubePolicyError, ObjectsRefused, load_documents
from agent.authority.storage import HostRecord

ROUTE_KINDS = ("HTTPRoute", "TrafficSplit", "ServiceProfile", "Service")
MAX_ITEM_BYTES = 64 << 10  # one parent item of the wire member
MAX_MEMBER_BYTES = 1 << 20  # the whole `routes` member
# meshagent's default skip_detect_ports (config.py): the agent never sees HTTP there.
SKIP_DETECT_PORTS = frozenset({25, 587, 3306})

CORE_GROUP = ""
GATEWAY_GROUP = "gateway.networking.k8s.io"
LINKERD_POLICY_GROUP = "policy.linkerd.io"
SMI_SPLIT_GROUP = "split.smi-spec.io"
LINKERD_GROUP = "linkerd.io"
MESHAGENT_GROUP = "meshagent.io"

_VERSIONS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "HTTPRoute": ((GATEWAY_GROUP, ("v1", "v1beta1")), (LINKERD_POLICY_GROUP, ("v1beta3",))),
    "TrafficSplit": ((SMI_SPLIT_GROUP, ("v1alpha2",)),),
    "ServiceProfile": ((LINKERD_GROUP, ("v1alpha2",)),),
    "Service": ((CORE_GROUP, ("v1",)),),
}
_REFUSED_KINDS = {
    "GRPCRoute": "is not read: use an HTTPRoute whose path matches are /package.Service/Method",
    "TCPRoute": "is not a route policy (L4 traffic is never routed): use `policy apply` for authorization",
    "TLSRoute": "is not a route policy (TLS traffic is never routed per request)",
    "Gateway": "is not read: meshagent routes GAMMA-style, attach HTTPRoutes to a Service or Host",
}

# Linkerd's annotations (linkerd2 policy-controller index.rs, index/http.rs, index/grpc.rs).
RETRY_HTTP = "retry.linkerd.io/http"
RETRY_GRPC = "retry.linkerd.io/grpc"
RETRY_LIMIT = "retry.linkerd.io/limit"
RETRY_TIMEOUT = "retry.linkerd.io/timeout"
TIMEOUT_REQUEST = "timeout.linkerd.io/request"
TIMEOUT_RESPONSE = "timeout.linkerd.io/response"
TIMEOUT_IDLE = "timeout.linkerd.io/idle"
ACCRUAL = "balancer.linkerd.io/failure-accrual"
ACCRUAL_MAX_FAILURES = "balancer.linkerd.io/failure-accrual-consecutive-max-failures"
ACCRUAL_MIN_PENALTY = "balancer.linkerd.io/failure-accrual-consecutive-min-penalty"
ACCRUAL_MAX_PENALTY = "balancer.linkerd.io/failure-accrual-consecutive-max-penalty"
ACCRUAL_JITTER = "balancer.linkerd.io/failure-accrual-consecutive-jitter-ratio"
SPLIT_PORTS = "split.meshagent.io/ports"
_RETRY_ANNOTATIONS = (RETRY_HTTP, RETRY_GRPC, RETRY_LIMIT, RETRY_TIMEOUT)
_TIMEOUT_ANNOTATIONS = (TIMEOUT_REQUEST, TIMEOUT_RESPONSE, TIMEOUT_IDLE)
_ACCRUAL_ANNOTATIONS = (
    ACCRUAL,
    ACCRUAL_MAX_FAILURES,
    ACCRUAL_MIN_PENALTY,
    ACCRUAL_MAX_PENALTY,
    ACCRUAL_JITTER,
)
# The annotations an object keeps when stored (kubectl's last-applied-configuration is not one).
KEPT_ANNOTATIONS = frozenset(
    (*_RETRY_ANNOTATIONS, *_TIMEOUT_ANNOTATIONS, *_ACCRUAL_ANNOTATIONS, SPLIT_PORTS, OPAQUE_PORTS_ANNOTATION)
)
_GRPC_CODES = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}

# Linkerd's retry defaults (policy-controller grpc/src/outbound/http.rs) and budget defaults
# (controller/api/destination/profile_translator.go).
RETRY_DEFAULTS = {"backoff_min_ms": 25, "backoff_max_ms": 250, "jitter": 1.0, "max_request_bytes": 65536}
DEFAULT_HTTP_CONDITIONS = ((500, 599),)
DEFAULT_BUDGET = {"ratio": 0.2, "min_per_s": 10, "ttl_s": 10.0}
DEFAULT_ACCRUAL = {"max_failures": 7, "min_penalty_ms": 1000, "max_penalty_ms": 60000, "jitter": 0.5}

# Gateway API limits and patterns (gateway-api apis/v1/httproute_types.go, shared_types.go).
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_GATEWAY_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_LINKERD_DURATION = re.compile(r"^([0-9]+)(ms|s|m|h|d)$")
_GO_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_WEIGHT = 1_000_000
# The hosts' bounds (agent/proxy/routes.py): what apply accepts must parse on every agent, else
# the entry is dropped there and its traffic silently stays L4.
MAX_DURATION_MS = 86_400_000  # a day: any timeout, penalty or backoff
MAX_REGEX = 1024  # characters of one regular expression
MAX_FAILURES = 2**31
MAX_MIN_RETRIES = 2**31 - 2


class RouteRefused(ObjectsRefused):
    """The route objects were refused, all of them: `problems` names every object and field."""

    code = "route_refused"


@dataclass(frozen=True)
class RouteObject:
    """One validated object as stored (registry table `route_objects`): `body` is the canonical
    object (apiVersion, kind, metadata.{name, namespace, annotations, creationTimestamp},
    spec), never its status."""

    kind: str  # HTTPRoute | TrafficSplit | ServiceProfile | Service
    namespace: str
    name: str
    api_version: str
    body: dict[str, Any]
    source: str  # "file" | "cluster"
    created_at: float  # metadata.creationTimestamp, else the first apply: precedence ties

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    @property
    def key(self) -> tuple[str, str, str]:
        return self.kind, self.namespace, self.name


@dataclass(frozen=True)
class ServiceInfo:
    """A Service a reference may name: its TCP ports (name, port), which are opaque, its
    annotations (Linkerd's retry/timeout/accrual ones), and whether discovery serves it (its
    endpoints reach the hosts) or only a Service object of a file described it."""

    namespace: str
    name: str
    ports: tuple[tuple[str, int], ...] = ()
    opaque: frozenset[int] = frozenset()
    annotations: Mapping[str, str] = field(default_factory=dict)
    discovered: bool = False

    def port_named(self, name: str) -> int | None:
        return next((p for n, p in self.ports if n == name), None)


@dataclass(frozen=True)
class HostGroup:
    """The enrolled, unrevoked hosts of one identity, rendered as Authority.catalog() renders
    them: SPIFFE ID, mesh DNS server name, their served addresses (sorted) and the app ports
    registered at token time (name, port)."""

    namespace: str
    name: str
    identity: str
    server_name: str
    addresses: tuple[str, ...]
    ports: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class KnownRefs:
    """What references may resolve to. `services`: (ns, name) -> ServiceInfo (the stored
    Service objects, the discovered Services); `hosts`: identity (ns, name) -> HostGroup."""

    services: Mapping[tuple[str, str], ServiceInfo] = field(default_factory=dict)
    hosts: Mapping[tuple[str, str], HostGroup] = field(default_factory=dict)

    def with_objects(self, objects: Iterable[RouteObject]) -> KnownRefs:
        """These refs plus the Service objects among `objects` (a discovered Service keeps its
        ports and opaque flags, and gains the object's annotations and port names)."""
        services = dict(self.services)
        for obj in objects:
            if obj.kind != "Service":
                continue
            try:
                info = _service_info(obj.namespace, obj.name, obj.body)
            except _BAD_STORED:
                continue  # a stored body that no longer reads: compile_routes reports it
            old = services.get((obj.namespace, obj.name))
            if old is not None and old.discovered:
                named = {p: n for n, p in info.ports}
                ports = tuple((named.get(p, n), p) for n, p in old.ports)
                info = ServiceInfo(old.namespace, old.name, ports, old.opaque, info.annotations, True)
            services[(obj.namespace, obj.name)] = info
        return KnownRefs(services, self.hosts)


@dataclass(frozen=True)
class RouteSettings:
    """What objects are read against: the cluster domain of ServiceProfile names (None: any
    domain, as compile_routes reads stored objects: the name was checked at apply, against the
    domain the operator gave then)."""

    cluster_domain: str | None = "cluster.local"


def known_refs(
    catalog: Sequence[Mapping[str, Any]],
    hosts: Sequence[HostRecord],
    discovered: Sequence[Mapping[str, Any]] = (),
    objects: Sequence[RouteObject] = (),
) -> KnownRefs:
    """KnownRefs from what the authority serves: `catalog` is Authority.catalog(hosts) (its
    host entries are the unrevoked hosts with their SPIFFE ID, server name and served
    addresses, a Service's cluster IP left out), `hosts` the registry's hosts (for their
    identity and registered ports), `discovered` the Services discovery serves, `objects` the
    stored route objects (their Service objects give port names and annotations)."""
    by_id = {h.id: h for h in hosts}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in catalog:
        source = str(entry.get("source", ""))
        host = by_id.get(source.removeprefix("host:")) if source.startswith("host:") else None
        if host is None:
            continue
        ns, _, name = host.identity.partition("/")
        group = groups.setdefault(
            (ns, name),
            {
                "identity": entry["identity"],
                "server_name": entry["server_name"],
                "addresses": set(),
                "ports": {},
            },
        )
        group["addresses"].add(str(entry["cidr"]).partition("/")[0])
        for port_name, port, protocol in host.registration.ports:
            if protocol.upper() == "TCP":
                group["ports"].setdefault(port, port_name)
    host_groups = {
        key: HostGroup(
            key[0],
            key[1],
            g["identity"],
            g["server_name"],
            tuple(sorted(g["addresses"], key=_address_key)),
            tuple(sorted((n, p) for p, n in g["ports"].items())),
        )
        for key, g in groups.items()
    }
    services: dict[tuple[str, str], ServiceInfo] = {}
    for doc in discovered:
        try:
            ports = tuple((str(p.get("name", "")), int(p["port"])) for p in doc.get("ports") or ())
            opaque = frozenset(int(p["port"]) for p in doc.get("ports") or () if p.get("opaque"))
            key = (str(doc["namespace"]), str(doc["name"]))
        except (KeyError, TypeError, ValueError):
            continue  # discovery's own documents: never malformed, but never fatal either
        services[key] = ServiceInfo(key[0], key[1], ports, opaque, {}, True)
    return KnownRefs(services, host_groups).with_objects(objects)


def _address_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


# --- field helpers (kube_policy's style: one problem per field, collected) ---------------------


class _Refused(Exception):
    """One problem with one field; collected, never raised out of this module."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path} {message}" if path else message)


# What a stored body that no longer reads (a row written by hand, an older meshagent's) may
# raise while compiled: that object is skipped, the document still rendered.
_BAD_STORED = (_Refused, KeyError, TypeError, ValueError, AttributeError, IndexError)


def _q(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return '"' + text[:120].replace('"', '\\"') + '"'


def _map(doc: Any, path: str, required: bool = False) -> dict[str, Any]:
    if doc is None and not required:
        return {}
    if not isinstance(doc, dict):
        raise _Refused(path, "must be a mapping")
    return doc


def _list(doc: Any, path: str, most: int) -> list[Any]:
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise _Refused(path, "must be a list")
    if len(doc) > most:
        raise _Refused(path, f"has {len(doc)} entries; at most {most}")
    return doc


def _str(doc: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if value is None:
        raise _Refused(f"{path}{key}", "is required")
    if not isinstance(value, str):
        raise _Refused(f"{path}{key}", "must be a string")
    return value


def _int(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Refused(path, f"{_q(value)} must be a whole number from {low} to {high}")
    return value


def _port(value: Any, path: str) -> int:
    return _int(value, path, 1, 65535)


def _name(value: Any, path: str) -> str:
    """An object name: a DNS-1123 subdomain (Services, service accounts, routes)."""
    if not isinstance(value, str):
        raise _Refused(path, "is required" if value is None else "must be a string")
    if len(value) > 253 or not _SUBDOMAIN.fullmatch(value):
        raise _Refused(path, f"{_q(value)} is not a valid name (lowercase letters, digits, '-' and '.')")
    return value


def _namespace(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _Refused(path, "must be a string")
    try:
        return validate_namespace(value)  # a DNS-1123 label
    except KubeObjectError:
        raise _Refused(path, f"{_q(value)} is not a valid namespace") from None


def _only(doc: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    """Typo protection: a field meshagent does not read is refused, never silently ignored."""
    allowed = set(allowed)
    for key in doc:
        if key not in allowed:
            raise _Refused(
                f"{path}{key}", f"is not a field meshagent reads here (known: {', '.join(sorted(allowed))})"
            )


def gateway_duration_ms(value: Any, path: str) -> int:
    """A Gateway API Duration (GEP-2257) in milliseconds; 0 = none."""
    if not isinstance(value, str) or not _GATEWAY_DURATION.match(value):
        raise _Refused(path, f"{_q(value)} is not a Gateway API duration (^([0-9]{{1,5}}(h|m|s|ms)){{1,4}}$)")
    ms = sum(int(n) * _UNITS_MS[u] for n, u in _GATEWAY_DURATION_PART.findall(value))
    if ms > MAX_DURATION_MS:
        raise _Refused(path, f"{_q(value)} is longer than a day (24h, the most the hosts take)")
    return ms


def linkerd_duration_ms(value: str) -> int:
    """Linkerd's annotation duration (index.rs parse_duration): an integer and a unit ms, s, m,
    h or d; "0" alone. ValueError saying why."""
    value = value.strip()
    if value == "0":
        return 0
    if value.startswith("-"):
        raise ValueError("duration value cannot be negative")
    found = _LINKERD_DURATION.match(value)
    if found is None:
        raise ValueError("is not a duration (an integer and a unit: ms, s, m, h or d; e.g. 500ms, 5s)")
    ms = int(found.group(1)) * _UNITS_MS[found.group(2)]
    if ms > MAX_DURATION_MS:
        raise ValueError("is longer than a day (1d, the most the hosts take)")
    return ms


def _go_duration_ms(value: Any, path: str) -> float:
    """A Go duration as ServiceProfiles write them (10s, 1m30s, 500ms)."""
    units = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
    if not isinstance(value, str) or not value or _GO_DURATION_PART.sub("", value) != "":
        raise _Refused(path, f"{_q(value)} is not a duration (e.g. 10s)")
    return sum(float(n) * units[u] for n, u in _GO_DURATION_PART.findall(value))


# --- annotations ------------------------------------------------------------------------------


def _http_conditions(value: str) -> list[list[int]]:
    ranges: list[list[int]] = []
    for part in (t.strip() for t in value.split(",")):
        if part == "5xx":
            ranges.append([500, 599])
        elif part == "gateway-error":
            ranges.append([502, 504])
        elif "-" in part:
            lo, _, hi = part.partition("-")
            if not (lo.isdigit() and hi.isdigit()) or not 100 <= int(lo) <= int(hi) <= 599:
                raise ValueError(f"{_q(part)} is not a status range A-B within 100-599")
            ranges.append([int(lo), int(hi)])
        elif part.isdigit() and 100 <= int(part) <= 599:
            ranges.append([int(part), int(part)])
        else:
            raise ValueError(f"{_q(part)} is not 5xx, gateway-error, a status 100-599 or a range A-B")
    return ranges


def _grpc_conditions(value: str) -> list[int]:
    codes = []
    for token in (t.strip() for t in value.split(",")):
        if token not in _GRPC_CODES:
            raise ValueError(f"{_q(token)} is not one of {', '.join(_GRPC_CODES)}")
        codes.append(_GRPC_CODES[token])
    return sorted(set(codes))


@dataclass(frozen=True)
class _Annotations:
    """Linkerd's annotations of one object, read (None: not given)."""

    retry: dict[str, Any] | None = None  # the wire retry, or None
    attempt_ms: int | None = None
    request_ms: int | None = None
    response_ms: int | None = None
    idle_ms: int | None = None
    timeouts_given: frozenset[str] = frozenset()  # which of request/response/idle were annotated
    accrual: dict[str, Any] | None = None
    split_ports: tuple[int, ...] = ()


def _annotations(raw: Mapping[str, Any]) -> _Annotations:
    where = 'metadata.annotations["{}"]'

    def ann(key: str) -> str | None:
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise _Refused(where.format(key), f'must be a string (quote it: "{value}")')
        return value

    def duration(key: str) -> int | None:
        value = ann(key)
        if value is None:
            return None
        try:
            return linkerd_duration_ms(value)
        except ValueError as exc:
            raise _Refused(where.format(key), f"{_q(value)}: {exc}") from None

    retry: dict[str, Any] | None = None
    if any(raw.get(k) is not None for k in _RETRY_ANNOTATIONS):
        limit_text = ann(RETRY_LIMIT)
        limit = 1
        if limit_text is not None:
            if not limit_text.strip().isdigit() or int(limit_text) > 65535:
                raise _Refused(where.format(RETRY_LIMIT), f"{_q(limit_text)} is not a whole number 0-65535")
            limit = int(limit_text) or 1  # 0 = unset (Linkerd)
        http_text, grpc_text = ann(RETRY_HTTP), ann(RETRY_GRPC)
        try:
            http = (
                _http_conditions(http_text)
                if http_text is not None
                else [list(r) for r in DEFAULT_HTTP_CONDITIONS]
            )
        except ValueError as exc:
            raise _Refused(where.format(RETRY_HTTP), str(exc)) from None
        try:
            grpc = _grpc_conditions(grpc_text) if grpc_text is not None else []
        except ValueError as exc:
            raise _Refused(where.format(RETRY_GRPC), str(exc)) from None
        retry = {"limit": limit, "http": http, "grpc": grpc, **RETRY_DEFAULTS}
    attempt = duration(RETRY_TIMEOUT)
    given = frozenset(k.rpartition("/")[2] for k in _TIMEOUT_ANNOTATIONS if raw.get(k) is not None)
    timeouts = [duration(k) for k in _TIMEOUT_ANNOTATIONS]

    accrual = None
    mode = ann(ACCRUAL)
    if mode is None:
        extra = next((k for k in _ACCRUAL_ANNOTATIONS[1:] if raw.get(k) is not None), None)
        if extra is not None:
            raise _Refused(where.format(extra), f"has no effect without {ACCRUAL}: consecutive")
    elif mode != "consecutive":
        hint = (
            "is not supported (use consecutive)"
            if mode == "unified"
            else "is not a mode meshagent reads (use consecutive)"
        )
        raise _Refused(where.format(ACCRUAL), f"{_q(mode)} {hint}")
    else:
        accrual = dict(DEFAULT_ACCRUAL)
        failures = ann(ACCRUAL_MAX_FAILURES)
        if failures is not None:
            if not failures.strip().isdigit() or not 0 < int(failures) <= MAX_FAILURES:
                raise _Refused(
                    where.format(ACCRUAL_MAX_FAILURES),
                    f"{_q(failures)} is not a whole number from 1 to {MAX_FAILURES}",
                )
            accrual["max_failures"] = int(failures)
        low, high = duration(ACCRUAL_MIN_PENALTY), duration(ACCRUAL_MAX_PENALTY)
        if low is not None:
            accrual["min_penalty_ms"] = low
        if high is not None:
            accrual["max_penalty_ms"] = high
        if accrual["max_penalty_ms"] <= 0:
            raise _Refused(where.format(ACCRUAL_MAX_PENALTY), "must be above 0")
        if accrual["min_penalty_ms"] > accrual["max_penalty_ms"]:
            raise _Refused(where.format(ACCRUAL_MIN_PENALTY), "is above the max penalty")
        jitter = ann(ACCRUAL_JITTER)
        if jitter is not None:
            try:
                ratio = float(jitter)
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio <= 100.0:
                raise _Refused(where.format(ACCRUAL_JITTER), f"{_q(jitter)} is not a number from 0 to 100")
            accrual["jitter"] = ratio

    split_ports: list[int] = []
    ports_text = ann(SPLIT_PORTS)
    if ports_text is not None:
        for token in (t.strip() for t in ports_text.split(",")):
            if not token.isdigit() or not 0 < int(token) < 65536:
                raise _Refused(where.format(SPLIT_PORTS), f"{_q(token)} is not a port 1-65535")
            split_ports.append(int(token))
    return _Annotations(
        retry,
        attempt or None,
        timeouts[0] or None,
        timeouts[1] or None,
        timeouts[2] or None,
        given,
        accrual,
        tuple(sorted(set(split_ports))),
    )


_READ_PREFIXES = ("retry.linkerd.io/", "timeout.linkerd.io/", "balancer.linkerd.io/", "split.meshagent.io/")


def _kept_annotations(meta: Mapping[str, Any]) -> dict[str, str]:
    """The annotations meshagent reads; a key under their prefixes that is none of them (a
    typo: `retry.linkerd.io/limt`) is refused, never kept without effect."""
    raw = _map(meta.get("annotations"), "metadata.annotations")
    for key in sorted(k for k in raw if isinstance(k, str)):
        if key.startswith(_READ_PREFIXES) and key not in KEPT_ANNOTATIONS:
            known = ", ".join(sorted(k for k in KEPT_ANNOTATIONS if k.startswith(key.partition("/")[0])))
            raise _Refused(
                f'metadata.annotations["{key}"]', f"is not an annotation meshagent reads (known: {known})"
            )
    return {k: v for k, v in sorted(raw.items()) if k in KEPT_ANNOTATIONS}


# --- the objects, parsed (the same code reads a file at apply and a stored body at render) ----


@dataclass(frozen=True)
class _Ref:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None
    section: str
    path: str  # where the reference was written, for problems

    def wire(self, port: int | None = None) -> dict[str, Any]:
        return {
            "group": self.group,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "port": self.port if port is None else port,
            "section": self.section,
        }


@dataclass(frozen=True)
class _Rule:
    name: str
    matches: list[dict[str, Any]]
    backends: list[tuple[_Ref, int]]  # (ref, weight); [] = the parent itself
    request_ms: int | None
    backend_request_ms: int | None
    retry: dict[str, Any] | None  # Gateway's rules[].retry, as wire
    path: str


@dataclass(frozen=True)
class _Route:
    group: str
    namespace: str
    name: str
    parents: list[_Ref]
    rules: list[_Rule]
    ann: _Annotations


@dataclass(frozen=True)
class _Split:
    namespace: str
    name: str
    service: str
    backends: list[tuple[str, int, str]]  # (service name, weight, path)
    ann: _Annotations


@dataclass(frozen=True)
class _Profile:
    namespace: str
    service: str
    budget: dict[str, Any]


def _check_kind(doc: Mapping[str, Any]) -> str:
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if not isinstance(kind, str):
        raise _Refused("kind", "is required")
    if kind in _REFUSED_KINDS:
        raise _Refused("kind", f"{_q(kind)} {_REFUSED_KINDS[kind]}")
    if kind not in _VERSIONS:
        raise _Refused(
            "kind", f"{_q(kind)} is not a route object meshagent reads (use {', '.join(ROUTE_KINDS)})"
        )
    if not isinstance(api_version, str):
        raise _Refused("apiVersion", "is required")
    got_group, _, version = api_version.rpartition("/")
    for group, versions in _VERSIONS[kind]:
        if got_group == group and version in versions:
            return kind
    want = " or ".join(f"{g}/{v}".lstrip("/") for g, vs in _VERSIONS[kind] for v in vs)
    raise _Refused("apiVersion", f"{_q(api_version)} is not supported for {kind} (use {want})")


def _parent_ref(doc: Any, ns: str, path: str) -> _Ref:
    ref = _map(doc, path, required=True)
    _only(ref, ("group", "kind", "namespace", "name", "sectionName", "port"), f"{path}.")
    group = ref.get("group", GATEWAY_GROUP)
    kind = ref.get("kind", "Gateway")
    if group == "core":
        group = CORE_GROUP
    if (group, kind) == (CORE_GROUP, "Service") or (group, kind) == (MESHAGENT_GROUP, "Host"):
        pass
    elif kind == "Gateway" or group == GATEWAY_GROUP:
        raise _Refused(
            f"{path}.kind",
            f"{_q(kind)}: Gateway parents are not supported (meshagent routes GAMMA-style: "
            'kind: Service with group: "", or kind: Host with group: meshagent.io)',
        )
    else:
        raise _Refused(
            f"{path}",
            f"{_q(f'{group}/{kind}')} is not a parent meshagent reads (Service, or meshagent.io Host)",
        )
    name = _name(ref.get("name"), f"{path}.name")
    target_ns = ref.get("namespace", ns)
    if target_ns != ns:
        raise _Refused(
            f"{path}.namespace",
            f"{_q(target_ns)}: a parent in another namespace makes a consumer route, not supported: "
            "put the route in the parent's namespace",
        )
    port = None if ref.get("port") is None else _port(ref["port"], f"{path}.port")
    section = ref.get("sectionName", "")
    if not isinstance(section, str):
        raise _Refused(f"{path}.sectionName", "must be a string")
    if kind == "Host" and port is None:
        raise _Refused(f"{path}.port", "is required for Host (a host has no Service ports to attach to)")
    return _Ref(group, kind, ns, name, port, section, path)


def _backend_ref(doc: Any, ns: str, path: str) -> tuple[_Ref, int]:
    ref = _map(doc, path, required=True)
    if ref.get("filters"):
        raise _Refused(
            f"{path}.filters:",
            "filters are not supported (meshagent would otherwise change requests silently)",
        )
    _only(ref, ("group", "kind", "namespace", "name", "port", "weight", "filters"), f"{path}.")
    group = ref.get("group", CORE_GROUP)
    group = CORE_GROUP if group == "core" else group
    kind = ref.get("kind", "Service")
    if (group, kind) not in ((CORE_GROUP, "Service"), (MESHAGENT_GROUP, "Host")):
        raise _Refused(
            f"{path}",
            f"{_q(f'{group}/{kind}')} is not a backend meshagent reads (Service, or meshagent.io Host)",
        )
    name = _name(ref.get("name"), f"{path}.name")
    target_ns = _namespace(ref.get("namespace", ns), f"{path}.namespace")
    if ref.get("port") is None:
        raise _Refused(f"{path}.port", f"is required for {kind}")
    port = _port(ref["port"], f"{path}.port")
    weight = _int(ref.get("weight", 1), f"{path}.weight", 0, MAX_WEIGHT)
    return _Ref(group, kind, target_ns, name, port, "", path), weight


def _path_match(doc: Any, path: str) -> dict[str, str]:
    match = _map(doc, path)
    _only(match, ("type", "value"), f"{path}.")
    kind = match.get("type", "PathPrefix")
    value = match.get("value", "/")
    if kind not in ("Exact", "PathPrefix", "RegularExpression"):
        raise _Refused(f"{path}.type", f"{_q(kind)} is not Exact, PathPrefix or RegularExpression")
    if not isinstance(value, str) or not 0 < len(value) <= 1024:
        raise _Refused(f"{path}.value", "must be a string of 1 to 1024 characters")
    if kind == "RegularExpression":
        _regex(value, f"{path}.value")
    else:
        bad = next((s for s in ("//", "/./", "/../", "%2f", "%2F", "#") if s in value), None)
        if not value.startswith("/"):
            raise _Refused(f"{path}.value", f"{_q(value)} must start with /")
        if bad is not None or value.endswith(("/..", "/.")) or not _PATH_CHARS.match(value):
            raise _Refused(
                f"{path}.value", f"{_q(value)} is not a path Gateway API accepts (no //, /./, /../, %2f, #)"
            )
    return {"type": kind, "value": value}


def _regex(value: str, path: str) -> None:
    if len(value) > MAX_REGEX:
        raise _Refused(path, f"is a regular expression longer than {MAX_REGEX} characters")
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError) as exc:
        raise _Refused(path, f"{_q(value)} is not a regular expression Python reads: {exc}") from None


def _name_values(doc: Any, path: str, most_value: int, fold: bool) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for j, raw in enumerate(_list(doc, path, 16)):
        where = f"{path}[{j}]"
        item = _map(raw, where, required=True)
        _only(item, ("type", "name", "value"), f"{where}.")
        kind = item.get("type", "Exact")
        if kind not in ("Exact", "RegularExpression"):
            raise _Refused(f"{where}.type", f"{_q(kind)} is not Exact or RegularExpression")
        name = _str(item, "name", f"{where}.")
        if not 0 < len(name) <= 256 or not _HEADER_NAME.match(name):
            raise _Refused(f"{where}.name", f"{_q(name)} is not a valid name")
        value = _str(item, "value", f"{where}.")
        if not 0 < len(value) <= most_value:
            raise _Refused(f"{where}.value", f"must be 1 to {most_value} characters")
        if kind == "RegularExpression":
            _regex(value, f"{where}.value")
        key = name.lower() if fold else name
        if key in seen:
            continue  # Gateway: of equivalent names only the first counts
        seen.add(key)
        out.append({"type": kind, "name": key, "value": value})
    return out


def _http_route(doc: Mapping[str, Any], group: str, ns: str, name: str) -> _Route:
    spec = _map(doc.get("spec"), "spec", required=True)
    if spec.get("hostnames"):
        raise _Refused(
            "spec.hostnames",
            "must be empty: meshes do not infer anything from hostnames (GAMMA); "
            "match the Host header instead",
        )
    _only(spec, ("parentRefs", "hostnames", "rules"), "spec.")
    ann = _annotations(_map(_map(doc.get("metadata"), "metadata").get("annotations"), "metadata.annotations"))
    raw_parents = _list(spec.get("parentRefs"), "spec.parentRefs", 32)
    if not raw_parents:
        raise _Refused(
            "spec.parentRefs", "is required (a Service or meshagent.io Host the route attaches to)"
        )
    parents = [_parent_ref(p, ns, f"spec.parentRefs[{i}]") for i, p in enumerate(raw_parents)]
    raw_rules = spec.get("rules")
    if raw_rules is None:
        raw_rules = [{}]  # Gateway's default: one rule, PathPrefix /
    rules_list = _list(raw_rules, "spec.rules", 16)
    if not rules_list:
        raise _Refused("spec.rules", "must have at least one rule")
    rules: list[_Rule] = []
    names: set[str] = set()
    total = 0
    for i, raw in enumerate(rules_list):
        path = f"spec.rules[{i}]"
        rule = _map(raw, path, required=True)
        if rule.get("filters"):
            raise _Refused(
                f"{path}.filters:",
                "filters are not supported (meshagent would otherwise change requests silently)",
            )
        if rule.get("sessionPersistence") is not None:
            raise _Refused(f"{path}.sessionPersistence", "is not supported")
        _only(rule, ("name", "matches", "filters", "backendRefs", "timeouts", "retry"), f"{path}.")
        rule_name = rule.get("name", "")
        if rule_name:
            rule_name = _name(rule_name, f"{path}.name")
            if rule_name in names:
                raise _Refused(f"{path}.name", f"{_q(rule_name)} is given to two rules")
            names.add(rule_name)
        raw_matches = _list(rule.get("matches"), f"{path}.matches", 64)
        total += len(raw_matches)
        if total > 128:
            raise _Refused(f"{path}.matches", "brings the route's matches above 128")
        matches = []
        for j, m in enumerate(raw_matches or [{}]):
            where = f"{path}.matches[{j}]"
            match = _map(m, where)
            _only(match, ("path", "headers", "queryParams", "method"), f"{where}.")
            method = match.get("method")
            if method is not None and method not in METHODS:
                raise _Refused(f"{where}.method", f"{_q(method)} is not one of {', '.join(METHODS)}")
            matches.append(
                {
                    "path": _path_match(match.get("path"), f"{where}.path"),
                    "method": method,
                    "headers": _name_values(match.get("headers"), f"{where}.headers", 4096, fold=True),
                    "query": _name_values(match.get("queryParams"), f"{where}.queryParams", 1024, fold=False),
                }
            )
        backends = [
            _backend_ref(b, ns, f"{path}.backendRefs[{j}]")
            for j, b in enumerate(_list(rule.get("backendRefs"), f"{path}.backendRefs", 16))
        ]
        if backends and not any(w for _, w in backends):
            raise _Refused(f"{path}.backendRefs:", "every weight is 0: no request could be routed")
        timeouts = _map(rule.get("timeouts"), f"{path}.timeouts")
        _only(timeouts, ("request", "backendRequest"), f"{path}.timeouts.")
        request = (
            None
            if "request" not in timeouts
            else gateway_duration_ms(timeouts["request"], f"{path}.timeouts.request")
        )
        backend_request = (
            None
            if "backendRequest" not in timeouts
            else gateway_duration_ms(timeouts["backendRequest"], f"{path}.timeouts.backendRequest")
        )
        if request and backend_request and backend_request > request:
            raise _Refused(f"{path}.timeouts.backendRequest", "is longer than timeouts.request")
        retry = None
        if rule.get("retry") is not None:
            if ann.retry is not None:
                raise _Refused(f"{path}.retry", "and retry.linkerd.io annotations both given: use one")
            retry = _gateway_retry(rule["retry"], f"{path}.retry")
        rules.append(_Rule(rule_name, matches, backends, request, backend_request, retry, path))
    return _Route(group, ns, name, parents, rules, ann)


def _gateway_retry(doc: Any, path: str) -> dict[str, Any]:
    retry = _map(doc, path, required=True)
    _only(retry, ("codes", "attempts", "backoff"), f"{path}.")
    codes = [
        _int(c, f"{path}.codes[{i}]", 400, 599)
        for i, c in enumerate(_list(retry.get("codes"), f"{path}.codes", 200))
    ]
    attempts = 1 if retry.get("attempts") is None else _int(retry["attempts"], f"{path}.attempts", 1, 65535)
    out: dict[str, Any] = {
        "limit": attempts,
        "http": [[c, c] for c in sorted(set(codes))] if codes else [list(r) for r in DEFAULT_HTTP_CONDITIONS],
        "grpc": [],
        **RETRY_DEFAULTS,
    }
    if retry.get("backoff") is not None:
        low = gateway_duration_ms(retry["backoff"], f"{path}.backoff")
        if 10 * low > MAX_DURATION_MS:  # (its maximum is 10 times it)
            raise _Refused(
                f"{path}.backoff",
                f"{_q(retry['backoff'])} is longer than 2h24m (its maximum, 10 times it, a day)",
            )
        out["backoff_min_ms"] = low
        out["backoff_max_ms"] = max(10 * low, 250)
    return out


def _traffic_split(doc: Mapping[str, Any], ns: str, name: str) -> _Split:
    spec = _map(doc.get("spec"), "spec", required=True)
    _only(spec, ("service", "backends"), "spec.")
    ann = _annotations(_map(_map(doc.get("metadata"), "metadata").get("annotations"), "metadata.annotations"))
    service = _name(spec.get("service"), "spec.service")
    raw = _list(spec.get("backends"), "spec.backends", 16)
    if not raw:
        raise _Refused("spec.backends", "is required (at least one backend)")
    backends = []
    for i, b in enumerate(raw):
        where = f"spec.backends[{i}]"
        backend = _map(b, where, required=True)
        _only(backend, ("service", "weight"), f"{where}.")
        if backend.get("weight") is None:
            raise _Refused(f"{where}.weight", "is required")
        weight = _int(backend["weight"], f"{where}.weight", 0, MAX_WEIGHT)
        backends.append((_name(backend.get("service"), f"{where}.service"), weight, where))
    if not any(w for _, w, _ in backends):
        raise _Refused("spec.backends:", "every weight is 0: no request could be routed")
    return _Split(ns, name, service, backends, ann)


def _service_profile(doc: Mapping[str, Any], ns: str, name: str, domain: str | None) -> _Profile:
    spec = _map(doc.get("spec"), "spec", required=True)
    other = sorted(k for k in spec if k != "retryBudget")
    if other:
        raise _Refused(
            f"spec.{other[0]}",
            "is not read: meshagent reads a ServiceProfile's retryBudget only "
            "(routes, retries and timeouts: use an HTTPRoute)",
        )
    service, _, rest = name.partition(".")
    want = f"{ns}.svc.{domain or 'DOMAIN'}"
    if domain is not None:
        ok = rest == want
    else:
        ok = rest.startswith(f"{ns}.svc.") and len(rest) > len(f"{ns}.svc.")
    if not service or not ok:
        raise _Refused("metadata.name", f"{_q(name)} must be SERVICE.{want} (the Service it applies to)")
    budget = _map(spec.get("retryBudget"), "spec.retryBudget", required=True)
    _only(budget, ("retryRatio", "minRetriesPerSecond", "ttl"), "spec.retryBudget.")
    ratio = budget.get("retryRatio")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1000:
        raise _Refused("spec.retryBudget.retryRatio", f"{_q(ratio)} must be a number from 0 to 1000")
    minimum = _int(
        budget.get("minRetriesPerSecond"), "spec.retryBudget.minRetriesPerSecond", 0, MAX_MIN_RETRIES
    )
    ttl = _go_duration_ms(budget.get("ttl"), "spec.retryBudget.ttl")
    if not 1000 <= ttl <= 60_000:
        raise _Refused("spec.retryBudget.ttl", f"{_q(budget.get('ttl'))} must be from 1s to 60s")
    return _Profile(ns, service, {"ratio": float(ratio), "min_per_s": minimum, "ttl_s": ttl / 1000})


def _service_info(namespace: str, name: str, body: Mapping[str, Any]) -> ServiceInfo:
    """A Service object, as stored or of a file (_Refused if its body does not read)."""
    meta = _map(body.get("metadata"), "metadata")
    raw = _map(meta.get("annotations"), "metadata.annotations")
    annotations = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
    named: dict[str, int] = {}
    ports: list[tuple[str, int]] = []
    for p in _service_spec(body)["ports"]:
        named.setdefault(p.get("name", ""), p["port"])
        if p.get("protocol", "TCP") == "TCP":
            ports.append((p.get("name", ""), p["port"]))
    opaque_text = annotations.get(OPAQUE_PORTS_ANNOTATION, LINKERD_DEFAULT_OPAQUE_PORTS)
    ranges, _ = parse_opaque_ports(opaque_text, named)
    opaque = frozenset(p for _, p in ports if any(lo <= p <= hi for lo, hi in ranges))
    return ServiceInfo(namespace, name, tuple(ports), opaque, annotations, False)


def _service_spec(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What of a Service is kept: its ports (name, port, protocol). Other fields are the
    cluster's business (a `kubectl get svc -o yaml` has many) and are not read."""
    spec = _map(doc.get("spec"), "spec")
    ports = []
    for i, raw in enumerate(_list(spec.get("ports"), "spec.ports", 256)):
        where = f"spec.ports[{i}]"
        p = _map(raw, where, required=True)
        port = _port(p.get("port"), f"{where}.port")
        name = p.get("name", "")
        if not isinstance(name, str):
            raise _Refused(f"{where}.name", "must be a string")
        protocol = p.get("protocol", "TCP")
        if not isinstance(protocol, str):
            raise _Refused(f"{where}.protocol", "must be a string")
        ports.append({"name": name, "port": port, "protocol": protocol})
    return {"ports": ports}


def _created(meta: Mapping[str, Any], now: float) -> float:
    stamp = meta.get("creationTimestamp")
    if stamp is None:
        return now
    if isinstance(stamp, datetime):  # YAML reads an unquoted timestamp as one
        return stamp.timestamp()
    if not isinstance(stamp, str):
        raise _Refused("metadata.creationTimestamp", "must be an RFC 3339 time")
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise _Refused("metadata.creationTimestamp", f"{_q(stamp)} is not an RFC 3339 time") from None


def _parsed(obj: RouteObject, domain: str | None) -> _Route | _Split | _Profile | ServiceInfo:
    body = obj.body
    if obj.kind == "HTTPRoute":
        group = body["apiVersion"].rpartition("/")[0]
        return _http_route(body, group, obj.namespace, obj.name)
    if obj.kind == "TrafficSplit":
        return _traffic_split(body, obj.namespace, obj.name)
    if obj.kind == "ServiceProfile":
        return _service_profile(body, obj.namespace, obj.name, domain)
    return _service_info(obj.namespace, obj.name, body)


# --- apply ------------------------------------------------------------------------------------


def parse_routes_file(
    text: str | bytes,
    known: KnownRefs,
    settings: RouteSettings | None = None,
    now: float = 0.0,
    stored: Sequence[RouteObject] = (),
    notes: list[str] | None = None,
) -> list[RouteObject]:
    """Every object of the YAML stream validated, or RouteRefused naming each problem.
    `now`: created_at of objects without a creationTimestamp; `stored`: the objects already
    stored (a file's object replaces its namesake; the rest are checked with it: two sources
    on one parent port, sizes); `notes`: gets what the operator should know (Service refs
    that only discovery can resolve, TrafficSplit backends without the port)."""
    try:
        docs = load_documents(text)
    except KubePolicyError as exc:
        raise RouteRefused(exc.problems) from None
    return resolve(docs, known, settings, now, "file", stored, notes)


def resolve(
    docs: Iterable[Mapping[str, Any]],
    known: KnownRefs,
    settings: RouteSettings | None = None,
    now: float = 0.0,
    source: str = "file",
    stored: Sequence[RouteObject] = (),
    notes: list[str] | None = None,
) -> list[RouteObject]:
    """The objects (as the API returns them, or from YAML) validated against `known` plus the
    file's own Service objects; RouteRefused if any problem. See parse_routes_file."""
    settings = settings or RouteSettings()
    problems: list[str] = []
    objects: list[RouteObject] = []
    seen: set[tuple[str, str, str]] = set()
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
            _namespace(ns, "metadata.namespace")
            _name(name, "metadata.name")
            if (kind, ns, name) in seen:
                raise _Refused("metadata.name", "is given twice for this kind and namespace")
            seen.add((kind, ns, name))
            kept: dict[str, Any] = {"name": name, "namespace": ns}
            annotations = _kept_annotations(meta)
            if annotations:
                kept["annotations"] = annotations
            created = _created(meta, now)
            if meta.get("creationTimestamp") is not None:
                kept["creationTimestamp"] = (
                    datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z")
                )
            spec = _service_spec(doc) if kind == "Service" else doc.get("spec")
            body = {"apiVersion": doc["apiVersion"], "kind": kind, "metadata": kept, "spec": spec}
            body = json.loads(json.dumps(body, default=str))  # plain JSON values, as stored
            obj = RouteObject(kind, ns, name, doc["apiVersion"], body, source, created)
            parsed = _parsed(obj, settings.cluster_domain)
            if isinstance(parsed, ServiceInfo):
                _annotations(annotations)  # Service-level Linkerd annotations, checked
            objects.append(obj)
        except _Refused as exc:
            problems.append(f"{label}: {exc}")
    if problems:
        raise RouteRefused(problems)
    keys = {o.key for o in objects}
    everything = [o for o in stored if o.key not in keys] + objects
    known = known.with_objects(everything)
    for obj in objects:
        try:
            _check_refs(obj, _parsed(obj, settings.cluster_domain), known, notes)
        except _Refused as exc:
            problems.append(f"{obj.label}: {exc}")
    if problems:
        raise RouteRefused(problems)
    problems.extend(_check_together(everything, keys, known, settings))
    if problems:
        raise RouteRefused(problems)
    return objects


def _unknown(kind: str, ns: str, name: str, known: KnownRefs) -> str:
    if kind == "Host":
        return f"Host {ns}/{name}: no enrolled host has identity {ns}/{name}"
    text = f"Service {ns}/{name} is not in this file and no enrolled host has identity {ns}/{name}"
    if (ns, name) in known.hosts:
        text = (
            f"Service {ns}/{name} is not in this file nor stored (enrolled hosts have identity {ns}/{name}: "
            "name them with group: meshagent.io, kind: Host)"
        )
    return text


def _check_refs(obj: RouteObject, parsed: object, known: KnownRefs, notes: list[str] | None) -> None:
    def note(text: str) -> None:
        if notes is not None and text not in notes:
            notes.append(text)

    def service_note(ns: str, name: str) -> None:
        info = known.services.get((ns, name))
        if info is not None and not info.discovered:
            note(
                f"{obj.label}: Service {ns}/{name} (resolved by discovery: "
                "hosts reach it only with `serve --kubernetes`)"
            )

    if isinstance(parsed, _Route):
        for ref in parsed.parents:
            _parent_ports(ref, known)  # raises naming the field
            if ref.kind == "Service":
                service_note(ref.namespace, ref.name)
        for rule in parsed.rules:
            for ref, _ in rule.backends:
                found = _lookup(ref.kind, ref.namespace, ref.name, known)
                if found is None:
                    raise _Refused(ref.path, _unknown(ref.kind, ref.namespace, ref.name, known))
                if isinstance(found, ServiceInfo):
                    if found.ports and ref.port not in {p for _, p in found.ports}:
                        raise _Refused(
                            f"{ref.path}.port",
                            f"{ref.port} is not a TCP port of Service {ref.namespace}/{ref.name}",
                        )
                    service_note(ref.namespace, ref.name)
    elif isinstance(parsed, _Split):
        ports = _split_ports(parsed, known)
        if isinstance(_split_root(parsed, known), HostGroup):
            note(
                f"{obj.label}: spec.service {parsed.service}: no Service "
                f"{parsed.namespace}/{parsed.service} is known, "
                f"so the enrolled hosts of identity {parsed.namespace}/{parsed.service}, "
                f"port(s) {','.join(map(str, ports))}"
            )
        for backend, _, where in parsed.backends:
            found = _split_backend(parsed.namespace, backend, known)
            if found is None:
                raise _Refused(f"{where}.service", _unknown("Service", parsed.namespace, backend, known))
            if isinstance(found, ServiceInfo):
                service_note(parsed.namespace, backend)
                missing = [p for p in ports if found.ports and p not in {q for _, q in found.ports}]
                if missing:
                    note(
                        f"{obj.label}: {where}.service {backend} has no port {missing[0]}: "
                        "it gets no traffic there (SMI)"
                    )


def _lookup(kind: str, ns: str, name: str, known: KnownRefs) -> ServiceInfo | HostGroup | None:
    if kind == "Service":
        return known.services.get((ns, name))
    return known.hosts.get((ns, name))


def _parent_ports(ref: _Ref, known: KnownRefs) -> list[int]:
    """The parent's ports a route attaches to; _Refused naming the field when it cannot."""
    found = _lookup(ref.kind, ref.namespace, ref.name, known)
    if found is None:
        raise _Refused(ref.path, _unknown(ref.kind, ref.namespace, ref.name, known))
    if isinstance(found, HostGroup):
        assert ref.port is not None
        if ref.port in SKIP_DETECT_PORTS:
            raise _Refused(f"{ref.path}.port", f"{ref.port} is a skip-detect port (no HTTP is seen there)")
        return [ref.port]
    if ref.section:
        port = found.port_named(ref.section)
        if port is None:
            raise _Refused(
                f"{ref.path}.sectionName",
                f"{_q(ref.section)} is not a port name of Service {ref.namespace}/{ref.name}",
            )
        if ref.port is not None and ref.port != port:
            raise _Refused(f"{ref.path}.port", f"{ref.port} is not the port named {_q(ref.section)} ({port})")
        ports = [port]
    elif ref.port is not None:
        if found.ports and ref.port not in {p for _, p in found.ports}:
            raise _Refused(
                f"{ref.path}.port", f"{ref.port} is not a TCP port of Service {ref.namespace}/{ref.name}"
            )
        ports = [ref.port]
    else:
        ports = [p for _, p in found.ports if p not in found.opaque and p not in SKIP_DETECT_PORTS]
        if not ports:
            raise _Refused(
                ref.path, f"Service {ref.namespace}/{ref.name} has no port HTTP can be routed on: name one"
            )
        return ports
    for port in ports:
        if port in found.opaque:
            raise _Refused(
                f"{ref.path}.port",
                f"{port} is an opaque port of Service {ref.namespace}/{ref.name} (no HTTP is seen there)",
            )
        if port in SKIP_DETECT_PORTS:
            raise _Refused(f"{ref.path}.port", f"{port} is a skip-detect port (no HTTP is seen there)")
    return ports


def _split_backend(ns: str, name: str, known: KnownRefs) -> ServiceInfo | HostGroup | None:
    return known.services.get((ns, name)) or known.hosts.get((ns, name))


def _split_root(split: _Split, known: KnownRefs) -> ServiceInfo | HostGroup:
    found = _split_backend(split.namespace, split.service, known)
    if found is None:
        raise _Refused("spec.service", _unknown("Service", split.namespace, split.service, known))
    return found


def _split_ports(split: _Split, known: KnownRefs) -> list[int]:
    root = _split_root(split, known)
    if isinstance(root, ServiceInfo):
        ports = [p for _, p in root.ports if p not in root.opaque and p not in SKIP_DETECT_PORTS]
        if split.ann.split_ports:
            ports = [p for p in ports if p in split.ann.split_ports]
    else:
        ports = list(split.ann.split_ports) or [p for _, p in root.ports]
        ports = [p for p in ports if p not in SKIP_DETECT_PORTS]
    if not ports:
        raise _Refused(
            "spec.service",
            f'{split.service}: no port to split on: name the ports (annotation {SPLIT_PORTS}: "8080,8443")',
        )
    return ports


def _check_together(
    everything: Sequence[RouteObject],
    new: set[tuple[str, str, str]],
    known: KnownRefs,
    settings: RouteSettings,
) -> list[str]:
    """What only the whole stored set shows: two sources on one parent port, sizes."""
    problems: list[str] = []
    owners: dict[tuple[str, str, str, int], list[RouteObject]] = {}
    for obj in everything:
        try:
            parsed = _parsed(obj, settings.cluster_domain)
            keys = _parent_keys(parsed, known)
        except _Refused:
            continue  # a stored object that no longer resolves: compile skips it
        for key in keys:
            owners.setdefault(key, []).append(obj)
    for (kind, ns, name, port), objs in sorted(owners.items()):
        splits = [o for o in objs if o.kind == "TrafficSplit"]
        if splits and len(objs) > 1 and any(o.key in new for o in objs):
            at = next(o for o in objs if o.key in new)
            others = ", ".join(o.label for o in objs if o is not at)
            problems.append(
                f"{at.label}: {kind} {ns}/{name} port {port} already has {others}: "
                "a parent port takes HTTPRoutes or one TrafficSplit"
            )
    # Anything else the compiler would leave out (an entry too large, say) is refused now;
    # a conflict named above is not named twice.
    named = {p.partition(":")[0] for p in problems}
    reasons: list[tuple[RouteObject, str]] = []
    compile_routes(everything, known, lambda o, r: reasons.append((o, r)), settings)
    for obj, reason in reasons:
        if obj.key in new and obj.label not in named:
            problems.append(f"{obj.label}: {reason}")
    return sorted(set(problems))


def _parent_keys(parsed: object, known: KnownRefs) -> list[tuple[str, str, str, int]]:
    if isinstance(parsed, _Route):
        return [(r.kind, r.namespace, r.name, p) for r in parsed.parents for p in _parent_ports(r, known)]
    if isinstance(parsed, _Split):
        root = _split_root(parsed, known)
        kind = "Service" if isinstance(root, ServiceInfo) else "Host"
        return [(kind, parsed.namespace, parsed.service, p) for p in _split_ports(parsed, known)]
    return []


# --- render -----------------------------------------------------------------------------------


def compile_routes(
    objects: Sequence[RouteObject],
    known: KnownRefs,
    skip: Callable[[RouteObject, str], None],
    settings: RouteSettings | None = None,
) -> list[dict[str, Any]]:
    """The directory's `routes` member (design §3.3), canonical order. An object that no
    longer compiles is left out via `skip(obj, reason)`, never breaking the document."""
    settings = settings or RouteSettings(cluster_domain=None)
    known = known.with_objects(objects)
    budgets: dict[tuple[str, str], tuple[dict[str, Any], RouteObject]] = {}
    routes: list[tuple[RouteObject, _Route]] = []
    splits: list[tuple[RouteObject, _Split]] = []
    services: list[RouteObject] = []
    for obj in sorted(objects, key=lambda o: o.key):
        try:
            parsed = _parsed(obj, settings.cluster_domain)
        except _BAD_STORED as exc:
            skip(obj, f"no longer valid: {exc}")
            continue
        if isinstance(parsed, _Route):
            routes.append((obj, parsed))
        elif isinstance(parsed, _Split):
            splits.append((obj, parsed))
        elif isinstance(parsed, _Profile):
            budgets[(parsed.namespace, parsed.service)] = (parsed.budget, obj)
        else:
            services.append(obj)

    # (kind, ns, name, port) -> {"parent": wire, "routes": [wire], "objects": [its sources]}.
    # HTTPRoutes first, then TrafficSplits where no route is, then Services' default routes:
    # apply refuses two sources on one port; stored rows that still clash resolve this way.
    items: dict[tuple[str, str, str, int], dict[str, Any]] = {}

    def item(kind: str, ns: str, name: str, port: int) -> dict[str, Any]:
        key = (kind, ns, name, port)
        if key not in items:
            parent: dict[str, Any] = {
                "group": MESHAGENT_GROUP if kind == "Host" else CORE_GROUP,
                "kind": kind,
                "namespace": ns,
                "name": name,
                "port": port,
                "section": "",  # one item per port, whichever sectionName routes named it by
            }
            if kind == "Host":
                parent["addresses"] = list(known.hosts[(ns, name)].addresses)
            items[key] = {"parent": parent, "routes": [], "objects": []}
        return items[key]

    for obj, route in routes:
        try:
            attached = [(ref, p) for ref in route.parents for p in _parent_ports(ref, known)]
            compiled = {
                (id(ref), port): _compile_route(obj, route, ref, port, known) for ref, port in attached
            }
        except _BAD_STORED as exc:
            skip(obj, str(exc))
            continue
        for ref, port in attached:
            entry = item(ref.kind, ref.namespace, ref.name, port)
            entry["routes"].append(compiled[(id(ref), port)])
            entry["objects"].append(obj)
    for obj, split in splits:
        try:
            root = _split_root(split, known)
            ports = _split_ports(split, known)
            kind = "Service" if isinstance(root, ServiceInfo) else "Host"
            compiled_ports = {p: _compile_split(obj, split, root, p, known) for p in ports}
        except _BAD_STORED as exc:
            skip(obj, str(exc))
            continue
        for port in ports:
            if (kind, split.namespace, split.service, port) in items:
                taken = items[(kind, split.namespace, split.service, port)]["objects"]
                skip(
                    obj, f"{kind} {split.namespace}/{split.service} port {port} already has {taken[0].label}"
                )
                continue
            entry = item(kind, split.namespace, split.service, port)
            entry["routes"].append(compiled_ports[port])
            entry["objects"].append(obj)
    for obj in services:
        info = known.services[(obj.namespace, obj.name)]
        try:
            ann = _annotations(info.annotations)
        except _BAD_STORED as exc:
            skip(obj, str(exc))
            continue
        if ann.retry is None and not ann.timeouts_given and ann.attempt_ms is None and ann.accrual is None:
            continue
        # Service-level annotations and no route on the port: Linkerd's default route.
        for _, port in info.ports:
            if (
                port in info.opaque
                or port in SKIP_DETECT_PORTS
                or ("Service", obj.namespace, obj.name, port) in items
            ):
                continue
            ref = _Ref(CORE_GROUP, "Service", obj.namespace, obj.name, port, "", "")
            rule = {
                "matches": [],
                "backends": [_backend_wire(ref, 1, ann.accrual, known)],
                "timeouts": _timeouts(ann, None, None, ann),
                "retry": ann.retry,
            }
            entry = item("Service", obj.namespace, obj.name, port)
            entry["routes"].append(_default_route(obj.created_at, rule))
            entry["objects"].append(obj)

    out: list[dict[str, Any]] = []
    total = 2
    for key in sorted(items):
        entry = items[key]
        kind, ns, name, _ = key
        budget = budgets.get((ns, name))
        entry["routes"].sort(key=lambda r: (r["created"], r["namespace"], r["name"]))
        sources = sorted({o.label for o in entry["objects"]} | ({budget[1].label} if budget else set()))
        wire = {
            "parent": entry["parent"],
            "budget": dict(budget[0]) if budget else dict(DEFAULT_BUDGET),
            "sources": sources,
            "routes": entry["routes"],
        }
        size = len(json.dumps(wire, sort_keys=True, separators=(",", ":")))
        if size > MAX_ITEM_BYTES or total + size + 1 > MAX_MEMBER_BYTES:
            why = (
                f"item too large ({size} bytes; at most {MAX_ITEM_BYTES})"
                if size > MAX_ITEM_BYTES
                else f"the routes member would exceed {MAX_MEMBER_BYTES} bytes"
            )
            for obj in {o.key: o for o in entry["objects"]}.values():
                skip(obj, f"{kind} {ns}/{name} port {key[3]}: {why}")
            continue
        total += size + 1
        out.append(wire)
    return out


def _default_route(created: float, rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "group": CORE_GROUP,
        "kind": "default",
        "namespace": "",
        "name": "http",
        "created": created,
        "rules": [rule],
    }


def _timeouts(
    ann: _Annotations,
    request: int | None,
    backend_request: int | None,
    service: _Annotations | None,
    own_retry: bool = False,
) -> dict[str, Any]:
    """Linkerd's precedence (policy-controller outbound http.rs): the route's timeout
    annotations, the rule's `timeouts.request` filling in request; only if that gives none at
    all, the Service's timeout annotations as a whole set (never merged key by key). Likewise
    `retry.linkerd.io/timeout` is the Service's only when the rule has no retry of its own
    (`own_retry`: a retry.linkerd.io/* annotation on the route or the rule's `retry`)."""
    svc = service or _Annotations()
    if ann.timeouts_given or request:
        given = ann.timeouts_given
        timeouts = (
            ann.request_ms if "request" in given else (request or None),
            ann.response_ms if "response" in given else None,
            ann.idle_ms if "idle" in given else None,
        )
    else:
        timeouts = (svc.request_ms, svc.response_ms, svc.idle_ms)
    own = ann.retry is not None or own_retry
    attempt = ann.attempt_ms if own else svc.attempt_ms
    return {
        "request_ms": timeouts[0],
        "response_ms": timeouts[1],
        "idle_ms": timeouts[2],
        "attempt_ms": attempt,
        "backend_request_ms": backend_request,
    }


def _backend_wire(ref: _Ref, weight: int, accrual: dict[str, Any] | None, known: KnownRefs) -> dict[str, Any]:
    """A backend as served: Host backends carry their endpoints (rendered as the catalog does);
    accrual: the route's (meshagent extension), else the backend Service's annotation."""
    wire: dict[str, Any] = {"weight": weight, "ref": ref.wire(), "accrual": accrual}
    found = _lookup(ref.kind, ref.namespace, ref.name, known)
    if found is None:
        raise _Refused(ref.path or "backend", _unknown(ref.kind, ref.namespace, ref.name, known))
    if isinstance(found, HostGroup):
        wire["endpoints"] = [
            {"address": a, "port": ref.port, "identity": found.identity, "server_name": found.server_name}
            for a in found.addresses
        ]
    elif accrual is None:
        wire["accrual"] = _annotations(found.annotations).accrual
    return wire


def _service_ann(kind: str, ns: str, name: str, known: KnownRefs) -> _Annotations | None:
    if kind != "Service":
        return None
    info = known.services.get((ns, name))
    return None if info is None else _annotations(info.annotations)


def _compile_route(
    obj: RouteObject, route: _Route, parent: _Ref, port: int, known: KnownRefs
) -> dict[str, Any]:
    svc = _service_ann(parent.kind, parent.namespace, parent.name, known)
    # No backendRefs: the parent itself, on the port the request was sent to (Linkerd's FirstAvailable).
    itself = _Ref(parent.group, parent.kind, parent.namespace, parent.name, port, "", parent.path)
    rules = []
    for rule in route.rules:
        backends = rule.backends or [(itself, 1)]
        wires = [_backend_wire(ref, weight, route.ann.accrual, known) for ref, weight in backends]
        retry = route.ann.retry or rule.retry or (svc.retry if svc else None)
        rules.append(
            {
                "matches": rule.matches,
                "backends": wires,
                "timeouts": _timeouts(
                    route.ann, rule.request_ms, rule.backend_request_ms, svc, rule.retry is not None
                ),
                "retry": retry,
            }
        )
    return {
        "group": route.group,
        "kind": "HTTPRoute",
        "namespace": route.namespace,
        "name": route.name,
        "created": obj.created_at,
        "rules": rules,
    }


def _compile_split(
    obj: RouteObject, split: _Split, root: ServiceInfo | HostGroup, port: int, known: KnownRefs
) -> dict[str, Any]:
    svc = _annotations(root.annotations) if isinstance(root, ServiceInfo) else None
    backends = []
    for name, weight, where in split.backends:
        found = _split_backend(split.namespace, name, known)
        if found is None:
            raise _Refused(f"{where}.service", _unknown("Service", split.namespace, name, known))
        if isinstance(found, ServiceInfo):
            if found.ports and port not in {p for _, p in found.ports}:
                continue  # SMI: a backend Service without the root port gets no traffic
            ref = _Ref(CORE_GROUP, "Service", split.namespace, name, port, "", where)
        else:
            ref = _Ref(MESHAGENT_GROUP, "Host", split.namespace, name, port, "", where)
        backends.append(_backend_wire(ref, weight, split.ann.accrual, known))
    if not any(b["weight"] for b in backends):
        raise _Refused("spec.backends", f"no backend with weight above 0 has port {port}")
    ann = split.ann
    retry = ann.retry or (svc.retry if svc else None)
    rule = {"matches": [], "backends": backends, "timeouts": _timeouts(ann, None, None, svc), "retry": retry}
    return _default_route(obj.created_at, rule)
