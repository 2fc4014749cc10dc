"""The name table: which names the stub owns, and their addresses.

Input is a list of `ServiceAddress` (service, namespace, cluster IPs), which the catalog feeds
once discovery exists. The stub owns exactly:

- the zone `svc.<cluster-domain>`: `<service>.<namespace>.svc.<cluster-domain>` of a known
  service answers its addresses; every other name in the zone is NXDOMAIN (a namespace or the
  zone itself with no address of its own is NODATA, an empty non-terminal);
- when `short_forms` is on, `<service>.<namespace>` and `<service>.<namespace>.svc` of a known
  service, and nothing else of that shape: an unknown `a.b` may be a real name elsewhere.

Everything else, the rest of the cluster domain included, is not ours and is forwarded: so a
cluster domain that is a real domain (`corp.example.com`) loses nothing outside `svc.`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.dns.message import Labels

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class ServiceAddress:
    """One Service as the catalog knows it: name, namespace and cluster IPs (v4 and/or v6;
    none for a headless Service, whose name then exists but has no address)."""

    name: str
    namespace: str
    cluster_ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Found:
    """A name we own with its addresses; `in_zone` tells whether an SOA may go with a NODATA."""

    v4: tuple[str, ...]
    v6: tuple[str, ...]
    in_zone: bool


@dataclass(frozen=True, slots=True)
class Empty:
    """A name in our zone that exists without addresses (NODATA)."""


@dataclass(frozen=True, slots=True)
class Missing:
    """A name in our zone that does not exist (NXDOMAIN)."""


@dataclass(frozen=True, slots=True)
class NotOurs:
    """Forward the query, unchanged."""


Lookup = Found | Empty | Missing | NotOurs
EMPTY, MISSING, NOT_OURS = Empty(), Missing(), NotOurs()


def domain_labels(domain: str) -> Labels | str:
    """The cluster domain as wire labels, or why it is not a valid domain."""
    text = domain.strip().rstrip(".").lower()
    parts = text.split(".") if text else []
    if not parts or len(text) > 253 or not all(_LABEL.fullmatch(p) for p in parts):
        return f"cluster domain {domain!r} is not a DNS name (lower-case labels joined by dots)"
    return tuple(p.encode() for p in parts)


@dataclass(frozen=True)
class NameTable:
    zone: Labels  # ("svc", *cluster_domain)
    short_forms: bool
    _services: dict[tuple[bytes, bytes], tuple[tuple[str, ...], tuple[str, ...]]] = field(repr=False)
    _namespaces: frozenset[bytes] = field(repr=False)
    skipped: tuple[tuple[str, str], ...] = ()
    """(service, reason) for each input entry left out: a bad name or address."""

    @property
    def cluster_domain(self) -> Labels:
        return self.zone[1:]

    def __len__(self) -> int:
        return len(self._services)

    def lookup(self, name: Labels) -> Lookup:
        """`name` lower-cased, as `message.Query.name` has it."""
        zone = self.zone
        if len(name) >= len(zone) and name[len(name) - len(zone) :] == zone:
            rest = name[: len(name) - len(zone)]
            if len(rest) == 2:
                hit = self._services.get((rest[0], rest[1]))
                return MISSING if hit is None else Found(hit[0], hit[1], True)
            if not rest or (len(rest) == 1 and rest[0] in self._namespaces):
                return EMPTY
            return MISSING
        if self.short_forms and (len(name) == 2 or (len(name) == 3 and name[2] == b"svc")):
            hit = self._services.get((name[0], name[1]))
            if hit is not None:
                return Found(hit[0], hit[1], False)
        return NOT_OURS


def build_table(
    services: Iterable[ServiceAddress], cluster_domain: Labels, short_forms: bool = False
) -> NameTable:
    """The table for `services`; entries with a bad name or address are left out and listed in
    `skipped` (the catalog is input from the cluster: one bad object must not hide the rest).
    A service listed twice keeps the union of its addresses, in first-seen order."""
    table: dict[tuple[bytes, bytes], tuple[list[str], list[str]]] = {}
    skipped: list[tuple[str, str]] = []
    for svc in services:
        label = f"{svc.name}.{svc.namespace}"
        if not _LABEL.fullmatch(svc.name) or not _LABEL.fullmatch(svc.namespace):
            skipped.append((label, "service and namespace must be DNS labels (a-z, 0-9, '-', 1-63)"))
            continue
        v4, v6 = table.setdefault((svc.name.encode(), svc.namespace.encode()), ([], []))
        for raw in svc.cluster_ips:
            try:
                address = ipaddress.ip_address(raw)
            except ValueError:
                skipped.append((label, f"cluster IP {raw!r} is not an IP address"))
                continue
            bucket = v4 if address.version == 4 else v6
            if str(address) not in bucket:
                bucket.append(str(address))
    return NameTable(
        zone=(b"svc", *cluster_domain),
        short_forms=short_forms,
        _services={key: (tuple(v4), tuple(v6)) for key, (v4, v6) in table.items()},
        _namespaces=frozenset(ns for _, ns in table),
        skipped=tuple(skipped),
    )
