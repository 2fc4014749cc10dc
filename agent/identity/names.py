"""Names, validated on construction: a workload's SPIFFE ID and mesh DNS name, and what a host
claims about itself at enrollment (its host name and addresses).

One certificate carries both workload names, as Linkerd's do:

    spiffe://<trust-domain>/ns/<namespace>/sa/<name>                       (URI SAN)
    <name>.<namespace>.serviceaccount.identity.<mesh>.<trust-domain>        (DNS SAN)

Every pattern is matched with `fullmatch`: `$` also matches before a trailing newline, which
let `shop/billing\n` into a signed certificate (issue #15).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from agent.errors import MeshagentError

# Kubernetes names: DNS-1123 labels (namespaces and service accounts both fit this).
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# A trust domain is a DNS-like name: lowercase labels joined by dots.
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*")
# A host name: RFC 1123 labels (letters of either case, digits, inner '-') joined by dots.
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?")
MAX_HOST_ADDRESSES = 64

DEFAULT_MESH = "linkerd"


class InvalidName(MeshagentError):
    code = "invalid_name"


def validate_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(value) or len(value) > 253:
        raise InvalidName(
            f"trust domain {value!r} is not a valid DNS name",
            "use lowercase letters, digits, '-' and '.', e.g. cluster.local",
        )
    return value


def validate_mesh(value: str) -> str:
    if not _LABEL.fullmatch(value):
        raise InvalidName(
            f"mesh name {value!r} is not a valid DNS label",
            "use 1-63 lowercase letters, digits and '-', e.g. linkerd",
        )
    return value


@dataclass(frozen=True, order=True)
class WorkloadIdentity:
    """One mesh identity: a service account `name` in `namespace`, in `trust_domain`."""

    trust_domain: str
    namespace: str
    name: str
    mesh: str = DEFAULT_MESH

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        for what, value in (("namespace", self.namespace), ("name", self.name)):
            if not _LABEL.fullmatch(value):
                raise InvalidName(
                    f"{what} {value!r} is not a valid Kubernetes name",
                    "use 1-63 lowercase letters, digits and '-', starting and ending alphanumeric",
                )
        validate_mesh(self.mesh)

    @classmethod
    def parse_short(cls, value: str, trust_domain: str, mesh: str = DEFAULT_MESH) -> WorkloadIdentity:
        """Parse the operator's short form `NAMESPACE/NAME`."""
        parts = value.split("/")
        if len(parts) != 2 or not all(parts):
            raise InvalidName(
                f"identity {value!r} is not of the form NAMESPACE/NAME",
                "for example: --identity shop/billing",
            )
        try:
            return cls(trust_domain, parts[0], parts[1], mesh)
        except InvalidName as exc:
            raise InvalidName(f"identity {value!r}: {exc.message}", exc.hint) from None

    @classmethod
    def from_spiffe_id(cls, uri: str, mesh: str = DEFAULT_MESH) -> WorkloadIdentity:
        """Parse `spiffe://TD/ns/NS/sa/NAME`; anything else is refused with the reason."""
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise InvalidName(f"{uri!r} is not a SPIFFE ID: it must start with {prefix}")
        trust_domain, _, path = uri[len(prefix) :].partition("/")
        segments = path.split("/")
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise InvalidName(f"SPIFFE ID {uri!r} does not have the path /ns/<namespace>/sa/<name>")
        return cls(trust_domain, segments[1], segments[3], mesh)

    @property
    def short(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.name}"

    @property
    def dns_name(self) -> str:
        return f"{self.name}.{self.namespace}.serviceaccount.identity.{self.mesh}.{self.trust_domain}"

    def __str__(self) -> str:
        return self.spiffe_id


# --- what a host claims at enrollment ----------------------------------------------------------


def validate_host_name(value: str) -> str:
    """An RFC 1123 host name (one label or an FQDN, no trailing dot), at most 253 characters.
    Shown in tables, logs and Prometheus labels: nothing else may get in."""
    if not isinstance(value, str):
        raise InvalidName("the host name must be a string", "e.g. --host-name legacy-db-1")
    if not value or len(value) > 253 or not all(_HOST_LABEL.fullmatch(p) for p in value.split(".")):
        raise InvalidName(
            f"host name {value[:80]!r} is not a valid RFC 1123 host name",
            "use letters, digits and '-' in dot-separated labels of 1-63 characters, "
            "e.g. --host-name legacy-db-1",
        )
    return value


def validate_host_address(value: str) -> str:
    """One unicast address other hosts can reach this one at, in canonical form.

    Every agent routes this address (as /32 or /128) to the host's identity, so it must mean
    the same host from everywhere: networks, the unspecified address, multicast and broadcast
    never do; loopback would capture every host's own local traffic; link-local is per link
    (and 169.254.169.254 is the cloud metadata service); an IPv6 zone is local to one host;
    reserved ranges (IPv4 240/4, IPv4-mapped IPv6) are not a host's own.
    """
    if not isinstance(value, str):  # ip_address() would take an integer
        raise InvalidName(f"address {value!r} is not a string", "give addresses as text, e.g. 10.0.0.5")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidName(
            f"address {value[:80]!r} is not an IP address",
            "give one IPv4 or IPv6 address per --address, e.g. --address 10.0.0.5 (no network, no port)",
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise InvalidName(f"address {value!r} has a zone", "give a global address, without %zone")
    reason = next(
        (
            why
            for bad, why in (
                (ip.is_unspecified, "the unspecified address"),
                (ip.is_multicast, "a multicast address"),
                (ip.is_loopback, "a loopback address"),
                (ip.is_link_local, "a link-local address"),
                (ip.is_reserved, "a reserved address"),
            )
            if bad
        ),
        None,
    )
    if reason is not None:
        raise InvalidName(
            f"address {value!r} is {reason}: other hosts cannot reach this host at it",
            "give this host's unicast address that other hosts reach it at (IPv4 as a.b.c.d)",
        )
    return str(ip)


def validate_host_addresses(values: list[str]) -> tuple[str, ...]:
    """Each address checked and canonical, duplicates dropped, order kept."""
    if len(values) > MAX_HOST_ADDRESSES:
        raise InvalidName(
            f"{len(values)} addresses given; at most {MAX_HOST_ADDRESSES}",
            "give the addresses other hosts reach this one at",
        )
    return tuple(dict.fromkeys(validate_host_address(v) for v in values))
