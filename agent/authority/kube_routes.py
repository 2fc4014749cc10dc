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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.authority.storage import HostRecord
from agent.errors import ExitCode, MeshagentError

ROUTE_KINDS = ("HTTPRoute", "TrafficSplit", "ServiceProfile", "Service")
SOURCES = ("file", "cluster")
MAX_PROBLEMS_SHOWN = 50
MAX_ITEM_BYTES = 64 << 10  # one parent item of the wire member
MAX_MEMBER_BYTES = 1 << 20  # the whole `routes` member
# Linkerd's default opaque ports and meshagent's skip_detect_ports: no HTTP is seen there.
SKIP_DETECT_PORTS = frozenset({25, 587, 3306})


class RouteRefused(MeshagentError):
    """The route objects were refused, all of them: `problems` names every object and field."""

    code = "route_refused"
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


@dataclass(frozen=True)
class RouteSettings:
    """What objects are read against: the cluster domain of ServiceProfile names."""

    cluster_domain: str = "cluster.local"


def known_refs(
    catalog: Sequence[Mapping[str, Any]],
    hosts: Sequence[HostRecord],
    discovered: Sequence[Mapping[str, Any]] = (),
    objects: Sequence[RouteObject] = (),
) -> KnownRefs:
    """KnownRefs from what the authority serves: `catalog` is Authority.catalog(hosts) (its
    host entries are the unrevoked hosts with their SPIFFE ID, server name and served
    addresses, a Service's cluster IP left out), `hosts` the registry's hosts (for their
    registered ports), `discovered` the Services discovery serves, `objects` the stored route
    objects (their Service objects give port names and annotations)."""
    raise NotImplementedError


def parse_routes_file(
    text: str | bytes, known: KnownRefs, settings: RouteSettings | None = None, now: float = 0.0
) -> list[RouteObject]:
    """Every object of the YAML stream validated, or RouteRefused naming each problem.
    `now`: created_at of objects without a creationTimestamp."""
    raise NotImplementedError


def resolve(
    docs: Iterable[Mapping[str, Any]],
    known: KnownRefs,
    settings: RouteSettings | None = None,
    now: float = 0.0,
    source: str = "file",
) -> list[RouteObject]:
    """The objects (as the API returns them, or from YAML) validated against `known` plus the
    file's own Service objects; RouteRefused if any problem."""
    raise NotImplementedError


def compile_routes(
    objects: Sequence[RouteObject],
    known: KnownRefs,
    skip: Callable[[RouteObject, str], None],
) -> list[dict[str, Any]]:
    """The directory's `routes` member (design §3.3), canonical order. An object that no
    longer compiles is left out via `skip(obj, reason)`, never breaking the document."""
    raise NotImplementedError
