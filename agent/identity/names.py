"""Names, validated on construction: a workload's SPIFFE ID and mesh DNS name, and what a host
claims about itself at enrollment (its host name and addresses).

One identity, two spellings, mapped one to the other:

    spiffe://<trust-domain>/ns/<namespace>/sa/<name>                       (URI SAN)
    <name>.<namespace>.serviceaccount.identity.<mesh>.<trust-domain>        (DNS SAN)

Linkerd's identity controller issues pod certificates with the DNS SAN only (linkerd2
pkg/identity/service.go, checkCSR: exactly one DNS name, no URI); SPIFFE peers carry the URI.
Wherever an identity or an allow-list pattern is read (config, authority, catalog, peers'
certificates), either spelling is accepted and the SPIFFE form is what is kept and compared.

Identity as Linkerd reads it (linkerd2-proxy linkerd/meshtls/verifier/src/lib.rs and
linkerd/identity/src/lib.rs):
- a server (an in-cluster pod's inbound proxy) takes the FIRST SAN of the client's certificate
  that parses, DNS name or URI, as the client's identity (`client_identity`: `ids.first()`);
  Linkerd policies (`MeshTLSAuthentication`) name identities in DNS form, so a host's
  certificate lists its DNS SAN first;
- a client (an in-cluster proxy calling an ExternalWorkload) parses `meshTLS.identity` as a
  URI (`Id::parse_uri`) and, after the handshake, requires a SAN of the same kind equal to it
  (`verify_id`: `ids.contains(expected)`, and a `Dns` id never equals a `Uri` one), so the
  certificate must carry the SPIFFE URI SAN the ExternalWorkload names.
The authority's leaf certificates (agent/authority/signing.py) list the DNS SAN, then the URI
SAN: both readings hold (tests/identity/test_linkerd_identity.py).

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
SPIFFE_SCHEME = "spiffe://"
# The labels between a workload's namespace and its mesh in the DNS form.
_DNS_MIDDLE = ("serviceaccount", "identity")
# A namespace or name in an allow-list glob: label characters and fnmatch's wildcards.
_GLOB_LABEL = re.compile(r"[-a-z0-9*?\[\]!]{1,63}")
_GLOB_CHARS = frozenset("*?[]")


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
        prefix = SPIFFE_SCHEME
        if not uri.startswith(prefix):
            raise InvalidName(f"{uri!r} is not a SPIFFE ID: it must start with {prefix}")
        trust_domain, _, path = uri[len(prefix) :].partition("/")
        segments = path.split("/")
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise InvalidName(f"SPIFFE ID {uri!r} does not have the path /ns/<namespace>/sa/<name>")
        return cls(trust_domain, segments[1], segments[3], mesh)

    @classmethod
    def from_dns_name(cls, name: str) -> WorkloadIdentity:
        """Parse `NAME.NAMESPACE.serviceaccount.identity.MESH.TD` (Linkerd's identity name);
        the trust domain is every label after the mesh's."""
        labels = name.split(".")
        if len(labels) < 6 or tuple(labels[2:4]) != _DNS_MIDDLE:
            raise InvalidName(
                f"{name[:300]!r} is not a mesh identity name",
                "write NAME.NAMESPACE.serviceaccount.identity.MESH.TRUST-DOMAIN, "
                "e.g. web.shop.serviceaccount.identity.linkerd.cluster.local",
            )
        try:
            return cls(".".join(labels[5:]), labels[1], labels[0], labels[4])
        except InvalidName as exc:
            raise InvalidName(f"identity name {name[:300]!r}: {exc.message}", exc.hint) from None

    @classmethod
    def parse_any(cls, value: str, mesh: str = DEFAULT_MESH) -> WorkloadIdentity:
        """A SPIFFE ID (`spiffe://...`, given `mesh` for its DNS form) or a mesh DNS name."""
        if value.startswith(SPIFFE_SCHEME):
            return cls.from_spiffe_id(value, mesh)
        return cls.from_dns_name(value)

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


def spiffe_pattern(pattern: str) -> str:
    """An allow-list entry in the SPIFFE form hosts match peers against.

    A `spiffe://` pattern is kept as written. A DNS-form one maps label by label: its first two
    labels (the name and the namespace) may be globs, the mesh and trust domain must be written
    out, e.g. `*.shop.serviceaccount.identity.linkerd.cluster.local` ->
    `spiffe://cluster.local/ns/shop/sa/*`. Anything else is refused, saying why: a DNS pattern
    with no SPIFFE equivalent (a wildcard spanning labels, or in the trust domain) must not
    silently match something else."""
    if pattern.startswith(SPIFFE_SCHEME):
        return pattern
    labels = pattern.split(".")
    example = "e.g. *.shop.serviceaccount.identity.linkerd.cluster.local, or spiffe://cluster.local/ns/shop/*"
    if len(labels) < 6 or tuple(labels[2:4]) != _DNS_MIDDLE:
        raise InvalidName(
            f"allow entry {pattern[:300]!r} is neither a SPIFFE ID or glob nor a mesh identity name "
            "NAME.NAMESPACE.serviceaccount.identity.MESH.TRUST-DOMAIN",
            example,
        )
    name, namespace, mesh, trust_domain = labels[0], labels[1], labels[4], ".".join(labels[5:])
    if _GLOB_CHARS & set(mesh + trust_domain):
        raise InvalidName(
            f"allow entry {pattern[:300]!r} has a wildcard in its mesh or trust domain: "
            "only the name and namespace labels map to the SPIFFE form",
            "write the trust domain out, or use a spiffe:// glob such as spiffe://*/ns/shop/*",
        )
    try:
        validate_mesh(mesh)
        validate_trust_domain(trust_domain)
    except InvalidName as exc:
        raise InvalidName(f"allow entry {pattern[:300]!r}: {exc.message}", exc.hint) from None
    for what, label in (("name", name), ("namespace", namespace)):
        if not _GLOB_LABEL.fullmatch(label):
            raise InvalidName(
                f"allow entry {pattern[:300]!r}: the {what} label {label[:80]!r} is not a name or glob",
                "use lowercase letters, digits, '-' and the wildcards * ? [...]; " + example,
            )
    return f"{SPIFFE_SCHEME}{trust_domain}/ns/{namespace}/sa/{name}"


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
