"""What the data plane routes and authorizes by, merged from the authority and the local config.

The authority's `/v1/host/config` document (catalog + this host's policy) is parsed here into
a `Catalog` and an `InboundPolicy`. Local settings give the defaults; a policy the authority
sets for a port (or as default) wins, so operators steer a fleet from one place. Pure: the
daemon fetches and caches the document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError

from .catalog import Catalog, CatalogEntry
from .policy import DefaultPolicy, InboundPolicy, PortPolicy


@dataclass(frozen=True)
class Directory:
    catalog: Catalog
    policy: InboundPolicy


def port_policy(doc: dict[str, Any]) -> PortPolicy:
    try:
        return PortPolicy(DefaultPolicy(doc["default"]), tuple(str(a) for a in doc.get("allow", [])))
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"policy {doc!r} is invalid: {exc}") from None


def merge(
    local_catalog: list[CatalogEntry], local_policy: InboundPolicy, remote: dict[str, Any] | None
) -> Directory:
    """Local entries and policy, overlaid with the authority's document (if any)."""
    entries = list(local_catalog)
    default, ports = local_policy.default, dict(local_policy.ports)
    if remote is not None:
        entries += [CatalogEntry.from_doc(e) for e in remote.get("catalog", [])]
        policy = remote.get("policy") or {}
        if "default" in policy:
            default = port_policy(policy["default"])
        for port, doc in (policy.get("ports") or {}).items():
            ports[int(port)] = port_policy(doc)
    return Directory(Catalog(entries), InboundPolicy(default, ports))
