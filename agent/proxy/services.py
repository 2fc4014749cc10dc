"""The cluster's Services as the authority discovered them, and how a connection picks an endpoint.

The authority's document lists each Service with its cluster IPs, ports (opaque or not) and its
ready endpoints, each with the endpoint's own identity (interfaces: `services`). Outbound, a
connection to a cluster IP:port goes to one ready endpoint, with mTLS to that endpoint's
identity; a connection straight to an endpoint's address and target port (a pod IP) gets that
endpoint's identity too.

Parsing is entry by entry, as the directory's: a bad Service or endpoint is left out and handed
to `reject`, every valid one still applies.

`Balancer` picks the endpoint: power of two choices, as linkerd2-proxy's pool does
(linkerd/pool/p2c/src/lib.rs, 29637b64): two distinct endpoints drawn at random, the less loaded
wins. Linkerd measures load as a peak-EWMA of latency; we count open connections per endpoint,
which needs no timing on the data path and is what spreads long-lived TCP connections anyway.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from agent.dns.names import ServiceAddress
from agent.errors import ConfigError

from .catalog import Catalog, CatalogEntry

Reject = Callable[[str, Any, str], None]  # (where, the entry as received, reason)

BACKOFF_INITIAL_S: Final = 1.0
BACKOFF_MAX_S: Final = 30.0


@dataclass(frozen=True)
class Endpoint:
    """One ready endpoint: its address, the endpoint's target port for each service port, and
    its identity (None: not meshed, reached without TLS)."""

    address: str
    ports: Mapping[int, int]  # service port -> target port
    identity: str | None  # SPIFFE ID
    server_name: str | None  # SNI, and what its certificate must carry
    proxy_port: int | None  # its inbound proxy: opaque ports are dialled here with a header
    source: str = ""  # "pod:NS/NAME", "externalworkload:NS/NAME", ...


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    cluster_ips: tuple[str, ...]  # () = headless
    ports: Mapping[int, bool]  # service port -> opaque (TCP ports only)
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class ServicePort:
    """A connection to a cluster IP on `port`: one of `endpoints` (those serving it) takes it."""

    service: Service
    port: int
    opaque: bool
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class EndpointPort:
    """A connection straight to an endpoint's address on one of its target ports."""

    endpoint: Endpoint
    opaque: bool


Route = ServicePort | EndpointPort


class ServiceTable:
    """Lookup by (address, port): a Service's cluster IP:port, or an endpoint's address:target
    port. One dict, so a connection to anything else costs one lookup."""

    def __init__(self, services: Iterable[Service] = ()) -> None:
        self.services = tuple(services)
        routes: dict[tuple[str, int], Route] = {}
        # Endpoints first, Services over them: a cluster IP wins over a pod address.
        for svc in self.services:
            for ep in svc.endpoints:
                for port, target in ep.ports.items():
                    opaque = svc.ports.get(port, False)
                    routes.setdefault((ep.address, target), EndpointPort(ep, opaque))
        for svc in self.services:
            for port, opaque in svc.ports.items():
                serving = tuple(ep for ep in svc.endpoints if port in ep.ports)
                for ip in svc.cluster_ips:
                    routes[(ip, port)] = ServicePort(svc, port, opaque, serving)
        self._routes = routes
        self._by_name = {(svc.namespace, svc.name): svc for svc in self.services}

    @classmethod
    def empty(cls) -> ServiceTable:
        return cls()

    def route(self, address: str, port: int) -> Route | None:
        found = self._routes.get((address, port))
        if found is None and address.startswith("::ffff:") and "." in address:
            found = self._routes.get((address[7:], port))  # IPv4-mapped, as Catalog.lookup
        return found

    def by_name(self, namespace: str, name: str) -> Service | None:
        """The Service namespace/name (route parents and backends name Services so)."""
        return self._by_name.get((namespace, name))

    def lookup(self, address: str, port: int) -> Service | None:
        """The Service whose cluster IP:port this is."""
        found = self.route(address, port)
        return found.service if isinstance(found, ServicePort) else None

    def endpoint_catalog(self) -> Catalog:
        """Each meshed endpoint address with its target ports, as catalog entries (an opaque
        port's entry dials the endpoint's proxy port with a transport header)."""
        entries: list[CatalogEntry] = []
        seen: set[tuple[str, bool]] = set()
        for svc in self.services:
            for ep in svc.endpoints:
                if ep.identity is None or ep.server_name is None:
                    continue
                for opaque in (False, True):
                    ports = frozenset(t for p, t in ep.ports.items() if svc.ports.get(p, False) is opaque)
                    if not ports or (ep.address, opaque) in seen:
                        continue
                    seen.add((ep.address, opaque))
                    network = ipaddress.ip_network(ep.address)
                    proxy = ep.proxy_port if opaque else None
                    entries.append(CatalogEntry(network, ports, ep.identity, ep.server_name, proxy))
        return Catalog(entries)

    def addresses(self) -> list[ServiceAddress]:
        """What the DNS stub answers: each Service's name and cluster IPs."""
        return [ServiceAddress(s.name, s.namespace, s.cluster_ips) for s in self.services]

    def __len__(self) -> int:
        return len(self.services)


# --- parsing ----------------------------------------------------------------------------------


def parse_services(docs: Any, reject: Reject) -> ServiceTable:
    """The document's `services` list; each bad Service or endpoint goes to `reject`."""
    if docs is None:
        return ServiceTable.empty()
    if not isinstance(docs, list):
        reject("services", docs, "services must be a list")
        return ServiceTable.empty()
    services: list[Service] = []
    taken: dict[tuple[str, int], str] = {}
    for i, doc in enumerate(docs):
        try:
            svc = _service(doc, f"services[{i}]", reject)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            reject(f"services[{i}]", doc, _reason(exc))
            continue
        clash = next(((ip, p) for ip in svc.cluster_ips for p in svc.ports if (ip, p) in taken), None)
        if clash is not None:
            reject(f"services[{i}]", doc, f"{clash[0]}:{clash[1]} is already {taken[clash]}'s")
            continue
        for ip in svc.cluster_ips:
            for port in svc.ports:
                taken[(ip, port)] = f"{svc.namespace}/{svc.name}"
        services.append(svc)
    return ServiceTable(services)


def _reason(exc: BaseException) -> str:
    return f"missing {exc}" if isinstance(exc, KeyError) else str(exc)


def _service(doc: Any, where: str, reject: Reject) -> Service:
    name, namespace = _text(doc["name"], "name"), _text(doc["namespace"], "namespace")
    ips = _list(doc, "cluster_ips")
    if not isinstance(ips, list) or len(ips) > 2:
        raise ValueError("cluster_ips must be a list of at most two addresses")
    cluster_ips = tuple(_address(ip) for ip in ips)
    port_docs = _list(doc, "ports")
    if not isinstance(port_docs, list):
        raise ValueError("ports must be a list")
    ports: dict[int, bool] = {}
    for p in port_docs:
        if str(p.get("protocol", "TCP")) != "TCP":
            continue  # UDP and SCTP are not proxied
        opaque = p.get("opaque", False)
        if not isinstance(opaque, bool):
            raise ValueError(f"opaque {opaque!r} must be true or false")
        ports[_port(p["port"], "port")] = opaque
    endpoint_docs = _list(doc, "endpoints")
    if not isinstance(endpoint_docs, list):
        raise ValueError("endpoints must be a list")
    endpoints: list[Endpoint] = []
    for j, ep_doc in enumerate(endpoint_docs):
        try:
            endpoints.append(_endpoint(ep_doc))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            reject(f"{where}.endpoints[{j}]", ep_doc, _reason(exc))
    return Service(name, namespace, cluster_ips, ports, tuple(endpoints))


def _endpoint(doc: Any) -> Endpoint:
    address = _address(doc["address"])
    port_docs = doc["ports"]
    if not isinstance(port_docs, dict) or not port_docs:
        raise ValueError("ports must map service ports to target ports")
    ports = {_port(int(k), "service port"): _port(v, "target port") for k, v in port_docs.items()}
    identity, server_name = doc.get("identity"), doc.get("server_name")
    if identity is not None:
        # The catalog's own rules: either form of identity, kept as the SPIFFE ID.
        try:
            entry = CatalogEntry.from_doc({"cidr": address, "identity": identity, "server_name": server_name})
        except ConfigError as exc:
            raise ValueError(exc.message.rpartition(" is invalid: ")[2]) from None
        identity, server_name = entry.identity, entry.server_name
    proxy_port = doc.get("proxy_port")
    return Endpoint(
        address,
        ports,
        identity,
        server_name,
        None if proxy_port is None else _port(proxy_port, "proxy_port"),
        str(doc.get("source", "")),
    )


def _list(doc: Any, key: str) -> Any:
    value = doc.get(key)
    return [] if value is None else value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _address(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address")
    ip = ipaddress.ip_address(value)  # ValueError names the input
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.compressed


def _port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{what} {value!r} is not a port number (1-65535)")
    return value


# --- balancing --------------------------------------------------------------------------------

Key = tuple[str, int]  # (endpoint address, target port)


@dataclass
class _State:
    open: int = 0
    failures: int = 0
    retry_at: float = 0.0  # in back-off until then


@dataclass(eq=False)
class Pick:
    """One connection's endpoint; the shell reports how it went (`Balancer.connected`,
    `failed`, `released`)."""

    endpoint: Endpoint
    key: Key
    done: bool = field(default=False)


class Balancer:
    """Power of two choices on open connections; an endpoint whose connect failed sits out a
    back-off (1 s doubling to 30 s, reset by a success) while others are available.

    State is per (address, target port) and survives directory refreshes for endpoints that
    stay; `pick` drops that of endpoints gone from the table it is handed."""

    def __init__(
        self,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - load spreading, not secrets
        self.clock = clock
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.states: dict[Key, _State] = {}
        self.backing_off: set[Key] = set()  # failed since their last success
        self._table: ServiceTable | None = None

    def pick(self, table: ServiceTable, route: ServicePort) -> Pick | None:
        """An endpoint for a new connection to `route` (None: none serves it), counted open."""
        if table is not self._table:
            self._retain(table)
        endpoints = route.endpoints
        if not endpoints:
            return None
        port = route.port
        if self.backing_off:  # only then pay for the filter
            now = self.clock()
            ready = tuple(e for e in endpoints if self._state((e.address, e.ports[port])).retry_at <= now)
            endpoints = ready or endpoints  # all in back-off: try them all the same
        if len(endpoints) == 1:
            chosen = endpoints[0]
        else:
            a = self.rng.randrange(len(endpoints))
            b = self.rng.randrange(len(endpoints) - 1)
            b += b >= a  # two distinct endpoints
            ea, eb = endpoints[a], endpoints[b]
            load_a = self._state((ea.address, ea.ports[port])).open
            load_b = self._state((eb.address, eb.ports[port])).open
            chosen = ea if load_a <= load_b else eb
        key = (chosen.address, chosen.ports[port])
        self._state(key).open += 1
        return Pick(chosen, key)

    def connected(self, pick: Pick) -> None:
        """The endpoint answered: its back-off ends."""
        state = self.states.get(pick.key)
        if state is not None and state.failures:
            state.failures, state.retry_at = 0, 0.0
            self.backing_off.discard(pick.key)

    def failed(self, pick: Pick) -> None:
        """The endpoint could not be reached (or failed the handshake): back off, release."""
        state = self.states.get(pick.key)
        if state is not None:
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2**state.failures)
            state.failures = min(state.failures + 1, 16)
            state.retry_at = self.clock() + delay
            self.backing_off.add(pick.key)
        self.released(pick)

    def released(self, pick: Pick) -> None:
        """The connection ended (once per pick; later calls do nothing)."""
        if pick.done:
            return
        pick.done = True
        state = self.states.get(pick.key)
        if state is not None and state.open > 0:
            state.open -= 1

    def open(self, key: Key) -> int:
        state = self.states.get(key)
        return 0 if state is None else state.open

    def _state(self, key: Key) -> _State:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _State()
        return state

    def _retain(self, table: ServiceTable) -> None:
        """A new directory: keep the state of endpoints still in it, drop the others'."""
        keep = {
            (ep.address, target)
            for svc in table.services
            for ep in svc.endpoints
            for target in ep.ports.values()
        }
        self.states = {k: s for k, s in self.states.items() if k in keep}
        self.backing_off &= keep
        self._table = table
