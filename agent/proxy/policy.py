"""Inbound authorization: per port, a default and allow-lists of client identities.

The semantics of Linkerd's Server + AuthorizationPolicy (and SMI TrafficTarget):
- `all-unauthenticated`: anyone, including plaintext clients outside the mesh;
- `all-authenticated`: any client with a valid mesh certificate of this host's trust domain
  (a certificate of another trust domain, even from the same issuer, is refused:
  `foreign_trust_domain`);
- `deny`: nobody;
- `audit`: everyone is admitted, but a client the port would otherwise refuse (not on its
  allow-list; with no allow-list, any client: audit stands in for `deny`) gets a Decision marked
  `audit` with the reason it would have been refused. Linkerd's `audit` default policy is an
  authorization named `audit` of kind `default` that admits anyone and logs "Request allowed"
  (linkerd2-proxy linkerd/app/inbound/src/policy/{defaults,tcp,http}.rs, `Meta::is_audit`): the
  admission counts on `inbound_*_authz_allow_total{authz_kind="default",authz_name="audit"}`,
  which is what an audited Decision's `rule` gives here too.
An allow-list entry is a SPIFFE ID or a glob (`spiffe://cluster.local/ns/shop/*`), or the same
in Linkerd's DNS form (`*.shop.serviceaccount.identity.linkerd.cluster.local`), kept in the
SPIFFE form (agent/identity/names.py, `spiffe_pattern`); a port with an allow-list admits
exactly the identities on it, whatever the default says. Clients are matched by the SPIFFE form
of their identity, whichever SAN their certificate carries it in (agent/proxy/tls.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import Enum

from agent.errors import ConfigError
from agent.identity.names import InvalidName, spiffe_pattern


class DefaultPolicy(Enum):
    ALL_UNAUTHENTICATED = "all-unauthenticated"
    ALL_AUTHENTICATED = "all-authenticated"
    DENY = "deny"
    AUDIT = "audit"


@dataclass(frozen=True)
class PortPolicy:
    default: DefaultPolicy
    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Every way in (config, the authority's document, code) gets the SPIFFE form here.
        try:
            allow = tuple(spiffe_pattern(p) for p in self.allow)
        except InvalidName as exc:
            raise ConfigError(
                f"allow list {list(self.allow)!r} is invalid: {exc.message}", exc.hint
            ) from None
        object.__setattr__(self, "allow", allow)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # a closed set of words, usable as a metric label
    rule: str = ""  # what admitted the client: the default policy's name or the allow-list pattern
    # Set only when audit mode admitted a client the policy would have refused: the refusal
    # reason it waived (a word of `reason`'s set). The data plane logs and counts these.
    audit: str = ""


@dataclass(frozen=True)
class InboundPolicy:
    default: PortPolicy = PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED)
    ports: dict[int, PortPolicy] = field(default_factory=dict)

    def for_port(self, port: int) -> PortPolicy:
        return self.ports.get(port, self.default)

    def authorize(self, port: int, client_id: str | None, trust_domain: str | None = None) -> Decision:
        """`client_id` is the peer's SPIFFE ID, or None for a client without mesh TLS;
        `trust_domain` is this host's (None: any). An allow-list names trust domains itself."""
        policy = self.for_port(port)
        decision = _decide(policy, client_id, trust_domain)
        if decision.allowed or policy.default is not DefaultPolicy.AUDIT:
            return decision
        name = DefaultPolicy.AUDIT.value
        return Decision(True, name, name, audit=decision.reason)


def _decide(policy: PortPolicy, client_id: str | None, trust_domain: str | None) -> Decision:
    if policy.allow:
        if client_id is None:
            return Decision(False, "unauthenticated")
        for pattern in policy.allow:
            if fnmatch.fnmatchcase(client_id, pattern):
                return Decision(True, "allow_list", pattern)
        return Decision(False, "not_authorized")
    name = policy.default.value
    if policy.default is DefaultPolicy.ALL_UNAUTHENTICATED:
        return Decision(True, "unauthenticated_allowed" if client_id is None else "authenticated", name)
    if policy.default in (DefaultPolicy.DENY, DefaultPolicy.AUDIT):
        return Decision(False, "denied")
    if client_id is None:
        return Decision(False, "unauthenticated")
    if trust_domain is not None and not in_trust_domain(client_id, trust_domain):
        return Decision(False, "foreign_trust_domain")
    return Decision(True, "authenticated", name)


def in_trust_domain(spiffe_id: str, trust_domain: str) -> bool:
    """Whether `spiffe_id` names a workload of `trust_domain` (exactly: no prefix tricks)."""
    return spiffe_id.startswith(f"spiffe://{trust_domain}/")
