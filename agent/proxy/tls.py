"""TLS 1.3 contexts built from the host's identity, swapped in place on rotation.

`Credentials` holds the current server and client contexts. New connections read the
attributes when they start; open connections keep the SSLObject they were made with, so a
rotation never drops a connection (linkerd2-proxy's creds store does the same over a watch).

The server context offers the ALPN `transport.l5d.io/v1`: a linkerd2-proxy that offers it gets
it selected (and then sends the transport header); a client offering nothing or something else
gets no ALPN, and the handshake goes on. `client_opaque` offers it, for endpoints that expect
the header (linkerd2-proxy's tagged transport writes the header only once the server selected
the ALPN).

A peer's identity is read from its certificate's SPIFFE URI SAN or its mesh DNS SAN (a pod
certificate from Linkerd's identity controller has only the DNS SAN), mapped one to the other
(agent/identity/names.py).
"""

from __future__ import annotations

import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agent.identity.names import DEFAULT_MESH, SPIFFE_SCHEME, InvalidName, WorkloadIdentity
from agent.identity.store import IdentityInfo, IdentityStore
from agent.logs import get_logger

from .ticket_keys import new_ticket_key, set_ticket_key, ticket_key_name
from .transport_header import ALPN

log = get_logger("meshagent.proxy.tls")

try:  # compiled by setup.py with the relay; without it every handshake verifies the chain in full
    from . import verify_cache as _verify_cache
except ImportError:  # pragma: no cover - the build always makes it where the tests run
    _verify_cache = None  # type: ignore[assignment]


def _base(purpose: ssl.Purpose, store: IdentityStore, verify_cache: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # The generation directory, not the symlink: the three files are read as one consistent set.
    gen = store.current.resolve()
    ctx.load_cert_chain(gen / "cert.pem", gen / "key.pem")
    ctx.load_verify_locations(cafile=gen / "bundle.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    if verify_cache and _verify_cache is not None:  # a chain seen before is not verified again
        _verify_cache.install(ctx)
    return ctx


def server_context(
    store: IdentityStore, ticket_key: bytes | None = None, tickets: bool = True, verify_cache: bool = True
) -> ssl.SSLContext:
    """Terminates mTLS from mesh peers: a client certificate chaining to the bundle is required.

    `tickets`: one stateless TLS 1.3 ticket per full handshake, sealed with `ticket_key` (shared
    by every worker; None: the context's own random key), so a returning client resumes without
    the certificate exchange. Stateless: the server keeps no session cache (with OP_NO_TICKET,
    TLS 1.3 tickets are stateful and the cache held 150 MB under churn). A resumed session
    carries the client's certificate: identity, revocation and expiry are checked as on a full
    handshake (listeners.py). Off: no ticket, no cache, every handshake full.

    `verify_cache` (proxy.tls_verify_cache): client chains verified before are answered from
    the context's verification cache (verify_cache.pyx)."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, store, verify_cache)
    if tickets:
        ctx.num_tickets = 1
        if ticket_key is not None:
            set_ticket_key(ctx, ticket_key)
    else:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    # Selected only when the client offers it; otherwise no ALPN, and the handshake goes on.
    ctx.set_alpn_protocols([ALPN])
    return ctx


def client_context(store: IdentityStore, verify_cache: bool = True) -> ssl.SSLContext:
    """Originates mTLS: presents our certificate, verifies the server's chain and DNS name
    (`verify_cache`: as `server_context`'s)."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, store, verify_cache)
    ctx.check_hostname = True  # against server_hostname = the expected identity's DNS name
    return ctx


def client_opaque_context(store: IdentityStore, verify_cache: bool = True) -> ssl.SSLContext:
    """`client_context` offering the ALPN transport.l5d.io/v1, for an endpoint that expects
    Linkerd's transport header (its proxy port)."""
    ctx = client_context(store, verify_cache)
    ctx.set_alpn_protocols([ALPN])
    return ctx


@dataclass(frozen=True)
class PeerIdentity:
    """A verified peer's mesh identity in both forms. `dns_name` is how linkerd-proxy labels
    it (`client_id`/`server_id`); it is "" for a SPIFFE ID outside the /ns/NS/sa/NAME scheme,
    which has no DNS form."""

    spiffe_id: str
    dns_name: str

    @property
    def label(self) -> str:
        """The name metrics and logs show: the DNS form, else the SPIFFE ID."""
        return self.dns_name or self.spiffe_id


def peer_identity(cert: dict[str, Any] | None, mesh: str = DEFAULT_MESH) -> PeerIdentity | None:
    """The identity a verified peer certificate (`getpeercert()` form) proves, or None.

    Its SPIFFE URI SAN, or its mesh DNS SAN (`NAME.NS.serviceaccount.identity.MESH.TD`, all a
    Linkerd pod certificate has), each mapped to the other; a URI-only certificate gets the DNS
    form under `mesh`. DNS SANs that are not mesh names (host names) are ignored.

    None when the certificate names no mesh identity, and also when it names more than one:
    SANs that disagree (a URI for one workload and a DNS name for another, or two different
    URIs). Linkerd's servers would take the first SAN and SPIFFE peers the URI: the same
    certificate would be two different clients, so it is none.
    """
    if not cert:
        return None
    spiffe_ids: set[str] = set()
    dns_names: dict[str, str] = {}  # SPIFFE form -> DNS name as written in the certificate
    for kind, value in cert.get("subjectAltName", ()):
        if not isinstance(value, str):
            continue
        if kind == "URI" and value.startswith(SPIFFE_SCHEME):
            spiffe_ids.add(value)
        elif kind == "DNS" and ".serviceaccount.identity." in value:
            try:
                dns_names.setdefault(WorkloadIdentity.from_dns_name(value).spiffe_id, value)
            except InvalidName:
                continue
    named = spiffe_ids | set(dns_names)
    if len(named) != 1:
        return None
    (spiffe_id,) = named
    dns_name = dns_names.get(spiffe_id)
    if dns_name is None:
        try:
            dns_name = WorkloadIdentity.from_spiffe_id(spiffe_id, mesh).dns_name
        except InvalidName:
            dns_name = ""
    return PeerIdentity(spiffe_id, dns_name)


def peer_spiffe_id(cert: dict[str, Any] | None) -> str | None:
    """The SPIFFE form of a verified peer's identity (URI SAN or mesh DNS SAN), see `peer_identity`."""
    peer = peer_identity(cert)
    return peer.spiffe_id if peer is not None else None


def peer_identity_name(cert: dict[str, Any] | None) -> str | None:
    """The peer's identity as linkerd-proxy labels it (`client_id`/`server_id`): the mesh DNS
    name (`web.shop.serviceaccount.identity.linkerd.cluster.local`), else the SPIFFE ID. None
    exactly when `peer_spiffe_id` is None, so labels and decisions never disagree."""
    peer = peer_identity(cert)
    return peer.label if peer is not None else None


def verify_server_identity(cert: dict[str, Any] | None, expected_spiffe_id: str) -> str | None:
    """Outbound: None when the server's verified certificate proves `expected_spiffe_id` by
    either SAN form (a Linkerd pod has only the DNS SAN), else a short reason."""
    if not cert:
        return "no certificate"
    return wrong_server(peer_identity(cert), expected_spiffe_id)


def wrong_server(peer: PeerIdentity | None, expected_spiffe_id: str) -> str | None:
    """`verify_server_identity` from the identity the certificate proves (peer_certs.py)."""
    if peer is None:
        return "no single mesh identity in the certificate"
    if peer.spiffe_id != expected_spiffe_id:
        return f"the server proved {peer.spiffe_id}, not {expected_spiffe_id}"
    return None


@dataclass
class Credentials:
    """The contexts new connections use; replaced as a whole on rotation."""

    identity: IdentityInfo
    server: ssl.SSLContext
    client: ssl.SSLContext
    client_opaque: ssl.SSLContext  # offers ALPN transport.l5d.io/v1
    ticket_key: bytes | None = None  # None: the server context's own random key
    tickets: bool = True  # proxy.tls_resumption, server side
    verify_cache: bool = True  # proxy.tls_verify_cache
    retired_checks: Counter[str] = field(default_factory=Counter)  # replaced contexts' chain checks
    # Reloads run in a thread: the swap and the retired counts change together, under the lock.
    swap_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(
        cls,
        store: IdentityStore,
        ticket_key: bytes | None = None,
        tickets: bool = True,
        verify_cache: bool = True,
    ) -> Credentials:
        identity = store.load_info()
        return cls(
            identity,
            server_context(store, ticket_key, tickets, verify_cache),
            client_context(store, verify_cache),
            client_opaque_context(store, verify_cache),
            ticket_key,
            tickets,
            verify_cache,
        )

    @property
    def ticket_key_name(self) -> str:
        return ticket_key_name(self.ticket_key)

    def chain_checks(self) -> dict[str, int]:
        """Peer chains verified in full (`chains_verified`) and answered from the contexts'
        verification caches (`chains_cached`), since start: /status `handshakes`."""
        with self.swap_lock:
            total = Counter(self.retired_checks)
            for ctx in (self.server, self.client, self.client_opaque):
                total.update(_checks(ctx))
        return dict(total)

    def _retire(self, *contexts: ssl.SSLContext) -> None:
        """(Under `swap_lock`, with the swap of these contexts.)"""
        for ctx in contexts:
            self.retired_checks.update(_checks(ctx))

    def reload(self, store: IdentityStore, identity: IdentityInfo, ticket_key: bytes | None = None) -> None:
        """Swap in contexts for a renewed identity, after checking it is still us. Loading the
        chain also proves key and certificate match (OpenSSL refuses a mismatched pair).

        Tickets issued under the old identity or bundle must not resume: the new server context
        takes `ticket_key` (the supervisor's new key, the same in every worker) or, when none
        is given, a fresh one of its own. The caller then calls `Proxy.credentials_changed()`
        (client sessions belong to the old client contexts)."""
        if identity.workload != self.identity.workload:
            log.error(
                "tls.reload_refused",
                reason="identity changed",
                old=str(self.identity.workload),
                new=str(identity.workload),
            )
            return
        key = ticket_key if ticket_key is not None else (new_ticket_key() if self.ticket_key else None)
        try:
            server = server_context(store, key, self.tickets, self.verify_cache)
            client = client_context(store, self.verify_cache)
            client_opaque = client_opaque_context(store, self.verify_cache)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls.reload_refused", reason=str(exc))
            return
        with self.swap_lock:
            self._retire(self.server, self.client, self.client_opaque)
            self.identity, self.server, self.client = identity, server, client
            self.client_opaque = client_opaque
        self.ticket_key = key
        log.info(
            "tls.reloaded", serial=identity.summary.serial, not_after=identity.summary.not_after.isoformat()
        )

    def rotate_ticket_key(self, store: IdentityStore, key: bytes) -> None:
        """Seal and open tickets with `key` from now on; tickets under the old key get a full
        handshake. Only the server context changes (client sessions stay good). In place when
        the key can be set (`set_ticket_key`); else a new server context, whose new random key
        retires the old tickets all the same."""
        self.ticket_key = key
        if not self.tickets:
            return
        if set_ticket_key(self.server, key):
            log.info("tls.ticket_key_rotated", key=ticket_key_name(key))
            return
        try:
            server = server_context(store, key, self.tickets, self.verify_cache)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls.ticket_key_rotation_failed", reason=str(exc))
            return
        with self.swap_lock:
            self._retire(self.server)
            self.server = server
        log.info("tls.ticket_key_rotated", key=ticket_key_name(key), shared=False)


def _checks(ctx: ssl.SSLContext) -> dict[str, int]:
    cache = _verify_cache.cache_of(ctx) if _verify_cache is not None else None
    if cache is None:
        return {}
    got = cache.stats()
    return {"chains_verified": got["misses"] + got["bypassed"], "chains_cached": got["hits"]}
