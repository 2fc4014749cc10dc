"""The catalog of meshed destinations: which address and port expect which server identity.

Outbound, the original destination of a connection is looked up here; a hit means "originate
mTLS and insist the server proves this identity", a miss means "not meshed": pass through (or
refuse, by config). Entries come from the authority (enrolled hosts register their addresses
and ports; operators add in-cluster services) and from the local config.

An entry's identity is read in either form (SPIFFE ID or mesh DNS name) and kept as the SPIFFE
ID; the server is verified by whichever SAN form its certificate has (agent/proxy/tls.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError
from agent.identity.names import SPIFFE_SCHEME, InvalidName, WorkloadIdentity

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class CatalogEntry:
    network: Network
    ports: frozenset[int]  # empty: every port
    identity: str  # the server's SPIFFE ID
    server_name: str  # its DNS name: SNI, and what its certificate must carry
    # This endpoint expects Linkerd's transport header on this proxy port (ALPN
    # transport.l5d.io/v1): dial it there and name the original port in the header.
    opaque_port: int | None = None

    def matches(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        return ip in self.network and (not self.ports or port in self.ports)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "cidr": str(self.network),
            "ports": sorted(self.ports),
            "identity": self.identity,
            "server_name": self.server_name,
        }
        if self.opaque_port is not None:
            doc["opaque_port"] = self.opaque_port
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> CatalogEntry:
        """`identity` is a SPIFFE ID or a mesh DNS name; `server_name` defaults to the DNS form
        of a workload identity; `opaque_port` (1-65535) is optional."""
        try:
            ports = frozenset(int(p) for p in doc.get("ports", []))
            if any(not 0 < p < 65536 for p in ports):
                raise ValueError("port out of range")
            identity, server_name = _identity(str(doc["identity"]), doc.get("server_name"))
            return cls(
                ipaddress.ip_network(str(doc["cidr"]), strict=False),
                ports,
                identity,
                server_name,
                _opaque_port(doc.get("opaque_port")),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ConfigError(
                f"catalog entry {doc!r} is invalid: {what}",
                "an entry needs cidr, identity (SPIFFE ID or mesh DNS name) and optional "
                "server_name, ports and opaque_port",
            ) from None


def _identity(identity: str, server_name: Any) -> tuple[str, str]:
    """(SPIFFE ID, server name): a DNS-form identity is mapped to its SPIFFE ID; a SPIFFE ID
    outside the workload scheme is kept as written, and then needs its server name given."""
    workload: WorkloadIdentity | None = None
    try:
        workload = WorkloadIdentity.parse_any(identity)
    except InvalidName as exc:
        if not identity.startswith(SPIFFE_SCHEME):
            raise ValueError(exc.message) from None
    if server_name is None:
        if workload is None:
            raise KeyError("server_name")
        server_name = workload.dns_name
    return (workload.spiffe_id if workload is not None else identity), str(server_name)


def _opaque_port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"opaque_port {value!r} is not a port number (1-65535)")
    return value


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
