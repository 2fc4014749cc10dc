"""The DNS redirect: nft table `inet meshagent_dns`, sending UDP and TCP port 53 traffic addressed
to the stub addresses (the host's resolvers) to the agent's DNS stub, and nothing else.

Fail open by construction: the redirect matches only destinations listed in the sets `live4` /
`live6`, whose elements carry a kernel timeout (`LIVE_TIMEOUT_S`). The running agent re-adds them
every `BEAT_S` (`beat`); stopped, crashed, SIGKILLed or hung, it does not, and within the timeout
DNS goes straight to the resolvers again. A clean stop deletes the table (`remove_steps`).

The agent's own upstream queries carry its mark (and, when it is not root, its uid) and skip the
redirect. The chain runs before meshagent's TCP capture (priority -110 < -100): in NAT the first
chain that rewrites a connection wins, so TCP DNS to a resolver reaches the stub, not the proxy.
Never touched: any other table, resolv.conf, systemd-resolved.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from .errors import InterceptError
from .tools import Step, read, which

TABLE = "meshagent_dns"
FAMILY = "inet"
PRIORITY = -110
LIVE_TIMEOUT_S = 3
BEAT_S = 1.0
COMMENT = "meshagent:"


@dataclass(frozen=True)
class DnsRedirect:
    addresses: tuple[str, ...]
    """The stub addresses: port-53 traffic to these goes to the stub."""
    port: int
    """The stub's port (on 127.0.0.1 / ::1: `redirect` maps locally made packets to loopback)."""
    mark: int
    """The agent's SO_MARK on its upstream queries: those skip the redirect."""
    uid: int | None = None
    """The agent's uid, skipped too (None when it runs as root: skipping root would skip every
    root process's DNS)."""

    def split(self) -> tuple[list[str], list[str]]:
        v4 = [a for a in self.addresses if ipaddress.ip_address(a).version == 4]
        v6 = [a for a in self.addresses if ipaddress.ip_address(a).version == 6]
        return v4, v6


def render(spec: DnsRedirect) -> str:
    """The whole table with live elements, as one `nft -f` transaction that replaces ours (the
    prelude declares, then deletes it, so a leftover never makes it fail)."""
    mark = f"{spec.mark:#x}"
    skip_uid = (
        f'    meta skuid {spec.uid} return comment "{COMMENT} the agent\'s own queries (its user)"\n'
        if spec.uid is not None
        else ""
    )
    return (
        f"add table {FAMILY} {TABLE}\n"
        f"delete table {FAMILY} {TABLE}\n"
        f"table {FAMILY} {TABLE} {{\n"
        f"  set live4 {{ type ipv4_addr . inet_service; flags timeout; }}\n"
        f"  set live6 {{ type ipv6_addr . inet_service; flags timeout; }}\n"
        f"  chain output {{\n"
        f"    type nat hook output priority {PRIORITY}; policy accept;\n"
        f'    meta mark & {mark} == {mark} return comment "{COMMENT} the agent\'s own upstream queries"\n'
        f"{skip_uid}"
        f"    meta l4proto {{ tcp, udp }} ip daddr . th dport @live4 redirect to :{spec.port}"
        f' comment "{COMMENT} DNS to the stub while the agent refreshes live4"\n'
        f"    meta l4proto {{ tcp, udp }} ip6 daddr . th dport @live6 redirect to :{spec.port}"
        f' comment "{COMMENT} DNS to the stub while the agent refreshes live6"\n'
        f"  }}\n"
        f"}}\n" + beat(spec)
    )


def beat(spec: DnsRedirect) -> str:
    """The heartbeat transaction: each live set flushed and refilled with a fresh timeout (an
    element added again would keep its old expiry)."""
    out = []
    for name, addresses in zip(("live4", "live6"), spec.split(), strict=True):
        out.append(f"flush set {FAMILY} {TABLE} {name}\n")
        if addresses:
            elements = ", ".join(f"{a} . 53 timeout {LIVE_TIMEOUT_S}s" for a in addresses)
            out.append(f"add element {FAMILY} {TABLE} {name} {{ {elements} }}\n")
    return "".join(out)


def nft_path() -> str:
    nft = which("nft")
    if nft is None:
        raise InterceptError(
            "dns.enabled needs nft, which is not installed",
            "install the nftables package, or set dns.enabled = false",
        )
    return nft


def install_step(spec: DnsRedirect) -> Step:
    return Step((nft_path(), "-f", "-"), render(spec), f"replace nftables table {FAMILY} {TABLE} (DNS)")


def present(nft: str | None = None) -> bool:
    """Whether our table exists now (False without nft: then it cannot)."""
    nft = nft or which("nft")
    if nft is None:
        return False
    return any(
        line.split() == ["table", FAMILY, TABLE] for line in read([nft, "list", "tables"]).splitlines()
    )


def remove_steps() -> list[Step]:
    """Deleting our table, when it exists (reads the kernel, changes nothing)."""
    nft = which("nft")
    if nft is None or not present(nft):
        return []
    return [
        Step(
            (nft, "-f", "-"),
            f"delete table {FAMILY} {TABLE}\n",
            f"delete nftables table {FAMILY} {TABLE} (DNS)",
        )
    ]


def owned() -> dict[str, Any] | None:
    """Our table as `nft list table` prints it (live elements with their expiry), or None."""
    nft = which("nft")
    if nft is None or not present(nft):
        return None
    return {"table": f"{FAMILY} {TABLE}", "ruleset": read([nft, "list", "table", FAMILY, TABLE])}
