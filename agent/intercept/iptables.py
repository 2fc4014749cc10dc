"""The iptables backend: `iptables-restore --noflush` in the nft or the legacy flavour.

Finds the flavour's binaries (`iptables-nft-restore`, `iptables-legacy-save`, ...; on hosts with
only unsuffixed ones, such as RHEL 8, the plain binary if its `--version` names the flavour),
reads the current ruleset with `*-save`, and feeds one `render_iptables.transaction` per address
family to `*-restore --noflush`: one atomic commit per table, others' rules never named.

The legacy flavour's tables are only read when the kernel already has them
(`/proc/net/ip_tables_names`), so looking never creates a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import nftobjects, render_iptables
from .errors import InterceptError
from .plan import Family, Plan
from .tools import Step, read, run, which

Flavour = Literal["nft", "legacy"]
_VERSION_TAG: dict[Flavour, str] = {"nft": "(nf_tables)", "legacy": "(legacy)"}
_BASE: dict[Family, str] = {4: "iptables", 6: "ip6tables"}
_NFT_FAMILY: dict[Family, str] = {4: "ip", 6: "ip6"}
_LEGACY_NAMES: dict[Family, Path] = {
    4: Path("/proc/net/ip_tables_names"),
    6: Path("/proc/net/ip6_tables_names"),
}


@dataclass(frozen=True)
class IptablesTools:
    flavour: Flavour
    save: dict[Family, str] = field(default_factory=dict)
    restore: dict[Family, str] = field(default_factory=dict)


def find_tools(flavour: Flavour) -> IptablesTools | None:
    """The flavour's save/restore binaries per family, or None when IPv4 ones are missing."""
    tools = IptablesTools(flavour)
    for family, base in _BASE.items():
        save, restore = which(f"{base}-{flavour}-save"), which(f"{base}-{flavour}-restore")
        if not (save and restore):
            plain = which(base)
            if plain and _VERSION_TAG[flavour] in _version(plain):
                save, restore = which(f"{base}-save"), which(f"{base}-restore")
        if save and restore:
            tools.save[family] = save
            tools.restore[family] = restore
    return tools if 4 in tools.save else None


def _version(binary: str) -> str:
    try:
        return read([binary, "--version"])
    except InterceptError:
        return ""


def legacy_tables(family: Family) -> list[str]:
    """Legacy (x_tables) tables the kernel has in this network namespace."""
    try:
        return _LEGACY_NAMES[family].read_text().split()
    except OSError:
        return []


class IptablesBackend:
    """`iptables-restore` in one flavour."""

    def __init__(self, tools: IptablesTools) -> None:
        self.tools = tools
        self.name = f"iptables-{tools.flavour}"

    def save(self, family: Family) -> str:
        """`iptables-save` (or ip6tables-save) output; "" when this flavour has nothing to show."""
        if family not in self.tools.save:
            return ""
        if self.tools.flavour == "legacy" and not legacy_tables(family):
            return ""
        return read([self.tools.save[family]])

    def render(self, plan: Plan) -> str:
        out = []
        for family in plan.families:
            out.append(f"# {_BASE[family]}-restore --noflush\n{render_iptables.render(plan, family)}")
        return "".join(out)

    def steps(self, plan: Plan | None) -> list[Step]:
        """What `apply` (plan) or `remove` (None) would run, computed from the live ruleset."""
        steps = []
        for family in (4, 6):
            fam: Family = 4 if family == 4 else 6
            if fam not in self.tools.restore:
                if plan is not None and fam in plan.families:
                    raise InterceptError(
                        f"{_BASE[fam]}-restore ({self.tools.flavour}) is not installed",
                        "install it, or set intercept.ipv6 = false",
                    )
                continue
            saved = self.save(fam)
            created = self._created(plan, saved, fam)
            text = render_iptables.transaction(plan, saved, fam, created)
            if text:
                what = f"{'apply' if plan else 'remove'} IPv{fam} rules ({self.name})"
                steps.append(Step((self.tools.restore[fam], "-w", "--noflush"), text, what))
            for table, objects in render_iptables.to_tidy(plan, saved, fam).items():
                what = f"delete what meshagent created in {_NFT_FAMILY[fam]} {table}, if empty ({self.name})"
                steps.append(Step(nftobjects.tidy_argv(fam, table, objects), "", what))
        return steps

    def hold_steps(self) -> list[Step]:
        """What a stopping agent runs (`apply.stop_capture`): nothing captured any more, but
        connections already redirected keep their NAT (`render_iptables.hold`). Nothing is
        tidied here: `steps(None)` deletes what we created once the drain is over."""
        steps = []
        for fam in (4, 6):
            family: Family = 4 if fam == 4 else 6
            if family not in self.tools.restore:
                continue
            text = render_iptables.hold(self.save(family))
            if text:
                what = f"hold IPv{family} rules for the drain ({self.name})"
                steps.append(Step((self.tools.restore[family], "-w", "--noflush"), text, what))
        return steps

    def _created(self, plan: Plan | None, saved: str, family: Family) -> dict[str, list[str]]:
        """Tables and built-in chains that applying `plan` creates (iptables-nft only: legacy
        tables and their chains always exist once the kernel module is in)."""
        if self.tools.flavour != "nft" or plan is None or family not in plan.families:
            return {}
        have = nftobjects.existing(family)
        out: dict[str, list[str]] = {}
        for table in plan.tables():
            builtins = render_iptables.builtin_chains(plan, table, family)
            if table not in have:
                out[table] = [nftobjects.TABLE, *builtins]
            else:
                missing = [c for c in builtins if c not in have[table]]
                if missing:
                    out[table] = missing
        return out

    def run(self, steps: list[Step]) -> None:
        for step in steps:
            run(step)

    def owned(self) -> dict[str, Any]:
        """Our chains and jumps per family, as the kernel has them now."""
        doc: dict[str, Any] = {}
        for fam in (4, 6):
            family: Family = 4 if fam == 4 else 6
            tables = render_iptables.owned(self.save(family))
            if tables:
                doc[f"ipv{family}"] = {
                    name: {"chains": t.chains, "jumps": t.builtin_rules} for name, t in tables.items()
                }
        return doc
