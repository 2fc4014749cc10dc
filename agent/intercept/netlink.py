"""Policy routing for TPROXY, over netlink with pyroute2 (no `ip` subprocess).

For each family the plan asks for:

    ip rule add fwmark MARK/MARK lookup TABLE pref PRIORITY proto 77
    ip route replace local default dev lo table TABLE proto 77

Everything we add carries routing protocol 77 (`plan.RTPROTO`), so `remove_routes` finds and
deletes exactly ours without knowing the config that made them; nothing else is touched.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Sequence
from typing import Any

from agent.logs import get_logger

from .errors import InterceptError
from .plan import RTPROTO, Family, PolicyRoute

log = get_logger("meshagent.intercept")

_AF: dict[Family, int] = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT: dict[Family, str] = {4: "0.0.0.0/0", 6: "::/0"}
SCOPE_HOST = 254


def describe(route: PolicyRoute) -> list[str]:
    """The change in `ip` command words, for `--dry-run` and `show`."""
    v = f"-{route.family}"
    return [
        f"ip {v} rule add fwmark {route.mark:#x}/{route.mark:#x} lookup {route.table} "
        f"pref {route.priority} proto {RTPROTO}",
        f"ip {v} route replace local default dev lo table {route.table} proto {RTPROTO}",
    ]


def _ours(ipr: Any, family: Family) -> tuple[list[Any], list[Any]]:
    af = _AF[family]
    rules = [r for r in ipr.get_rules(family=af) if r.get("FRA_PROTOCOL") == RTPROTO]
    tables = {r.get("FRA_TABLE") or r["table"] for r in rules}
    routes = []
    for table in sorted(tables):
        routes += [r for r in ipr.get_routes(family=af, table=table) if r.get("proto") == RTPROTO]
    return rules, routes


def current() -> list[dict[str, Any]]:
    """Our rules and routes as the kernel has them now."""
    out: list[dict[str, Any]] = []
    with _iproute() as ipr:
        for family in (4, 6):
            fam: Family = 4 if family == 4 else 6
            rules, routes = _ours(ipr, fam)
            out += [
                {
                    "family": fam,
                    "kind": "rule",
                    "fwmark": r.get("FRA_FWMARK"),
                    "table": r.get("FRA_TABLE") or r["table"],
                    "priority": r.get("FRA_PRIORITY"),
                }
                for r in rules
            ]
            out += [
                {"family": fam, "kind": "route", "table": r.get("RTA_TABLE"), "type": "local"} for r in routes
            ]
    return out


def apply_routes(routes: Sequence[PolicyRoute]) -> list[str]:
    """Make our policy routing exactly `routes` (stale ones of ours go); idempotent."""
    done: list[str] = []
    with _iproute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family in (4, 6):
            fam: Family = 4 if family == 4 else 6
            want = [r for r in routes if r.family == fam]
            rules, installed = _ours(ipr, fam)
            keep_rules = {(r.mark, r.table, r.priority) for r in want}
            for rule in rules:
                key = (
                    rule.get("FRA_FWMARK"),
                    rule.get("FRA_TABLE") or rule["table"],
                    rule.get("FRA_PRIORITY"),
                )
                if key not in keep_rules or rule.get("FRA_FWMASK") != key[0]:
                    _delete_rule(ipr, fam, rule)
            keep_tables = {r.table for r in want}
            for route in installed:
                if route.get("RTA_TABLE") not in keep_tables:
                    _delete_route(ipr, fam, route)
            present = {
                (r.get("FRA_FWMARK"), r.get("FRA_TABLE") or r["table"], r.get("FRA_PRIORITY"))
                for r in _ours(ipr, fam)[0]
            }
            for r in want:
                _call(
                    ipr.route,
                    "replace",
                    family=_AF[fam],
                    dst=_DEFAULT[fam],
                    table=r.table,
                    type="local",
                    oif=lo,
                    scope=SCOPE_HOST,
                    proto=RTPROTO,
                )
                if (r.mark, r.table, r.priority) not in present:
                    _call(
                        ipr.rule,
                        "add",
                        family=_AF[fam],
                        fwmark=r.mark,
                        fwmask=r.mark,
                        table=r.table,
                        priority=r.priority,
                        protocol=RTPROTO,
                    )
                done += describe(r)
    log.info("intercept.routes_applied", count=len(routes))
    return done


def any_rules() -> bool:
    """Whether any ip rule of ours exists, asked of `ip` rather than pyroute2 so that a host in
    redirect mode never loads pyroute2 (~20 MB of RSS) just to find there is nothing to remove.
    Our routes live only in tables our rules point at."""
    for family in ("-4", "-6"):
        try:
            out = subprocess.run(
                ["ip", "-j", "-d", family, "rule", "show"], capture_output=True, text=True, timeout=10
            )
            rules = json.loads(out.stdout or "[]")
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return True  # cannot tell: let pyroute2 look
        if out.returncode != 0 or any(str(r.get("protocol")) == str(RTPROTO) for r in rules):
            return True
    return False


def remove_routes() -> int:
    """Delete every ip rule and route of ours (protocol 77), both families. Returns how many."""
    if not any_rules():
        return 0
    removed = 0
    with _iproute() as ipr:
        for family in (4, 6):
            fam: Family = 4 if family == 4 else 6
            rules, routes = _ours(ipr, fam)
            for rule in rules:
                _delete_rule(ipr, fam, rule)
                removed += 1
            for route in routes:
                _delete_route(ipr, fam, route)
                removed += 1
    if removed:
        log.info("intercept.routes_removed", count=removed)
    return removed


def _delete_route(ipr: Any, family: Family, route: Any) -> None:
    """Delete one of our local default routes, as the kernel listed it."""
    _call(
        ipr.route,
        "del",
        family=_AF[family],
        dst=_DEFAULT[family],
        table=route.get("RTA_TABLE"),
        type="local",
        oif=route.get("RTA_OIF"),
        scope=SCOPE_HOST,
    )


def _delete_rule(ipr: Any, family: Family, rule: Any) -> None:
    _call(
        ipr.rule,
        "del",
        family=_AF[family],
        fwmark=rule.get("FRA_FWMARK"),
        fwmask=rule.get("FRA_FWMASK"),
        table=rule.get("FRA_TABLE") or rule["table"],
        priority=rule.get("FRA_PRIORITY"),
        protocol=RTPROTO,
    )


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return fn(*args, **kwargs)
    except NetlinkError as exc:
        raise InterceptError(
            f"netlink {getattr(fn, '__name__', 'request')} {args[0]} {kwargs} failed: {exc}",
            "run as root (CAP_NET_ADMIN); IPv6 needs the ipv6 module",
        ) from None


def _iproute() -> Any:
    # Imported here: pyroute2 costs ~20 MB of RSS, and only TPROXY mode needs it while running.
    from pyroute2 import IPRoute

    try:
        return IPRoute()
    except OSError as exc:
        raise InterceptError(f"cannot open a netlink socket: {exc}") from None
