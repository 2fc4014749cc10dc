"""TLS session resumption, bounded (issue #19), and a proxy serving on sockets it is given.

Loopback, as tests/proxy/test_mtls_loopback.py: host A (web) dials out, host B (db) terminates.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.authority.ca import load_authority
from agent.authority.signing import issue_leaf, parse_csr
from agent.identity.names import WorkloadIdentity
from agent.identity.pki import generate_key, make_csr
from agent.identity.store import IdentityStore
from agent.proxy import session_offer, ticket_keys
from agent.proxy.catalog import Catalog
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import InboundPolicy
from agent.proxy.revocation import RevokedSet, cert_serial
from agent.proxy.session_offer import KeptSession
from agent.proxy.sessions import SessionCache
from agent.proxy.ticket_keys import new_ticket_key, set_ticket_key
from agent.proxy.tls import Credentials, client_context, client_opaque_context, peer_identity, server_context
from agent.proxy.transport_header import ALPN
from agent.telemetry.metrics import labels
from agent.telemetry.proxy_metrics import ProxyMetrics
from tests.proxy.memory_tls import handshake
from tests.proxy.test_mtls_loopback import DB, DB_NAME, WEB, World, echo_server, request, run
from tests.support import issue_identity

# --- TLS over memory BIOs: the contexts alone, no sockets ---------------------------------


def _identities(tmp: Path) -> tuple[IdentityStore, IdentityStore]:
    issue_identity(tmp / "authority", "shop/web", tmp / "a")
    issue_identity(tmp / "authority", "shop/db", tmp / "b")
    return IdentityStore(tmp / "a"), IdentityStore(tmp / "b")


def _connect(
    client: ssl.SSLContext,
    server: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    kept: KeptSession | None = None,
    read_ticket: bool = True,
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full (or resumed: `session` offered by CPython, `kept` as the proxy offers it) handshake
    to DB, then (`read_ticket`) one record from the server, which brings the client its ticket."""
    return handshake(client, server, DB_NAME, session, kept, read_ticket)


def test_stateless_tickets_keep_no_server_cache(tmp_path: Path) -> None:
    """Tickets without OP_NO_TICKET are stateless: the server caches nothing, however many
    sessions it hands out and resumes (a stateful cache grows by one per handshake: it held
    150 MB under churn). 1,000 handshakes, half of them offering the session just made."""
    a, b = _identities(tmp_path)
    client, server = client_context(a), server_context(b, new_ticket_key())
    offered = resumed = 0
    for _ in range(500):
        c, _ = _connect(client, server)
        assert c.session is not None and c.session.has_ticket
        c2, s2 = _connect(client, server, c.session)
        offered += 1
        resumed += s2.session_reused and c2.session_reused
    assert server.session_stats()["number"] == 0
    assert client.session_stats()["number"] == 0  # nor does the client: only SessionCache holds them
    assert resumed >= 0.99 * offered


def test_tickets_off_means_full_handshakes(tmp_path: Path) -> None:
    a, b = _identities(tmp_path)
    client, server = client_context(a), server_context(b, new_ticket_key(), tickets=False)
    c, _ = _connect(client, server)
    assert c.session is None or not c.session.has_ticket
    _, s2 = _connect(client, server, c.session)
    assert not s2.session_reused
    assert server.session_stats()["number"] == 0


def test_resumed_session_proves_the_same_identities(tmp_path: Path) -> None:
    a, b = _identities(tmp_path)
    client, server = client_context(a), server_context(b)
    c1, s1 = _connect(client, server)
    c2, s2 = _connect(client, server, c1.session)
    assert c2.session_reused and s2.session_reused
    client_seen, server_seen = peer_identity(s2.getpeercert()), peer_identity(c2.getpeercert())
    assert client_seen is not None and client_seen.spiffe_id == WEB
    assert server_seen is not None and server_seen.spiffe_id == DB
    assert cert_serial(s2.getpeercert()) == cert_serial(s1.getpeercert()) is not None
    assert cert_serial(c2.getpeercert()) == cert_serial(c1.getpeercert()) is not None
    assert (s2.getpeercert() or {}).get("notAfter") == (s1.getpeercert() or {}).get("notAfter") is not None


def test_resumed_session_selects_the_transport_alpn(tmp_path: Path) -> None:
    """An endpoint dialled for Linkerd's transport header must select its ALPN on a resumed
    session too (else the outbound proxy refuses it: transport_alpn_not_selected)."""
    a, b = _identities(tmp_path)
    client, server = client_opaque_context(a), server_context(b)
    c1, _ = _connect(client, server)
    c2, s2 = _connect(client, server, c1.session)
    assert s2.session_reused
    assert c2.selected_alpn_protocol() == s2.selected_alpn_protocol() == ALPN


def test_shared_ticket_key_resumes_across_contexts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers' contexts with one key resume each other's tickets; with different keys
    they do not (a full handshake, no error)."""
    a, b = _identities(tmp_path)
    client = client_context(a)
    key = new_ticket_key()
    w1, w2, other = server_context(b, key), server_context(b, key), server_context(b, new_ticket_key())
    c, _ = _connect(client, w1)
    _, s = _connect(client, w2, c.session)
    assert s.session_reused
    _, s = _connect(client, other, c.session)
    assert not s.session_reused
    # Contexts left with their own random keys do not share.
    own1, own2 = server_context(b), server_context(b)
    c, _ = _connect(client, own1)
    _, s = _connect(client, own2, c.session)
    assert not s.session_reused


class _ForeignLayout:
    """A libssl whose SSL_CTX does not read as the SSLContext it should be."""

    def get_options(self, ptr: int) -> int:
        return 0

    def ctrl(self, *args: Any) -> int:
        raise AssertionError("SSL_CTX_ctrl called on an unrecognized SSL_CTX")


def test_a_failed_guard_keeps_the_contexts_own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, b = _identities(tmp_path)
    ctx = server_context(b)
    assert set_ticket_key(ctx, new_ticket_key())
    monkeypatch.setattr(ticket_keys, "_openssl", _ForeignLayout())
    assert not set_ticket_key(ctx, new_ticket_key())
    with pytest.raises(ValueError, match="80 bytes"):
        set_ticket_key(ctx, b"short")


def test_rotated_ticket_key_forces_full_handshake(tmp_path: Path) -> None:
    a, b = _identities(tmp_path)
    client = client_context(a)
    worker0, worker1 = Credentials.load(b, new_ticket_key()), Credentials.load(b, new_ticket_key())
    c, _ = _connect(client, worker0.server)
    key = new_ticket_key()
    worker0.rotate_ticket_key(b, key)
    c2, s2 = _connect(client, worker0.server, c.session)
    assert not s2.session_reused and not c2.session_reused  # a full handshake, no error
    assert peer_identity(s2.getpeercert()) is not None
    # A ticket under the new key resumes, on every worker given that key.
    worker1.rotate_ticket_key(b, key)
    _, s3 = _connect(client, worker1.server, c2.session)
    assert s3.session_reused
    assert worker0.ticket_key_name == worker1.ticket_key_name == key[:4].hex()


def test_session_cache_is_bounded_and_bound_to_its_context(tmp_path: Path) -> None:
    a, b = _identities(tmp_path)
    client, server = client_context(a), server_context(b)
    c, _ = _connect(client, server)
    session = c.session
    assert session is not None
    cache = SessionCache(limit=3)
    now = time.time()
    for i in range(5):
        cache.put(("198.18.0.1", i, DB, None), KeptSession(session, client), client, now + 60, now=now)
    assert len(cache) == 3
    assert cache.get(("198.18.0.1", 0, DB, None), client, now=now) is None  # least recent: gone
    kept = cache.get(("198.18.0.1", 4, DB, None), client, now=now)
    assert kept is not None and kept.context is client
    # Another context's session is never offered (OpenSSL would refuse it), nor an expired one.
    assert cache.get(("198.18.0.1", 3, DB, None), client_context(a), now=now) is None
    assert cache.get(("198.18.0.1", 2, DB, None), client, now=now + 61) is None
    assert len(cache) == 1
    expired_cert = now - 1
    cache.put(("198.18.0.1", 9, DB, None), KeptSession(session, client), client, expired_cert, now=now)
    assert len(cache) == 1


def test_a_kept_session_resumes_after_its_connection_ended_without_close_notify(tmp_path: Path) -> None:
    """OpenSSL marks a session not resumable when a connection holding it is freed without
    close_notify (as a reset or an abort ends it). The kept copy is no connection's and every
    offer gives its connection a copy of its own, so the kept session keeps resuming; and it
    is offered without CPython's copy, which re-parses the server's certificate."""
    a, b = _identities(tmp_path)
    client, server = client_context(a), server_context(b)
    c, s = _connect(client, server)
    assert c.session is not None
    kept = KeptSession(c.session, client)
    assert kept.private, "the session's layout did not check out: CPython's costly copy is used"
    del c, s  # the first connection ends without close_notify
    gc.collect()
    for _ in range(3):
        # Each ends before the server's new ticket arrives (which would replace the session the
        # connection holds): had the offer handed over the kept session itself, this end would
        # mark it not resumable and the next round would make a full handshake.
        c, s = _connect(client, server, kept=kept, read_ticket=False)
        assert c.session_reused and s.session_reused
        assert peer_identity(s.getpeercert()) == peer_identity(_connect(client, server)[1].getpeercert())
        del c, s
        gc.collect()
    assert session_offer.fast() is True


def test_a_private_copy_that_cannot_be_offered_falls_back_to_cpython(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session layout that checks out with a socket layout that does not: CPython's copy."""
    a, b = _identities(tmp_path)
    client, server = client_context(a), server_context(b)
    c, _ = _connect(client, server)
    assert c.session is not None
    kept = KeptSession(c.session, client)
    assert kept.private
    monkeypatch.setattr(session_offer, "_socket_layout", False)  # as a failed socket check leaves it
    c2, s2 = _connect(client, server, kept=kept)
    assert c2.session_reused and s2.session_reused


def test_a_ticketed_session_is_kept_from_the_connection_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ticketed` finds the server's ticket without CPython's getter (which copies by encoding
    and decoding): None before the ticket arrives and from a server that sends none; the kept
    copy resumes. With the layout check failed, CPython's getter gives the same answer."""
    a, b = _identities(tmp_path)
    client, server = client_context(a), server_context(b)
    early, _ = _connect(client, server, read_ticket=False)
    assert session_offer.ticketed(early) is None  # the ticket has not been read yet
    silent, _ = _connect(client, server_context(b, tickets=False))
    assert session_offer.ticketed(silent) is None
    c, _ = _connect(client, server)
    kept = session_offer.ticketed(c)
    assert kept is not None and kept.private and kept.session is None and kept.context is client
    assert kept.ticket_lifetime_hint > 0
    del c
    gc.collect()
    c2, s2 = _connect(client, server, kept=kept)
    assert c2.session_reused and s2.session_reused
    monkeypatch.setattr(session_offer, "_socket_layout", False)
    standard = session_offer.ticketed(c2)
    assert standard is not None and standard.session is not None
    c3, s3 = _connect(client, server, kept=standard)
    assert c3.session_reused and s3.session_reused


def test_a_session_from_another_context_is_offered_the_standard_way(tmp_path: Path) -> None:
    a, b = _identities(tmp_path)
    client, server = client_context(a), server_context(b)
    c, _ = _connect(client, server)
    assert c.session is not None
    other = client_context(a)
    kept = KeptSession(c.session, other)
    assert not kept.private  # its layout check names `client`, not `other`: no pointer followed
    with pytest.raises(ValueError, match="different SSLContext"):  # CPython's own check
        _connect(other, server, kept=kept)


# --- through the proxies ------------------------------------------------------------------


def _resumed(proxy: Proxy, direction: str) -> int:
    assert proxy.metrics is not None
    metric = proxy.metrics.tls_resumed.child(labels(("direction", direction))).value
    assert metric == proxy.stats.handshakes[f"resumed_{direction}"]
    return int(metric)


async def _metered(world: World, app_port: int) -> tuple[Proxy, Proxy]:
    a, b = await world.start(app_port)
    a.metrics, b.metrics = ProxyMetrics(), ProxyMetrics()
    return a, b


def test_outbound_resumes_through_the_proxy(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await _metered(world, app_port)
        port = a.listening["outbound"][1]
        for i in range(20):
            assert await request(port, f"req-{i}".encode()) == f"echo:req-{i}".encode()
        assert _resumed(a, "outbound") >= 19
        assert _resumed(b, "inbound") >= 19
        assert len(a.sessions) == 1
        assert b.credentials.server.session_stats()["number"] == 0
        server.close()

    run(tmp_path, body)


def test_resumption_off_makes_full_handshakes(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await _metered(world, app_port)
        a.settings = ListenerSettings(**{**a.settings.__dict__, "tls_resumption": False})
        port = a.listening["outbound"][1]
        for _ in range(3):
            assert await request(port, b"hi") == b"echo:hi"
        assert _resumed(a, "outbound") == _resumed(b, "inbound") == 0
        assert len(a.sessions) == 0
        server.close()

    run(tmp_path, body)


def test_revoked_client_cannot_resume(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await _metered(world, app_port)
        port = a.listening["outbound"][1]
        for _ in range(2):
            assert await request(port, b"hi") == b"echo:hi"
        assert _resumed(b, "inbound") == 1 and len(a.sessions) == 1
        b.set_revoked(RevokedSet(identities=frozenset({WEB})))
        assert await request(port, b"hi") == b""
        # The session was offered and resumed (OpenSSL counts the hit), then refused.
        assert b.credentials.server.session_stats()["hits"] == 2
        assert b.stats.refused["inbound:peer_revoked"] == 1
        assert _resumed(b, "inbound") == 1  # counted once the checks passed
        a.set_revoked(RevokedSet(identities=frozenset({DB})))
        assert len(a.sessions) == 0
        server.close()

    run(tmp_path, body)


def test_rotated_away_identity_cannot_resume(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await _metered(world, app_port)
        port = a.listening["outbound"][1]
        for _ in range(2):
            assert await request(port, b"hi") == b"echo:hi"
        old = a.credentials.identity.summary.serial
        # A renews: its sessions were made under the old certificate.
        fresh = issue_identity(tmp_path / "authority", "shop/web", tmp_path / "a")
        a.credentials.reload(IdentityStore(tmp_path / "a"), fresh)
        a.credentials_changed()
        assert len(a.sessions) == 0
        # B refuses the old serial: the next connection proves the new one in a full handshake.
        b.set_revoked(RevokedSet(serials=frozenset({old})))
        assert await request(port, b"hi") == b"echo:hi"
        assert _resumed(b, "inbound") == 1
        # B renews: its new server context has a new ticket key, A's session gets a full handshake.
        assert await request(port, b"hi") == b"echo:hi"
        assert _resumed(b, "inbound") == 2
        b_fresh = issue_identity(tmp_path / "authority", "shop/db", tmp_path / "b")
        b.credentials.reload(IdentityStore(tmp_path / "b"), b_fresh)
        b.credentials_changed()
        assert await request(port, b"hi") == b"echo:hi"
        assert _resumed(b, "inbound") == 2
        assert _resumed(a, "outbound") == 2
        server.close()

    run(tmp_path, body)


def test_a_failed_offer_drops_the_session(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await _metered(world, app_port)
        port = a.listening["outbound"][1]
        assert await request(port, b"hi") == b"echo:hi"
        assert len(a.sessions) == 1
        await b.stop(0.1)  # B is gone: the offered session's connection fails
        assert await request(port, b"hi") == b""
        assert a.stats.failures["outbound_tls"] == 1
        assert len(a.sessions) == 0
        server.close()

    run(tmp_path, body)


def _short_lived(tmp: Path, name: str, identity: str, lifetime_s: int) -> IdentityStore:
    """An identity from the World's authority whose certificate lives `lifetime_s` seconds."""
    material = load_authority(tmp / "authority")
    key = generate_key()
    csr = parse_csr(make_csr(key).decode())
    workload = WorkloadIdentity.parse_short(identity, material.settings.trust_domain)
    leaf = issue_leaf(material, workload, csr, datetime.now(UTC), timedelta(seconds=lifetime_s))
    store = IdentityStore(tmp / name)
    store.save(key, [leaf, *material.chain_tail], list(material.trust_bundle))
    return store


def test_expired_client_cert_cannot_resume(tmp_path: Path) -> None:
    """OpenSSL resumes a session whose client certificate has expired since: the proxy refuses
    it (`resumed_identity_expired`)."""

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        a, b = await _metered(world, app_port)
        store = _short_lived(tmp_path, "a-short", "shop/web", 3)
        a.credentials = Credentials.load(store)
        port = a.listening["outbound"][1]
        assert await request(port, b"hi") == b"echo:hi"  # a full handshake: the cert is valid
        assert len(a.sessions) == 1
        not_after = a.credentials.identity.summary.not_after.timestamp()
        await asyncio.sleep(max(0.0, not_after - time.time()) + 0.2)  # the certificate has expired
        assert time.time() > not_after
        assert await request(port, b"hi") == b""
        assert b.credentials.server.session_stats()["hits"] == 1  # resumed by OpenSSL, then refused
        assert b.stats.refused["inbound:resumed_identity_expired"] == 1
        assert _resumed(b, "inbound") == 0
        server.close()

    run(tmp_path, body)


def _reuseport_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def test_proxy_start_on_given_sockets(tmp_path: Path) -> None:
    """A worker's proxy serves on the supervisor's bound sockets: it binds nothing itself, and its
    stop closes only its own copies (the supervisor's stay open, their port still bound)."""

    async def body(world: World) -> None:
        server, app_port = await echo_server()
        _, b = await world.start(app_port)
        b_in = b.listening["inbound"][1]
        inbound, outbound = _reuseport_socket(), _reuseport_socket()
        kept = socket.socket(fileno=socket.dup(outbound.fileno()))  # the supervisor's copy
        a = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 1), outbound=("127.0.0.1", 1)),
            Credentials.load(IdentityStore(world.tmp / "a")),
            InboundPolicy(),
            world.proxies[0].catalog,
            lambda sock: ("127.0.0.1", b_in),
        )
        await a.start(sockets={"inbound": [inbound], "outbound": [outbound]})
        try:
            port = outbound.getsockname()[1]
            assert a.listening["outbound"] == ("127.0.0.1", port)
            assert a.listening["inbound"] == ("127.0.0.1", inbound.getsockname()[1])
            assert await request(port, b"hi") == b"echo:hi"
            assert a.stats.opened["outbound:mtls"] == 1
        finally:
            await a.stop(0.5)
        # The supervisor's copy still listens: a new connection is queued, not refused.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        kept.close()
        server.close()

    run(tmp_path, body)


def test_proxy_start_without_a_direction_refuses(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = Proxy(
            ListenerSettings(),
            Credentials.load(IdentityStore(world.tmp / "a")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", 1),
        )
        sock = _reuseport_socket()
        try:
            await a.start(sockets={"inbound": [sock]})
        except ValueError as exc:
            assert "outbound" in str(exc)
        else:
            raise AssertionError("started without an outbound socket")
        finally:
            await a.stop(0.1)

    run(tmp_path, body)
