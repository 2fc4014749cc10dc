"""The agent's settings: typed, frozen, loaded from one TOML file (default /etc/meshagent/agent.toml).

Every section is a frozen dataclass; its fields are the file's keys, with the defaults the
README documents. The loader walks the dataclasses, so a new setting is a new field. Errors
name the file, the key and the fix. This module imports nothing else from `agent`, except errors
and the pure name checks of agent/identity/names.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from agent.errors import ConfigError
from agent.health.probes import ProbeSpec, parse_probes
from agent.identity.names import InvalidName, WorkloadIdentity, spiffe_pattern
from agent.workers.cpus import auto_workers

DEFAULT_CONFIG_FILE = Path("/etc/meshagent/agent.toml")


@dataclass(frozen=True)
class IdentitySettings:
    state_dir: Path = Path("/var/lib/meshagent")
    """Where the key, certificate chain, trust bundle and authority reference are kept."""


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    """debug, info, warning or error."""
    format: str = "logfmt"
    """logfmt (one key=value line per event) or json."""

    def __post_init__(self) -> None:
        if self.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log.level {self.level!r} is not one of debug, info, warning, error")
        if self.format not in ("logfmt", "json"):
            raise ConfigError(f"log.format {self.format!r} is not one of logfmt, json")


PortSpec = int | str
"""A port (`22`) or an inclusive range (`"8000-8100"`)."""


def _check_port(value: int, where: str, *, allow_zero: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not (0 if allow_zero else 1) <= value <= 65535
    ):
        raise ConfigError(f"{where} must be a port number 1..65535, got {value!r}")


def _port_specs(value: Any, where: str) -> tuple[PortSpec, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f'{where} must be a list of ports or ranges like [22, "8000-8100"]')
    out: list[PortSpec] = []
    for item in value:
        if isinstance(item, str):
            lo, sep, hi = item.partition("-")
            if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
                raise ConfigError(f'{where}: {item!r} is not a port or a range like "8000-8100"')
            _check_port(int(lo), where)
            _check_port(int(hi), where)
            if int(lo) > int(hi):
                raise ConfigError(f"{where}: range {item!r} runs backwards")
            out.append(f"{int(lo)}-{int(hi)}")
        else:
            _check_port(item, where)
            out.append(item)
    return tuple(out)


def _cidrs(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f'{where} must be a list of addresses or CIDRs like ["10.0.0.0/8", "fd00::/8"]')
    out: list[str] = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            raise ConfigError(f"{where}: {item!r} is not an IP address or CIDR") from None
    return tuple(out)


def _ids(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in value
    ):
        raise ConfigError(f"{where} must be a list of numeric ids like [0, 1000]")
    return tuple(value)


@dataclass(frozen=True)
class InterceptSettings:
    """`[intercept]`: which TCP traffic the kernel sends through the agent's proxy.

    Empty capture lists mean "all". SSH, the admin port and the authority are never captured
    unless the matching `capture_*` switch is set; the proxy's own uid and mark never are.
    """

    enabled: bool = True
    """Apply the rules when `meshagent run` starts (and remove them when it stops)."""
    backend: str = "auto"
    """auto, nft, iptables-nft or iptables-legacy. auto: legacy if this host already has legacy
    iptables rules, else native nft, else iptables-nft."""
    inbound_mode: str = "redirect"
    """redirect (NAT; the proxy reads SO_ORIGINAL_DST) or tproxy (keeps the destination address;
    needs the proxy listener to set IP_TRANSPARENT)."""
    ipv6: bool = True
    """Capture IPv6 as well as IPv4."""
    inbound_port: int = 4143
    """Where captured inbound connections are sent (the proxy's inbound listener)."""
    outbound_port: int = 4140
    """Where captured outbound connections are sent (the proxy's outbound listener)."""
    admin_port: int = 4191
    """The agent's admin port (/metrics, /ready): never captured."""
    proxy_user: int | str = "meshagent"
    """The proxy's user (name or uid): its own connections are never captured."""
    proxy_mark: int = 0x1000000
    """SO_MARK the proxy may set on its sockets: marked connections are never captured (0: none)."""
    inbound_ports: tuple[PortSpec, ...] = ()
    """Local ports whose inbound connections are captured; empty: all."""
    inbound_skip_ports: tuple[PortSpec, ...] = ()
    """Local ports never captured inbound."""
    inbound_skip_cidrs: tuple[str, ...] = ()
    """Source networks whose inbound connections are never captured."""
    outbound_ports: tuple[PortSpec, ...] = ()
    """Destination ports captured outbound; empty: all."""
    outbound_skip_ports: tuple[PortSpec, ...] = ()
    """Destination ports never captured outbound."""
    outbound_cidrs: tuple[str, ...] = ()
    """Destination networks captured outbound; empty: all."""
    outbound_skip_cidrs: tuple[str, ...] = ()
    """Destination networks never captured outbound."""
    skip_uids: tuple[int, ...] = ()
    """Users whose outbound connections are never captured (uids)."""
    skip_gids: tuple[int, ...] = ()
    """Groups whose outbound connections are never captured (gids)."""
    ssh_ports: tuple[int, ...] = (22,)
    """SSH ports: never captured in either direction unless capture_ssh is set."""
    capture_ssh: bool = False
    capture_admin_port: bool = False
    authority_addresses: tuple[str, ...] = ()
    """The authority's addresses, never captured outbound (the enrolled authority is added too)."""
    capture_authority: bool = False
    tproxy_mark: int = 0x2000000
    """Firewall mark for TPROXY-diverted packets (tproxy mode only)."""
    tproxy_table: int = 4143
    """Routing table holding `local default dev lo` for marked packets (tproxy mode only)."""

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nft", "iptables-nft", "iptables-legacy"):
            raise ConfigError(
                f"intercept.backend {self.backend!r} is not one of auto, nft, iptables-nft, iptables-legacy"
            )
        if self.inbound_mode not in ("redirect", "tproxy"):
            raise ConfigError(f"intercept.inbound_mode {self.inbound_mode!r} is not one of redirect, tproxy")
        for name in ("inbound_port", "outbound_port", "admin_port"):
            _check_port(getattr(self, name), f"intercept.{name}")
        if isinstance(self.proxy_user, bool) or not isinstance(self.proxy_user, int | str):
            raise ConfigError("intercept.proxy_user must be a user name or a numeric uid")
        for name in ("proxy_mark", "tproxy_mark", "tproxy_table"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
                raise ConfigError(f"intercept.{name} must be an integer 0..2^32-1, got {value!r}")
        fix = {
            **{n: _port_specs(getattr(self, n), f"intercept.{n}") for n in _PORT_LISTS},
            **{n: _cidrs(getattr(self, n), f"intercept.{n}") for n in _CIDR_LISTS},
            **{n: _ids(getattr(self, n), f"intercept.{n}") for n in ("skip_uids", "skip_gids")},
        }
        ssh = _port_specs(self.ssh_ports, "intercept.ssh_ports")
        if not all(isinstance(p, int) for p in ssh):
            raise ConfigError("intercept.ssh_ports must be a list of port numbers")
        fix["ssh_ports"] = ssh
        for name, value in fix.items():
            object.__setattr__(self, name, value)


_PORT_LISTS = ("inbound_ports", "inbound_skip_ports", "outbound_ports", "outbound_skip_ports")
_CIDR_LISTS = ("inbound_skip_cidrs", "outbound_cidrs", "outbound_skip_cidrs", "authority_addresses")


_POLICIES = ("all-unauthenticated", "all-authenticated", "deny", "audit")


def _choice(value: Any, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where} {value!r} is not one of {', '.join(choices)}")


def _float_range(value: float, lo: float, hi: float, where: str) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{where} must be between {lo} and {hi}, got {value!r}")


@dataclass(frozen=True)
class ProxySettings:
    """The data plane: listeners, timeouts, and what happens when the agent stops."""

    listen: str = "::"
    """Address of the inbound and outbound listeners (:: is dual-stack; 0.0.0.0 is used if the
    host has no IPv6). Their ports are intercept.inbound_port and intercept.outbound_port."""
    connect_timeout_s: float = 5.0
    """How long connecting to a destination (or the local app) may take."""
    handshake_timeout_s: float = 10.0
    """How long a TLS handshake may take."""
    max_handshakes: int = 128
    """Inbound mTLS handshakes in progress at once, agent-wide (each holds ~130 KB of OpenSSL state
    until the client finishes; with workers each gets an even share). More wait for a slot within
    handshake_timeout_s, up to 8 per slot; past that a new connection is refused at once.
    Counted in /status under handshakes (and per worker under workers[])."""
    detect_timeout_s: float = 1.0
    """How long an inbound client may stay silent before it counts as plaintext (server-speaks-first)."""
    skip_detect_ports: tuple[int, ...] = (25, 587, 3306)
    """Inbound ports whose protocol speaks first from the server (SMTP, MySQL): no detection wait."""
    unmeshed_outbound: str = "pass"
    """Outbound to a destination not in the catalog: pass (plain, untouched) or refuse."""
    drain_timeout_s: float = 10.0
    """On SIGTERM, how long open connections may finish before they are closed."""
    idle_timeout_s: float = 3600.0
    """A proxied connection that moves no byte either way for this long is closed (0: never)."""
    on_stop: str = "remove-rules"
    """remove-rules (fail open: the app keeps working without the mesh while the agent is down) or
    keep-rules (fail closed: intercepted traffic fails until the agent is back)."""
    refresh_interval_s: float = 30.0
    """How often the catalog and policy are fetched from the authority (cached on disk)."""
    workers: int | str = "auto"
    """Proxy worker processes: "auto" (the default: one per CPU the agent may use: its affinity
    CPUs, or its cgroup's CPU quota rounded up when that is fewer; at most 64) or 0 to 64. The
    workers share the listening ports (SO_REUSEPORT) under the agent's own process, which keeps
    the identity, the rules and the admin server and replaces a worker that dies; so a one-CPU
    host runs as a sixteen-CPU one does. 0 runs the proxy inside the agent's own process
    instead: ~12 MB less, but a proxy crash is the whole agent's. A change needs a restart."""
    tls_resumption: bool = True
    """Resume TLS sessions (stateless tickets inbound, a bounded session cache outbound): a
    returning peer skips the full handshake. false: every connection does a full handshake."""
    tls_verify_cache: bool = True
    """Remember peer certificate chains verified in full handshakes (per TLS context, while the
    clock is inside the chain's validity) and answer the same chain from memory; false: OpenSSL verifies
    every chain in full. Identity, policy, revocation and the proof of the key are checked on
    every connection either way. A change needs a restart."""
    native_relay: bool = True
    """Relay an L4 mTLS connection's bytes in compiled code once it is paired (the TLS session
    driven through OpenSSL directly, no Python per chunk); false: the Python relay. Either way
    the same bytes, counts, taps and ends."""
    ticket_key_rotation_s: float = 3600.0
    """How often the key that encrypts session tickets is replaced (at least 60 s): a ticket
    resumes for at most this long. A renewal replaces it too."""
    http_routes: bool = True
    """Apply the authority's HTTP route policies (the directory's `routes`: splits, timeouts,
    retries, circuit breaking) to outbound connections to their destinations. false: every
    connection takes the L4 path (the kill switch); the policies are still received."""
    http_pool_idle_s: float = 3.0
    """How long an upstream HTTP/1 connection of the routed path is kept idle for the next request."""
    http_pool_max_idle: int = 100
    """Idle upstream HTTP/1 connections kept per endpoint (per worker); more are closed."""
    http_retry_buffer_total: int = 32 * 1024 * 1024
    """Bytes of request bodies held for retries at once, per worker; past it new requests are
    not retried (each holds at most 64 KiB)."""

    def __post_init__(self) -> None:
        workers = self.workers
        if isinstance(workers, str) and workers.isdigit():  # an environment override gives "2"
            workers = int(workers)
        if workers != "auto" and (
            isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 64
        ):
            raise ConfigError(
                f'proxy.workers must be "auto" or between 0 and 64, got {self.workers!r}',
                'workers = "auto" (one per CPU), workers = 2, or workers = 0 (the proxy in this process)',
            )
        object.__setattr__(self, "workers", workers)
        _float_range(self.ticket_key_rotation_s, 60, 7 * 86400, "proxy.ticket_key_rotation_s")
        _choice(self.unmeshed_outbound, ("pass", "refuse"), "proxy.unmeshed_outbound")
        _choice(self.on_stop, ("remove-rules", "keep-rules"), "proxy.on_stop")
        _float_range(self.connect_timeout_s, 0.1, 300, "proxy.connect_timeout_s")
        _float_range(self.handshake_timeout_s, 0.1, 300, "proxy.handshake_timeout_s")
        _float_range(self.detect_timeout_s, 0.01, 60, "proxy.detect_timeout_s")
        _float_range(self.drain_timeout_s, 0, 3600, "proxy.drain_timeout_s")
        _float_range(self.idle_timeout_s, 0, 7 * 86400, "proxy.idle_timeout_s")
        _float_range(self.refresh_interval_s, 1, 86400, "proxy.refresh_interval_s")
        _float_range(self.http_pool_idle_s, 0, 3600, "proxy.http_pool_idle_s")
        if not isinstance(self.http_routes, bool):
            raise ConfigError(f"proxy.http_routes must be true or false, got {self.http_routes!r}")
        for name, lo, hi in (
            ("http_pool_max_idle", 0, 100000),
            ("http_retry_buffer_total", 0, 1 << 34),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"proxy.{name} must be an integer between {lo} and {hi}, got {value!r}")
        if not 1 <= self.max_handshakes <= 100000:
            raise ConfigError(
                f"proxy.max_handshakes must be between 1 and 100000, got {self.max_handshakes!r}"
            )
        ports = tuple(self.skip_detect_ports)
        for port in ports:
            _check_port(port, "proxy.skip_detect_ports")
        object.__setattr__(self, "skip_detect_ports", ports)


def worker_count(proxy: ProxySettings) -> int:
    """How many proxy processes `proxy.workers` asks for: "auto" is one per CPU this process may
    use (its affinity mask, which a cgroup cpuset or taskset narrows, and fewer under a cgroup
    CPU quota, rounded up), at most 64."""
    if isinstance(proxy.workers, int):
        return proxy.workers
    return auto_workers()


@dataclass(frozen=True)
class TelemetrySettings:
    """The metrics plane and the admin server (its port is intercept.admin_port, 4191)."""

    admin_listen: str = "::"
    """Address of the admin server (/metrics, /ready, /live, /status, /stat). The default, every
    address, is what a Prometheus in the cluster needs to scrape /metrics; 127.0.0.1 keeps it
    to local health checks and `meshagent status|stat`, or give the one address Prometheus reaches."""
    admin_max_connections: int = 100
    """Admin connections open at once; one more is closed at once (counted in /status). Far below
    the process's file limit, so the admin port never starves the data plane."""
    admin_timeout_s: float = 10.0
    """An admin connection must send its request and read the reply within this time."""
    metrics: bool = True
    """Record linkerd-compatible metrics for every proxied connection."""
    http_accounting: bool = True
    """Detect HTTP/1 and count requests, responses and latencies (needs metrics)."""

    def __post_init__(self) -> None:
        if not isinstance(self.admin_max_connections, int) or not 1 <= self.admin_max_connections <= 10000:
            raise ConfigError(
                "telemetry.admin_max_connections must be between 1 and 10000, "
                f"got {self.admin_max_connections!r}"
            )
        _float_range(self.admin_timeout_s, 0.1, 3600, "telemetry.admin_timeout_s")


@dataclass(frozen=True)
class InboundPortPolicy:
    port: int
    policy: str = "all-authenticated"
    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class InboundSettings:
    """Who may connect to this host's ports (the authority's policy, when set, wins)."""

    default_policy: str = "all-unauthenticated"
    """all-unauthenticated (permissive: clients outside the mesh too), all-authenticated (strict:
    mesh identities only) or deny."""
    ports: tuple[InboundPortPolicy, ...] = ()
    """Per port: [[inbound.ports]] port = 5432, policy = "deny", allow = ["spiffe://TD/ns/shop/*"].
    An allow entry may also be in DNS form (`*.shop.serviceaccount.identity.linkerd.TD`): it is
    kept in the SPIFFE form."""

    def __post_init__(self) -> None:
        _choice(self.default_policy, _POLICIES, "inbound.default_policy")
        parsed = []
        for i, doc in enumerate(self.ports):
            where = f"inbound.ports[{i}]"
            if isinstance(doc, InboundPortPolicy):
                parsed.append(doc)
                continue
            if not isinstance(doc, dict) or set(doc) - {"port", "policy", "allow"} or "port" not in doc:
                raise ConfigError(
                    f"{where} must be a table with port, policy and allow",
                    'e.g. [[inbound.ports]] port = 5432, policy = "all-authenticated"',
                )
            _check_port(doc["port"], f"{where}.port")
            _choice(doc.get("policy", "all-authenticated"), _POLICIES, f"{where}.policy")
            allow = doc.get("allow", [])
            if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
                raise ConfigError(
                    f"{where}.allow must be a list of SPIFFE IDs or globs (spiffe://...) "
                    "or mesh identity names (NAME.NS.serviceaccount.identity.MESH.TD)"
                )
            try:
                allow = [spiffe_pattern(a) for a in allow]
            except InvalidName as exc:
                raise ConfigError(f"{where}.allow: {exc.message}", exc.hint) from None
            parsed.append(
                InboundPortPolicy(doc["port"], doc.get("policy", "all-authenticated"), tuple(allow))
            )
        object.__setattr__(self, "ports", tuple(parsed))


@dataclass(frozen=True)
class CatalogEntrySettings:
    cidr: str
    identity: str  # the SPIFFE ID (a mesh DNS name in the file is mapped to it)
    ports: tuple[int, ...] = ()
    opaque_port: int | None = None  # the endpoint's proxy port expecting Linkerd's transport header


@dataclass(frozen=True)
class OutboundSettings:
    """Local additions to the catalog of meshed destinations (the authority's come on top)."""

    catalog: tuple[CatalogEntrySettings, ...] = ()
    """[[outbound.catalog]] cidr = "10.96.0.0/12", ports = [5432], identity = "spiffe://TD/ns/NS/sa/NAME"
    (or NAME.NS.serviceaccount.identity.MESH.TD), optional opaque_port = 4143."""

    def __post_init__(self) -> None:
        parsed = []
        for i, doc in enumerate(self.catalog):
            where = f"outbound.catalog[{i}]"
            if isinstance(doc, CatalogEntrySettings):
                parsed.append(doc)
                continue
            if (
                not isinstance(doc, dict)
                or set(doc) - {"cidr", "ports", "identity", "opaque_port"}
                or not {"cidr", "identity"} <= set(doc)
            ):
                raise ConfigError(
                    f"{where} must be a table with cidr, identity and optional ports and opaque_port"
                )
            cidr = _cidrs([doc["cidr"]], f"{where}.cidr")[0]
            opaque_port = doc.get("opaque_port")
            if opaque_port is not None:
                _check_port(opaque_port, f"{where}.opaque_port")
            ports = doc.get("ports", [])
            if not isinstance(ports, list | tuple):
                raise ConfigError(
                    f"{where}.ports must be a list of port numbers, got {ports!r}",
                    "a list, even of one port: ports = [5432]",
                )
            for port in ports:
                _check_port(port, f"{where}.ports")
            try:
                identity = WorkloadIdentity.parse_any(str(doc["identity"])).spiffe_id
            except InvalidName as exc:
                raise ConfigError(
                    f"{where}.identity: {exc.message}",
                    "a SPIFFE ID (spiffe://TD/ns/NS/sa/NAME) or a mesh identity name "
                    "(NAME.NS.serviceaccount.identity.MESH.TD)",
                ) from None
            parsed.append(CatalogEntrySettings(cidr, identity, tuple(ports), opaque_port))
        object.__setattr__(self, "catalog", tuple(parsed))


@dataclass(frozen=True)
class HealthSettings:
    """The app's own readiness probes, run by the agent on this host (issue #17): while one
    fails, the authority reports the host not Ready to the cluster."""

    probes: tuple[ProbeSpec, ...] = ()
    """[[health.probes]] port = 8080, kind = "http", path = "/healthz" (kinds: tcp, http, exec)."""

    def __post_init__(self) -> None:
        if not all(isinstance(p, ProbeSpec) for p in self.probes):
            object.__setattr__(self, "probes", tuple(parse_probes(list(self.probes))))


def _addresses(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f'{where} must be a list of IP addresses like ["127.0.0.53"]')
    out: list[str] = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_address(str(item))))
        except ValueError:
            raise ConfigError(
                f"{where}: {item!r} is not an IP address", "plain addresses, no port or prefix length"
            ) from None
    return tuple(out)


@dataclass(frozen=True)
class DnsSettings:
    """`[dns]`: cluster Service names on the host (`<svc>.<ns>.svc.<cluster_domain>`), answered by
    the agent's stub; every other query goes, unchanged, to the host's own resolvers. Off unless
    enabled: resolv.conf is read, never written."""

    enabled: bool = False
    """Start the stub and redirect DNS to the stub addresses (UDP and TCP port 53) to it."""
    cluster_domain: str = "cluster.local"
    """The cluster's DNS domain: the stub owns svc.<cluster_domain> and forwards the rest."""
    short_forms: bool = False
    """Also answer <svc>.<ns> and <svc>.<ns>.svc for known Services (never other names)."""
    stub_addresses: tuple[str, ...] = ()
    """Resolver addresses whose port-53 traffic goes to the stub; empty: the nameservers of
    resolv_conf (at most three, e.g. 127.0.0.53 with systemd-resolved)."""
    upstreams: tuple[str, ...] = ()
    """Where the stub forwards what it does not answer; empty: the nameservers of resolv_conf."""
    resolv_conf: Path = Path("/etc/resolv.conf")
    """Read once at start for the two defaults above (never written)."""
    port: int = 15053
    """The stub's port on 127.0.0.1 (and ::1 when a stub address is IPv6), UDP and TCP."""
    ttl: int = 5
    """TTL of the stub's answers (and of its negative answers)."""
    max_inflight: int = 256
    """Forwarded queries in flight at once; more are dropped (the client retries) and counted."""
    per_source_qps: float = 2000.0
    """Queries a second per source address (every local app shares one): beyond, dropped."""
    per_source_burst: float = 4000.0
    """Queries a source may send at once before per_source_qps applies."""

    def __post_init__(self) -> None:
        from agent.dns.names import domain_labels  # pure; imported here to keep this module light

        if isinstance(domain_labels(self.cluster_domain), str):
            raise ConfigError(
                f"dns.cluster_domain {self.cluster_domain!r} is not a DNS name",
                'lower-case labels joined by dots, like "cluster.local" (the cluster\'s --cluster-domain)',
            )
        object.__setattr__(self, "cluster_domain", self.cluster_domain.strip().rstrip(".").lower())
        for name in ("stub_addresses", "upstreams"):
            object.__setattr__(self, name, _addresses(getattr(self, name), f"dns.{name}"))
        if len(self.stub_addresses) > 8:
            raise ConfigError("dns.stub_addresses lists more than 8 addresses", "list the resolvers apps use")
        _check_port(self.port, "dns.port")
        if self.port == 53:
            raise ConfigError(
                "dns.port must not be 53",
                "the stub listens on a local port of its own; port-53 traffic is redirected to it",
            )
        if isinstance(self.ttl, bool) or not 0 <= self.ttl <= 86400:
            raise ConfigError(f"dns.ttl must be between 0 and 86400 seconds, got {self.ttl!r}")
        if isinstance(self.max_inflight, bool) or not 1 <= self.max_inflight <= 4096:
            raise ConfigError(
                f"dns.max_inflight must be between 1 and 4096, got {self.max_inflight!r}",
                "each forwarded query holds a socket: keep it well under the file limit",
            )
        _float_range(self.per_source_qps, 1, 1_000_000, "dns.per_source_qps")
        _float_range(self.per_source_burst, 1, 1_000_000, "dns.per_source_burst")


@dataclass(frozen=True)
class AuthoritySettings:
    """`[authority]`: how this host reaches the authority (enroll, renew, and the agent's own
    calls). Unset keys leave it to the environment (HTTPS_PROXY, NO_PROXY), like curl."""

    https_proxy: str | None = None
    """An HTTP forward proxy to tunnel to the authority through (CONNECT; TLS and the pin stay
    end to end), like "http://proxy.example:3128" or "http://user:password@10.0.0.1:8080".
    Unset: HTTPS_PROXY / https_proxy from the environment; "" (empty): direct, whatever the
    environment says. `meshagent enroll --https-proxy` overrides it."""
    no_proxy: str | None = None
    """Authorities reached directly although a proxy is set: comma-separated names (a name
    covers every name below it), addresses, CIDRs, each with an optional :port, or "*".
    Unset: NO_PROXY / no_proxy from the environment."""

    def __post_init__(self) -> None:
        from agent.identity.transport import parse_proxy_url  # pure stdlib; keeps this module light

        for name in ("https_proxy", "no_proxy"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(
                    f"authority.{name} must be a string, got {type(value).__name__} {value!r}",
                    'like https_proxy = "http://proxy.example:3128", no_proxy = "10.0.0.0/8,.corp"',
                )
        if self.https_proxy:
            parse_proxy_url(self.https_proxy, "authority.https_proxy")


@dataclass(frozen=True)
class AgentConfig:
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    log: LogSettings = field(default_factory=LogSettings)
    intercept: InterceptSettings = field(default_factory=InterceptSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    inbound: InboundSettings = field(default_factory=InboundSettings)
    outbound: OutboundSettings = field(default_factory=OutboundSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    authority: AuthoritySettings = field(default_factory=AuthoritySettings)
    source: Path | None = None  # the file this came from, None for built-in defaults
    sources: dict[str, str] = field(default_factory=dict)  # "section.key" -> file path or "env VAR"


def _list_example(cls: type[Any], key: str, elem: Any) -> str:
    """A TOML list that fits `cls.key`, for the hint of a scalar given where a list belongs."""
    if elem is InboundPortPolicy:
        return '[{port = 5432, policy = "all-authenticated"}]'
    if elem is ProbeSpec:
        return '[{port = 8080, kind = "http", path = "/healthz"}]'
    if elem is CatalogEntrySettings:
        return '[{cidr = "10.96.0.0/12", identity = "spiffe://TD/ns/NS/sa/NAME", ports = [5432]}]'
    default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
    if isinstance(default, tuple) and default:
        return "[" + ", ".join(str(v) for v in default) + "]"
    if cls is DnsSettings:
        return '["127.0.0.53"]'
    if elem is str:
        return '["10.0.0.0/8"]'
    if elem is int:
        return "[0, 1000]"
    return '[22, "8000-8100"]'


def _list_hint(cls: type[Any], name: str, key: str, value: Any, origin: str) -> str:
    elem = get_type_hints(cls)[key].__args__[0]
    example = _list_example(cls, key, elem)
    if isinstance(value, int) and not isinstance(value, bool) and elem in (int, PortSpec):
        example = f"[{value}]"  # they meant one port: the same port, as a list
    if origin.startswith("env "):
        return f"a list, even of one item: {origin.removeprefix('env ')}='{example}'"
    if elem is InboundPortPolicy:
        return (
            'write one table per port: [[inbound.ports]] port = 5432, policy = "all-authenticated"'
            f" (or {key} = {example})"
        )
    if elem is CatalogEntrySettings:
        return (
            f"write one table per entry: [[outbound.catalog]] cidr = ..., identity = ..., ports = [...]"
            f" (or {key} = {example})"
        )
    return f"a list, even of one item: {key} = {example}"


def _coerce(value: Any, kind: Any, where: str) -> Any:
    if kind is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a path string, got {type(value).__name__}")
        return Path(value)
    if kind in (int, float, str, bool):
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigError(f"{where} must be {kind.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def _origin(name: str, key: str, path: Path, sources: dict[str, str]) -> str:
    """Where `name.key` came from: `env VAR` or the file's path."""
    source = sources.get(f"{name}.{key}", str(path))
    return source if source.startswith("env ") else str(path)


def _section(cls: type[Any], doc: dict[str, Any], name: str, path: Path, sources: dict[str, str]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        origin = _origin(name, key, path, sources)
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {name}.{close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{origin}: unknown key {name}.{key}", hint)
        if getattr(hints[key], "__origin__", None) is tuple and not isinstance(value, list):
            # A scalar where a list belongs (`ports = 22`) must not reach the checks that iterate.
            raise ConfigError(
                f"{origin}: {name}.{key} must be a list, got {type(value).__name__} {value!r}",
                _list_hint(cls, name, key, value, origin),
            )
        kwargs[key] = _coerce(value, hints[key], f"{origin}: {name}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # The check names the key; say whether the file or the environment gave it.
        key = next((k for k in doc if f"{name}.{k}" in exc.message), "")
        raise ConfigError(f"{_origin(name, key, path, sources)}: {exc.message}", exc.hint) from None


ENV_PREFIX = "MESHAGENT_"


def env_name(section: str, key: str) -> str:
    """`proxy.on_stop` -> `MESHAGENT_PROXY_ON_STOP`."""
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _env_value(name: str, text: str) -> Any:
    """An environment override is a TOML value (`3`, `true`, `[22, 2222]`, `"x"`) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _sections() -> dict[str, type[Any]]:
    hints = get_type_hints(AgentConfig)
    return {
        f.name: hints[f.name] for f in dataclasses.fields(AgentConfig) if f.name not in ("source", "sources")
    }


def _read_file(path: Path, required: bool) -> dict[str, Any] | None:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"config file {path} does not exist",
                "create it (see the README's configuration reference) or drop --config",
            ) from None
        return None
    except PermissionError:
        raise ConfigError(
            f"config file {path} is not readable", "run as root or as the meshagent user"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (at byte {exc.start})",
            "TOML files are UTF-8: re-save it as UTF-8 (e.g. iconv -t UTF-8)",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"config file {path} cannot be read: {exc.strerror or exc}",
            "give --config a readable TOML file",
        ) from None
    return raw


def load_config(
    path: Path | None, required: bool = False, environ: dict[str, str] | None = None
) -> AgentConfig:
    """Defaults, then the TOML file, then `MESHAGENT_<SECTION>_<KEY>` environment overrides.

    A missing default file means defaults (and the environment); a missing explicit one is an
    error. `sources` records where every value that is not a default came from.
    """
    path = path or DEFAULT_CONFIG_FILE
    env = os.environ if environ is None else environ
    raw = _read_file(path, required)
    sections = _sections()
    merged: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for name, doc in (raw or {}).items():
        if name not in sections:
            close = difflib.get_close_matches(name, sections, n=1)
            hint = (
                f"did you mean [{close[0]}]?" if close else f"known sections: {', '.join(sorted(sections))}"
            )
            raise ConfigError(f"{path}: unknown section [{name}]", hint)
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: {name} must be a table ([{name}])")
        merged[name] = dict(doc)
        sources.update({f"{name}.{key}": str(path) for key in doc})
    for name, cls in sections.items():
        for f in dataclasses.fields(cls):
            var = env_name(name, f.name)
            if var in env:
                merged.setdefault(name, {})[f.name] = _env_value(var, env[var])
                sources[f"{name}.{f.name}"] = f"env {var}"
    values = {name: _section(sections[name], doc, name, path, sources) for name, doc in merged.items()}
    return AgentConfig(**values, source=path if raw is not None else None, sources=sources)


def describe(config: AgentConfig) -> list[dict[str, Any]]:
    """Every setting, its effective value and where it came from (`meshagent config show`)."""
    rows = []
    for name in _sections():
        section = getattr(config, name)
        for f in dataclasses.fields(section):
            key = f"{name}.{f.name}"
            value = getattr(section, f.name)
            if key == "authority.https_proxy" and value:
                value = _without_password(value)
            rows.append(
                {
                    "key": key,
                    "value": _plain(value),
                    "source": config.sources.get(key, "default"),
                    "env": env_name(name, f.name),
                }
            )
    return rows


def _without_password(url: str) -> str:
    """A proxy URL as it may be shown: a password in it replaced by ***."""
    from agent.identity.transport import redact  # pure stdlib

    return redact(url)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    return value
