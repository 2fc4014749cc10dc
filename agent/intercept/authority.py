"""Where the enrolled authority is, for the rules that must never capture it: its addresses
(an IP literal, or what its name resolves to now) and its port, from the identity store; and
the HTTPS proxy it is reached through, if any, which is exempt for the same reason."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import MeshagentError
from agent.identity.store import IdentityStore
from agent.identity.transport import ProxyConfig, proxy_from_environment

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


def enrolled(state_dir: Path, proxy: ProxyConfig | None = None) -> list[Endpoint]:
    """The endpoints of the authority this host enrolled with, and of the proxy it is reached
    through (`proxy`, else the environment's); [] before enrollment. A `meshagent renew` run by
    root while the rules are applied would otherwise be captured on its way to the proxy."""
    try:
        url = IdentityStore(state_dir).load_authority().url
    except (MeshagentError, OSError, ValueError):
        return []
    found = endpoints(url)
    via = (proxy or proxy_from_environment()).for_url(url)
    if via is not None:
        host = f"[{via.host}]" if ":" in via.host else via.host
        found += endpoints(f"http://{host}:{via.port}")
    return sorted(set(found))
