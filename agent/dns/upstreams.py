"""The host's own resolvers, read from resolv.conf (never written: the stub changes nothing in
/etc/resolv.conf or systemd-resolved; Istio's VM DNS capture did, istio/istio#29224)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

MAX_UPSTREAMS = 3  # glibc's MAXNS: the resolver itself never uses more


def parse_resolv_conf(text: str) -> tuple[str, ...]:
    """The `nameserver` addresses in `text`, in order, at most three (glibc reads no more).
    Lines that are not an IP address (a typo, an IPv6 zone we cannot route) are left out."""
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = str(ipaddress.ip_address(fields[1]))
        except ValueError:
            continue
        if address not in found:
            found.append(address)
    return tuple(found[:MAX_UPSTREAMS])


def read_upstreams(path: str | Path = "/etc/resolv.conf") -> tuple[str, ...] | str:
    """The resolvers from `path`, or a sentence saying why there are none."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}; set dns.upstreams in the config"
    found = parse_resolv_conf(text)
    if not found:
        return f"{path} names no nameserver; set dns.upstreams in the config"
    return found
