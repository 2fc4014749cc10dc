"""Where the enrolled authority is, for the rules that must never capture it: its addresses
(an IP literal, or what its name resolves to now) and its port, from the identity store."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import MeshagentError
from agent.identity.store import IdentityStore

Endpoint = tuple[str, int]


def endpoints(url: str) -> list[Endpoint]:
    """`https://auth.example:8443` -> [(address, 8443), ...]; [] when the name does not resolve."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return []
    try:
        return [(str(ipaddress.ip_address(host)), port)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({(str(info[4][0]), port) for info in infos})


def enrolled(state_dir: Path) -> list[Endpoint]:
    """The endpoints of the authority this host enrolled with; [] before enrollment."""
    try:
        return endpoints(IdentityStore(state_dir).load_authority().url)
    except (MeshagentError, OSError, ValueError):
        return []
