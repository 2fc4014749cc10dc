"""The proxy's listener settings from the agent's config, and the original destination of a
redirected connection: what the inline proxy and every worker build their `Proxy` from.

Its own module so that a replacement worker (a new interpreter: agent/workers/fresh.py) imports
these and not the daemon with everything only the supervisor uses (~3 MB less).
"""

from __future__ import annotations

from typing import Any

from agent.config import AgentConfig
from agent.intercept.orig_dst import original_dst
from agent.proxy.decisions import ServedPorts
from agent.proxy.listeners import ListenerSettings


def listener_settings(config: AgentConfig) -> ListenerSettings:
    p, i = config.proxy, config.intercept
    return ListenerSettings(
        inbound=(p.listen, i.inbound_port),
        outbound=(p.listen, i.outbound_port),
        mark=i.proxy_mark,
        # TPROXY hands a captured connection only to a socket with IP_TRANSPARENT.
        transparent=i.inbound_mode == "tproxy",
        connect_timeout_s=p.connect_timeout_s,
        handshake_timeout_s=p.handshake_timeout_s,
        detect_timeout_s=p.detect_timeout_s,
        skip_detect_ports=frozenset(p.skip_detect_ports),
        unmeshed_outbound="refuse" if p.unmeshed_outbound == "refuse" else "pass",
        http_accounting=config.telemetry.metrics and config.telemetry.http_accounting,
        idle_timeout_s=p.idle_timeout_s,
        max_handshakes=p.max_handshakes,
        tls_resumption=p.tls_resumption,
        native_relay=p.native_relay,
        http_routes=p.http_routes,
        http_pool_idle_s=p.http_pool_idle_s,
        http_pool_max_idle=p.http_pool_max_idle,
        http_retry_buffer_total=p.http_retry_buffer_total,
        direct=True,
        served_ports=served_ports(config),
    )


def served_ports(config: AgentConfig) -> ServedPorts:
    """The app ports a transport header may name: those interception captures inbound
    (intercept.inbound_ports, all when empty), without the skipped ones, SSH unless captured,
    and never the proxy's own listeners or the admin port."""
    i = config.intercept
    excluded = [
        *_ranges(i.inbound_skip_ports),
        *((p, p) for p in (i.inbound_port, i.outbound_port, i.admin_port)),
    ]
    if not i.capture_ssh:
        excluded += _ranges(i.ssh_ports)
    return ServedPorts(tuple(_ranges(i.inbound_ports)), tuple(excluded))


def _ranges(specs: tuple[int | str, ...]) -> list[tuple[int, int]]:
    """Validated port specs (8080 or "8000-8100") as (first, last) ranges."""
    out = []
    for spec in specs:
        lo, _, hi = str(spec).partition("-")
        out.append((int(lo), int(hi or lo)))
    return out


def orig_dst(sock: Any) -> tuple[str, int]:
    """SO_ORIGINAL_DST of a redirected connection as (host, port)."""
    dst = original_dst(sock)
    return dst.host, dst.port
