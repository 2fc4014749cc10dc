"""Verified peer certificates' facts, read once per certificate (agent/proxy/peer_certs.py).

The cache keys by the leaf's DER: a different certificate (another identity, or the same one
renewed) gets its own facts, the bound holds, a non-verifying context never fills it, and the
checks made with the facts (expiry, revocation) still run on every connection.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import Any

from agent.identity.store import IdentityStore
from agent.proxy.peer_certs import NO_CERT, PeerCertCache, read_facts
from agent.proxy.revocation import RevokedSet, normal_serial
from agent.proxy.tls import Credentials, client_context, server_context
from tests.proxy.memory_tls import handshake
from tests.proxy.test_mtls_loopback import DB, DB_NAME, WEB, World, echo_server, request, run
from tests.proxy.test_resumption import _short_lived
from tests.support import issue_identity

API = "spiffe://cluster.local/ns/shop/sa/api"


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full TLS 1.3 handshake over memory BIOs: (client side, server side)."""
    return handshake(client, server, DB_NAME if client.check_hostname else None)


def _stores(tmp: Path, *names: str) -> dict[str, IdentityStore]:
    for name in names:
        issue_identity(tmp / "authority", f"shop/{name}", tmp / name)
    return {name: IdentityStore(tmp / name) for name in names}


def test_facts_are_read_once_and_match_the_certificate(tmp_path: Path) -> None:
    stores = _stores(tmp_path, "web", "db")
    server = server_context(stores["db"])
    cache = PeerCertCache()
    _c, first = _handshake(client_context(stores["web"]), server)
    facts = cache.lookup(first)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    # The same facts the uncached reading gives, and what the certificate says.
    cert: dict[str, Any] = first.getpeercert() or {}
    assert facts == read_facts(cert)
    assert facts.identity is not None and facts.identity.spiffe_id == WEB
    assert facts.identity.label == "web.shop.serviceaccount.identity.linkerd.cluster.local"
    assert facts.serial == normal_serial(cert["serialNumber"])
    assert facts.serial == stores["web"].load_info().summary.serial
    assert facts.not_after == ssl.cert_time_to_seconds(cert["notAfter"])
    assert facts.has_uri
    # A new connection with the same certificate: served from the cache.
    _c, again = _handshake(client_context(stores["web"]), server)
    assert cache.lookup(again) is facts
    assert (cache.hits, cache.misses) == (1, 1)


def test_a_different_certificate_gets_its_own_facts(tmp_path: Path) -> None:
    stores = _stores(tmp_path, "web", "db", "api")
    server = server_context(stores["db"])
    cache = PeerCertCache()
    web = cache.lookup(_handshake(client_context(stores["web"]), server)[1])
    api = cache.lookup(_handshake(client_context(stores["api"]), server)[1])
    assert web.identity is not None and web.identity.spiffe_id == WEB
    assert api.identity is not None and api.identity.spiffe_id == API
    assert api.serial != web.serial
    # The same identity renewed: a new certificate, a new serial (revocation by serial sees it).
    issue_identity(tmp_path / "authority", "shop/web", tmp_path / "web")
    renewed = cache.lookup(_handshake(client_context(stores["web"]), server)[1])
    assert renewed.identity == web.identity
    assert renewed.serial != web.serial
    assert renewed.serial == stores["web"].load_info().summary.serial
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 3)
    # The client side reads the server's certificate the same way.
    client_side, _s = _handshake(client_context(stores["web"]), server)
    db = cache.lookup(client_side)
    assert db.identity is not None and db.identity.spiffe_id == DB


def test_the_cache_is_bounded_least_recently_seen_first(tmp_path: Path) -> None:
    stores = _stores(tmp_path, "web", "db", "api")
    server = server_context(stores["db"])
    cache = PeerCertCache(limit=2)

    def look(name: str) -> None:
        cache.lookup(_handshake(client_context(stores[name]), server)[1])

    look("web")
    look("api")
    look("web")  # a hit: web is now the most recently seen
    look("db")  # a third certificate: api, the least recently seen, is dropped
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 3)
    look("web")
    assert (cache.hits, cache.misses) == (2, 3)
    look("api")  # read again
    assert (cache.hits, cache.misses, len(cache)) == (2, 4, 2)


def test_a_context_that_does_not_verify_never_fills_the_cache(tmp_path: Path) -> None:
    stores = _stores(tmp_path, "web", "db")
    lax = client_context(stores["web"])
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    cache = PeerCertCache()
    client_side, _s = _handshake(lax, server_context(stores["db"]))
    assert client_side.getpeercert(binary_form=True)  # the server did present one
    assert cache.lookup(client_side) == NO_CERT
    assert len(cache) == 0
    # Nor is it served what another connection verified: the same server certificate, once
    # verified and cached, still proves nothing on a connection that verifies no peer.
    verified, _s2 = _handshake(client_context(stores["web"]), server_context(stores["db"]))
    assert cache.lookup(verified).identity is not None and len(cache) == 1
    assert verified.getpeercert(binary_form=True) == client_side.getpeercert(binary_form=True)
    assert cache.lookup(client_side) is NO_CERT
    # A server that asks for no client certificate: none to read.
    plain = server_context(stores["db"])
    plain.verify_mode = ssl.CERT_NONE
    _c, server_side = _handshake(client_context(stores["web"]), plain)
    assert cache.lookup(server_side) is NO_CERT
    assert read_facts(None) is NO_CERT and NO_CERT.expired(time.time())


def test_an_expired_certificate_is_refused_although_its_facts_are_cached(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await world.start(app_port)
        a.credentials = Credentials.load(_short_lived(tmp_path, "a-short", "shop/web", 2))
        port = a.listening["outbound"][1]
        assert await request(port, b"hi") == b"echo:hi"  # full handshake: facts read and kept
        assert await request(port, b"hi") == b"echo:hi"  # resumed, facts from the cache
        assert (b.peer_certs.misses, b.peer_certs.hits) == (1, 1)
        not_after = a.credentials.identity.summary.not_after.timestamp()
        await asyncio.sleep(max(0.0, not_after - time.time()) + 0.2)
        assert await request(port, b"hi") == b""  # resumed by OpenSSL, refused by the clock
        assert (b.peer_certs.misses, b.peer_certs.hits) == (1, 2)
        assert b.stats.refused["inbound:resumed_identity_expired"] == 1
        server.close()

    run(tmp_path, body)


def test_a_revoked_serial_is_refused_on_the_next_connection(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await world.start(app_port)
        port = a.listening["outbound"][1]
        for _ in range(2):
            assert await request(port, b"hi") == b"echo:hi"
        assert b.peer_certs.hits == 1 and a.peer_certs.hits == 1
        # Inbound: B revokes A's certificate by serial; A's next connection is refused.
        b.set_revoked(RevokedSet(serials=frozenset({a.credentials.identity.summary.serial})))
        assert await request(port, b"hi") == b""
        assert b.stats.refused["inbound:peer_revoked"] == 1
        assert b.peer_certs.hits == 2  # the facts came from the cache; the check ran all the same
        b.set_revoked(RevokedSet.empty())
        assert await request(port, b"hi") == b"echo:hi"
        # Outbound: A revokes B's certificate by serial; A refuses it.
        a.set_revoked(RevokedSet(serials=frozenset({b.credentials.identity.summary.serial})))
        assert await request(port, b"hi") == b""
        assert a.stats.refused["outbound:peer_revoked"] == 1
        server.close()

    run(tmp_path, body)
