"""The interception plan: `[intercept]` settings in, a list of typed rules out. Pure: no I/O.

The rules are data, as in istio-iptables and Kuma: each `Rule` names its table, its chain,
its matches (small value types), one action and a comment. The renderers (`render_iptables`,
`render_nft`) turn the same plan into `iptables-restore` or `nft -f` text; the backends only
run that text. Invariants every plan keeps (and `tests/intercept` checks):

- every rule sits in a chain of our own (`MESHAGENT_*`; table `meshagent` for nft), except
  one jump per hook from the built-in chain; every rule carries a `meshagent: ...` comment;
- the proxy's own connections (uid, and mark when set) are never captured: no loops;
- loopback is never captured (the app talking to itself, or to this host's own addresses,
  stays on the host and never enters the proxy twice);
- SSH, the admin port and the authority are skipped unless a `capture_*` switch insists,
  and `Plan.exclusions` says so in words;
- inbound capture only takes connections addressed to this host (forwarded traffic, e.g. to
  containers, passes untouched);
- all TCP only. UDP (DNS included) is never touched.

A guard stands behind the capture rules (`filter OUTPUT` and `filter INPUT`, chains
`MESHAGENT_*_GUARD`): NAT only sees a conntrack flow's first packet, so a new connection whose
4-tuple meets a stale, un-redirected conntrack entry would skip capture and go out (or reach
the app) in clear. The guard refuses with a TCP reset any new connection of a captured kind
(same matches, same exclusions) that was not redirected. `conntrack_cleanup` removes such stale
entries when the rules are applied, so the guard rarely has anything to do.

Outbound is always NAT `REDIRECT` in `nat OUTPUT` (the proxy reads SO_ORIGINAL_DST). Inbound
is `REDIRECT` in `nat PREROUTING`, or in `tproxy` mode `TPROXY` in `mangle PREROUTING` with a
firewall mark and a policy route (`fwmark M lookup T`, `local default dev lo table T`) so the
listener sees the original destination as its own address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from agent.config import InterceptSettings, PortSpec

from .errors import PlanError

Family = Literal[4, 6]
Table = Literal["nat", "mangle", "filter"]
Direction = Literal["inbound", "outbound"]

CHAIN_PREFIX = "MESHAGENT_"
COMMENT_PREFIX = "meshagent"
NFT_TABLE = "meshagent"
RTPROTO = 77
"""Routing protocol number on our ip rules and routes, so `remove` finds them without a config."""
TPROXY_RULE_PRIORITY = 4143

PREROUTING = "PREROUTING"
OUTPUT = "OUTPUT"
INPUT = "INPUT"
INBOUND = "MESHAGENT_INBOUND"
OUTBOUND = "MESHAGENT_OUTBOUND"
INBOUND_GUARD = "MESHAGENT_INBOUND_GUARD"
OUTBOUND_GUARD = "MESHAGENT_OUTBOUND_GUARD"
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
RESERVED_TABLES = (0, 253, 254, 255)
MULTIPORT_MAX = 15  # xt_multiport slots; a range takes two


# -- matches ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortRange:
    lo: int
    hi: int

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"

    @property
    def slots(self) -> int:
        return 1 if self.lo == self.hi else 2

    @staticmethod
    def parse(spec: PortSpec) -> PortRange:
        if isinstance(spec, int):
            return PortRange(spec, spec)
        lo, _, hi = spec.partition("-")
        return PortRange(int(lo), int(hi or lo))


@dataclass(frozen=True)
class InIface:
    name: str


@dataclass(frozen=True)
class OutIface:
    name: str


@dataclass(frozen=True)
class DstPorts:
    ports: tuple[PortRange, ...]


@dataclass(frozen=True)
class SrcNet:
    net: str


@dataclass(frozen=True)
class DstNet:
    net: str


@dataclass(frozen=True)
class UidOwner:
    uid: int


@dataclass(frozen=True)
class GidOwner:
    gid: int


@dataclass(frozen=True)
class Mark:
    """The packet's firewall mark has all of `value`'s bits (under `mask`)."""

    value: int
    mask: int


@dataclass(frozen=True)
class LocalDst:
    """The destination is one of this host's own addresses (forwarded traffic, e.g. to containers,
    is never captured)."""


@dataclass(frozen=True)
class Established:
    """Conntrack says the packet belongs to a known connection (ESTABLISHED or RELATED)."""


@dataclass(frozen=True)
class Syn:
    """A connection's opening packet (SYN without ACK). Capture rules take only these: a
    connection that was open before the rules went in (conntrack may pick it up mid-stream as
    NEW, e.g. an SSH session's replies on a host that had no conntrack before) is never redirected."""


@dataclass(frozen=True)
class TransparentSocket:
    """The packet belongs to an established socket with IP_TRANSPARENT (a TPROXY'd connection)."""


@dataclass(frozen=True)
class NotRedirected:
    """Conntrack says the connection's destination was not rewritten (no DNAT/REDIRECT of anyone's)."""


@dataclass(frozen=True)
class NoMark:
    """None of `mask`'s bits are in the packet's firewall mark (TPROXY did not take it)."""

    mask: int


Match = (
    InIface
    | OutIface
    | DstPorts
    | SrcNet
    | DstNet
    | UidOwner
    | GidOwner
    | Mark
    | LocalDst
    | Established
    | Syn
    | TransparentSocket
    | NotRedirected
    | NoMark
)


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Return:
    pass


@dataclass(frozen=True)
class Jump:
    chain: str


@dataclass(frozen=True)
class Redirect:
    port: int


@dataclass(frozen=True)
class TProxy:
    port: int
    mark: int


@dataclass(frozen=True)
class SetMark:
    """OR `mark` into the packet's firewall mark."""

    mark: int


@dataclass(frozen=True)
class Reject:
    """Refuse with a TCP reset (the sender sees ECONNREFUSED at once, not a timeout)."""


Action = Return | Jump | Redirect | TProxy | SetMark | Reject


@dataclass(frozen=True)
class Rule:
    table: Table
    chain: str
    matches: tuple[Match, ...]
    action: Action
    comment: str
    family: Family | None = None
    """None: both families; 4 or 6 when a match is family-specific (an address)."""
    first: bool = False
    """Insert at the head of a built-in chain (iptables): a filter rule must come before the
    host firewall's own ACCEPTs. nft needs nothing of the kind (our base chains stand apart)."""

    def applies_to(self, family: Family) -> bool:
        return self.family is None or self.family == family


@dataclass(frozen=True)
class PolicyRoute:
    """`ip rule add fwmark MARK/MARK lookup TABLE` + `ip route add local default dev lo table TABLE`."""

    family: Family
    mark: int
    table: int
    priority: int = TPROXY_RULE_PRIORITY


@dataclass(frozen=True)
class Exclusion:
    """One thing that is never captured, and why, for people reading `intercept show`."""

    direction: Literal["inbound", "outbound", "both"]
    what: str
    value: str
    why: str


@dataclass(frozen=True)
class Plan:
    families: tuple[Family, ...]
    inbound_mode: Literal["redirect", "tproxy"]
    inbound_port: int
    outbound_port: int
    proxy_uid: int
    proxy_mark: int
    rules: tuple[Rule, ...]
    routes: tuple[PolicyRoute, ...] = ()
    exclusions: tuple[Exclusion, ...] = ()
    warnings: tuple[str, ...] = ()
    backend: str = "auto"
    """The backend asked for in the config (auto, nft, iptables-nft, iptables-legacy)."""

    def tables(self) -> list[Table]:
        """Tables the plan writes to, in a fixed order."""
        used = {r.table for r in self.rules}
        return [t for t in ("nat", "mangle", "filter") if t in used]

    def own_chains(self, table: Table) -> list[str]:
        """Our chains in `table`, in order of first appearance."""
        seen: dict[str, None] = {}
        for rule in self.rules:
            if rule.table == table and rule.chain.startswith(CHAIN_PREFIX):
                seen.setdefault(rule.chain, None)
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        def rule_doc(rule: Rule) -> dict[str, Any]:
            return {
                "table": rule.table,
                "chain": rule.chain,
                "family": rule.family,
                "matches": [{"type": type(m).__name__, **_fields(m)} for m in rule.matches],
                "action": {"type": type(rule.action).__name__, **_fields(rule.action)},
                "comment": rule.comment,
                "first": rule.first,
            }

        return {
            "families": list(self.families),
            "inbound_mode": self.inbound_mode,
            "inbound_port": self.inbound_port,
            "outbound_port": self.outbound_port,
            "proxy_uid": self.proxy_uid,
            "proxy_mark": self.proxy_mark,
            "backend": self.backend,
            "rules": [rule_doc(r) for r in self.rules],
            "routes": [asdict(r) for r in self.routes],
            "exclusions": [asdict(e) for e in self.exclusions],
            "warnings": list(self.warnings),
        }

    @staticmethod
    def from_dict(doc: dict[str, Any]) -> Plan:
        """The inverse of `to_dict` (a plan handed to a child process as JSON, see `conntrack`)."""
        rules = tuple(
            Rule(
                table=r["table"],
                chain=r["chain"],
                matches=tuple(_part(m) for m in r["matches"]),
                action=_part(r["action"]),
                comment=r["comment"],
                family=r["family"],
                first=r.get("first", False),
            )
            for r in doc["rules"]
        )
        return Plan(
            families=tuple(doc["families"]),
            inbound_mode=doc["inbound_mode"],
            inbound_port=doc["inbound_port"],
            outbound_port=doc["outbound_port"],
            proxy_uid=doc["proxy_uid"],
            proxy_mark=doc["proxy_mark"],
            rules=rules,
            routes=tuple(PolicyRoute(**r) for r in doc["routes"]),
            exclusions=tuple(Exclusion(**e) for e in doc["exclusions"]),
            warnings=tuple(doc["warnings"]),
            backend=doc["backend"],
        )


_PARTS: dict[str, type] = {cls.__name__: cls for cls in (*get_args(Match), *get_args(Action))}


def _part(doc: dict[str, Any]) -> Any:
    """A match or action from its `to_dict` form ({"type": class name, **fields})."""
    fields = {k: v for k, v in doc.items() if k != "type"}
    if "ports" in fields:
        fields["ports"] = tuple(PortRange.parse(p) for p in fields["ports"])
    return _PARTS[doc["type"]](**fields)


def _fields(value: Any) -> dict[str, Any]:
    doc = asdict(value)
    if "ports" in doc:
        doc["ports"] = [str(PortRange(**p)) for p in doc["ports"]]
    return doc


# -- building --------------------------------------------------------------------------------


def family_of(net: str) -> Family:
    return 4 if ipaddress.ip_network(net, strict=False).version == 4 else 6


def _ports(specs: Iterable[PortSpec]) -> tuple[PortRange, ...]:
    return tuple(PortRange.parse(s) for s in specs)


@dataclass
class _Builder:
    rules: list[Rule] = field(default_factory=list)
    exclusions: list[Exclusion] = field(default_factory=list)

    def add(
        self,
        table: Table,
        chain: str,
        matches: Sequence[Match],
        action: Action,
        comment: str,
        family: Family | None = None,
    ) -> None:
        self.rules.append(Rule(table, chain, tuple(matches), action, f"{COMMENT_PREFIX}: {comment}", family))

    def skip(
        self,
        table: Table,
        chain: str,
        match: Match | list[Match],
        comment: str,
        exclusion: Exclusion | None,
        family: Family | None = None,
    ) -> None:
        """RETURN (leave uncaptured) what matches: one match, or all of a list of them."""
        self.add(table, chain, match if isinstance(match, list) else [match], Return(), comment, family)
        if exclusion is not None and exclusion not in self.exclusions:
            self.exclusions.append(exclusion)


def _resolve_uid(user: int | str, lookup_user: Callable[[str], int] | None) -> int | PlanError:
    if isinstance(user, int):
        return user
    if user.isdigit():
        return int(user)
    if lookup_user is None:
        return PlanError(
            f"intercept.proxy_user {user!r} is a name and no user lookup was given",
            "set intercept.proxy_user to a numeric uid",
        )
    try:
        return lookup_user(user)
    except KeyError:
        return PlanError(
            f"intercept.proxy_user {user!r} does not exist on this host",
            "create the user (the package's sysusers snippet does) or set intercept.proxy_user to a uid",
        )


def build_plan(
    settings: InterceptSettings,
    *,
    authority: Sequence[tuple[str, int]] = (),
    lookup_user: Callable[[str], int] | None = None,
) -> Plan | PlanError:
    """Turn `[intercept]` settings into a Plan, or say in a PlanError what is wrong and how to fix it.

    `authority`: (address, port) of the enrolled authority: that port of that address is never
    captured (the whole of each `authority_addresses` entry is not).
    `lookup_user`: name -> uid (e.g. `pwd.getpwnam(n).pw_uid`); raise KeyError for an unknown name.
    """
    uid = _resolve_uid(settings.proxy_user, lookup_user)
    if isinstance(uid, PlanError):
        return uid
    if settings.inbound_port == settings.outbound_port:
        return PlanError(
            f"intercept.inbound_port and intercept.outbound_port are both {settings.inbound_port}",
            "give the proxy's inbound and outbound listeners different ports (defaults 4143 and 4140)",
        )
    tproxy = settings.inbound_mode == "tproxy"
    if tproxy:
        if settings.tproxy_mark == 0:
            return PlanError(
                "intercept.tproxy_mark is 0", "tproxy mode needs a non-zero mark, e.g. 0x2000000"
            )
        if settings.tproxy_mark & settings.proxy_mark:
            return PlanError(
                f"intercept.tproxy_mark {settings.tproxy_mark:#x} shares bits with "
                f"intercept.proxy_mark {settings.proxy_mark:#x}",
                "the proxy's own marked packets would be routed back to this host; pick disjoint marks",
            )
        if settings.tproxy_table in RESERVED_TABLES:
            return PlanError(
                f"intercept.tproxy_table {settings.tproxy_table} is a reserved routing table",
                "pick a table id not in 0, 253 (default), 254 (main), 255 (local), e.g. 4143",
            )
    try:
        authority_eps = [(str(ipaddress.ip_network(a, strict=False)), port) for a, port in authority]
    except ValueError as exc:
        return PlanError(f"authority address is not an IP address: {exc}")
    families: tuple[Family, ...] = (4, 6) if settings.ipv6 else (4,)
    warnings: list[str] = []
    b = _Builder()

    def nets(values: Iterable[str]) -> list[tuple[str, Family]]:
        out: list[tuple[str, Family]] = []
        for net in values:
            fam = family_of(net)
            if fam in families and (net, fam) not in out:
                out.append((net, fam))
        return out

    ssh = _ports(settings.ssh_ports)
    admin = (PortRange(settings.admin_port, settings.admin_port),)
    own = tuple(PortRange(p, p) for p in (settings.inbound_port, settings.outbound_port))

    # ---- outbound: nat OUTPUT -> MESHAGENT_OUTBOUND ---------------------------------------
    b.add("nat", OUTPUT, [], Jump(OUTBOUND), "outbound capture")
    b.skip(
        "nat",
        OUTBOUND,
        UidOwner(uid),
        f"proxy's own connections (uid {uid})",
        Exclusion("outbound", "proxy uid", str(uid), "the proxy's own connections must not loop back"),
    )
    if settings.proxy_mark:
        mark = settings.proxy_mark
        b.skip(
            "nat",
            OUTBOUND,
            Mark(mark, mark),
            f"proxy's own connections (mark {mark:#x})",
            Exclusion("outbound", "proxy mark", f"{mark:#x}", "sockets the proxy marks with SO_MARK"),
        )
    for skip_uid in settings.skip_uids:
        b.skip(
            "nat",
            OUTBOUND,
            UidOwner(skip_uid),
            f"skip uid {skip_uid}",
            Exclusion("outbound", "uid", str(skip_uid), "intercept.skip_uids"),
        )
    for gid in settings.skip_gids:
        b.skip(
            "nat",
            OUTBOUND,
            GidOwner(gid),
            f"skip gid {gid}",
            Exclusion("outbound", "gid", str(gid), "intercept.skip_gids"),
        )
    loopback = Exclusion(
        "both", "loopback", "lo", "the app talking to itself or to this host's own addresses stays local"
    )
    b.skip("nat", OUTBOUND, OutIface("lo"), "loopback and this host's own addresses", loopback)
    if not settings.capture_ssh:
        ssh_x = Exclusion("both", "ssh", _join(ssh), "safe default; set intercept.capture_ssh to capture")
        b.skip("nat", OUTBOUND, DstPorts(ssh), "ssh never captured", ssh_x)
    else:
        warnings.append("intercept.capture_ssh is set: SSH connections go through the proxy")
    if not settings.capture_admin_port:
        admin_x = Exclusion(
            "both", "admin port", _join(admin), "the agent's own admin port (/metrics, /ready)"
        )
        b.skip("nat", OUTBOUND, DstPorts(admin), "agent admin port never captured", admin_x)
    authority_nets = nets(settings.authority_addresses)
    authority_eps = [(net, port) for net, port in authority_eps if family_of(net) in families]
    if settings.capture_authority:
        if authority_nets or authority_eps:
            warnings.append("intercept.capture_authority is set: enrollment and renewal go through the proxy")
    else:
        why = "enrollment and renewal must reach the authority"
        for net, fam in authority_nets:
            b.skip(
                "nat",
                OUTBOUND,
                DstNet(net),
                f"authority {net} never captured",
                Exclusion("outbound", "authority", net, why),
                fam,
            )
        for net, port in authority_eps:
            fam = family_of(net)
            address = net.split("/")[0]
            where = f"[{address}]:{port}" if fam == 6 else f"{address}:{port}"
            b.skip(
                "nat",
                OUTBOUND,
                [DstNet(net), DstPorts((PortRange(port, port),))],
                f"authority {where} never captured",
                Exclusion("outbound", "authority", where, why),
                fam,
            )
    for net, fam in nets(settings.outbound_skip_cidrs):
        b.skip(
            "nat",
            OUTBOUND,
            DstNet(net),
            f"skip destination {net}",
            Exclusion("outbound", "cidr", net, "intercept.outbound_skip_cidrs"),
            fam,
        )
    if settings.outbound_skip_ports:
        ports = _ports(settings.outbound_skip_ports)
        b.skip(
            "nat",
            OUTBOUND,
            DstPorts(ports),
            "skip destination ports",
            Exclusion("outbound", "ports", _join(ports), "intercept.outbound_skip_ports"),
        )
    port_match: list[Match] = [DstPorts(_ports(settings.outbound_ports))] if settings.outbound_ports else []
    redirect_out = Redirect(settings.outbound_port)
    if settings.outbound_cidrs:
        captured = nets(settings.outbound_cidrs)
        if not captured:
            warnings.append("intercept.outbound_cidrs has no address of an enabled family: nothing captured")
        for net, fam in captured:
            b.add("nat", OUTBOUND, [Syn(), DstNet(net), *port_match], redirect_out, f"capture to {net}", fam)
    else:
        b.add("nat", OUTBOUND, [Syn(), *port_match], redirect_out, "capture outbound to the proxy")

    # ---- inbound: nat PREROUTING (redirect) or mangle PREROUTING (tproxy) -------------------
    table: Table = "mangle" if tproxy else "nat"
    b.add(table, PREROUTING, [], Jump(INBOUND), "inbound capture")
    b.skip(table, INBOUND, InIface("lo"), "loopback", loopback)
    if tproxy:
        tm = settings.tproxy_mark
        b.add(table, INBOUND, [TransparentSocket()], SetMark(tm), "established tproxy connection: mark")
        b.add(table, INBOUND, [TransparentSocket()], Return(), "established tproxy connection: done")
        # TPROXY would take any packet addressed here, replies to this host's own outbound
        # connections too, and drop those (their socket is not transparent): new connections only
        b.add(table, INBOUND, [Established()], Return(), "known connections (replies to ours) pass")
    if not settings.capture_ssh:
        b.skip(table, INBOUND, DstPorts(ssh), "ssh never captured", None)
    if not settings.capture_admin_port:
        b.skip(table, INBOUND, DstPorts(admin), "agent admin port never captured", None)
    b.skip(
        table,
        INBOUND,
        DstPorts(own),
        "proxy's own listeners",
        Exclusion("inbound", "proxy ports", _join(own), "connections straight to the proxy's listeners"),
    )
    for net, fam in nets(settings.inbound_skip_cidrs):
        b.skip(
            table,
            INBOUND,
            SrcNet(net),
            f"skip source {net}",
            Exclusion("inbound", "cidr", net, "intercept.inbound_skip_cidrs"),
            fam,
        )
    if settings.inbound_skip_ports:
        ports = _ports(settings.inbound_skip_ports)
        b.skip(
            table,
            INBOUND,
            DstPorts(ports),
            "skip local ports",
            Exclusion("inbound", "ports", _join(ports), "intercept.inbound_skip_ports"),
        )
    # LocalDst: only connections to this host's own addresses. apply.stop_capture relies on it:
    # a tproxy connection's packets then route locally without our mark and policy route, so the
    # drain needs neither.
    in_match: list[Match] = [Syn(), LocalDst()]
    if settings.inbound_ports:
        in_match.append(DstPorts(_ports(settings.inbound_ports)))
    if tproxy:
        action: Action = TProxy(settings.inbound_port, settings.tproxy_mark)
    else:
        action = Redirect(settings.inbound_port)
    b.add(table, INBOUND, in_match, action, "capture inbound to the proxy")
    not_taken: Match = NoMark(settings.tproxy_mark) if tproxy else NotRedirected()
    b.rules += _guard(b.rules, OUTBOUND, OUTBOUND_GUARD, OUTPUT, NotRedirected(), "outbound")
    b.rules += _guard(b.rules, INBOUND, INBOUND_GUARD, INPUT, not_taken, "inbound")
    routes: tuple[PolicyRoute, ...] = ()
    if tproxy:
        routes = tuple(PolicyRoute(f, settings.tproxy_mark, settings.tproxy_table) for f in families)

    if not settings.capture_ssh and settings.inbound_ports:
        listed = [p for p in _ports(settings.inbound_ports) if any(_overlap(p, s) for s in ssh)]
        if listed:
            warnings.append(
                f"intercept.inbound_ports lists SSH port(s) {_join(listed)}: still skipped "
                "(set intercept.capture_ssh to capture SSH)"
            )
    return Plan(
        families=families,
        inbound_mode="tproxy" if tproxy else "redirect",
        inbound_port=settings.inbound_port,
        outbound_port=settings.outbound_port,
        proxy_uid=uid,
        proxy_mark=settings.proxy_mark,
        rules=tuple(b.rules),
        routes=routes,
        exclusions=tuple(b.exclusions),
        warnings=tuple(warnings),
        backend=settings.backend,
    )


def _guard(
    rules: Sequence[Rule], chain: str, guard: str, hook: str, not_taken: Match, direction: str
) -> list[Rule]:
    """The guard for capture chain `chain`: its exclusions, then a reset for what it would have
    captured but did not (a stale conntrack entry carried the connection past NAT). Only
    connection openings that nobody redirected reach the guard chain at all."""
    out = [
        Rule(
            "filter",
            hook,
            (Syn(), not_taken),
            Jump(guard),
            f"{COMMENT_PREFIX}: {direction} guard (new connections that capture missed)",
            first=True,
        )
    ]
    for rule in rules:
        if rule.chain != chain or any(isinstance(m, Established | TransparentSocket) for m in rule.matches):
            continue  # tproxy's bookkeeping for established connections; the guard sees SYNs only
        if isinstance(rule.action, Return):
            out.append(Rule("filter", guard, rule.matches, Return(), rule.comment, rule.family))
        elif isinstance(rule.action, Redirect | TProxy):
            comment = f"{COMMENT_PREFIX}: refuse: {direction} connection not captured (stale conntrack entry)"
            out.append(Rule("filter", guard, (*rule.matches, not_taken), Reject(), comment, rule.family))
    return out


def _join(ports: Iterable[PortRange]) -> str:
    return ",".join(str(p) for p in ports)


def _overlap(a: PortRange, b: PortRange) -> bool:
    return a.lo <= b.hi and b.lo <= a.hi
