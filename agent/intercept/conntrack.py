"""Stale conntrack entries that would carry a new connection past capture, found and deleted.

NAT rules only see a conntrack flow's first packet. An entry left from before our rules were in
(the agent was stopped, a firewall's `ct state established,related accept` kept tracking) that
was never redirected lets a later connection with the same 4-tuple skip the proxy. Right after
the rules are applied, `clear_stale(plan)` deletes such entries, each by its exact tuple:

- TCP entries only, in the default zone, that nobody NATed (so never an entry we redirected,
  never Docker's or kube-proxy's DNAT/masquerade), and not in TIME_WAIT (a new SYN replaces
  such an entry, and capture sees it);
- of a flow the plan captures: outbound from one of this host's addresses, or inbound to one,
  on a port and address the plan takes, with its exclusions (SSH, the admin port, the
  authority, skipped CIDRs and ports) honoured;
- with no local socket: a live connection (opened before the rules, or the proxy's own) is
  never touched.

Never a flush; at most `BUDGET_S` seconds per apply. Done over netlink with pyroute2 (already
a dependency for policy routing; no `conntrack` binary on the host, no subprocess per entry,
and the unit already allows AF_NETLINK), in one short-lived child per apply so that the daemon
never imports pyroute2 in redirect mode (`clear_stale`; `sweep` is the child's work).
The guard rule (see `plan`) refuses what slips through or is left when the budget runs
out; this keeps it from refusing connections needlessly. Pure selection (`stale`) is apart from the I/O.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.logs import get_logger

from .errors import InterceptError
from .plan import (
    INBOUND,
    OUTBOUND,
    DstNet,
    DstPorts,
    Established,
    Family,
    InIface,
    LocalDst,
    Match,
    OutIface,
    Plan,
    Redirect,
    Return,
    SrcNet,
    Syn,
    TProxy,
    TransparentSocket,
)
from .tools import child

log = get_logger("meshagent.intercept")

BUDGET_S = 3.0
"""Longest the cleanup may take per apply."""
CHILD_SLACK_S = 20.0
"""Time the child gets beyond the budget: interpreter and pyroute2 start (~0.3 s idle)."""
CHUNK = 500
"""Entries judged (against a fresh socket list) and deleted at a time while the dump goes on."""
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
_AF: dict[Family, int] = {4: socket.AF_INET, 6: socket.AF_INET6}
_PROC_TCP: dict[Family, Path] = {4: Path("/proc/net/tcp"), 6: Path("/proc/net/tcp6")}
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[Address, int]


@dataclass(frozen=True)
class Flow:
    """A conntrack entry's original direction, plus what decides whether it may go."""

    family: Family
    src: Address
    sport: int
    dst: Address
    dport: int
    nat: bool
    """Someone (we, or another program) rewrote an address or port of it."""
    zone: int = 0
    state: str = ""

    def __str__(self) -> str:
        return f"{self.src}:{self.sport}->{self.dst}:{self.dport} {self.state}".strip()


# -- selection (pure) ------------------------------------------------------------------------


def _matches(match: Match, flow: Flow, inbound: bool, local: frozenset[Address]) -> bool | None:
    """Whether the flow's first packet would match; None when a match cannot be judged from the
    entry (uid, gid, mark: the socket is gone, so the no-socket rule decides instead)."""
    if isinstance(match, DstPorts):
        return any(p.lo <= flow.dport <= p.hi for p in match.ports)
    if isinstance(match, DstNet):
        return flow.dst in ipaddress.ip_network(match.net, strict=False)
    if isinstance(match, SrcNet):
        return flow.src in ipaddress.ip_network(match.net, strict=False)
    if isinstance(match, OutIface | InIface):
        # loopback: the only interface name the plan matches on; traffic between this host's
        # own addresses (or 127/8, ::1) goes over it
        return match.name == "lo" and _local(flow.src if inbound else flow.dst, local)
    if isinstance(match, LocalDst):
        return _local(flow.dst, local)
    if isinstance(match, Syn):
        return True
    return None


def _local(addr: Address, local: frozenset[Address]) -> bool:
    return addr in local or addr.is_loopback


def captured(plan: Plan, flow: Flow, local: frozenset[Address]) -> bool:
    """Would the plan have redirected this flow's first packet (as far as the entry tells)?"""
    inbound = _local(flow.dst, local) and not _local(flow.src, local)
    outbound = _local(flow.src, local) and not _local(flow.dst, local)
    if not (inbound or outbound):
        return False
    chain = INBOUND if inbound else OUTBOUND
    for rule in plan.rules:
        if rule.chain != chain or not rule.applies_to(flow.family):
            continue
        if any(isinstance(m, Established | TransparentSocket) for m in rule.matches):
            continue  # tproxy's rules for packets of established connections
        results = [_matches(m, flow, inbound, local) for m in rule.matches]
        if isinstance(rule.action, Return):
            if results and all(r is True for r in results):
                return False  # excluded (SSH, admin port, authority, skipped CIDR or port...)
        elif isinstance(rule.action, Redirect | TProxy) and all(r is not False for r in results):
            return True
    return False


def stale(
    plan: Plan,
    flows: Iterable[Flow],
    local: frozenset[Address],
    sockets: frozenset[tuple[Endpoint, Endpoint]],
) -> list[Flow]:
    """The flows to delete: un-NATed, default zone, captured by the plan, no local socket.

    `sockets`: (local endpoint, remote endpoint) of every TCP socket in this namespace, any state.
    """
    out = []
    for flow in flows:
        if flow.nat or flow.zone or flow.family not in plan.families or flow.state == "TIME_WAIT":
            continue  # a SYN on a TIME_WAIT entry starts a new one, which capture sees
        if not captured(plan, flow, local):
            continue
        inbound = _local(flow.dst, local)
        ends = ((flow.dst, flow.dport), (flow.src, flow.sport))
        if (ends if inbound else (ends[1], ends[0])) in sockets:
            continue
        out.append(flow)
    return out


# -- the kernel ------------------------------------------------------------------------------


def _unmap(addr: Address) -> Address:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _proc_addr(hexaddr: str) -> Address:
    raw = bytes.fromhex(hexaddr)
    # /proc/net/tcp* prints each 32-bit word in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return _unmap(ipaddress.ip_address(words))


def local_sockets(paths: Iterable[Path] = _PROC_TCP.values()) -> frozenset[tuple[Endpoint, Endpoint]]:
    """(local, remote) endpoints of every TCP socket of this network namespace, from /proc/net."""
    out: set[tuple[Endpoint, Endpoint]] = set()
    for path in paths:
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 3:
                continue
            (la, lp), (ra, rp) = (f.split(":") for f in fields[1:3])
            out.add(((_proc_addr(la), int(lp, 16)), (_proc_addr(ra), int(rp, 16))))
    return frozenset(out)


def local_addresses() -> frozenset[Address]:
    """This host's own addresses (loopback ones are judged by `is_loopback`)."""
    from pyroute2 import IPRoute

    found: set[Address] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            value = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if value:
                found.add(_unmap(ipaddress.ip_address(value)))
    return frozenset(found)


def _flows(family: Family) -> Iterator[tuple[Flow, tuple[Any, int | None]]]:
    """Each TCP entry as a `Flow`, with what deletes exactly that entry: its original tuple and
    its conntrack id."""
    from pyroute2.conntrack import Conntrack, NFCTAttrTuple

    with Conntrack(nfgen_family=_AF[family]) as ct:
        for entry in ct.dump_entries(tuple_orig=NFCTAttrTuple(family=_AF[family], proto=socket.IPPROTO_TCP)):
            orig = entry.tuple_orig
            if orig.proto != socket.IPPROTO_TCP or orig.saddr is None or orig.daddr is None:
                continue
            flow = Flow(
                family,
                _unmap(ipaddress.ip_address(orig.saddr)),
                int(orig.sport),
                _unmap(ipaddress.ip_address(orig.daddr)),
                int(orig.dport),
                nat=bool((entry.status or 0) & (IPS_SRC_NAT | IPS_DST_NAT)),
                zone=int(entry.zone or 0),
                state=entry.protoinfo.state_name() if entry.protoinfo is not None else "",
            )
            yield flow, (orig, entry.id)


@dataclass(frozen=True)
class Cleared:
    """What `clear_stale` did."""

    deleted: tuple[str, ...] = ()
    error: str = ""
    partial: bool = False
    """The time budget ran out before every entry was examined (the guard refuses the rest)."""


def clear_stale(plan: Plan, budget_s: float = BUDGET_S) -> Cleared:
    """Delete the stale conntrack entries of flows `plan` captures (call after applying it).

    Runs `sweep` in a short-lived child (`python -m agent.intercept.conntrack`, the plan as JSON
    on stdin): pyroute2 would otherwise stay imported in `meshagent run` for good (~10 MB of
    RSS, against a 40 MB idle goal). Never raises: a failure is logged and reported, and
    applying the rules still succeeds.
    """
    try:
        doc = child("conntrack", [], {"plan": plan.to_dict(), "budget_s": budget_s}, budget_s + CHILD_SLACK_S)
        cleared = Cleared(tuple(doc["deleted"]), str(doc["error"]), bool(doc["partial"]))
    except (InterceptError, KeyError, TypeError) as exc:
        cleared = Cleared(error=exc.message if isinstance(exc, InterceptError) else f"bad reply: {exc!r}")
    if cleared.error:
        log.warning("intercept.conntrack_cleanup_failed", error=cleared.error, deleted=len(cleared.deleted))
    elif cleared.partial:
        log.warning("intercept.conntrack_cleanup_partial", deleted=len(cleared.deleted), budget_s=budget_s)
    if cleared.deleted:
        log.info(
            "intercept.conntrack_cleared", deleted=len(cleared.deleted), flows=",".join(cleared.deleted[:10])
        )
    return cleared


def sweep(plan: Plan, budget_s: float = BUDGET_S) -> Cleared:
    """`clear_stale`'s work, in this process (which then holds pyroute2). Never raises.

    Bounded by `budget_s` (pyroute2 parses some 1,500 entries/s, so a host with tens of
    thousands of entries would otherwise hold up the agent's start); what is left is the
    guard's to refuse.
    """
    from pyroute2.conntrack import Conntrack

    deadline = time.monotonic() + budget_s
    deleted: list[str] = []
    partial = False

    def judge(ct: Any, chunk: dict[Flow, tuple[Any, int | None]]) -> None:
        sockets = local_sockets()  # after the chunk's dump: a listed entry's socket exists by now
        for flow in stale(plan, chunk, local, sockets):
            orig, ctid = chunk[flow]
            try:
                # By id too: the tuple alone would delete whatever entry holds it now, e.g. a new,
                # redirected connection that reopened the tuple since the dump (its NAT would go).
                ct.entry("del", tuple_orig=orig, id=ctid)
            except Exception as exc:  # gone or replaced meanwhile (ENOENT): nothing of ours to do
                if getattr(exc, "code", None) != 2:
                    raise
                continue
            deleted.append(str(flow))

    try:
        local = local_addresses()
        for family in plan.families:
            with Conntrack(nfgen_family=_AF[family]) as ct:
                chunk: dict[Flow, tuple[Any, int | None]] = {}
                for flow, handle in _flows(family):
                    chunk[flow] = handle
                    if len(chunk) >= CHUNK:
                        judge(ct, chunk)
                        chunk = {}
                    if time.monotonic() > deadline:
                        partial = True
                        break
                judge(ct, chunk)
            if partial:
                break
    except Exception as exc:  # netlink or /proc failure: report, never fail the apply
        return Cleared(tuple(deleted), str(exc) or repr(exc), partial)
    return Cleared(tuple(deleted), partial=partial)


def main() -> int:
    """The child: {"plan": Plan.to_dict(), "budget_s": float} on stdin, `Cleared` as JSON out."""
    doc = json.load(sys.stdin)
    cleared = sweep(Plan.from_dict(doc["plan"]), float(doc["budget_s"]))
    json.dump(
        {"deleted": list(cleared.deleted), "error": cleared.error, "partial": cleared.partial}, sys.stdout
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
