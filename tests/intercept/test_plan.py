"""The plan as a table: config in, rules out. Pure; no kernel."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.config import InterceptSettings
from agent.errors import ConfigError
from agent.intercept.errors import PlanError
from agent.intercept.plan import (
    BUILTIN_CHAINS,
    CHAIN_PREFIX,
    DstNet,
    DstPorts,
    Established,
    GidOwner,
    Jump,
    LocalDst,
    Mark,
    NoMark,
    NotRedirected,
    Plan,
    PortRange,
    Redirect,
    Reject,
    Return,
    Syn,
    TProxy,
    TransparentSocket,
    UidOwner,
    build_plan,
)


def plan(**kw: Any) -> Plan:
    kw.setdefault("proxy_user", 4190)
    result = build_plan(InterceptSettings(**kw), lookup_user={"meshagent": 999}.__getitem__)
    assert isinstance(result, Plan), result
    return result


def skipped_ports(p: Plan, chain: str) -> set[int]:
    return {
        port.lo
        for r in p.rules
        if r.chain == chain and isinstance(r.action, Return)
        for m in r.matches
        if isinstance(m, DstPorts)
        for port in m.ports
    }


def outbound(p: Plan) -> list[Any]:
    return [r for r in p.rules if r.chain == "MESHAGENT_OUTBOUND"]


def inbound(p: Plan) -> list[Any]:
    return [r for r in p.rules if r.chain == "MESHAGENT_INBOUND"]


CASES = [
    pytest.param({}, lambda p: 22 in skipped_ports(p, "MESHAGENT_OUTBOUND"), id="ssh-skipped-outbound"),
    pytest.param({}, lambda p: 22 in skipped_ports(p, "MESHAGENT_INBOUND"), id="ssh-skipped-inbound"),
    pytest.param({}, lambda p: 4191 in skipped_ports(p, "MESHAGENT_INBOUND"), id="admin-skipped"),
    pytest.param(
        {"capture_ssh": True},
        lambda p: 22 not in skipped_ports(p, "MESHAGENT_INBOUND") and any("SSH" in w for w in p.warnings),
        id="capture-ssh-insists-and-warns",
    ),
    pytest.param(
        {"ssh_ports": [22, 2222]},
        lambda p: {22, 2222} <= skipped_ports(p, "MESHAGENT_INBOUND"),
        id="extra-ssh-port",
    ),
    pytest.param(
        {}, lambda p: outbound(p)[0].matches == (UidOwner(4190),), id="proxy-uid-first-outbound-rule"
    ),
    pytest.param({"proxy_user": "meshagent"}, lambda p: p.proxy_uid == 999, id="proxy-user-by-name"),
    pytest.param(
        {"proxy_mark": 0},
        lambda p: not any(isinstance(m, Mark) for r in p.rules for m in r.matches),
        id="no-mark",
    ),
    pytest.param(
        {"proxy_mark": 0x10},
        lambda p: outbound(p)[1].matches == (Mark(0x10, 0x10),),
        id="mark-second-outbound-rule",
    ),
    pytest.param({}, lambda p: p.families == (4, 6) and p.routes == (), id="default-dual-stack-redirect"),
    pytest.param({"ipv6": False}, lambda p: p.families == (4,), id="ipv4-only"),
    pytest.param(
        {"ipv6": False, "outbound_skip_cidrs": ["fd00::/8"]},
        lambda p: not any(isinstance(m, DstNet) for r in p.rules for m in r.matches),
        id="ipv6-cidr-dropped-when-ipv6-off",
    ),
    pytest.param(
        {"outbound_cidrs": ["198.18.0.0/15", "2001:db8::/32"], "outbound_ports": [80, "8000-8100"]},
        lambda p: (
            [(r.family, r.matches) for r in outbound(p) if isinstance(r.action, Redirect)]
            == [
                (4, (Syn(), DstNet("198.18.0.0/15"), DstPorts((PortRange(80, 80), PortRange(8000, 8100))))),
                (6, (Syn(), DstNet("2001:db8::/32"), DstPorts((PortRange(80, 80), PortRange(8000, 8100))))),
            ]
        ),
        id="capture-only-listed-cidrs-and-ports",
    ),
    pytest.param(
        {},
        lambda p: all(Syn() in r.matches for r in p.rules if isinstance(r.action, Redirect | TProxy)),
        id="only-opening-packets-are-captured",
    ),
    pytest.param(
        {"ipv6": False, "outbound_cidrs": ["2001:db8::/32"]},
        lambda p: not any(isinstance(r.action, Redirect) for r in outbound(p)) and p.warnings,
        id="capture-list-without-enabled-family-warns",
    ),
    pytest.param(
        {"authority_addresses": ["198.18.9.9"]},
        lambda p: (
            any(r.matches == (DstNet("198.18.9.9/32"),) for r in outbound(p))
            and any(e.what == "authority" for e in p.exclusions)
        ),
        id="authority-skipped",
    ),
    pytest.param(
        {"authority_addresses": ["198.18.9.9"], "capture_authority": True},
        lambda p: not any(isinstance(m, DstNet) for r in p.rules for m in r.matches) and p.warnings,
        id="capture-authority-insists",
    ),
    pytest.param(
        {"inbound_mode": "tproxy"},
        lambda p: (
            p.tables() == ["nat", "mangle", "filter"]
            and isinstance(inbound(p)[-1].action, TProxy)
            and [r.family for r in p.routes] == [4, 6]
        ),
        id="tproxy-mangle-and-routes",
    ),
    pytest.param(
        {"inbound_mode": "tproxy"},
        lambda p: any(r.matches == (Established(),) for r in p.rules if r.table == "mangle"),
        id="tproxy-leaves-known-connections-alone",
    ),
    pytest.param(
        {"inbound_ports": [8080]},
        lambda p: inbound(p)[-1].matches == (Syn(), LocalDst(), DstPorts((PortRange(8080, 8080),))),
        id="inbound-only-listed-ports-addressed-here",
    ),
    pytest.param(
        {"inbound_ports": [22, 8080]},
        lambda p: 22 in skipped_ports(p, "MESHAGENT_INBOUND") and p.warnings,
        id="ssh-in-inbound-ports-still-skipped",
    ),
    pytest.param(
        {"skip_uids": [0, 33], "skip_gids": [27]},
        lambda p: (
            [r.matches[0] for r in outbound(p)[1:5]]
            == [Mark(0x1000000, 0x1000000), UidOwner(0), UidOwner(33), GidOwner(27)]
        ),
        id="skip-uids-and-gids-after-the-proxy",
    ),
]


@pytest.mark.parametrize(("settings", "check"), CASES)
def test_plan(settings: dict[str, Any], check: Any) -> None:
    assert check(plan(**settings))


ERRORS = [
    pytest.param({"inbound_port": 4140}, "both 4140", id="same-listener-ports"),
    pytest.param({"inbound_mode": "tproxy", "tproxy_mark": 0}, "tproxy_mark is 0", id="tproxy-mark-zero"),
    pytest.param(
        {"inbound_mode": "tproxy", "tproxy_mark": 0x1000000},
        "shares bits",
        id="tproxy-mark-overlaps-proxy-mark",
    ),
    pytest.param({"inbound_mode": "tproxy", "tproxy_table": 254}, "reserved", id="tproxy-main-table"),
    pytest.param({"proxy_user": "nosuchuser"}, "does not exist", id="unknown-user"),
]


@pytest.mark.parametrize(("settings", "message"), ERRORS)
def test_plan_errors(settings: dict[str, Any], message: str) -> None:
    settings.setdefault("proxy_user", 4190)
    result = build_plan(InterceptSettings(**settings), lookup_user={"meshagent": 999}.__getitem__)
    assert isinstance(result, PlanError)
    assert message in result.message and result.hint


def test_user_name_without_lookup_is_an_error() -> None:
    result = build_plan(InterceptSettings(proxy_user="meshagent"))
    assert isinstance(result, PlanError) and "numeric uid" in result.hint


INVARIANT_CONFIGS = [
    {},
    {"inbound_mode": "tproxy", "ipv6": False},
    {"capture_ssh": True, "capture_admin_port": True, "outbound_cidrs": ["198.18.0.0/15"]},
    {"skip_uids": [1], "inbound_skip_cidrs": ["198.18.5.0/24", "2001:db8::/48"], "outbound_skip_ports": [53]},
]


@pytest.mark.parametrize("settings", INVARIANT_CONFIGS)
def test_invariants(settings: dict[str, Any]) -> None:
    """Own chains only, jumps alone in built-in chains (a guard's jump takes only un-redirected
    connection openings), a comment on every rule, uid skip first."""
    p = plan(**settings)
    not_taken = NoMark(0x2000000) if p.inbound_mode == "tproxy" else NotRedirected()
    for rule in p.rules:
        assert rule.comment.startswith("meshagent: ")
        assert rule.chain.startswith(CHAIN_PREFIX) or rule.chain in BUILTIN_CHAINS
        if rule.chain in BUILTIN_CHAINS:
            assert isinstance(rule.action, Jump)
            if rule.table == "filter":
                assert rule.first and rule.action.chain.endswith("_GUARD")
                expected = (Syn(), not_taken if rule.chain == "INPUT" else NotRedirected())
                assert rule.matches == expected
            else:
                assert rule.matches == ()
        if isinstance(rule.action, Reject):
            assert rule.table == "filter" and rule.chain.endswith("_GUARD") and Syn() in rule.matches
    assert outbound(p)[0].matches == (UidOwner(4190),)
    assert p.to_dict()["rules"]


@pytest.mark.parametrize("settings", INVARIANT_CONFIGS)
def test_guard_mirrors_capture(settings: dict[str, Any]) -> None:
    """Each guard chain holds its capture chain's exclusions, in order, then refuses what that
    chain would have captured but nobody redirected."""
    p = plan(**settings)
    for capture, guard in (
        ("MESHAGENT_OUTBOUND", "MESHAGENT_OUTBOUND_GUARD"),
        ("MESHAGENT_INBOUND", "MESHAGENT_INBOUND_GUARD"),
    ):
        mine = [r for r in p.rules if r.chain == capture]
        theirs = [r for r in p.rules if r.chain == guard]
        skips = [
            (r.matches, r.family)
            for r in mine
            if isinstance(r.action, Return)
            and not any(isinstance(m, Established | TransparentSocket) for m in r.matches)
        ]
        assert [(r.matches, r.family) for r in theirs if isinstance(r.action, Return)] == skips
        takes = [r for r in mine if isinstance(r.action, Redirect | TProxy)]
        refuses = [r for r in theirs if isinstance(r.action, Reject)]
        assert [r.matches[: len(t.matches)] for r, t in zip(refuses, takes, strict=True)] == [
            t.matches for t in takes
        ]
        assert all(r.matches[-1] in (NotRedirected(), NoMark(0x2000000)) for r in refuses)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"inbound_ports": ["80-70"]}, "backwards"),
        ({"inbound_ports": [70000]}, "1..65535"),
        ({"outbound_cidrs": ["not-an-ip"]}, "not an IP"),
        ({"backend": "pf"}, "not one of"),
        ({"inbound_mode": "ebpf"}, "not one of"),
        ({"skip_uids": ["root"]}, "numeric ids"),
        ({"proxy_mark": -1}, "0..2^32-1"),
    ],
)
def test_config_rejects(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("^", r"\^")):
        InterceptSettings(**section)


def test_config_normalises() -> None:
    s = InterceptSettings(inbound_ports=[80, "8000-8100"], outbound_skip_cidrs=["10.1.2.3"])
    assert s.inbound_ports == (80, "8000-8100")
    assert s.outbound_skip_cidrs == ("10.1.2.3/32",)


def test_enrolled_authority_is_skipped_by_address_and_port() -> None:
    result = build_plan(
        InterceptSettings(),
        authority=[("198.18.9.9", 8443), ("2001:db8::9", 8443)],
        lookup_user={"meshagent": 999}.__getitem__,
    )
    assert isinstance(result, Plan)
    skips = [r.matches for r in outbound(result) if DstNet("198.18.9.9/32") in r.matches]
    assert skips == [(DstNet("198.18.9.9/32"), DstPorts((PortRange(8443, 8443),)))], skips
    assert {e.value for e in result.exclusions if e.what == "authority"} == {
        "198.18.9.9:8443",
        "[2001:db8::9]:8443",
    }


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_from_dict_inverts_to_dict(mode: str) -> None:
    """A plan crosses to the conntrack child as JSON and comes back equal."""
    settings = InterceptSettings(proxy_user=4190, inbound_mode=mode, outbound_ports=(443, "6000-6010"))
    p = build_plan(settings, authority=[("198.18.9.9", 8443)])
    assert isinstance(p, Plan)
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
