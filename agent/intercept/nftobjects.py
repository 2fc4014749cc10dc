"""What the iptables-nft flavour leaves behind: nf_tables tables and base chains, over netlink.

iptables-nft creates a table (`table ip6 nat`) and its base chains (`OUTPUT`) the first time a
rule goes in, and never deletes them; `iptables-save` cannot even tell which base chains exist
(it prints every built-in chain). So the backend asks the kernel here which exist before it
applies, records in the table itself what the apply creates (empty marker chains
`MESHAGENT_MADE_<OBJECT>`, see `render_iptables`), and after a remove runs

    python -m agent.intercept.nftobjects tidy 6 nat OUTPUT TABLE

to delete exactly those objects again, each only if it is empty at that moment: a base chain
with no rule, a table with no chain. Anything someone else put there keeps it alive.

Both run in a short-lived child (`existing` runs `python -m agent.intercept.nftobjects
chains 4|6`): pyroute2 would otherwise stay imported in `meshagent run` (~10 MB of RSS, against
a 40 MB idle goal). Not `nft -j list chains`: the `nft` binary comes with the nftables
package, which iptables-nft does not need, so it may be missing where this flavour is used.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Sequence

from .errors import InterceptError
from .plan import Family
from .tools import child

TABLE = "TABLE"
"""The object name that stands for the table itself."""
_AF: dict[Family, int] = {4: socket.AF_INET, 6: socket.AF_INET6}


CHILD_TIMEOUT_S = 30.0


def existing(family: Family) -> dict[str, set[str]]:
    """`chains(family)`, asked of a short-lived child; failure is an InterceptError."""
    doc = child("nftobjects", ["chains", str(family)], None, CHILD_TIMEOUT_S)
    try:
        return {str(table): {str(c) for c in names} for table, names in doc.items()}
    except (AttributeError, TypeError):
        raise InterceptError(f"nftobjects chains {family} printed {doc!r}, not table -> chains") from None


def chains(family: Family) -> dict[str, set[str]]:
    """table -> its chains, for the `ip` (4) or `ip6` (6) nf_tables family (in this process)."""
    from pyroute2.nftables.main import NFTables

    out: dict[str, set[str]] = {}
    with NFTables(nfgen_family=_AF[family]) as nft:
        for msg in nft.get_tables():
            out.setdefault(str(msg.get_attr("NFTA_TABLE_NAME")), set())
        for msg in nft.get_chains():
            out.setdefault(str(msg.get_attr("NFTA_CHAIN_TABLE")), set()).add(
                str(msg.get_attr("NFTA_CHAIN_NAME"))
            )
    return out


def tidy(family: Family, table: str, objects: Sequence[str]) -> list[str]:
    """Delete the named base chains of `table` that hold no rule, then the table itself if
    `TABLE` is named and no chain is left in it. Returns what was deleted."""
    from pyroute2.nftables.main import NFTables

    deleted: list[str] = []
    with NFTables(nfgen_family=_AF[family]) as nft:
        present = {
            str(m.get_attr("NFTA_CHAIN_NAME"))
            for m in nft.get_chains()
            if m.get_attr("NFTA_CHAIN_TABLE") == table
        }
        used = {
            str(m.get_attr("NFTA_RULE_CHAIN"))
            for m in nft.get_rules()
            if m.get_attr("NFTA_RULE_TABLE") == table
        }
        for chain in objects:
            if chain != TABLE and chain in present and chain not in used:
                nft.chain("del", table=table, name=chain)
                present.discard(chain)
                deleted.append(f"chain {chain}")
        tables = {str(m.get_attr("NFTA_TABLE_NAME")) for m in nft.get_tables()}
        if TABLE in objects and table in tables and not present:
            nft.table("del", name=table)
            deleted.append("table")
    return deleted


def tidy_argv(family: Family, table: str, objects: Sequence[str]) -> tuple[str, ...]:
    """The command line that runs `tidy` (a Step, so `--dry-run` shows it like every other)."""
    return (sys.executable, "-m", "agent.intercept.nftobjects", "tidy", str(family), table, *objects)


def main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "chains" and argv[1] in ("4", "6"):
        try:
            found = chains(4 if argv[1] == "4" else 6)
        except Exception as exc:  # netlink refused: say so on stderr, the caller reports it
            print(f"cannot list nf_tables chains: {exc}", file=sys.stderr)
            return 1
        json.dump({table: sorted(names) for table, names in found.items()}, sys.stdout)
        return 0
    if len(argv) < 3 or argv[0] != "tidy" or argv[1] not in ("4", "6"):
        print(
            "usage: python -m agent.intercept.nftobjects tidy 4|6 TABLE OBJECT... | chains 4|6",
            file=sys.stderr,
        )
        return 2
    family: Family = 4 if argv[1] == "4" else 6
    try:
        deleted = tidy(family, argv[2], argv[3:])
    except Exception as exc:  # netlink refused: say so on stderr, the caller reports it
        print(f"cannot tidy {'ip' if family == 4 else 'ip6'} {argv[2]}: {exc}", file=sys.stderr)
        return 1
    for what in deleted:
        print(f"deleted {'ip' if family == 4 else 'ip6'} {argv[2]} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
