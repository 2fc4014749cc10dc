"""Workload names: the SPIFFE ID and the mesh DNS name of one identity, validated on construction.

One certificate carries both, as Linkerd's do:

    spiffe://<trust-domain>/ns/<namespace>/sa/<name>                       (URI SAN)
    <name>.<namespace>.serviceaccount.identity.<mesh>.<trust-domain>        (DNS SAN)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import MeshagentError

# Kubernetes names: DNS-1123 labels (namespaces and service accounts both fit this).
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# A trust domain is a DNS-like name: lowercase labels joined by dots.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")

DEFAULT_MESH = "linkerd"


class InvalidName(MeshagentError):
    code = "invalid_name"


def validate_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.match(value) or len(value) > 253:
        raise InvalidName(
            f"trust domain {value!r} is not a valid DNS name",
            "use lowercase letters, digits, '-' and '.', e.g. cluster.local",
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
            if not _LABEL.match(value):
                raise InvalidName(
                    f"{what} {value!r} is not a valid Kubernetes name",
                    "use 1-63 lowercase letters, digits and '-', starting and ending alphanumeric",
                )
        if not _LABEL.match(self.mesh):
            raise InvalidName(f"mesh name {self.mesh!r} is not a valid DNS label")

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
