"""Plan -> `nft -f` text: one table `meshagent` (inet for both families, ip or ip6 for one).

nftables keeps each table to itself: our base chains hook in beside everyone else's and never
edit them, so applying is "delete our table, define it again" in one atomic `nft -f`
transaction, and removing is deleting the table. The prelude first declares, then deletes our
table in every family, so a re-apply (or a switch between inet and ip) starts from nothing
and never fails on a missing table.
"""

from __future__ import annotations

from .plan import (
    CHAIN_PREFIX,
    INPUT,
    NFT_TABLE,
    OUTPUT,
    PREROUTING,
    DstNet,
    DstPorts,
    Established,
    GidOwner,
    InIface,
    Jump,
    LocalDst,
    Mark,
    Match,
    NoMark,
    NotRedirected,
    OutIface,
    Plan,
    Redirect,
    Reject,
    Return,
    Rule,
    SetMark,
    SrcNet,
    Syn,
    Table,
    TProxy,
    TransparentSocket,
    UidOwner,
    family_of,
)

NFT_FAMILIES = ("ip", "ip6", "inet")

_BASE = {
    ("nat", PREROUTING): "type nat hook prerouting priority dstnat; policy accept;",
    ("nat", OUTPUT): "type nat hook output priority -100; policy accept;",
    ("mangle", PREROUTING): "type filter hook prerouting priority mangle; policy accept;",
    ("filter", OUTPUT): "type filter hook output priority filter; policy accept;",
    ("filter", INPUT): "type filter hook input priority filter; policy accept;",
}


def table_family(plan: Plan) -> str:
    if plan.families == (4,):
        return "ip"
    if plan.families == (6,):
        return "ip6"
    return "inet"


def chain_name(table: Table, chain: str) -> str:
    """`MESHAGENT_INBOUND` in nat -> `nat_inbound`; built-in `PREROUTING` in nat -> `prerouting_nat`."""
    if chain.startswith(CHAIN_PREFIX):
        return f"{table}_{chain[len(CHAIN_PREFIX) :].lower()}"
    return f"{chain.lower()}_{table}"


def _addr(net: str) -> str:
    return "ip" if family_of(net) == 4 else "ip6"


def _match(match: Match) -> str:
    if isinstance(match, InIface):
        return f'iifname "{match.name}"'
    if isinstance(match, OutIface):
        return f'oifname "{match.name}"'
    if isinstance(match, SrcNet):
        return f"{_addr(match.net)} saddr {match.net}"
    if isinstance(match, DstNet):
        return f"{_addr(match.net)} daddr {match.net}"
    if isinstance(match, UidOwner):
        return f"meta skuid {match.uid}"
    if isinstance(match, GidOwner):
        return f"meta skgid {match.gid}"
    if isinstance(match, Mark):
        return f"meta mark & {match.mask:#x} == {match.value:#x}"
    if isinstance(match, TransparentSocket):
        return "socket transparent 1"
    if isinstance(match, Established):
        return "ct state established,related"
    if isinstance(match, NotRedirected):
        return "ct status & dnat == 0"
    if isinstance(match, NoMark):
        return f"meta mark & {match.mask:#x} == 0"
    if isinstance(match, Syn):
        return "tcp flags & (fin | syn | rst | ack) == syn"
    if isinstance(match, LocalDst):
        return "fib daddr type local"
    if isinstance(match, DstPorts):
        if len(match.ports) == 1:
            return f"tcp dport {match.ports[0]}"
        return "tcp dport { " + ", ".join(str(p) for p in match.ports) + " }"
    raise TypeError(f"unknown match {match!r}")


def _action(rule: Rule) -> str:
    action = rule.action
    if isinstance(action, Return):
        return "return"
    if isinstance(action, Jump):
        return f"jump {chain_name(rule.table, action.chain)}"
    if isinstance(action, Redirect):
        return f"redirect to :{action.port}"
    if isinstance(action, TProxy):
        return f"tproxy to :{action.port} meta mark set meta mark | {action.mark:#x} accept"
    if isinstance(action, SetMark):
        return f"meta mark set meta mark | {action.mark:#x}"
    if isinstance(action, Reject):
        return "reject with tcp reset"
    raise TypeError(f"unknown action {action!r}")


def rule_text(rule: Rule) -> str:
    parts = ["meta l4proto tcp", *(_match(m) for m in rule.matches), _action(rule)]
    return " ".join(parts) + f' comment "{rule.comment}"'


def render(plan: Plan) -> str:
    """The plan as one nft table definition (what `show` prints and the golden files hold)."""
    rules = [r for r in plan.rules if r.family is None or r.family in plan.families]
    chains: dict[tuple[Table, str], list[str]] = {}
    for rule in rules:
        chains.setdefault((rule.table, rule.chain), []).append(rule_text(rule))
    out = [
        f"table {table_family(plan)} {NFT_TABLE} {{",
        '\tcomment "meshagent traffic interception; remove with: meshagent intercept remove"',
    ]
    for (table, chain), texts in chains.items():
        out.append(f"\tchain {chain_name(table, chain)} {{")
        if (table, chain) in _BASE:
            out.append(f"\t\t{_BASE[(table, chain)]}")
        out += [f"\t\t{t}" for t in texts]
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


def prelude(families: tuple[str, ...] = NFT_FAMILIES) -> str:
    """Declare-then-delete our table in each family: valid whether or not it exists."""
    return "".join(f"table {f} {NFT_TABLE}\ndelete table {f} {NFT_TABLE}\n" for f in families)


def transaction(plan: Plan | None, present: tuple[str, ...] = NFT_FAMILIES) -> str:
    """`nft -f` input: drop our table(s) and (unless plan is None) define the plan's. "" if nothing to do.

    `present`: families in which our table exists now; for `remove` only those are named, so
    removing twice does nothing at all.
    """
    if plan is None:
        return prelude(present) if present else ""
    return prelude() + render(plan)
