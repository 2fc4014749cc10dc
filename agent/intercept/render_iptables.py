"""Plan -> `iptables-restore` / `ip6tables-restore` text (the same text for nft and legacy flavours).

Pure functions:

- `render(plan, family)`: the plan's own rules, as a fresh table section each (what `show` prints
  and what the golden files hold);
- `transaction(plan, saved, family)`: the exact `--noflush` input that turns the current ruleset
  (`saved`, from `iptables-save`) into "current minus ours plus the plan" in one commit per
  table. Our built-in-chain jumps are deleted with the very lines `iptables-save` printed, our
  chains are declared (which creates or flushes them), stale ones deleted, then the plan's rules
  appended. `plan=None` is `remove`. Nothing that is not ours is named, so nothing else changes;
- `hold(saved)`: what a stopping agent runs while it drains (nothing captured, the
  connections already redirected keep their NAT), until `transaction(None, ...)` removes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .plan import (
    BUILTIN_CHAINS,
    CHAIN_PREFIX,
    COMMENT_PREFIX,
    MULTIPORT_MAX,
    DstNet,
    DstPorts,
    Established,
    Family,
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
    PortRange,
    Redirect,
    Reject,
    Return,
    Rule,
    SetMark,
    SrcNet,
    Syn,
    TProxy,
    TransparentSocket,
    UidOwner,
)

TABLE_ORDER = ("raw", "mangle", "nat", "filter", "security")
MADE_PREFIX = f"{CHAIN_PREFIX}MADE_"


def _port(p: PortRange) -> str:
    return str(p.lo) if p.lo == p.hi else f"{p.lo}:{p.hi}"


def _port_chunks(ports: tuple[PortRange, ...]) -> Iterator[tuple[PortRange, ...]]:
    chunk: list[PortRange] = []
    used = 0
    for p in ports:
        if used + p.slots > MULTIPORT_MAX:
            yield tuple(chunk)
            chunk, used = [], 0
        chunk.append(p)
        used += p.slots
    if chunk:
        yield tuple(chunk)


def _match_args(match: Match) -> list[str]:
    if isinstance(match, InIface):
        return ["-i", match.name]
    if isinstance(match, OutIface):
        return ["-o", match.name]
    if isinstance(match, SrcNet):
        return ["-s", match.net]
    if isinstance(match, DstNet):
        return ["-d", match.net]
    if isinstance(match, UidOwner):
        return ["-m", "owner", "--uid-owner", str(match.uid)]
    if isinstance(match, GidOwner):
        return ["-m", "owner", "--gid-owner", str(match.gid)]
    if isinstance(match, Mark):
        return ["-m", "mark", "--mark", f"{match.value:#x}/{match.mask:#x}"]
    if isinstance(match, TransparentSocket):
        return ["-m", "socket", "--transparent"]
    if isinstance(match, Established):
        return ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"]
    if isinstance(match, NotRedirected):
        return ["-m", "conntrack", "!", "--ctstate", "DNAT"]
    if isinstance(match, NoMark):
        return ["-m", "mark", "!", "--mark", f"{match.mask:#x}/{match.mask:#x}"]
    if isinstance(match, Syn):
        return ["-m", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN"]
    if isinstance(match, LocalDst):
        return ["-m", "addrtype", "--dst-type", "LOCAL"]
    if isinstance(match, DstPorts):
        if len(match.ports) == 1:
            return ["-m", "tcp", "--dport", _port(match.ports[0])]
        return ["-m", "multiport", "--dports", ",".join(_port(p) for p in match.ports)]
    raise TypeError(f"unknown match {match!r}")


def _action_args(rule: Rule) -> list[str]:
    action = rule.action
    if isinstance(action, Return):
        return ["-j", "RETURN"]
    if isinstance(action, Jump):
        return ["-j", action.chain]
    if isinstance(action, Redirect):
        return ["-j", "REDIRECT", "--to-ports", str(action.port)]
    if isinstance(action, TProxy):
        return [
            "-j",
            "TPROXY",
            "--on-port",
            str(action.port),
            "--tproxy-mark",
            f"{action.mark:#x}/{action.mark:#x}",
        ]
    if isinstance(action, SetMark):
        return ["-j", "MARK", "--set-xmark", f"{action.mark:#x}/{action.mark:#x}"]
    if isinstance(action, Reject):
        return ["-j", "REJECT", "--reject-with", "tcp-reset"]
    raise TypeError(f"unknown action {action!r}")


def rule_lines(rule: Rule) -> list[str]:
    """`-A CHAIN ...` lines for one rule (several when a port list overflows multiport)."""
    variants: list[list[Match]] = [[]]
    for match in rule.matches:
        if isinstance(match, DstPorts) and len(match.ports) > 1:
            variants = [[*v, DstPorts(chunk)] for v in variants for chunk in _port_chunks(match.ports)]
        else:
            variants = [[*v, match] for v in variants]
    lines = []
    for matches in variants:
        args = ["-I" if rule.first else "-A", rule.chain, "-p", "tcp"]
        for match in matches:
            args += _match_args(match)
        args += ["-m", "comment", "--comment", f'"{rule.comment}"']
        args += _action_args(rule)
        lines.append(" ".join(args))
    return lines


def _table_rules(plan: Plan, table: str, family: Family) -> list[Rule]:
    return [r for r in plan.rules if r.table == table and r.applies_to(family)]


def render(plan: Plan, family: Family) -> str:
    """The plan's rules for one family as `iptables-restore` input (empty when the family is off)."""
    if family not in plan.families:
        return ""
    out: list[str] = []
    for table in plan.tables():
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in plan.own_chains(table)]
        for rule in _table_rules(plan, table, family):
            out += rule_lines(rule)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


# -- reading iptables-save -------------------------------------------------------------------


@dataclass
class OwnedTable:
    """What of ours one table holds, as `iptables-save` printed it."""

    chains: list[str] = field(default_factory=list)
    builtin_rules: list[str] = field(default_factory=list)  # "-A PREROUTING ..." lines, verbatim
    foreign_refs: list[str] = field(default_factory=list)  # others' rules jumping into our chains


def is_ours(line: str) -> bool:
    """A rule line that carries our comment or jumps to one of our chains."""
    return (
        f'--comment "{COMMENT_PREFIX}:' in line
        or f"--comment {COMMENT_PREFIX}:" in line
        or f"-j {CHAIN_PREFIX}" in line
        or f"-g {CHAIN_PREFIX}" in line
    )


def owned(saved: str) -> dict[str, OwnedTable]:
    """Our chains and built-in-chain rules per table in an `iptables-save` dump."""
    tables: dict[str, OwnedTable] = {}
    current: OwnedTable | None = None
    for raw in saved.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], OwnedTable())
        elif current is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":" + CHAIN_PREFIX):
            current.chains.append(line[1:].split()[0])
        elif line.startswith("-A ") and is_ours(line):
            chain = line.split()[1]
            if chain in BUILTIN_CHAINS:
                current.builtin_rules.append(line)
            elif not chain.startswith(CHAIN_PREFIX):
                current.foreign_refs.append(line)
    return {name: t for name, t in tables.items() if t.chains or t.builtin_rules or t.foreign_refs}


def marker(obj: str) -> str:
    """The empty chain that records, in the table itself, that we created `obj` (a built-in
    chain's name, or TABLE): iptables-nft never deletes what it created, so we do (`nftobjects`)."""
    return f"{MADE_PREFIX}{obj}"


def made(saved: str) -> dict[str, list[str]]:
    """table -> objects our markers say we created, in an `iptables-save` dump."""
    return {
        name: [c[len(MADE_PREFIX) :] for c in t.chains if c.startswith(MADE_PREFIX)]
        for name, t in owned(saved).items()
        if any(c.startswith(MADE_PREFIX) for c in t.chains)
    }


def builtin_chains(plan: Plan, table: str, family: Family) -> list[str]:
    """Built-in chains of `table` that the plan puts rules in."""
    seen: dict[str, None] = {}
    for rule in _table_rules(plan, table, family):
        if rule.chain in BUILTIN_CHAINS:
            seen.setdefault(rule.chain, None)
    return list(seen)


def to_tidy(plan: Plan | None, saved: str, family: Family) -> dict[str, list[str]]:
    """What we created and the transaction gives up (its table is no longer used): delete once empty."""
    active = plan if plan is not None and family in plan.families else None
    wanted = active.tables() if active else []
    return {table: objs for table, objs in made(saved).items() if table not in wanted}


HOLD_COMMENT = f"{COMMENT_PREFIX}: draining: nothing captured; keeps conntrack on"


def hold(saved: str) -> str:
    """`--noflush` input for a stopping agent: ours removed as by `transaction(None, ...)`, except
    the marker chains (the later remove still tidies what we created), plus, where we had rules
    in a nat built-in chain, one `conntrack` rule there. "" when nothing of ours needs holding.

    Removing our rules can take the last conntrack users (REDIRECT, `-m conntrack`) out of the
    namespace: the kernel unregisters conntrack's hooks, and NAT without conntrack no longer
    translates the connections already redirected (the app's port answers them with a reset).
    The rule keeps one user and changes no packet: it has no target, and nat sees only a flow's
    first packet, never an ESTABLISHED one. Keeping the nat chains without it was measured to
    reset those connections all the same. (The same text for both families.)"""
    have = owned(saved)
    out: list[str] = []
    for table in [t for t in TABLE_ORDER if t in have]:
        current = have[table]
        stale = [c for c in current.chains if not c.startswith(MADE_PREFIX)]
        if not (stale or current.builtin_rules or current.foreign_refs):
            continue  # only markers: nothing captures here, and remove tidies them later
        out.append(f"*{table}")
        out += _removal_lines(current, current.chains, stale)
        if table == "nat" and current.builtin_rules:
            # in a built-in chain we already use: one we would create could not be tidied later
            chain = current.builtin_rules[0].split()[1]
            out.append(
                f'-A {chain} -p tcp -m conntrack --ctstate ESTABLISHED -m comment --comment "{HOLD_COMMENT}"'
            )
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def _removal_lines(current: OwnedTable, declared: Sequence[str], stale: Sequence[str]) -> list[str]:
    """Declare (create or flush) `declared`, delete our built-in-chain rules and others' jumps
    into our chains (with the very lines `iptables-save` printed), then delete `stale` chains."""
    out = [f":{chain} - [0:0]" for chain in declared]
    out += ["-D" + line[2:] for line in [*current.builtin_rules, *current.foreign_refs]]
    out += [f"-X {chain}" for chain in stale]
    return out


def transaction(
    plan: Plan | None, saved: str, family: Family, created: Mapping[str, Sequence[str]] | None = None
) -> str:
    """`--noflush` restore input: current ruleset minus ours, plus `plan` (None: just remove).

    Returns "" when there is nothing to do. Others' rules that jump into our chains (someone
    hand-added one) are deleted too, or the chain could not be removed; `foreign_refs` lists them.
    `created`: table -> objects (built-in chains, TABLE) this apply creates; a marker chain for
    each records it, and markers already there are kept while the table stays in use.
    """
    have = owned(saved)
    active = plan if plan is not None and family in plan.families else None
    wanted = active.tables() if active else []
    tables = [t for t in TABLE_ORDER if t in wanted or t in have]
    out: list[str] = []
    for table in tables:
        current = have.get(table, OwnedTable())
        chains = active.own_chains(table) if active and table in wanted else []
        if table in wanted:
            markers = [c for c in current.chains if c.startswith(MADE_PREFIX)]
            markers += [marker(o) for o in (created or {}).get(table, ()) if marker(o) not in markers]
            chains = [*chains, *markers]
        stale = [c for c in current.chains if c not in chains]
        out.append(f"*{table}")
        out += _removal_lines(current, [*chains, *stale], stale)
        if active is not None:
            for rule in _table_rules(active, table, family):
                out += rule_lines(rule)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""
