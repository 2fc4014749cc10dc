from __future__ import annotations

from typing import Any

import pytest

from agent.config import CatalogEntrySettings, InboundSettings, OutboundSettings
from agent.errors import ConfigError
from agent.proxy.catalog import Catalog, CatalogEntry
from agent.proxy.directory import merge
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy

TD = "spiffe://cluster.local"
SHOP_WEB = f"{TD}/ns/shop/sa/web"
OTHER = f"{TD}/ns/other/sa/x"


@pytest.mark.parametrize(
    ("policy", "client", "allowed", "reason"),
    [
        (PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED), None, True, "unauthenticated_allowed"),
        (PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED), SHOP_WEB, True, "authenticated"),
        (PortPolicy(DefaultPolicy.ALL_AUTHENTICATED), None, False, "unauthenticated"),
        (PortPolicy(DefaultPolicy.ALL_AUTHENTICATED), SHOP_WEB, True, "authenticated"),
        (PortPolicy(DefaultPolicy.DENY), SHOP_WEB, False, "denied"),
        (PortPolicy(DefaultPolicy.DENY, (f"{TD}/ns/shop/*",)), SHOP_WEB, True, "allow_list"),
        (PortPolicy(DefaultPolicy.DENY, (f"{TD}/ns/shop/*",)), OTHER, False, "not_authorized"),
        (PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED, (SHOP_WEB,)), None, False, "unauthenticated"),
        (PortPolicy(DefaultPolicy.ALL_AUTHENTICATED, (SHOP_WEB,)), OTHER, False, "not_authorized"),
    ],
    ids=[
        "open-plain",
        "open-mtls",
        "strict-plain",
        "strict-mtls",
        "deny",
        "glob-hit",
        "glob-miss",
        "allow-list-beats-open",
        "allow-list-exact-miss",
    ],
)
def test_authorization_table(policy: PortPolicy, client: str | None, allowed: bool, reason: str) -> None:
    decision = InboundPolicy(ports={5432: policy}).authorize(5432, client)
    assert (decision.allowed, decision.reason) == (allowed, reason)


def test_ports_without_policy_use_the_default() -> None:
    policy = InboundPolicy(
        PortPolicy(DefaultPolicy.DENY), {80: PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED)}
    )
    assert policy.authorize(80, None).allowed
    assert not policy.authorize(81, SHOP_WEB).allowed


def _entry(cidr: str, ports: list[int], name: str) -> CatalogEntry:
    ident = f"spiffe://cluster.local/ns/t/sa/{name}"
    return CatalogEntry.from_doc({"cidr": cidr, "ports": ports, "identity": ident, "server_name": name})


@pytest.mark.parametrize(
    ("address", "port", "expected"),
    [
        ("198.18.0.20", 5432, "host"),
        ("198.18.0.20", 6379, "host"),
        ("198.18.5.5", 5432, "net-5432"),
        ("198.18.5.5", 80, "net-any"),
        ("::ffff:198.18.5.5", 80, "net-any"),
        ("203.0.113.1", 80, None),
        ("2001:db8::5", 443, "v6"),
    ],
    ids=["host-exact", "host-any-port", "port-specific-wins", "network", "v4-mapped", "miss", "ipv6"],
)
def test_catalog_lookup_prefers_the_most_specific(address: str, port: int, expected: str | None) -> None:
    catalog = Catalog(
        [
            _entry("198.18.0.0/15", [], "net-any"),
            _entry("198.18.0.0/15", [5432], "net-5432"),
            _entry("198.18.0.20/32", [], "host"),
            _entry("2001:db8::/64", [443], "v6"),
        ]
    )
    hit = catalog.lookup(address, port)
    assert (hit.server_name if hit else None) == expected


def test_authority_policy_overrides_local() -> None:
    local = InboundPolicy(PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED), {80: PortPolicy(DefaultPolicy.DENY)})
    remote = {
        "catalog": [{"cidr": "198.18.0.20/32", "ports": [], "identity": SHOP_WEB, "server_name": "w"}],
        "policy": {
            "default": {"default": "all-authenticated", "allow": []},
            "ports": {"5432": {"default": "deny", "allow": [SHOP_WEB]}},
        },
    }
    directory = merge([], local, remote)
    assert directory.policy.for_port(5432) == PortPolicy(DefaultPolicy.DENY, (SHOP_WEB,))
    assert directory.policy.for_port(80) == PortPolicy(DefaultPolicy.DENY)  # local kept
    assert directory.policy.for_port(9999).default is DefaultPolicy.ALL_AUTHENTICATED
    assert len(directory.catalog) == 1
    assert merge([], local, None).policy == local


GOOD = {"cidr": "198.18.0.20/32", "ports": [5432], "identity": SHOP_WEB, "server_name": "w"}


@pytest.mark.parametrize(
    ("remote", "catalog", "port_5432", "rejected"),
    [
        ({"catalog": [GOOD]}, 1, DefaultPolicy.ALL_UNAUTHENTICATED, []),
        (
            {"catalog": [{**GOOD, "cidr": "not-an-ip/32"}, GOOD]},
            1,
            DefaultPolicy.ALL_UNAUTHENTICATED,
            ["catalog[0]"],
        ),
        ({"catalog": [{**GOOD, "ports": [0]}, GOOD]}, 1, DefaultPolicy.ALL_UNAUTHENTICATED, ["catalog[0]"]),
        (
            {"catalog": [{"cidr": "10.0.0.0/8"}, "junk", None, GOOD]},
            1,
            DefaultPolicy.ALL_UNAUTHENTICATED,
            ["catalog[0]", "catalog[1]", "catalog[2]"],
        ),
        ({"catalog": "junk"}, 0, DefaultPolicy.ALL_UNAUTHENTICATED, ["catalog"]),
        (
            {"catalog": [GOOD], "policy": {"ports": {"5432": {"default": "deny"}, "x": {"default": "deny"}}}},
            1,
            DefaultPolicy.DENY,
            ["policy.ports['x']"],
        ),
        (
            {"policy": {"ports": {"5432": {"default": "maybe"}, "99999": {"default": "deny"}}}},
            0,
            DefaultPolicy.ALL_UNAUTHENTICATED,
            ["policy.ports[5432]", "policy.ports['99999']"],
        ),
        (
            {
                "policy": {
                    "default": {"default": "deny", "allow": "x"},
                    "ports": {"5432": {"default": "deny"}},
                }
            },
            0,
            DefaultPolicy.DENY,
            ["policy.default"],
        ),
        ({"policy": ["deny"]}, 0, DefaultPolicy.ALL_UNAUTHENTICATED, ["policy"]),
    ],
    ids=[
        "all-valid",
        "bad-cidr-left-out",
        "bad-port-left-out",
        "several-bad-shapes",
        "catalog-not-a-list",
        "bad-port-key-others-apply",
        "bad-policy-name",
        "bad-default-port-still-applies",
        "policy-not-an-object",
    ],
)
def test_merge_applies_every_valid_entry_and_reports_the_rest(
    remote: dict[str, object], catalog: int, port_5432: DefaultPolicy, rejected: list[str]
) -> None:
    directory = merge([], InboundPolicy(), remote)
    assert len(directory.catalog) == catalog
    assert directory.policy.for_port(5432).default is port_5432
    assert [r.where for r in directory.rejected] == rejected
    assert all(r.reason and r.entry for r in directory.rejected)


@pytest.mark.parametrize(
    ("policy", "client", "allowed", "reason"),
    [
        (PortPolicy(DefaultPolicy.ALL_AUTHENTICATED), SHOP_WEB, True, "authenticated"),
        (
            PortPolicy(DefaultPolicy.ALL_AUTHENTICATED),
            "spiffe://evil.example/ns/shop/sa/web",
            False,
            "foreign_trust_domain",
        ),
        (
            PortPolicy(DefaultPolicy.ALL_AUTHENTICATED),
            "spiffe://cluster.local.evil/ns/shop/sa/web",
            False,
            "foreign_trust_domain",
        ),
        (
            PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED),
            "spiffe://evil.example/ns/a/sa/b",
            True,
            "authenticated",
        ),
        (
            PortPolicy(DefaultPolicy.DENY, ("spiffe://evil.example/*",)),
            "spiffe://evil.example/ns/a/sa/b",
            True,
            "allow_list",
        ),
    ],
    ids=["same-domain", "other-domain", "prefix-trick", "permissive-admits-anyone", "allow-list-names-it"],
)
def test_trust_domain_of_the_client(policy: PortPolicy, client: str, allowed: bool, reason: str) -> None:
    decision = InboundPolicy(ports={443: policy}).authorize(443, client, "cluster.local")
    assert (decision.allowed, decision.reason) == (allowed, reason)


# --- either identity form: allow-lists, catalog entries, config ------------------------------

WEB_DNS = "web.shop.serviceaccount.identity.linkerd.cluster.local"


def test_dns_form_allow_patterns_are_kept_in_spiffe_form() -> None:
    policy = PortPolicy(DefaultPolicy.DENY, ("*.shop.serviceaccount.identity.linkerd.cluster.local", OTHER))
    assert policy.allow == (f"{TD}/ns/shop/sa/*", OTHER)
    decision = InboundPolicy(policy).authorize(5432, SHOP_WEB, "cluster.local")
    assert (decision.allowed, decision.rule) == (True, f"{TD}/ns/shop/sa/*")
    assert not InboundPolicy(policy).authorize(5432, f"{TD}/ns/billing/sa/web", "cluster.local").allowed


def test_a_dns_pattern_that_cannot_map_is_refused() -> None:
    with pytest.raises(ConfigError, match="wildcard in its mesh or trust domain"):
        PortPolicy(DefaultPolicy.DENY, ("*.shop.serviceaccount.identity.linkerd.*",))


def test_the_authoritys_unmappable_pattern_is_rejected_and_the_rest_applies() -> None:
    remote = {
        "policy": {
            "ports": {
                "5432": {"default": "deny", "allow": ["*.identity.linkerd.cluster.local"]},
                "6379": {"default": "deny", "allow": [WEB_DNS]},
            }
        }
    }
    directory = merge([], InboundPolicy(), remote)
    assert [r.where for r in directory.rejected] == ["policy.ports[5432]"]
    assert "neither a SPIFFE ID" in directory.rejected[0].reason
    assert directory.policy.for_port(6379) == PortPolicy(DefaultPolicy.DENY, (SHOP_WEB,))


@pytest.mark.parametrize(
    ("doc", "identity", "server_name", "opaque_port"),
    [
        ({"identity": SHOP_WEB, "server_name": WEB_DNS}, SHOP_WEB, WEB_DNS, None),
        ({"identity": WEB_DNS}, SHOP_WEB, WEB_DNS, None),
        ({"identity": SHOP_WEB}, SHOP_WEB, WEB_DNS, None),
        ({"identity": SHOP_WEB, "opaque_port": 4143}, SHOP_WEB, WEB_DNS, 4143),
        ({"identity": f"{TD}/custom", "server_name": "x.example"}, f"{TD}/custom", "x.example", None),
    ],
    ids=["spiffe", "dns-form", "server-name-derived", "opaque-port", "non-workload-spiffe"],
)
def test_catalog_entries_take_either_identity_form(
    doc: dict[str, Any], identity: str, server_name: str, opaque_port: int | None
) -> None:
    entry = CatalogEntry.from_doc({"cidr": "198.18.0.20/32", **doc})
    assert (entry.identity, entry.server_name, entry.opaque_port) == (identity, server_name, opaque_port)
    assert CatalogEntry.from_doc(entry.to_doc()) == entry
    assert ("opaque_port" in entry.to_doc()) == (opaque_port is not None)


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"identity": SHOP_WEB, "opaque_port": 0}, "opaque_port 0 is not a port number"),
        ({"identity": SHOP_WEB, "opaque_port": 65536}, "opaque_port 65536"),
        ({"identity": SHOP_WEB, "opaque_port": "4143"}, "opaque_port '4143'"),
        ({"identity": SHOP_WEB, "opaque_port": True}, "opaque_port True"),
        ({"identity": "web.shop.svc.cluster.local"}, "is not a mesh identity name"),
        ({"identity": f"{TD}/custom"}, "missing 'server_name'"),
    ],
    ids=["port-0", "port-too-big", "port-string", "port-bool", "not-a-mesh-name", "custom-needs-server-name"],
)
def test_bad_catalog_entries_are_refused_saying_why(doc: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        CatalogEntry.from_doc({"cidr": "198.18.0.20/32", **doc})
    assert says in err.value.message


def test_config_takes_either_form_and_keeps_spiffe() -> None:
    inbound = InboundSettings(
        ports=({"port": 5432, "allow": ["*.shop.serviceaccount.identity.linkerd.cluster.local", OTHER]},)  # type: ignore[arg-type]
    )
    assert inbound.ports[0].allow == (f"{TD}/ns/shop/sa/*", OTHER)
    outbound = OutboundSettings(
        catalog=({"cidr": "10.0.0.0/8", "identity": WEB_DNS, "opaque_port": 4143},)  # type: ignore[arg-type]
    )
    assert outbound.catalog[0] == CatalogEntrySettings("10.0.0.0/8", SHOP_WEB, (), 4143)


@pytest.mark.parametrize(
    ("section", "says"),
    [
        (
            lambda: InboundSettings(ports=({"port": 1, "allow": ["*.x.serviceaccount.identity.linkerd.*"]},)),
            "inbound.ports[0].allow",
        ),  # type: ignore[arg-type]
        (lambda: InboundSettings(ports=({"port": 1, "allow": [3]},)), "inbound.ports[0].allow"),  # type: ignore[arg-type]
        (
            lambda: OutboundSettings(catalog=({"cidr": "10.0.0.0/8", "identity": "web"},)),
            "outbound.catalog[0].identity",
        ),  # type: ignore[arg-type]
        (
            lambda: OutboundSettings(
                catalog=({"cidr": "10.0.0.0/8", "identity": WEB_DNS, "opaque_port": 0},)
            ),
            "outbound.catalog[0].opaque_port",
        ),  # type: ignore[arg-type]
    ],
    ids=["unmappable-pattern", "not-a-string", "bad-identity", "bad-opaque-port"],
)
def test_config_refuses_what_cannot_map_naming_the_key(section: Any, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        section()
    assert says in err.value.message


# --- audit: admit, but mark what the port would have refused (Linkerd's `audit` default) -------


@pytest.mark.parametrize(
    ("policy", "client", "reason", "rule", "audit"),
    [
        (PortPolicy(DefaultPolicy.AUDIT), None, "audit", "audit", "denied"),
        (PortPolicy(DefaultPolicy.AUDIT), SHOP_WEB, "audit", "audit", "denied"),
        (PortPolicy(DefaultPolicy.AUDIT, (SHOP_WEB,)), SHOP_WEB, "allow_list", SHOP_WEB, ""),
        (PortPolicy(DefaultPolicy.AUDIT, (SHOP_WEB,)), OTHER, "audit", "audit", "not_authorized"),
        (PortPolicy(DefaultPolicy.AUDIT, (SHOP_WEB,)), None, "audit", "audit", "unauthenticated"),
    ],
    ids=["plain", "mtls-no-list", "on-list", "off-list", "plain-with-list"],
)
def test_audit_admits_and_marks_what_would_be_refused(
    policy: PortPolicy, client: str | None, reason: str, rule: str, audit: str
) -> None:
    decision = InboundPolicy(ports={9100: policy}).authorize(9100, client, "cluster.local")
    assert decision.allowed
    assert (decision.reason, decision.rule, decision.audit) == (reason, rule, audit)


def test_only_audit_marks_decisions() -> None:
    for default in DefaultPolicy:
        if default is DefaultPolicy.AUDIT:
            continue
        for client in (None, SHOP_WEB, OTHER):
            assert InboundPolicy(PortPolicy(default, (SHOP_WEB,))).authorize(1, client).audit == ""
            assert InboundPolicy(PortPolicy(default)).authorize(1, client).audit == ""


def test_audit_counts_as_linkerds_default_audit_authorization() -> None:
    """The data plane labels an admission by `rule`, default kind unless an allow-list entry
    admitted it: an audited one is linkerd's authz_kind="default", authz_name="audit"."""
    from agent.proxy.decisions import Admit

    decision = InboundPolicy(PortPolicy(DefaultPolicy.AUDIT)).authorize(5432, None)
    tcp, _http = Admit(("10.0.0.5", 5432), "", "", decision, "plaintext").authz_keys()
    assert 'authz_kind="default"' in tcp and 'authz_name="audit"' in tcp


def test_audit_comes_from_the_authority_document() -> None:
    remote = {"policy": {"default": {"default": "audit", "allow": [SHOP_WEB]}}}
    directory = merge([], InboundPolicy(), remote)
    assert directory.rejected == ()
    decision = directory.policy.authorize(80, OTHER, "cluster.local")
    assert decision.allowed and decision.audit == "not_authorized"
