"""The certificate-chain verification cache (agent/proxy/verify_cache.pyx, issue #19).

Real OpenSSL handshakes between contexts over memory BIOs, and through a real proxy pair on
loopback: a chain seen before is answered from the cache, and nothing the cache remembers lets
through what a full verification would refuse (another name, another authority's look-alike
chain, an expired leaf).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity.store import IdentityStore
from agent.proxy import verify_cache
from agent.proxy.listeners import ListenerSettings
from agent.proxy.tls import Credentials
from tests.proxy.memory_tls import handshake
from tests.proxy.test_mtls_loopback import DB_NAME, World, echo_server, request, run
from tests.proxy.test_resumption import _identities

SERVER = "db.shop.example"


@dataclass
class Authority:
    """A trust anchor and the issuer under it, as meshagent's authority lays them out."""

    root: x509.Certificate
    issuer: x509.Certificate
    issuer_key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool,
    lifetime: timedelta = timedelta(hours=1),
    dns: str = "",
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _authority() -> Authority:
    """Every authority here has the same names: only the keys tell one from another."""
    root_key, issuer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _cert("mesh root", root_key, _name("mesh root"), root_key, ca=True)
    issuer = _cert("mesh issuer", issuer_key, root.subject, root_key, ca=True)
    return Authority(root, issuer, issuer_key)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _context(
    tmp: Path, name: str, ca: Authority, trusted: Authority, server_side: bool, lifetime: timedelta
) -> ssl.SSLContext:
    """A context presenting a leaf (SAN `SERVER`) from `ca`, trusting `trusted`'s anchor, with
    the cache installed."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert(name, key, ca.issuer.subject, ca.issuer_key, ca=False, lifetime=lifetime, dns=SERVER)
    (tmp / f"{name}.pem").write_bytes(_pem(leaf, ca.issuer))
    (tmp / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(tmp / f"{name}.pem", tmp / f"{name}.key")
    ctx.load_verify_locations(cadata=_pem(trusted.root).decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    assert verify_cache.install(ctx) is not None, "this Python's _ssl layout is the one the cache knows"
    return ctx


def _pair(
    tmp: Path, server_ca: Authority, client_ca: Authority, lifetime: timedelta = timedelta(hours=1)
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(client, server), each trusting the other's authority."""
    client = _context(tmp, "client", client_ca, server_ca, server_side=False, lifetime=lifetime)
    server = _context(tmp, "server", server_ca, client_ca, server_side=True, lifetime=lifetime)
    return client, server


def _stats(ctx: ssl.SSLContext) -> dict[str, int]:
    cache = verify_cache.cache_of(ctx)
    assert cache is not None
    return cache.stats()


def test_a_chain_seen_before_is_answered_from_the_cache_on_both_ends(tmp_path: Path) -> None:
    ca = _authority()
    client, server = _pair(tmp_path, ca, ca)
    for _ in range(3):
        c, s = handshake(client, server, SERVER)
        assert (c.getpeercert() or {}).get("subject") == ((("commonName", "server"),),)
        assert (s.getpeercert() or {}).get("subject") == ((("commonName", "client"),),)
    for ctx in (client, server):
        got = _stats(ctx)
        assert (got["misses"], got["hits"], got["entries"]) == (1, 2, 1), got


def test_a_cached_server_chain_does_not_pass_for_another_name(tmp_path: Path) -> None:
    ca = _authority()
    client, server = _pair(tmp_path, ca, ca)
    handshake(client, server, SERVER)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(client, server, "other.shop.example")
    assert _stats(client)["hits"] == 0
    handshake(client, server, SERVER)  # the right name: still from the cache
    assert _stats(client)["hits"] == 1


def test_a_look_alike_chain_from_another_authority_is_refused_after_a_cached_success(tmp_path: Path) -> None:
    """An impostor with the same names, SANs and chain shape, signed by other keys: a chain
    verified a moment ago with the same names does not vouch for it."""
    ca, impostor = _authority(), _authority()
    (tmp_path / "real").mkdir()
    client, server = _pair(tmp_path / "real", ca, ca)
    handshake(client, server, SERVER)
    handshake(client, server, SERVER)
    assert _stats(client)["hits"] == 1
    fake = tmp_path / "fake"
    fake.mkdir()
    fake_server = _context(fake, "server", impostor, ca, server_side=True, lifetime=timedelta(hours=1))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(client, fake_server, SERVER)
    assert _stats(client)["hits"] == 1


def test_a_cached_chain_is_verified_again_once_its_leaf_expires(tmp_path: Path) -> None:
    ca = _authority()
    client, server = _pair(tmp_path, ca, ca, lifetime=timedelta(seconds=2))
    handshake(client, server, SERVER)
    handshake(client, server, SERVER)
    assert _stats(client)["hits"] == 1
    time.sleep(2.5)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        handshake(client, server, SERVER)
    got = _stats(client)
    assert (got["hits"], got["entries"]) == (1, 0), got


def test_the_proxys_contexts_cache_and_a_reload_starts_empty(tmp_path: Path) -> None:
    """Credentials' server and client contexts carry the cache; a reload (a renewal, a new
    bundle) builds new contexts, whose caches start empty: a chain is verified against what the
    new contexts trust before it is cached."""
    a, b = _identities(tmp_path)
    web, db = Credentials.load(a, tickets=False), Credentials.load(b, tickets=False)
    for ctx in (web.client, web.client_opaque, db.server):
        assert verify_cache.cache_of(ctx) is not None
    for _ in range(2):
        ends = handshake(web.client, db.server, DB_NAME)
        for end in ends:  # nothing to read yet, and no error of the verification left queued
            with pytest.raises(ssl.SSLWantReadError):
                end.read(1)
    assert (_stats(web.client)["hits"], _stats(db.server)["hits"]) == (1, 1)
    old = db.server
    db.reload(b, b.load_info())
    assert db.server is not old
    handshake(web.client, db.server, DB_NAME)
    assert _stats(db.server)["misses"] == 1 and _stats(db.server)["hits"] == 0


def test_a_proxy_pair_counts_chains_verified_and_cached_on_both_ends(tmp_path: Path) -> None:
    """Through a real proxy pair with resumption off: the first connection verifies each end's
    peer chain in full, the next ones are answered from the caches; /status `handshakes` counts
    both, across a renewal (the replaced contexts' counts are kept)."""

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await world.start(app_port)
        a.settings = ListenerSettings(**{**a.settings.__dict__, "tls_resumption": False})
        port = a.listening["outbound"][1]
        for i in range(4):
            assert await request(port, f"req-{i}".encode()) == f"echo:req-{i}".encode()
        for proxy in (a, b):
            got = proxy.handshakes.status()
            assert (got["chains_verified"], got["chains_cached"]) == (1, 3), got
        store = IdentityStore(tmp_path / "b")
        b.credentials.reload(store, store.load_info())
        assert await request(port, b"after") == b"echo:after"
        got = b.handshakes.status()
        assert (got["chains_verified"], got["chains_cached"]) == (2, 3), got
        server.close()

    run(tmp_path, body)


def test_the_switch_off_verifies_every_chain_in_full(tmp_path: Path) -> None:
    """proxy.tls_verify_cache = false: no context gets a cache, and no count is reported."""
    a, b = _identities(tmp_path)
    web = Credentials.load(a, tickets=False, verify_cache=False)
    db = Credentials.load(b, tickets=False, verify_cache=False)
    for ctx in (web.client, web.client_opaque, web.server, db.server):
        assert verify_cache.cache_of(ctx) is None
    for _ in range(2):
        handshake(web.client, db.server, DB_NAME)
    db.reload(b, b.load_info())
    assert verify_cache.cache_of(db.server) is None
    assert web.chain_checks() == db.chain_checks() == {}
