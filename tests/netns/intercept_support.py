"""Helpers for the interception tests: who-answers servers, the CLI inside a namespace, rulesets."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.netlab import Host

TOOLS = Path(__file__).parent / "tools"
WHO = str(TOOLS / "tcp_who.py")
CLIENT_PYTHON = "/usr/bin/python3"  # readable by any uid (the venv's interpreter may not be)

PROXY_UID = 4190
SKIPPED_UID = 4242
PLAIN_UID = 4343
PROXY_MARK = 0x1000000
BACKENDS = ("nft", "iptables-nft", "iptables-legacy")


def start_who(host: Host, role: str, *listens: str, transparent: bool = False) -> subprocess.Popen[str]:
    argv = [sys.executable, WHO, "serve", "--role", role]
    for item in listens:
        argv += ["--listen", item]
    if transparent:
        argv.append("--transparent")
    proc = host.popen(*argv)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.wait(timeout=10)
        raise AssertionError(
            f"{role} server on {host.name} did not start: {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc


def who(
    host: Host,
    ip: str,
    port: int,
    user: int | None = None,
    mark: int | None = None,
    sport: int = 0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Connect from `host` to ip:port (from source port `sport`, if given) and return the
    answering server's JSON (or {"error": ...})."""
    argv = [CLIENT_PYTHON, WHO, "connect", ip, str(port), "--timeout", str(timeout)]
    if mark is not None:
        argv += ["--mark", hex(mark)]
    if sport:
        argv += ["--sport", str(sport)]
    proc = host.run(*argv, user=user, check=False)
    try:
        doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(
            f"client on {host.name} -> {ip}:{port} said {proc.stdout!r} {proc.stderr!r}"
        ) from None
    return doc


def plain(addr: str) -> str:
    """198.18.1.2 for ::ffff:198.18.1.2 (a dual-stack listener's view of an IPv4 peer)."""
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def meshagent(
    host: Host, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return host.run(sys.executable, "-m", "agent.cli", *args, check=check, env=env)


def meshagent_json(host: Host, *args: str) -> Any:
    return json.loads(meshagent(host, *args, "--json").stdout)


def write_config(path: Path, **intercept: Any) -> Path:
    lines = ["[intercept]"]
    for key, value in intercept.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


_SNAPSHOT_COMMANDS = (
    ("iptables-legacy-save",),
    ("ip6tables-legacy-save",),
    ("iptables-nft-save",),
    ("ip6tables-nft-save",),
    ("nft", "list", "ruleset"),
    ("ip", "-4", "rule", "show"),
    ("ip", "-6", "rule", "show"),
    ("ip", "-4", "route", "show", "table", "all"),
    ("ip", "-6", "route", "show", "table", "all"),
)
_COUNTERS = re.compile(r"\[\d+:\d+\]")
_NFT_COUNTERS = re.compile(r"counter packets \d+ bytes \d+")


def ruleset(host: Host) -> str:
    """Every firewall and policy-routing view of `host`, minus counters and timestamp comments."""
    out = []
    for cmd in _SNAPSHOT_COMMANDS:
        text = host.run(*cmd).stdout
        lines = [
            _NFT_COUNTERS.sub("counter", _COUNTERS.sub("[0:0]", line))
            for line in text.splitlines()
            if not line.startswith("#")
        ]
        out.append(f"$ {' '.join(cmd)}\n" + "\n".join(lines))
    return "\n".join(out) + "\n"


UNRELATED_IPTABLES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:ufw-before-input - [0:0]
-A INPUT -j ufw-before-input
-A ufw-before-input -i lo -j ACCEPT
-A ufw-before-input -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ufw-before-input -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -p tcp -m tcp --dport 9999 -m comment --comment "keep me" -j DNAT --to-destination 198.18.1.1:8080
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A FORWARD -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
COMMIT
"""

UNRELATED_IP6TABLES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p ipv6-icmp -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s fd00:d0c::/64 -j MASQUERADE
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A FORWARD -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
COMMIT
"""

UNRELATED_NFT = """\
table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
		iif "lo" accept
		ct state established,related accept
		tcp dport 22 accept comment "hand-written, keep me"
	}
}
table ip6 raw_notrack {
	chain prerouting {
		type filter hook prerouting priority raw; policy accept;
		udp dport 5353 notrack
	}
}
"""


def install_unrelated_ruleset(host: Host, backend: str) -> None:
    """A host's own firewall, in the flavour the backend under test uses (plus native nft)."""
    flavour = "legacy" if backend == "iptables-legacy" else "nft"
    host.run(f"iptables-{flavour}-restore", input=UNRELATED_IPTABLES)
    host.run(f"ip6tables-{flavour}-restore", input=UNRELATED_IP6TABLES)
    host.run("nft", "-f", "-", input=UNRELATED_NFT)


def legacy_usable(host: Host) -> bool:
    return host.run("iptables-legacy", "-t", "nat", "-L", "-n", check=False).returncode == 0


def require_backend(host: Host, backend: str) -> None:
    if backend == "iptables-legacy" and not legacy_usable(host):
        pytest.skip("this kernel has no legacy iptables (CONFIG_IP_NF_IPTABLES_LEGACY off)")
