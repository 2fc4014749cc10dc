"""Peers the authority revoked, and the open connections to cut when it does.

The authority's directory lists revoked hosts (`revoked`, interfaces §2): a whole identity when
no unrevoked host holds it any more, else only the revoked certificates' serials (hosts that
share a service account keep working). `RevokedSet` answers "is this verified peer revoked?"
at the end of each mTLS handshake, inbound (client certificate) and outbound (server
certificate): two set lookups per handshake, nothing per byte. The revoked host's addresses
are listed too: the authority drops it from the catalog, so without them a new connection to
it would pass through as unmeshed instead of being refused.

`PeerConnections` remembers each open mTLS connection's peer (a dict insert when it is
established, a pop when it closes) so a new `RevokedSet` can find and close the matching ones
without scanning every socket's certificate.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agent.identity.names import SPIFFE_SCHEME, InvalidName, WorkloadIdentity

if TYPE_CHECKING:
    from .relay import Leg

Direction = Literal["inbound", "outbound"]
Reject = Callable[[str, Any, str], None]  # (where, entry, reason), as directory.merge's

# A SPIFFE ID as the peers' certificates carry it: printable ASCII without spaces.
_SPIFFE = re.compile(r"spiffe://[!-~]{1,2000}")
_HEX = re.compile(r"[0-9a-fA-F]{1,80}")  # X.509 serials are at most 20 octets; leave slack


def normal_serial(text: str) -> str:
    """A certificate serial in the one form compared: lowercase hex without leading zeros (the
    authority writes `format(n, "x")`; `getpeercert()` writes uppercase, whole octets)."""
    return format(int(text, 16), "x")


@dataclass(frozen=True)
class RevokedSet:
    """Revoked identities (SPIFFE form), certificate serials (normal_serial form) and the
    revoked hosts' addresses (outbound connections there that no catalog entry claims)."""

    identities: frozenset[str] = frozenset()
    serials: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()

    @classmethod
    def empty(cls) -> RevokedSet:
        return _EMPTY

    def __bool__(self) -> bool:
        return bool(self.identities or self.serials or self.addresses)

    def match(self, spiffe_id: str | None, serial: str | None) -> str | None:
        """Why a verified peer is revoked ("identity" or "serial"), or None when it is not."""
        if spiffe_id is not None and spiffe_id in self.identities:
            return "identity"
        if serial is not None and serial in self.serials:
            return "serial"
        return None


_EMPTY = RevokedSet()


def cert_serial(cert: dict[str, Any] | None) -> str | None:
    """The serial of a verified peer certificate (`getpeercert()` form), normalized."""
    value = (cert or {}).get("serialNumber")
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        return None
    return normal_serial(value)


def _identity(value: Any) -> str:
    """The SPIFFE form of a listed identity (a SPIFFE ID, or a mesh DNS name mapped to it)."""
    if not isinstance(value, str):
        raise ValueError("identity must be a string")
    if value.startswith(SPIFFE_SCHEME):
        if not _SPIFFE.fullmatch(value):
            raise ValueError(f"{value[:80]!r} is not a SPIFFE ID")
        return value
    try:
        return WorkloadIdentity.from_dns_name(value).spiffe_id
    except InvalidName as exc:
        raise ValueError(exc.message) from None


def _addresses(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError("addresses must be a list of IP addresses")
    try:
        return [str(ipaddress.ip_address(a)) for a in value]
    except ValueError:
        raise ValueError("addresses must be a list of IP addresses") from None


def parse_revoked(doc: Any, reject: Reject) -> RevokedSet:
    """The directory's `revoked` list: [{"identity"?: ..., "serials": [...], "addresses": [...],
    "revoked_at": ...}].
    An entry that does not parse is left out and reported through `reject`; the others apply
    (one bad entry must not un-revoke every other host). Absent or null: nothing revoked."""
    if doc is None:
        return RevokedSet.empty()
    if not isinstance(doc, list):
        reject("revoked", doc, "revoked must be a list of entries")
        return RevokedSet.empty()
    identities: set[str] = set()
    serials: set[str] = set()
    addresses: set[str] = set()
    for i, entry in enumerate(doc):
        try:
            if not isinstance(entry, dict):
                raise ValueError("an entry must be an object")
            identity = entry.get("identity")
            found = _identity(identity) if identity is not None else None
            listed = entry.get("serials") or []
            if not isinstance(listed, list) or not all(
                isinstance(s, str) and _HEX.fullmatch(s) for s in listed
            ):
                raise ValueError("serials must be a list of hexadecimal strings")
            hosts = _addresses(entry.get("addresses") or [])
            if found is None and not listed:
                raise ValueError("an entry names an identity, serials or both")
        except ValueError as exc:
            reject(f"revoked[{i}]", entry, str(exc))
            continue
        if found is not None:
            identities.add(found)
        serials.update(normal_serial(s) for s in listed)
        addresses.update(hosts)
    if not identities and not serials and not addresses:
        return RevokedSet.empty()
    return RevokedSet(frozenset(identities), frozenset(serials), frozenset(addresses))


@dataclass(frozen=True, slots=True)
class PeerConnection:
    """What a cut needs to know of an open mTLS connection: who the peer proved to be."""

    direction: Direction
    spiffe_id: str | None
    serial: str | None
    label: str  # the name logs and metrics show (DNS form, else SPIFFE ID)
    remote: str  # the peer's address, for the log line


class PeerConnections:
    """Open mTLS connections by their TLS leg."""

    def __init__(self) -> None:
        self._open: dict[Leg, PeerConnection] = {}

    def add(self, leg: Leg, connection: PeerConnection) -> None:
        self._open[leg] = connection

    def discard(self, leg: Leg) -> None:
        self._open.pop(leg, None)

    def __len__(self) -> int:
        return len(self._open)

    def revoked(self, revoked: RevokedSet) -> Iterator[tuple[Leg, PeerConnection, str]]:
        """The open connections `revoked` matches: (TLS leg, connection, reason). A snapshot:
        the caller may close them (and so discard them) while iterating."""
        if not revoked:
            return
        for leg, conn in list(self._open.items()):
            reason = revoked.match(conn.spiffe_id, conn.serial)
            if reason is not None:
                yield leg, conn, reason
