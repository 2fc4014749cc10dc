"""What the data plane routes and authorizes by, merged from the authority and the local config.

The authority's `/v1/host/config` document (catalog + this host's policy + the cluster's
discovered Services + the revoked peers) is parsed here into a `Catalog`, an `InboundPolicy`,
a `ServiceTable` and a `RevokedSet`.
Local settings give the defaults; a policy the authority sets for a port (or as default) wins,
so operators steer a fleet from one place. Pure: the daemon fetches and caches the document.

Entry by entry: an entry that does not parse is left out and reported in `rejected`, every
valid one still applies. One bad address in the fleet's catalog must never freeze every
host's catalog and policy (a `deny` set afterwards would otherwise never arrive).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.errors import ConfigError

from .catalog import Catalog, CatalogEntry
from .policy import DefaultPolicy, InboundPolicy, PortPolicy
from .revocation import RevokedSet, parse_revoked
from .routes import RouteTable, parse_routes
from .services import ServiceTable, parse_services

_SHOWN = 200  # characters of a rejected entry kept for logs and /status


@dataclass(frozen=True)
class Rejected:
    """One entry of the authority's document that was left out, and why."""

    where: str  # "catalog[3]", "policy.ports[5432]", "services[2].endpoints[0]", "routes[3].routes[0]", ...
    entry: str  # the entry as received (repr, cut to _SHOWN characters)
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "entry": self.entry, "reason": self.reason}


@dataclass(frozen=True)
class Directory:
    catalog: Catalog
    policy: InboundPolicy
    rejected: tuple[Rejected, ...] = ()
    services: ServiceTable = field(default_factory=ServiceTable.empty)
    # Peers the authority revoked: refused at the handshake, their open connections cut.
    revoked: RevokedSet = field(default_factory=RevokedSet.empty)
    # Route policy per destination (design-21 §3.3); bad items are in `rejected`, never raised.
    routes: RouteTable = field(default_factory=RouteTable.empty)


def port_policy(doc: Any) -> PortPolicy:
    try:
        allow = doc.get("allow", [])
        if not isinstance(allow, list):
            raise TypeError("allow must be a list")
        return PortPolicy(DefaultPolicy(doc["default"]), tuple(str(a) for a in allow))
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(f"policy {doc!r} is invalid: {what}") from None


def _shown(doc: Any) -> str:
    text = repr(doc)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def merge(
    local_catalog: list[CatalogEntry], local_policy: InboundPolicy, remote: dict[str, Any] | None
) -> Directory:
    """Local entries and policy, overlaid with every valid entry of the authority's document."""
    entries = list(local_catalog)
    default, ports = local_policy.default, dict(local_policy.ports)
    rejected: list[Rejected] = []
    services = ServiceTable.empty()
    revoked = RevokedSet.empty()
    routes = RouteTable.empty()

    def reject(where: str, doc: Any, reason: str) -> None:
        rejected.append(Rejected(where, _shown(doc), reason))

    if remote is not None:
        catalog = remote.get("catalog") or []
        if not isinstance(catalog, list):
            reject("catalog", catalog, "the catalog must be a list of entries")
            catalog = []
        for i, doc in enumerate(catalog):
            try:
                entries.append(CatalogEntry.from_doc(doc))
            except ConfigError as exc:
                reject(f"catalog[{i}]", doc, exc.message.rpartition(" is invalid: ")[2])
        policy = remote.get("policy") or {}
        if not isinstance(policy, dict):
            reject("policy", policy, "the policy must be an object")
            policy = {}
        if "default" in policy:
            try:
                default = port_policy(policy["default"])
            except ConfigError as exc:
                reject("policy.default", policy["default"], exc.message.rpartition(" is invalid: ")[2])
        port_docs = policy.get("ports") or {}
        if not isinstance(port_docs, dict):
            reject("policy.ports", port_docs, "ports must be an object keyed by port number")
            port_docs = {}
        for key, doc in port_docs.items():
            try:
                port = int(key)
                if not 0 < port < 65536:
                    raise ValueError
            except (ValueError, TypeError):
                reject(f"policy.ports[{key!r}]", doc, f"{key!r} is not a port number (1-65535)")
                continue
            try:
                ports[port] = port_policy(doc)
            except ConfigError as exc:
                reject(f"policy.ports[{port}]", doc, exc.message.rpartition(" is invalid: ")[2])
        services = parse_services(remote.get("services"), reject)
        revoked = parse_revoked(remote.get("revoked"), reject)
        routes = parse_routes(remote.get("routes"), reject, services)
    policy_merged = InboundPolicy(default, ports)
    return Directory(Catalog(entries), policy_merged, tuple(rejected), services, revoked, routes)
