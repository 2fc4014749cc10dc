"""A connection's decisions, without I/O: what it is, whether it is admitted, where it goes and
how it is labelled.

The asyncio shell (`listeners.py`) owns sockets, TLS objects and timers. At each step of a
connection it hands one of these functions what it has learnt (the original destination, the
first bytes, the TLS handshake's outcome, a transport header) and carries out the action it gets
back. The functions read only their arguments, so every rule has a table test without sockets
(tests/proxy/test_decisions.py).

Inbound, step by step:

    accept_inbound(ctx, orig)            -> Refuse | ReadFirstBytes | Detected
    first_bytes(buffer)                  -> Detected | None (read on)
    route_detected(ctx, orig, detected, direct)
                                         -> TerminateMtls | Admit | Refuse
    route_mtls(ctx, orig, client, alpn, direct)
                                         -> Admit | ReadHeader | Refuse
    route_header(ctx, orig, client, header)
                                         -> Admit | Refuse
    after_tls(buffer, known, ended)      -> Stream | None (read on), for an Admit with `peek`

Outbound:

    accept_outbound(orig, proxy_port)    -> Refuse | None (look it up)
    outbound_destination(orig, catalog, services)
                                         -> CatalogEntry | ServicePort | EndpointPort | None
    route_outbound(orig, entry, unmeshed)
                                         -> Passthrough | Originate | Refuse
    route_service(route, picked, unmeshed), route_endpoint(route, port, unmeshed)
                                         -> Passthrough | Originate | Refuse
    route_routed_endpoint(address, port, identity, server_name, header_port, unmeshed)
                                         -> Passthrough | Originate | Refuse (an HTTP route's pick)

A "direct" connection is one whose original destination is the inbound listener's own port: a
linkerd2-proxy in opaque-transport mode dials it, negotiates ALPN `transport.l5d.io/v1` and
names the app's port in a transport header (linkerd2-proxy: linkerd/app/inbound/src/direct.rs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from agent.telemetry.metrics import join
from agent.telemetry.proxy_metrics import (
    DEFAULT_ROUTE,
    authz_labels,
    dst_labels,
    server_labels,
    target,
    tls_accept,
    tls_connect,
)

from .catalog import Catalog, CatalogEntry
from .detect import MAX_PEEK, Detected, Protocol, detect
from .policy import Decision, InboundPolicy
from .services import Endpoint, EndpointPort, ServicePort, ServiceTable
from .transport_header import ALPN as TRANSPORT_ALPN
from .transport_header import HeaderRefused, SessionProtocol, TransportHeader

Address = tuple[str, int]
PortRanges = tuple[tuple[int, int], ...]

# Refusal reasons of the direct (transport-header) port, a closed set: `refused` counters in
# /status (`inbound:<reason>`) and meshagent_connections_refused_total{direction,reason}.
DIRECT_NOT_TLS: Final = "direct_not_tls"  # plaintext, or TLS not meant for us, on the direct port
DIRECT_FOREIGN_SNI: Final = "direct_foreign_sni"
DIRECT_NO_IDENTITY: Final = "direct_no_identity"
DIRECT_NO_ALPN: Final = "direct_no_alpn"  # the client did not negotiate transport.l5d.io/v1
HEADER_UNSERVED_PORT: Final = "header_unserved_port"
HEADER_TIMEOUT: Final = "header_timeout"
HEADER_NAMED_TARGET: Final = "header_named_target"  # a gateway request (name set): not ours to serve
# Outbound: a Service with no ready endpoint serving the port (or every one gone).
NO_READY_ENDPOINT: Final = "no_ready_endpoint"


@dataclass(frozen=True)
class ServedPorts:
    """The app ports a transport header may name: the ports interception captures inbound
    (`intercept.inbound_ports`, all when empty) minus those it never captures, and never the
    proxy's or the admin port, which `excluded` must list."""

    included: PortRanges = ()  # empty: every port
    excluded: PortRanges = ()

    def __contains__(self, port: object) -> bool:
        if not isinstance(port, int) or not 0 < port < 65536:
            return False
        if any(lo <= port <= hi for lo, hi in self.excluded):
            return False
        return not self.included or any(lo <= port <= hi for lo, hi in self.included)


@dataclass(frozen=True)
class InboundContext:
    """What inbound decisions read: this host's mesh name and trust domain, its policy, ports."""

    our_name: str  # our mesh DNS name: the SNI a mesh peer sends us
    trust_domain: str
    policy: InboundPolicy
    proxy_port: int  # the inbound listener's own port: direct connections arrive there
    skip_detect_ports: frozenset[int] = frozenset()
    served: ServedPorts = field(default_factory=ServedPorts)
    direct: bool = True
    """Accept direct connections (transport header); off: refused as a loop, as before #16."""


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refuse:
    """Close the connection. `reason` is a closed set (metric label, /status key); `deny` is the
    `inbound_tcp_authz_deny_total` label set when the port's policy refused the client."""

    reason: str
    deny: str = ""
    port: int = 0


@dataclass(frozen=True)
class ReadFirstBytes:
    """Read the client's first bytes (within the detect deadline) and call `first_bytes`."""

    direct: bool


@dataclass(frozen=True)
class TerminateMtls:
    """Take a handshake slot, terminate TLS with a client certificate required, then call
    `route_mtls`."""

    direct: bool


@dataclass(frozen=True)
class ReadHeader:
    """Read Linkerd's transport header (bounded, within the detect deadline), then call
    `route_header`."""


@dataclass(frozen=True)
class Admit:
    """Connect to the app at `target` and relay. `known`: the protocol already known (None:
    detect HTTP from the first bytes); `kind`: the /status `opened` key."""

    target: Address
    where: str  # target_* and srv_* labels
    tls_labels: str
    decision: Decision
    kind: Literal["plaintext", "mtls", "header"]
    known: Protocol | None = None
    peek: bool = False
    """Read the client's first decrypted bytes before connecting (`after_tls`): an HTTP/2
    connection a linkerd2-proxy upgraded (l5d-orig-proto) goes to the gateway, not the app."""

    def authz_keys(self) -> tuple[str, str]:
        """The connection's `inbound_tcp_authz_allow_total` and `inbound_http_authz_allow_total`
        label sets (linkerd counts one for opaque connections, the other per HTTP request)."""
        authz = authz_labels(self.decision.rule, self.decision.reason != "allow_list")
        tcp = join(self.where, authz, self.tls_labels)
        return tcp, join(self.where, DEFAULT_ROUTE, authz, self.tls_labels)


@dataclass(frozen=True)
class Client:
    """A client's verified identity: `spiffe_id` for policy, `name` (the mesh DNS form when
    there is one) for labels and logs. Both None: a certificate without a mesh identity."""

    spiffe_id: str | None
    name: str | None
    may_upgrade: bool = False
    """The certificate carries the mesh DNS SAN alone, as Linkerd's identity controller issues
    them: a linkerd2-proxy, the only client that upgrades HTTP/1 to HTTP/2 (l5d-orig-proto).
    Only its connections are read before the app is dialled (see `route_mtls`)."""


# --- inbound ---------------------------------------------------------------------------------


def accept_inbound(ctx: InboundContext, orig: Address) -> Refuse | ReadFirstBytes | Detected:
    """A connection was accepted with original destination `orig`."""
    port = orig[1]
    if port == ctx.proxy_port:
        # Straight to the listener: only a mesh peer with a transport header may do that;
        # relaying anything else would loop into ourselves.
        return ReadFirstBytes(direct=True) if ctx.direct else Refuse("loop")
    if port in ctx.skip_detect_ports:
        return Detected(Protocol.OPAQUE)
    return ReadFirstBytes(direct=False)


def first_bytes(buffer: bytes) -> Detected | None:
    """What the first bytes say, or None to read on. Past `MAX_PEEK` undecided: opaque."""
    result = detect(buffer)
    if isinstance(result, Detected):
        return result
    return None if len(buffer) < MAX_PEEK else Detected(Protocol.OPAQUE)


def route_detected(
    ctx: InboundContext, orig: Address, detected: Detected, direct: bool = False
) -> TerminateMtls | Admit | Refuse:
    """The first bytes (or the detect deadline, as OPAQUE) said what the connection is."""
    if detected.protocol is Protocol.TLS and detected.sni == ctx.our_name:
        return TerminateMtls(direct)
    if direct:
        if detected.protocol is Protocol.TLS:
            return Refuse(DIRECT_FOREIGN_SNI, port=orig[1])
        return Refuse(DIRECT_NOT_TLS, port=orig[1])
    port = orig[1]
    decision = ctx.policy.authorize(port, None)
    if detected.protocol is Protocol.TLS:
        # Opaque: the app's own TLS to a server it names. A ClientHello naming none (a client
        # dialling an address) or too big to read stays no_identity, as before the cache.
        tls_labels = tls_accept(None, False, opaque=detected.sni is not None)
    else:
        skipped = port in ctx.skip_detect_ports
        tls_labels = tls_accept(None, False, reason="port_skipped" if skipped else "")
    where = where_labels(ctx.policy, orig)
    if not decision.allowed:
        return Refuse(decision.reason, join(where, tls_labels), port)
    return Admit(orig, where, tls_labels, decision, "plaintext", detected.protocol)


def route_mtls(
    ctx: InboundContext, orig: Address, client: Client, alpn: str | None, direct: bool = False
) -> Admit | ReadHeader | Refuse:
    """The mTLS handshake succeeded with `client` (`alpn`: the protocol negotiated, if any).

    A client that negotiated the transport ALPN sends a header next, wherever it dialled: on a
    redirected app port too (a host whose `linkerd-proxy` port in the cluster is not its
    inbound listener's), so the header is read there as well, never relayed as app bytes.
    Otherwise a linkerd2-proxy's connection is read first (it may be HTTP/2 it upgraded);
    any other peer's goes to the app at once (no wait, server-speaks-first protocols too)."""
    if direct or alpn == TRANSPORT_ALPN:
        if client.spiffe_id is None:
            return Refuse(DIRECT_NO_IDENTITY, port=orig[1])
        if alpn != TRANSPORT_ALPN:
            return Refuse(DIRECT_NO_ALPN, port=orig[1])
        return ReadHeader()
    peek = client.may_upgrade and orig[1] not in ctx.skip_detect_ports
    return _authorize(ctx, orig, client, "mtls", None, peek=peek)


def route_header(
    ctx: InboundContext, orig: Address, client: Client, header: TransportHeader | HeaderRefused | None
) -> Admit | Refuse:
    """A direct connection's transport header was read, refused by the reader, or (None) did not
    arrive within the detect deadline."""
    if header is None:
        return Refuse(HEADER_TIMEOUT, port=orig[1])
    if isinstance(header, HeaderRefused):
        return Refuse(f"header_{header.reason}", port=orig[1])
    if header.name:
        return Refuse(HEADER_NAMED_TARGET, port=header.port)
    if header.port not in ctx.served:
        return Refuse(HEADER_UNSERVED_PORT, port=header.port)
    known = {
        None: Protocol.OPAQUE,  # no session protocol: raw TCP, no detection (as linkerd)
        SessionProtocol.HTTP1: Protocol.HTTP1,
        SessionProtocol.HTTP2: Protocol.HTTP2,
    }[header.session_protocol]
    dst = (orig[0], header.port)
    return _authorize(ctx, dst, client, "header", known, peek=known is Protocol.HTTP2)


def _authorize(
    ctx: InboundContext,
    dst: Address,
    client: Client,
    kind: Literal["mtls", "header"],
    known: Protocol | None,
    peek: bool,
) -> Admit | Refuse:
    decision = ctx.policy.authorize(dst[1], client.spiffe_id, ctx.trust_domain)
    where = where_labels(ctx.policy, dst)
    tls_labels = tls_accept(client.name, True)
    if not decision.allowed:
        return Refuse(decision.reason, join(where, tls_labels), dst[1])
    return Admit(dst, where, tls_labels, decision, kind, known, peek)


@dataclass(frozen=True)
class Stream:
    """What a TLS client's decrypted stream carries. `upgraded`: HTTP/2 whose first request has
    `l5d-orig-proto` (a linkerd2-proxy's upgraded HTTP/1): the orig-proto gateway serves it."""

    protocol: Protocol
    upgraded: bool = False


def after_tls(buffer: bytes, known: Protocol | None, ended: bool = False) -> Stream | None:
    """The first decrypted bytes of an admitted `peek` connection: what they carry, or None to
    read on. `ended`: the client finished (or the detect deadline passed): decide with what is
    there (nothing known: opaque)."""
    protocol = known
    if protocol is None:
        detected = first_bytes(buffer)
        if detected is None:
            return Stream(Protocol.OPAQUE) if ended else None
        protocol = detected.protocol
    if protocol is not Protocol.HTTP2:
        return Stream(protocol)
    from .orig_proto import detect_upgraded  # hpack: loaded for HTTP/2 clients only

    upgraded = detect_upgraded(buffer)
    if isinstance(upgraded, bool):
        return Stream(protocol, upgraded)
    return Stream(protocol) if ended else None


def where_labels(policy: InboundPolicy, dst: Address) -> str:
    """The target_* and srv_* labels of an inbound connection to `dst`."""
    return join(target(*dst), server_labels(dst[1], policy.for_port(dst[1]).default.value))


# --- outbound --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passthrough:
    """Not meshed: connect to `target` as is, labelled `tls_labels`."""

    target: Address
    tls_labels: str


@dataclass(frozen=True)
class Originate:
    """Meshed: connect to `target` with mTLS (SNI `server_name`), insist on `identity`. With
    `header_port`, offer ALPN transport.l5d.io/v1 and write a transport header naming it."""

    target: Address
    server_name: str
    identity: str
    header_port: int | None = None

    def tls_labels(self, server_name_seen: str | None) -> str:
        """Labels once the server proved its identity (`server_name_seen`: as it presented it)."""
        return join(tls_connect(server_name_seen), dst_labels(self.identity))


def accept_outbound(orig: Address, proxy_port: int) -> Refuse | None:
    """The app's connection to `orig` was accepted; None: look it up in the catalog."""
    return Refuse("loop") if orig[1] == proxy_port else None


def route_outbound(
    orig: Address, entry: CatalogEntry | None, unmeshed: Literal["pass", "refuse"]
) -> Passthrough | Originate | Refuse:
    if entry is None:
        if unmeshed == "refuse":
            return Refuse("not_meshed")
        return Passthrough(orig, tls_connect(None))
    if entry.opaque_port is not None:
        return Originate((orig[0], entry.opaque_port), entry.server_name, entry.identity, orig[1])
    return Originate(orig, entry.server_name, entry.identity)


def outbound_destination(
    orig: Address, catalog: Catalog, services: ServiceTable
) -> CatalogEntry | ServicePort | EndpointPort | None:
    """What `orig` is, in this order: a catalog entry (static and enrolled hosts: written by
    hand, they win), a Service's cluster IP:port, an endpoint's address:target port."""
    entry = catalog.lookup(orig[0], orig[1])
    if entry is not None or not len(services):
        return entry
    return services.route(orig[0], orig[1])


def route_service(
    route: ServicePort, picked: Endpoint | None, unmeshed: Literal["pass", "refuse"]
) -> Passthrough | Originate | Refuse:
    """A connection to a Service's cluster IP: to the endpoint the balancer `picked` (None:
    none is ready), on its target port for the service port."""
    if picked is None:
        return Refuse(NO_READY_ENDPOINT)
    return _to_endpoint(picked, picked.ports[route.port], route.opaque, unmeshed)


def route_endpoint(
    route: EndpointPort, port: int, unmeshed: Literal["pass", "refuse"]
) -> Passthrough | Originate | Refuse:
    """A connection straight to an endpoint's address (a pod IP) on target port `port`."""
    return _to_endpoint(route.endpoint, port, route.opaque, unmeshed)


def route_routed_endpoint(
    address: str,
    port: int,
    identity: str | None,
    server_name: str | None,
    header_port: int | None,
    unmeshed: Literal["pass", "refuse"],
) -> Passthrough | Originate | Refuse:
    """An HTTP route's endpoint (routes.EndpointRef's fields): its server listens on `port`;
    with `header_port` (its inbound proxy port) it is dialled there with a transport header
    naming `port`. No identity: plaintext, unless refused."""
    if identity is None or server_name is None:
        if unmeshed == "refuse":
            return Refuse("not_meshed")
        return Passthrough((address, port), tls_connect(None))
    if header_port is not None:
        return Originate((address, header_port), server_name, identity, port)
    return Originate((address, port), server_name, identity)


def _to_endpoint(
    endpoint: Endpoint, port: int, opaque: bool, unmeshed: Literal["pass", "refuse"]
) -> Passthrough | Originate | Refuse:
    if endpoint.identity is None or endpoint.server_name is None:
        # Not meshed (no identity discovered): plaintext, as Linkerd sends it, unless refused.
        if unmeshed == "refuse":
            return Refuse("not_meshed")
        return Passthrough((endpoint.address, port), tls_connect(None))
    if opaque and endpoint.proxy_port is not None:
        target = (endpoint.address, endpoint.proxy_port)
        return Originate(target, endpoint.server_name, endpoint.identity, port)
    # Not opaque (or no proxy port known): the endpoint's own port, where its proxy captures it.
    return Originate((endpoint.address, port), endpoint.server_name, endpoint.identity)
