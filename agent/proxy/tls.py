"""TLS 1.3 contexts built from the host's identity, swapped in place on rotation.

`Credentials` holds the current server and client contexts. New connections read the
attributes when they start; open connections keep the SSLObject they were made with, so a
rotation never drops a connection (linkerd2-proxy's creds store does the same over a watch).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from agent.identity.store import IdentityInfo, IdentityStore
from agent.logs import get_logger

log = get_logger("meshagent.proxy.tls")


def _base(purpose: ssl.Purpose, store: IdentityStore) -> ssl.SSLContext:
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
    return ctx


def server_context(store: IdentityStore) -> ssl.SSLContext:
    """Terminates mTLS from mesh peers: a client certificate chaining to the bundle is required."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, store)
    ctx.options |= ssl.OP_NO_TICKET  # mesh peers reconnect rarely; tickets would outlive rotations
    # TLS 1.3 servers still issue tickets and cache each session (with the client's certificate)
    # unless told not to: under connection churn that cache held 150 MB (found by the benchmark).
    ctx.num_tickets = 0
    return ctx


def client_context(store: IdentityStore) -> ssl.SSLContext:
    """Originates mTLS: presents our certificate, verifies the server's chain and DNS name."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, store)
    ctx.check_hostname = True  # against server_hostname = the expected identity's DNS name
    return ctx


def peer_spiffe_id(cert: dict[str, Any] | None) -> str | None:
    """The URI SAN of a verified peer certificate (`getpeercert()` form), if it is a SPIFFE ID."""
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and isinstance(value, str) and value.startswith("spiffe://"):
            return value
    return None


def peer_identity_name(cert: dict[str, Any] | None) -> str | None:
    """The peer's identity as linkerd-proxy labels it (`client_id`/`server_id`): the mesh DNS
    name (`web.shop.serviceaccount.identity.linkerd.cluster.local`), else the SPIFFE ID."""
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS" and isinstance(value, str) and ".serviceaccount.identity." in value:
            return value
    return peer_spiffe_id(cert)


@dataclass
class Credentials:
    """The contexts new connections use; replaced as a whole on rotation."""

    identity: IdentityInfo
    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def load(cls, store: IdentityStore) -> Credentials:
        identity = store.load_info()
        return cls(identity, server_context(store), client_context(store))

    def reload(self, store: IdentityStore, identity: IdentityInfo) -> None:
        """Swap in contexts for a renewed identity, after checking it is still us. Loading the
        chain also proves key and certificate match (OpenSSL refuses a mismatched pair)."""
        if identity.workload != self.identity.workload:
            log.error(
                "tls.reload_refused",
                reason="identity changed",
                old=str(self.identity.workload),
                new=str(identity.workload),
            )
            return
        try:
            server, client = server_context(store), client_context(store)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls.reload_refused", reason=str(exc))
            return
        self.identity, self.server, self.client = identity, server, client
        log.info(
            "tls.reloaded", serial=identity.summary.serial, not_after=identity.summary.not_after.isoformat()
        )
