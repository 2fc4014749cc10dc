"""The catalog of meshed destinations: which address and port expect which server identity.

Outbound, the original destination of a connection is looked up here; a hit means "originate
mTLS and insist the server proves this identity", a miss means "not meshed": pass through (or
refuse, by config). Entries come from the authority (enrolled hosts register their addresses
and ports; operators add in-cluster services) and from the local config.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class CatalogEntry:
    network: Network
    ports: frozenset[int]  # empty: every port
    identity: str  # the server's SPIFFE ID
    server_name: str  # its DNS name: SNI, and what its certificate must carry

    def matches(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        return ip in self.network and (not self.ports or port in self.ports)

    def to_doc(self) -> dict[str, Any]:
        return {
            "cidr": str(self.network),
            "ports": sorted(self.ports),
            "identity": self.identity,
            "server_name": self.server_name,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> CatalogEntry:
        try:
            ports = frozenset(int(p) for p in doc.get("ports", []))
            if any(not 0 < p < 65536 for p in ports):
                raise ValueError("port out of range")
            return cls(
                ipaddress.ip_network(str(doc["cidr"]), strict=False),
                ports,
                str(doc["identity"]),
                str(doc["server_name"]),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ConfigError(
                f"catalog entry {doc!r} is invalid: {what}",
                "an entry needs cidr, identity, server_name and optional ports",
            ) from None


class Catalog:
    """Lookup by (address, port): the most specific network wins."""

    def __init__(self, entries: list[CatalogEntry]) -> None:
        # Longest prefix first, so the first match is the most specific.
        self.entries = sorted(entries, key=lambda e: (-e.network.prefixlen, not e.ports))

    def lookup(self, address: str, port: int) -> CatalogEntry | None:
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for entry in self.entries:
            if entry.matches(ip, port):
                return entry
        return None

    def __len__(self) -> int:
        return len(self.entries)
