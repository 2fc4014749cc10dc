"""Every rule of a connection's decisions, as tables, without sockets (agent/proxy/decisions.py)."""

from __future__ import annotations

import ipaddress
from typing import Literal

import pytest

from agent.proxy.catalog import Catalog, CatalogEntry
from agent.proxy.decisions import (
    Admit,
    Client,
    InboundContext,
    Originate,
    Passthrough,
    ReadFirstBytes,
    ReadHeader,
    Refuse,
    ServedPorts,
    Stream,
    TerminateMtls,
    accept_inbound,
    accept_outbound,
    after_tls,
    first_bytes,
    outbound_destination,
    route_detected,
    route_endpoint,
    route_header,
    route_mtls,
    route_outbound,
    route_service,
)
from agent.proxy.detect import MAX_PEEK, Detected, Protocol
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.services import Endpoint, EndpointPort, Service, ServicePort, ServiceTable
from agent.proxy.transport_header import HeaderRefused, SessionProtocol, TransportHeader
from agent.telemetry.proxy_metrics import tls_connect

TD = "cluster.local"
OURS = "db.shop.serviceaccount.identity.linkerd.cluster.local"
WEB_ID = f"spiffe://{TD}/ns/shop/sa/web"
WEB_NAME = "web.shop.serviceaccount.identity.linkerd.cluster.local"
WEB = Client(WEB_ID, WEB_NAME)
FOREIGN = Client("spiffe://other.td/ns/shop/sa/web", "web.shop.serviceaccount.identity.linkerd.other.td")
HOST = "10.0.0.5"
ORIG = (HOST, 8080)
DIRECT = (HOST, 4143)

POLICY = InboundPolicy(
    default=PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED),
    ports={
        6379: PortPolicy(DefaultPolicy.ALL_AUTHENTICATED),
        5432: PortPolicy(DefaultPolicy.DENY),
        9000: PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED, (f"spiffe://{TD}/ns/shop/sa/web",)),
    },
)
SERVED = ServedPorts(
    included=((8000, 9999), (6379, 6379), (5432, 5432)), excluded=((4143, 4143), (9999, 9999))
)


def ctx(direct: bool = True, policy: InboundPolicy = POLICY) -> InboundContext:
    return InboundContext(OURS, TD, policy, 4143, frozenset({25, 3306}), SERVED, direct)


# --- accept ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orig", "direct", "expected"),
    [
        (ORIG, True, ReadFirstBytes(direct=False)),
        (DIRECT, True, ReadFirstBytes(direct=True)),
        (DIRECT, False, Refuse("loop")),  # direct connections off: as before #16
        ((HOST, 3306), True, Detected(Protocol.OPAQUE)),  # server speaks first: no detection
        ((HOST, 25), False, Detected(Protocol.OPAQUE)),
    ],
)
def test_accept_inbound(orig: tuple[str, int], direct: bool, expected: object) -> None:
    assert accept_inbound(ctx(direct), orig) == expected


@pytest.mark.parametrize(
    ("buffer", "expected"),
    [
        (b"", None),
        (b"GE", None),
        (b"GET / HTTP/1.1\r\n", Detected(Protocol.HTTP1)),
        (b"\x00\x01binary", Detected(Protocol.OPAQUE)),
        (b"PRI * HTTP/2.0\r\n", None),
        (b"\x16\x03\x01\x02\x00\x01", None),  # a ClientHello still arriving
        (b"\x16\x03\x01\xff\xff" + b"\x00" * (MAX_PEEK - 5), Detected(Protocol.TLS)),  # too big to parse
        (b"G" + b"x" * MAX_PEEK, Detected(Protocol.OPAQUE)),
    ],
)
def test_first_bytes(buffer: bytes, expected: Detected | None) -> None:
    assert first_bytes(buffer) == expected


# --- after detection -------------------------------------------------------------------------


def test_tls_for_us_is_terminated_on_either_path() -> None:
    ours = Detected(Protocol.TLS, OURS)
    assert route_detected(ctx(), ORIG, ours) == TerminateMtls(direct=False)
    assert route_detected(ctx(), DIRECT, ours, direct=True) == TerminateMtls(direct=True)


@pytest.mark.parametrize(
    ("detected", "reason"),
    [
        (Detected(Protocol.HTTP1), "direct_not_tls"),
        (Detected(Protocol.OPAQUE), "direct_not_tls"),  # silent, or bytes that are nothing known
        (Detected(Protocol.TLS, None), "direct_foreign_sni"),
        (Detected(Protocol.TLS, "api.example.com"), "direct_foreign_sni"),
    ],
)
def test_direct_port_takes_only_mtls_for_us(detected: Detected, reason: str) -> None:
    assert route_detected(ctx(), DIRECT, detected, direct=True) == Refuse(reason, port=4143)


@pytest.mark.parametrize(
    ("port", "detected", "allowed", "reason", "tls"),
    [
        (8080, Detected(Protocol.HTTP1), True, "unauthenticated_allowed", 'tls="no_identity"'),
        (8080, Detected(Protocol.TLS, "app.example.com"), True, "unauthenticated_allowed", 'tls="opaque"'),
        (8080, Detected(Protocol.TLS, None), True, "unauthenticated_allowed", 'tls="no_identity"'),  # no SNI
        (3306, Detected(Protocol.OPAQUE), True, "unauthenticated_allowed", 'no_tls_reason="port_skipped"'),
        (6379, Detected(Protocol.OPAQUE), False, "unauthenticated", 'no_tls_reason="no_tls_from_remote"'),
        (5432, Detected(Protocol.OPAQUE), False, "denied", 'tls="no_identity"'),
        (9000, Detected(Protocol.HTTP1), False, "unauthenticated", 'tls="no_identity"'),
    ],
)
def test_plaintext_is_judged_by_the_port_policy(
    port: int, detected: Detected, allowed: bool, reason: str, tls: str
) -> None:
    action = route_detected(ctx(), (HOST, port), detected)
    if allowed:
        assert isinstance(action, Admit)
        assert (action.target, action.kind, action.known) == ((HOST, port), "plaintext", detected.protocol)
        assert action.decision.reason == reason
        assert tls in action.tls_labels
        assert f'target_addr="{HOST}:{port}"' in action.where and f'srv_port="{port}"' in action.where
    else:
        assert isinstance(action, Refuse)
        assert (action.reason, action.port) == (reason, port)
        assert tls in action.deny and f'target_port="{port}"' in action.deny  # counted as a denial


# --- after the handshake ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "client", "allowed", "reason", "authz"),
    [
        (8080, WEB, True, "authenticated", 'authz_kind="default",authz_name="all-unauthenticated"'),
        (6379, WEB, True, "authenticated", 'authz_name="all-authenticated"'),
        (6379, FOREIGN, False, "foreign_trust_domain", ""),
        (6379, Client(None, None), False, "unauthenticated", ""),
        (5432, WEB, False, "denied", ""),
        (9000, WEB, True, "allow_list", f'authz_kind="allowlist",authz_name="spiffe://{TD}/ns/shop/sa/web"'),
        (9000, Client(f"spiffe://{TD}/ns/shop/sa/db", None), False, "not_authorized", ""),
    ],
)
def test_redirected_mtls_is_judged_by_the_port_policy(
    port: int, client: Client, allowed: bool, reason: str, authz: str
) -> None:
    action = route_mtls(ctx(), (HOST, port), client, alpn=None)
    if allowed:
        assert isinstance(action, Admit)
        assert (action.target, action.kind, action.known) == ((HOST, port), "mtls", None)
        assert action.decision.reason == reason
        assert f'tls="true",client_id="{client.name}"' in action.tls_labels
        tcp, http = action.authz_keys()
        assert authz in tcp and authz in http and 'route_name="default"' in http
    else:
        assert isinstance(action, Refuse) and (action.reason, action.port) == (reason, port)
        assert 'tls="true"' in action.deny


def test_redirected_mtls_with_the_transport_alpn_reads_the_header() -> None:
    # A linkerd2-proxy that negotiated the transport ALPN sends a header next, wherever it
    # dialled (a host whose cluster-side proxy port is not its listener's): read, never relayed.
    assert route_mtls(ctx(), ORIG, WEB, alpn="transport.l5d.io/v1") == ReadHeader()
    assert isinstance(route_mtls(ctx(), ORIG, WEB, alpn="h2"), Admit)
    anonymous = route_mtls(ctx(), ORIG, Client(None, None), alpn="transport.l5d.io/v1")
    assert anonymous == Refuse("direct_no_identity", port=ORIG[1])


@pytest.mark.parametrize(
    ("client", "alpn", "expected"),
    [
        (WEB, "transport.l5d.io/v1", ReadHeader()),
        (WEB, None, Refuse("direct_no_alpn", port=4143)),
        (WEB, "h2", Refuse("direct_no_alpn", port=4143)),
        (Client(None, None), "transport.l5d.io/v1", Refuse("direct_no_identity", port=4143)),
    ],
)
def test_direct_mtls_needs_an_identity_and_the_alpn(
    client: Client, alpn: str | None, expected: object
) -> None:
    assert route_mtls(ctx(), DIRECT, client, alpn, direct=True) == expected


# --- the transport header --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("session", "known"),
    [
        (None, Protocol.OPAQUE),
        (SessionProtocol.HTTP1, Protocol.HTTP1),
        (SessionProtocol.HTTP2, Protocol.HTTP2),
    ],
)
def test_header_to_a_served_port_goes_to_that_port_of_our_address(
    session: SessionProtocol | None, known: Protocol
) -> None:
    action = route_header(ctx(), DIRECT, WEB, TransportHeader(8080, session_protocol=session))
    assert isinstance(action, Admit)
    assert (action.target, action.kind, action.known) == ((HOST, 8080), "header", known)
    assert f'target_addr="{HOST}:8080"' in action.where and 'srv_port="8080"' in action.where
    assert f'client_id="{WEB_NAME}"' in action.tls_labels


@pytest.mark.parametrize(
    ("header", "reason", "port"),
    [
        (None, "header_timeout", 4143),
        (HeaderRefused("bad_preface"), "header_bad_preface", 4143),
        (HeaderRefused("empty"), "header_empty", 4143),
        (HeaderRefused("too_large"), "header_too_large", 4143),
        (HeaderRefused("truncated"), "header_truncated", 4143),
        (HeaderRefused("malformed"), "header_malformed", 4143),
        (TransportHeader(4143), "header_unserved_port", 4143),  # ourselves: a loop
        (TransportHeader(9999), "header_unserved_port", 9999),  # excluded (the proxy's, admin)
        (TransportHeader(22), "header_unserved_port", 22),  # not captured
        (TransportHeader(8080, name="web.shop.svc.cluster.local"), "header_named_target", 8080),
    ],
)
def test_header_refusals(header: TransportHeader | HeaderRefused | None, reason: str, port: int) -> None:
    assert route_header(ctx(), DIRECT, WEB, header) == Refuse(reason, port=port)


@pytest.mark.parametrize(
    ("port", "client", "reason"),
    [
        (6379, FOREIGN, "foreign_trust_domain"),
        (5432, WEB, "denied"),
        (9000, Client(f"spiffe://{TD}/ns/shop/sa/db", None), "not_authorized"),
    ],
)
def test_header_target_port_has_the_policy_of_a_redirected_connection(
    port: int, client: Client, reason: str
) -> None:
    via_header = route_header(ctx(), DIRECT, client, TransportHeader(port))
    redirected = route_mtls(ctx(), (HOST, port), client, alpn=None)
    assert isinstance(via_header, Refuse) and via_header.reason == reason
    assert via_header == redirected  # same reason, same port, same denial labels


@pytest.mark.parametrize(
    ("served", "port", "inside"),
    [
        (ServedPorts(), 8080, True),  # nothing listed: every port
        (ServedPorts(), 0, False),
        (ServedPorts(), 65536, False),
        (ServedPorts(excluded=((4140, 4143),)), 4141, False),
        (ServedPorts(((80, 80), (8000, 8100))), 8100, True),
        (ServedPorts(((80, 80), (8000, 8100))), 8101, False),
        (ServedPorts(((8000, 8100),), ((8050, 8050),)), 8050, False),
    ],
)
def test_served_ports(served: ServedPorts, port: int, inside: bool) -> None:
    assert (port in served) is inside


# --- outbound --------------------------------------------------------------------------------


def entry(**extra: object) -> CatalogEntry:
    doc: dict[str, object] = {
        "cidr": "10.1.0.0/16",
        "identity": f"spiffe://{TD}/ns/shop/sa/db",
        "server_name": OURS,
        **extra,
    }
    return CatalogEntry.from_doc(doc)


def test_outbound_routes() -> None:
    dst = ("10.1.2.3", 6379)
    assert accept_outbound(("10.1.2.3", 4140), 4140) == Refuse("loop")
    assert accept_outbound(dst, 4140) is None
    assert route_outbound(dst, None, "refuse") == Refuse("not_meshed")
    passthrough = route_outbound(dst, None, "pass")
    assert isinstance(passthrough, Passthrough) and passthrough.target == dst
    assert 'no_tls_reason="not_provided_by_service_discovery"' in passthrough.tls_labels
    mtls = route_outbound(dst, entry(), "pass")
    assert mtls == Originate(dst, OURS, f"spiffe://{TD}/ns/shop/sa/db")
    labels = mtls.tls_labels(OURS) if isinstance(mtls, Originate) else ""
    assert f'server_id="{OURS}"' in labels and 'dst_serviceaccount="db"' in labels


def test_outbound_to_an_opaque_port_dials_it_and_names_the_target_in_a_header() -> None:
    e = entry(opaque_port=4143)
    if not hasattr(e, "opaque_port"):
        pytest.skip("catalog entries have no opaque_port yet")
    action = route_outbound(("10.1.2.3", 6379), e, "pass")
    assert action == Originate(("10.1.2.3", 4143), OURS, f"spiffe://{TD}/ns/shop/sa/db", header_port=6379)
    assert ipaddress.ip_address(action.target[0]) in e.network


# --- after TLS: what the decrypted stream carries ---------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.parametrize(
    ("buffer", "known", "ended", "expected"),
    [
        (b"GET / HTTP/1.1\r\n", None, False, Stream(Protocol.HTTP1)),
        (b"GE", None, False, None),
        (b"GE", None, True, Stream(Protocol.OPAQUE)),  # the client ended (or went silent)
        (b"", None, True, Stream(Protocol.OPAQUE)),
        (b"*1\r\n$4\r\nPING\r\n", None, False, Stream(Protocol.OPAQUE)),
        (b"anything", Protocol.OPAQUE, False, Stream(Protocol.OPAQUE)),  # header: no session protocol
        (b"", Protocol.HTTP1, False, Stream(Protocol.HTTP1)),
        (H2_PREFACE[:10], None, False, None),
        (H2_PREFACE, None, False, None),  # no HEADERS yet: read on
        (H2_PREFACE, None, True, Stream(Protocol.HTTP2)),  # ended first: not upgraded
        (b"GET / HTTP/1.1\r\n", Protocol.HTTP2, False, Stream(Protocol.HTTP2)),  # not h2: raw relay
    ],
)
def test_after_tls(buffer: bytes, known: Protocol | None, ended: bool, expected: Stream | None) -> None:
    assert after_tls(buffer, known, ended) == expected


def h2_request(extra: list[tuple[str, str]]) -> bytes:
    import hpack

    block = hpack.Encoder().encode(
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "db"), *extra]
    )
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    headers = len(block).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + block  # END_STREAM|END_HEADERS
    return H2_PREFACE + settings + headers


def test_after_tls_tells_upgraded_http2_from_native() -> None:
    upgraded = h2_request([("l5d-orig-proto", "HTTP/1.1")])
    assert after_tls(upgraded, None) == Stream(Protocol.HTTP2, upgraded=True)
    assert after_tls(upgraded, Protocol.HTTP2) == Stream(Protocol.HTTP2, upgraded=True)
    assert after_tls(h2_request([]), None) == Stream(Protocol.HTTP2, upgraded=False)
    assert after_tls(upgraded[:-3], None) is None


def test_peek_is_asked_where_an_upgraded_connection_may_come() -> None:
    pod = Client(WEB_ID, WEB_NAME, may_upgrade=True)  # a Linkerd-issued certificate: DNS SAN only
    redirected = route_mtls(ctx(), ORIG, pod, alpn=None)
    skipped = route_mtls(ctx(), (HOST, 3306), pod, alpn=None)
    host = route_mtls(ctx(), ORIG, WEB, alpn=None)  # a host's certificate (URI SAN): never upgrades
    assert isinstance(redirected, Admit) and redirected.peek
    assert isinstance(skipped, Admit) and not skipped.peek  # server speaks first: never waits
    assert isinstance(host, Admit) and not host.peek  # goes to the app at once
    for session, peek in ((None, False), (SessionProtocol.HTTP1, False), (SessionProtocol.HTTP2, True)):
        action = route_header(ctx(), DIRECT, WEB, TransportHeader(8080, session_protocol=session))
        assert isinstance(action, Admit) and action.peek is peek
    plain = route_detected(ctx(), ORIG, Detected(Protocol.HTTP2))
    assert isinstance(plain, Admit) and not plain.peek


# --- outbound to the cluster's Services ------------------------------------------------------

ORDERS_A = f"spiffe://{TD}/ns/shop/sa/orders-a"
ORDERS_A_NAME = "orders-a.shop.serviceaccount.identity.linkerd.cluster.local"
CLUSTER_IP = "198.19.0.10"


def _endpoint(address: str, identity: str | None = ORDERS_A, proxy_port: int | None = 4143) -> Endpoint:
    server_name = ORDERS_A_NAME if identity is not None else None
    return Endpoint(address, {80: 8080, 6379: 6379}, identity, server_name, proxy_port, "pod:shop/x")


SERVICES = ServiceTable(
    [
        Service(
            "orders",
            "shop",
            (CLUSTER_IP,),
            {80: False, 6379: True},
            (_endpoint("198.18.5.2"), _endpoint("198.18.5.3", None), _endpoint("10.1.9.9")),
        )
    ]
)
HAND_WRITTEN = Catalog([entry(cidr="10.1.0.0/16")])  # covers 10.1.9.9


@pytest.mark.parametrize(
    ("orig", "expected"),
    [
        ((CLUSTER_IP, 80), "service"),
        (("::ffff:198.19.0.10", 80), "service"),
        ((CLUSTER_IP, 8080), None),  # a port the Service does not have
        (("198.18.5.2", 8080), "endpoint"),  # a pod IP on its target port
        (("198.18.5.2", 80), None),
        (("10.1.9.9", 8080), "catalog"),  # hand-written entries win over discovered ones
        (("198.18.7.7", 443), None),
    ],
)
def test_outbound_lookup_order(orig: tuple[str, int], expected: str | None) -> None:
    found = outbound_destination(orig, HAND_WRITTEN, SERVICES)
    kind = {CatalogEntry: "catalog", ServicePort: "service", EndpointPort: "endpoint", type(None): None}
    assert kind[type(found)] == expected


def _service_route(port: int) -> ServicePort:
    route = SERVICES.route(CLUSTER_IP, port)
    assert isinstance(route, ServicePort)
    return route


@pytest.mark.parametrize(
    ("port", "picked", "unmeshed", "expected"),
    [
        # mTLS to the endpoint's own address, target port and identity.
        (80, _endpoint("198.18.5.2"), "pass", Originate(("198.18.5.2", 8080), ORDERS_A_NAME, ORDERS_A)),
        # Opaque: its proxy port, the target port named in a transport header.
        (
            6379,
            _endpoint("198.18.5.2"),
            "pass",
            Originate(("198.18.5.2", 4143), ORDERS_A_NAME, ORDERS_A, 6379),
        ),
        # Opaque without a known proxy port: the target port, where its proxy captures it.
        (
            6379,
            _endpoint("198.18.5.2", proxy_port=None),
            "pass",
            Originate(("198.18.5.2", 6379), ORDERS_A_NAME, ORDERS_A),
        ),
        # Unmeshed endpoint: plaintext to its target port, unless unmeshed destinations are refused.
        (80, _endpoint("198.18.5.3", None), "pass", Passthrough(("198.18.5.3", 8080), tls_connect(None))),
        (80, _endpoint("198.18.5.3", None), "refuse", Refuse("not_meshed")),
        (80, None, "pass", Refuse("no_ready_endpoint")),
        (80, None, "refuse", Refuse("no_ready_endpoint")),
    ],
)
def test_route_service(
    port: int, picked: Endpoint | None, unmeshed: Literal["pass", "refuse"], expected: object
) -> None:
    assert route_service(_service_route(port), picked, unmeshed) == expected


def test_a_service_connection_is_labelled_with_the_endpoints_identity() -> None:
    action = route_service(_service_route(80), _endpoint("198.18.5.2"), "pass")
    assert isinstance(action, Originate)
    labels = action.tls_labels(ORDERS_A_NAME)
    assert f'server_id="{ORDERS_A_NAME}"' in labels and 'dst_serviceaccount="orders-a"' in labels


@pytest.mark.parametrize(
    ("orig", "unmeshed", "expected"),
    [
        (("198.18.5.2", 8080), "pass", Originate(("198.18.5.2", 8080), ORDERS_A_NAME, ORDERS_A)),
        (("198.18.5.2", 6379), "pass", Originate(("198.18.5.2", 4143), ORDERS_A_NAME, ORDERS_A, 6379)),
        (("198.18.5.3", 8080), "pass", Passthrough(("198.18.5.3", 8080), tls_connect(None))),
        (("198.18.5.3", 8080), "refuse", Refuse("not_meshed")),
    ],
)
def test_route_endpoint(orig: tuple[str, int], unmeshed: Literal["pass", "refuse"], expected: object) -> None:
    route = SERVICES.route(*orig)
    assert isinstance(route, EndpointPort)
    assert route_endpoint(route, orig[1], unmeshed) == expected


def test_a_remote_sni_is_never_kept_by_the_label_caches() -> None:
    """Any client can name anything (up to ~16 KB) in its ClientHello: the memoized label
    builders must not take it as a key, or each one would stay alive after its connection."""
    from agent.telemetry import metrics, proxy_metrics

    cached = (proxy_metrics.tls_accept, metrics.labels, metrics.join)
    before = [c.cache_info().currsize for c in cached]
    for i in range(2000):
        sni = f"{i}.".ljust(4000, "x") + ".example"
        action = route_detected(ctx(), (HOST, 8080), Detected(Protocol.TLS, sni))
        assert isinstance(action, Admit) and action.tls_labels == 'tls="opaque"'
    grown = [c.cache_info().currsize - n for c, n in zip(cached, before, strict=True)]
    assert all(g <= 2 for g in grown), grown  # (the opaque label set itself, once)
