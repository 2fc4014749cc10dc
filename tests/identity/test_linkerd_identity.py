"""Identities as Linkerd's proxies read them, proved with certificates made as Linkerd's identity
controller makes them (one DNS SAN, no URI SAN: tests/linkerd/certs.py) and with the host
certificates the authority issues. Handshakes run over ssl.MemoryBIO: no sockets.

The rule (agent/identity/names.py has it with its sources): an in-cluster server takes the
first SAN of a client certificate as the client's identity; an in-cluster client requires a
SAN of the kind and value of the ExternalWorkload's `meshTLS.identity`, a URI.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.authority.ca import load_authority
from agent.authority.service import Authority
from agent.errors import RejectedError
from agent.identity.names import InvalidName
from agent.identity.store import IdentityStore
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.tls import (
    Credentials,
    PeerIdentity,
    peer_identity,
    peer_identity_name,
    verify_server_identity,
)
from agent.proxy.transport_header import ALPN
from tests.linkerd.certs import linkerd_ca, linkerd_name, linkerd_pod_cert
from tests.support import issue_identity

TD = "cluster.local"
HOST = "shop/db"  # the meshed host
HOST_SPIFFE = f"spiffe://{TD}/ns/shop/sa/db"
HOST_DNS = "db.shop.serviceaccount.identity.linkerd.cluster.local"
WEB_SPIFFE = f"spiffe://{TD}/ns/shop/sa/web"
WEB_DNS = linkerd_name("web", "shop")


@dataclass
class Mesh:
    tmp: Path
    creds: Credentials  # the meshed host's

    def pod_files(self, sa: str, ns: str, trust_domain: str = TD, foreign: bool = False) -> tuple[Path, Path]:
        """A Linkerd pod's certificate, signed by the mesh's issuer (or by another mesh's CA)."""
        if foreign:
            issuer_cert, issuer_key = linkerd_ca()
        else:
            material = load_authority(self.tmp / "authority")
            issuer_cert, issuer_key = material.issuer_cert, material.issuer_key
        assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)  # Linkerd's issuers are EC
        cert_pem, key_pem = linkerd_pod_cert(issuer_cert, issuer_key, sa, ns, trust_domain)
        name = f"{sa}.{ns}.{trust_domain}{'.foreign' if foreign else ''}"
        cert, key = self.tmp / f"{name}.crt", self.tmp / f"{name}.key"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        return cert, key

    @property
    def bundle(self) -> Path:
        return IdentityStore(self.tmp / "host").current.resolve() / "bundle.pem"

    def pod_client(self, sa: str, ns: str, trust_domain: str = TD, foreign: bool = False) -> ssl.SSLContext:
        """A linkerd2-proxy's client side: TLS 1.3, its pod certificate, the mesh's roots."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(*self.pod_files(sa, ns, trust_domain, foreign))
        ctx.load_verify_locations(cafile=self.bundle)
        return ctx

    def pod_server(self, sa: str, ns: str) -> ssl.SSLContext:
        """A linkerd2-proxy's inbound side: its pod certificate, client certificates required."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(*self.pod_files(sa, ns))
        ctx.load_verify_locations(cafile=self.bundle)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    tmp = tmp_path_factory.mktemp("mesh")
    issue_identity(tmp / "authority", HOST, tmp / "host")
    return Mesh(tmp, Credentials.load(IdentityStore(tmp / "host")))


@dataclass
class Handshake:
    client: ssl.SSLObject
    server: ssl.SSLObject


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str) -> Handshake:
    """A full TLS handshake between two SSLObjects, bytes shuttled by hand; raises the side's
    ssl.SSLError that refused it."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server learns of a refused client certificate only after its Finished;
            # a round of application data makes the client's refusal (if any) surface.
            client.write(b"x")
            s_in.write(c_out.read())
            assert server.read(1) == b"x"
            return Handshake(client, server)
    raise AssertionError("handshake did not finish")


# --- inbound: an in-cluster Linkerd pod calls the meshed host ---------------------------------


def test_a_linkerd_pod_is_identified_by_its_dns_san(mesh: Mesh) -> None:
    hs = handshake(mesh.pod_client("web", "shop"), mesh.creds.server, HOST_DNS)
    cert = hs.server.getpeercert()
    assert [k for k, _ in cert["subjectAltName"]] == ["DNS"]  # as Linkerd issues them: no URI
    assert peer_identity(cert) == PeerIdentity(WEB_SPIFFE, WEB_DNS)
    assert peer_identity_name(cert) == WEB_DNS  # the client_id label, as linkerd-proxy shows it


@pytest.mark.parametrize(
    ("policy", "allowed", "reason"),
    [
        (PortPolicy(DefaultPolicy.ALL_AUTHENTICATED), True, "authenticated"),
        (
            PortPolicy(DefaultPolicy.DENY, (f"*.shop.serviceaccount.identity.linkerd.{TD}",)),
            True,
            "allow_list",
        ),
        (PortPolicy(DefaultPolicy.DENY, (WEB_DNS,)), True, "allow_list"),
        (PortPolicy(DefaultPolicy.DENY, (f"spiffe://{TD}/ns/shop/sa/web",)), True, "allow_list"),
        (
            PortPolicy(DefaultPolicy.ALL_AUTHENTICATED, (f"*.billing.serviceaccount.identity.linkerd.{TD}",)),
            False,
            "not_authorized",
        ),
    ],
    ids=["all-authenticated", "dns-glob", "dns-name", "spiffe-id", "other-namespace"],
)
def test_a_linkerd_pod_is_authorized_by_its_identity(
    mesh: Mesh, policy: PortPolicy, allowed: bool, reason: str
) -> None:
    hs = handshake(mesh.pod_client("web", "shop"), mesh.creds.server, HOST_DNS)
    peer = peer_identity(hs.server.getpeercert())
    assert peer is not None
    decision = InboundPolicy(policy).authorize(5432, peer.spiffe_id, TD)
    assert (decision.allowed, decision.reason) == (allowed, reason)


def test_a_pod_of_another_trust_domain_signed_by_the_same_issuer_is_refused(mesh: Mesh) -> None:
    hs = handshake(mesh.pod_client("web", "shop", "other.example"), mesh.creds.server, HOST_DNS)
    peer = peer_identity(hs.server.getpeercert())
    assert peer == PeerIdentity(
        "spiffe://other.example/ns/shop/sa/web", linkerd_name("web", "shop", "other.example")
    )
    decision = InboundPolicy(PortPolicy(DefaultPolicy.ALL_AUTHENTICATED)).authorize(5432, peer.spiffe_id, TD)
    assert (decision.allowed, decision.reason) == (False, "foreign_trust_domain")


def test_a_pod_of_another_mesh_is_refused_in_the_handshake(mesh: Mesh) -> None:
    with pytest.raises(ssl.SSLError, match=r"CERTIFICATE_VERIFY_FAILED|UNKNOWN_CA"):
        handshake(mesh.pod_client("web", "shop", foreign=True), mesh.creds.server, HOST_DNS)


# --- outbound: the meshed host calls a Linkerd pod ------------------------------------------


def test_outbound_a_dns_only_pod_proves_the_expected_spiffe_id(mesh: Mesh) -> None:
    hs = handshake(
        mesh.creds.client, mesh.pod_server("web", "shop"), WEB_DNS
    )  # SNI: the catalog's server_name
    cert = hs.client.getpeercert()
    assert verify_server_identity(cert, WEB_SPIFFE) is None
    reason = verify_server_identity(cert, f"spiffe://{TD}/ns/shop/sa/orders")
    assert reason is not None and WEB_SPIFFE in reason


def test_outbound_a_pod_is_refused_when_its_name_is_not_the_expected_one(mesh: Mesh) -> None:
    # The catalog expects shop/orders: SNI and hostname check name it, the pod proves shop/web.
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(mesh.creds.client, mesh.pod_server("web", "shop"), linkerd_name("orders", "shop"))


# --- ALPN transport.l5d.io/v1 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "selected"),
    [([ALPN], ALPN), (["h2", ALPN], ALPN), (["h2"], None), (None, None)],
    ids=["opaque", "opaque-among-others", "other-only", "none"],
)
def test_the_server_selects_the_transport_alpn_only_when_offered(
    mesh: Mesh, offered: list[str] | None, selected: str | None
) -> None:
    client = mesh.pod_client("web", "shop")
    if offered is not None:
        client.set_alpn_protocols(offered)
    hs = handshake(client, mesh.creds.server, HOST_DNS)
    assert hs.server.selected_alpn_protocol() == selected
    assert hs.client.selected_alpn_protocol() == selected


def test_client_opaque_offers_the_transport_alpn_and_client_does_not(mesh: Mesh) -> None:
    server = mesh.pod_server("web", "shop")
    server.set_alpn_protocols([ALPN])  # a linkerd2-proxy's inbound port
    assert handshake(mesh.creds.client_opaque, server, WEB_DNS).client.selected_alpn_protocol() == ALPN
    assert handshake(mesh.creds.client, server, WEB_DNS).client.selected_alpn_protocol() is None


def test_client_opaque_is_reloaded_on_rotation(mesh: Mesh) -> None:
    store = IdentityStore(mesh.tmp / "host")
    creds = Credentials.load(store)
    before = creds.client_opaque
    creds.reload(store, store.load_info())
    assert creds.client_opaque is not before
    server = mesh.pod_server("web", "shop")
    server.set_alpn_protocols([ALPN])
    assert handshake(creds.client_opaque, server, WEB_DNS).client.selected_alpn_protocol() == ALPN


# --- the host certificate, read as Linkerd's verifier reads it --------------------------------


def _linkerd_ids(cert: x509.Certificate) -> list[tuple[str, str]]:
    """linkerd/meshtls/verifier/src/lib.rs `extract_ids_from_cert`: the SANs in order, DNS names
    as `Id::Dns` and URIs as `Id::Uri`, other kinds skipped."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ids: list[tuple[str, str]] = []
    for name in san:
        if isinstance(name, x509.DNSName):
            ids.append(("Dns", name.value))
        elif isinstance(name, x509.UniformResourceIdentifier):
            ids.append(("Uri", name.value))
    return ids


def test_a_host_certificate_reads_right_on_both_sides_of_linkerd(mesh: Mesh) -> None:
    leaf = x509.load_pem_x509_certificate(
        (IdentityStore(mesh.tmp / "host").current.resolve() / "cert.pem").read_bytes()
    )
    ids = _linkerd_ids(leaf)
    # An in-cluster server: `client_identity` is the first id, the name Linkerd policies use.
    assert ids[0] == ("Dns", HOST_DNS)
    # An in-cluster client: `verify_id` wants the ExternalWorkload's meshTLS.identity, parsed
    # as a URI, among the ids: the SPIFFE ID.
    assert ("Uri", HOST_SPIFFE) in ids
    # ...and meshagent reads the same certificate as the same identity.
    cert: dict[str, Any] = {"subjectAltName": tuple(({"Dns": "DNS", "Uri": "URI"}[k], v) for k, v in ids)}
    assert peer_identity(cert) == PeerIdentity(HOST_SPIFFE, HOST_DNS)


@pytest.mark.parametrize(
    ("sans", "expected"),
    [
        ((("DNS", WEB_DNS),), PeerIdentity(WEB_SPIFFE, WEB_DNS)),
        ((("URI", WEB_SPIFFE),), PeerIdentity(WEB_SPIFFE, WEB_DNS)),
        ((("DNS", WEB_DNS), ("URI", WEB_SPIFFE)), PeerIdentity(WEB_SPIFFE, WEB_DNS)),
        ((("DNS", "web.example.com"), ("URI", WEB_SPIFFE)), PeerIdentity(WEB_SPIFFE, WEB_DNS)),
        ((("DNS", WEB_DNS), ("URI", HOST_SPIFFE)), None),
        ((("URI", WEB_SPIFFE), ("URI", HOST_SPIFFE)), None),
        ((("DNS", "web.example.com"),), None),
        ((("URI", "spiffe://cluster.local/custom"),), PeerIdentity("spiffe://cluster.local/custom", "")),
        ((("DNS", "Web.shop.serviceaccount.identity.linkerd.cluster.local"),), None),
    ],
    ids=[
        "dns-only",
        "uri-only",
        "both-agree",
        "host-name-ignored",
        "disagree",
        "two-uris",
        "no-mesh-name",
        "non-workload-spiffe",
        "not-a-valid-name",
    ],
)
def test_peer_identity_table(sans: tuple[tuple[str, str], ...], expected: PeerIdentity | None) -> None:
    assert peer_identity({"subjectAltName": sans}) == expected


# --- the authority takes either form ----------------------------------------------------------


@pytest.mark.parametrize(
    "identity",
    ["shop/orders", f"spiffe://{TD}/ns/shop/sa/orders", linkerd_name("orders", "shop")],
    ids=["short", "spiffe", "dns"],
)
def test_catalog_add_takes_either_form(mesh: Mesh, identity: str) -> None:
    authority = Authority.open(mesh.tmp / "authority")
    entry = authority.add_static_entry("10.9.0.0/16", (80,), identity)
    try:
        served = next(e for e in authority.catalog() if e["source"] == f"static:{entry.id}")
        assert (served["identity"], served["server_name"]) == (
            f"spiffe://{TD}/ns/shop/sa/orders",
            linkerd_name("orders", "shop"),
        )
    finally:
        authority.registry.remove_static_entry(entry.id)


@pytest.mark.parametrize(
    ("identity", "says"),
    [
        (linkerd_name("orders", "shop", "other.example"), "not of this authority's trust domain"),
        ("spiffe://other.example/ns/shop/sa/orders", "not of this authority's trust domain"),
        (linkerd_name("orders", "shop", mesh="istio"), "not of this authority's trust domain"),
        ("orders", "not a mesh identity name"),
    ],
    ids=["dns-other-td", "spiffe-other-td", "dns-other-mesh", "bare-name"],
)
def test_catalog_add_refuses_identities_it_cannot_serve(mesh: Mesh, identity: str, says: str) -> None:
    with pytest.raises(InvalidName, match=says):
        Authority.open(mesh.tmp / "authority").add_static_entry("10.9.0.0/16", (), identity)


def test_policy_allow_lists_are_stored_in_spiffe_form(mesh: Mesh) -> None:
    authority = Authority.open(mesh.tmp / "authority")
    record = authority.set_policy("shop/db", 5432, "deny", (f"*.shop.serviceaccount.identity.linkerd.{TD}",))
    assert record.allow == (f"spiffe://{TD}/ns/shop/sa/*",)
    with pytest.raises(RejectedError, match="wildcard in its mesh or trust domain"):
        authority.set_policy("shop/db", 5432, "deny", ("*.shop.serviceaccount.identity.linkerd.*",))
    authority.registry.remove_policy("shop/db", 5432)
