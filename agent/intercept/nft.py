"""The native nftables backend: one table `meshagent`, replaced atomically with `nft -f -`."""

from __future__ import annotations

from typing import Any

from . import render_nft
from .plan import NFT_TABLE, Plan
from .tools import Step, read, run


class NftBackend:
    name = "nft"

    def __init__(self, nft: str) -> None:
        self.nft = nft

    def present(self) -> tuple[str, ...]:
        """Families (ip, ip6, inet) in which our table exists now."""
        found = []
        for line in read([self.nft, "list", "tables"]).splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "table" and parts[2] == NFT_TABLE:
                found.append(parts[1])
        return tuple(f for f in render_nft.NFT_FAMILIES if f in found)

    def render(self, plan: Plan) -> str:
        return render_nft.render(plan)

    def steps(self, plan: Plan | None) -> list[Step]:
        text = render_nft.transaction(plan, self.present() if plan is None else render_nft.NFT_FAMILIES)
        if not text:
            return []
        what = f"{'replace' if plan else 'delete'} nftables table {NFT_TABLE} (nft)"
        return [Step((self.nft, "-f", "-"), text, what)]

    def run(self, steps: list[Step]) -> None:
        for step in steps:
            run(step)

    def owned(self) -> dict[str, Any]:
        return {
            f"{family} {NFT_TABLE}": read([self.nft, "list", "table", family, NFT_TABLE])
            for family in self.present()
        }
