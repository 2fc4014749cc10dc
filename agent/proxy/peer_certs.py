"""What a verified peer certificate says, read once per distinct certificate.

Every mTLS connection needs the same few facts of its peer's certificate: the mesh identity it
proves, its serial (revocation), its notAfter (a resumed session's expiry) and whether it has a
URI SAN. Read from `getpeercert()` they cost a dict built from the X509, SAN parsing, name
validation and a `time.strptime`, on every connection — yet a host's peers present the same few
certificates over and over. Here they are computed once per certificate and kept in a bounded
LRU keyed by the leaf's DER bytes (`getpeercert(binary_form=True)`: one i2d, no parse).

Why that is sound: the facts are a pure function of the certificate's bytes, and the key is
those bytes, so a cached entry can only be returned for the very certificate it was read from.
The cache decides nothing: OpenSSL still verifies the chain on every full handshake (a resumed
session carries the certificate verified when it was made), and the caller still compares
`not_after` with the clock and looks the serial and identity up in the revoked set on every
connection. Only connections made with a verifying context (CERT_REQUIRED, as all of tls.py's
are) may be looked up: `getpeercert()` returns {} otherwise, and that is never kept.
"""

from __future__ import annotations

import ssl
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from .revocation import cert_serial
from .tls import PeerIdentity, peer_identity

# Distinct peer certificates kept: a DER leaf (~1 KB) and its facts (~0.4 KB) each, so at most
# ~0.7 MB per worker; a host with more peers than this re-reads the least recently seen ones.
MAX_CERTS: Final = 512


@dataclass(frozen=True, slots=True)
class PeerCert:
    """The facts of one verified peer certificate."""

    identity: PeerIdentity | None
    """The mesh identity it proves (`tls.peer_identity`); None: none, or SANs that disagree."""
    serial: str | None
    """`revocation.normal_serial` form, as the revoked set lists serials."""
    not_after: float
    """notAfter as epoch seconds; 0.0 when the certificate has none readable (always expired)."""
    has_uri: bool
    """It carries a URI SAN (Linkerd's identity controller issues the DNS SAN alone)."""

    def expired(self, now: float) -> bool:
        return self.not_after <= now


NO_CERT: Final = PeerCert(None, None, 0.0, False)


def read_facts(cert: dict[str, Any] | None) -> PeerCert:
    """The facts of a certificate in `getpeercert()` form (the uncached reading)."""
    if not cert:
        return NO_CERT
    try:
        not_after = float(ssl.cert_time_to_seconds(cert["notAfter"]))
    except (KeyError, ValueError, TypeError):
        not_after = 0.0
    has_uri = any(kind == "URI" for kind, _ in cert.get("subjectAltName", ()))
    return PeerCert(peer_identity(cert), cert_serial(cert), not_after, has_uri)


class PeerCertCache:
    """At most `limit` certificates' facts, least recently seen dropped first."""

    def __init__(self, limit: int = MAX_CERTS) -> None:
        self.limit = limit
        self._entries: OrderedDict[bytes, PeerCert] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, sslobj: ssl.SSLObject) -> PeerCert:
        """The facts of the certificate `sslobj`'s peer presented (its handshake is done and
        verified), NO_CERT when it presented none or the connection's context verifies no peer
        (its certificate proves nothing there, even one another connection verified)."""
        der = sslobj.getpeercert(binary_form=True)
        if not der or sslobj.context.verify_mode == ssl.CERT_NONE:
            return NO_CERT
        entries = self._entries
        facts = entries.get(der)
        if facts is not None:
            entries.move_to_end(der)
            self.hits += 1
            return facts
        self.misses += 1
        cert = sslobj.getpeercert()
        facts = read_facts(cert)
        if cert:  # {}: a context that does not verify, whose answer must not serve others
            entries[der] = facts
            if len(entries) > self.limit:
                entries.popitem(last=False)
        return facts

    def clear(self) -> None:
        self._entries.clear()
