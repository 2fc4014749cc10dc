"""How the host reaches the authority: directly, or through an HTTPS (CONNECT) egress proxy.

Which proxy applies is decided here once, the same way for every client: `--https-proxy` on
the command line, else the config's `[authority] https_proxy` (an empty string there means
"direct", whatever the environment says), else the environment's HTTPS_PROXY / https_proxy;
`no_proxy` likewise from the config key, else NO_PROXY / no_proxy.

The proxy only ever sees a CONNECT to the authority's host and port: TLS runs end to end
inside the tunnel, so the pin and the verification against the pinned CA are exactly those of
a direct connection, and a proxy that answers TLS itself (an inspecting proxy) fails them.

This module is the daemon's transport too (`http.client` with `set_tunnel`), so it imports
only the standard library: httpx, used by the short-lived enroll and renew processes, lives in
transport_httpx.py.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from agent.errors import ConfigError, TrustError, UnreachableError

# The config keys' own environment overrides (agent/config.py's env_name): the daemon hands the
# proxy it resolved to its renewal process through these, so both use the same one.
ENV_KEY_PROXY = "MESHAGENT_AUTHORITY_HTTPS_PROXY"
ENV_KEY_NO_PROXY = "MESHAGENT_AUTHORITY_NO_PROXY"


@dataclass(frozen=True)
class ProxyURL:
    """An http:// forward proxy; the credentials, if any, are never printed (see `display`)."""

    host: str
    port: int
    username: str = ""
    password: str = ""

    @property
    def display(self) -> str:
        """The proxy as it may be logged: user shown, password never."""
        auth = f"{self.username}:***@" if self.username or self.password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{auth}{host}:{self.port}"

    @property
    def url(self) -> str:
        """The full URL, credentials included (for httpx): never log this."""
        from urllib.parse import quote

        auth = (
            f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"
            if self.username or self.password
            else ""
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{auth}{host}:{self.port}"

    def authorization(self) -> dict[str, str]:
        """The CONNECT request's Proxy-Authorization header (Basic), when the URL has a user."""
        if not (self.username or self.password):
            return {}
        raw = f"{self.username}:{self.password}".encode()
        return {"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode()}


def parse_proxy_url(text: str, where: str) -> ProxyURL:
    """`http://[user:pass@]host[:port]` (a bare `host:port` is read as http://). Only plain-HTTP
    proxies: the tunnel inside already carries the authority's TLS."""
    raw = text.strip()
    if "://" not in raw:
        raw = f"http://{raw}"
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {redact(text)!r} is not a proxy URL ({exc})", _PROXY_HINT) from None
    if parts.scheme != "http":
        raise ConfigError(
            f"{where}: proxy scheme {parts.scheme!r} is not supported",
            "give the proxy as http://host:port: the connection to the authority inside the "
            "CONNECT tunnel is TLS already",
        )
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: {redact(text)!r} is not a proxy URL", _PROXY_HINT)
    return ProxyURL(
        parts.hostname,
        port or 80,
        unquote(parts.username or ""),
        unquote(parts.password or ""),
    )


_PROXY_HINT = 'like "http://proxy.example:3128" or "http://user:password@10.0.0.1:8080"'


def redact(text: str) -> str:
    """`text` with the password of any URL in it replaced by ***, for messages and `config show`:
    with or without a scheme (`user:pw@proxy:3128` is a valid setting), and up to the word's last
    `@` (a password may hold an unencoded `@` or `/`)."""
    return " ".join(_redact_word(word) for word in text.split(" "))


def _redact_word(word: str) -> str:
    if "@" not in word:
        return word
    scheme, sep, rest = word.partition("://")
    if not sep:
        scheme, rest = "", word
    userinfo, _, host = rest.rpartition("@")
    if ":" not in userinfo:
        return word  # a user name alone (or an e-mail address): nothing secret
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def _no_proxy_entries(text: str) -> tuple[str, ...]:
    return tuple(e.strip().lower() for e in text.replace(" ", ",").split(",") if e.strip())


def bypasses(host: str, port: int, no_proxy: tuple[str, ...]) -> bool:
    """Whether NO_PROXY-style `no_proxy` entries exempt host:port: `*` (everything), an IP
    address or CIDR, a domain (`example.com` and `.example.com` both match it and every name
    below it), each optionally with `:port`."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy:
        if entry == "*":
            return True
        name, entry_port = entry, None
        if entry.startswith("[") and "]" in entry:  # [v6] or [v6]:port
            name, _, rest = entry[1:].partition("]")
            entry_port = rest.removeprefix(":") or None
        elif entry.count(":") == 1:  # name:port or v4:port (a bare v6 address has more colons)
            name, entry_port = entry.split(":")
        if entry_port is not None and entry_port != str(port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        domain = name.lstrip("*").lstrip(".").rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy settings in force and where they came from (for status and errors)."""

    proxy: ProxyURL | None = None
    no_proxy: tuple[str, ...] = ()
    source: str = "none"  # "--https-proxy", "config authority.https_proxy", "env HTTPS_PROXY", ...

    def for_url(self, url: str) -> ProxyURL | None:
        """The proxy to reach `url` through, or None to connect directly."""
        if self.proxy is None:
            return None
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        return None if bypasses(host, port, self.no_proxy) else self.proxy

    def describe(self) -> str:
        """One line for status output and logs (no password)."""
        if self.proxy is None:
            return "direct" + (f" ({self.source})" if self.source != "none" else "")
        text = f"via {self.proxy.display} (from {self.source})"
        return text + (f", except {','.join(self.no_proxy)}" if self.no_proxy else "")

    def child_env(self) -> dict[str, str]:
        """Environment that makes a child process (the daemon's renewal) resolve this same proxy
        whatever its config file says: the config keys' own overrides."""
        return {
            ENV_KEY_PROXY: self.proxy.url if self.proxy else "",
            ENV_KEY_NO_PROXY: ",".join(self.no_proxy),
        }


def resolve_proxy(
    https_proxy: str | None = None,
    no_proxy: str | None = None,
    flag: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProxyConfig:
    """The proxy in force: `flag` (--https-proxy) > the config key `https_proxy` (None: unset;
    "": direct) > HTTPS_PROXY > https_proxy. `no_proxy`: the key if set, else NO_PROXY / no_proxy."""
    env = os.environ if environ is None else environ
    if flag is not None:
        text, source = flag, "--https-proxy"
    elif https_proxy is not None:
        text, source = https_proxy, "config authority.https_proxy"
    else:
        var = next((v for v in ("HTTPS_PROXY", "https_proxy") if env.get(v)), None)
        text, source = (env[var], f"env {var}") if var else ("", "none")
    if no_proxy is None:
        no_proxy = env.get("NO_PROXY") or env.get("no_proxy") or ""
    proxy = parse_proxy_url(text, source) if text.strip() else None
    if not text.strip() and source != "none":
        source = f"{source} (empty)"
    return ProxyConfig(proxy, _no_proxy_entries(no_proxy), source)


def proxy_from_environment(environ: Mapping[str, str] | None = None) -> ProxyConfig:
    """For a process started without the config (the daemon's renewal): the config keys'
    environment overrides if set (what `child_env` passes), else HTTPS_PROXY / NO_PROXY."""
    env = os.environ if environ is None else environ
    return resolve_proxy(env.get(ENV_KEY_PROXY), env.get(ENV_KEY_NO_PROXY), environ=env)


DIRECT = ProxyConfig()


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str]  # names lowercased


_TUNNEL_STATUS = re.compile(r"Tunnel connection failed: (\d{3})\s*(.*)")


def proxy_refused(proxy: ProxyURL, url: str, status: int, reason: str) -> UnreachableError:
    """The proxy answered our CONNECT with an error status."""
    target = urlsplit(url).netloc.rpartition("@")[2]
    if status in (401, 407):  # 407 is the standard; tinyproxy 1.11 answers CONNECT with 401
        hint = (
            "the proxy wants credentials: put them in the proxy URL "
            "(http://user:password@host:port) or check the ones there"
        )
    elif status == 403:
        hint = f"the proxy's policy forbids {target}: ask for CONNECT to it to be allowed (port included)"
    elif status in (500, 502, 503, 504):
        hint = (
            f"the proxy could not connect to {target}: check that the authority runs and that the "
            "proxy can reach it (its log says why)"
        )
    else:
        hint = f"check the proxy's log for why it refused CONNECT {target}"
    return UnreachableError(
        f"the proxy {proxy.display} refused to connect to the authority at {url}: "
        f"HTTP {status} {reason}".rstrip(),
        hint,
        code="proxy_refused",
    )


def proxy_unreachable(proxy: ProxyURL, url: str, detail: str) -> UnreachableError:
    return UnreachableError(
        f"cannot reach the proxy {proxy.display} (to the authority at {url}): {detail}",
        "check the proxy's address and port ([authority] https_proxy, --https-proxy or "
        "HTTPS_PROXY), that it runs, and that this host can reach it; "
        "or list the authority in no_proxy if this host reaches it directly",
        code="proxy_unreachable",
    )


def not_the_authority(url: str, proxy: ProxyURL | None) -> TrustError:
    """The TLS peer's certificate is not from the pinned CA (verification failed)."""
    if proxy is not None:
        return TrustError(
            f"the server reached through the proxy {proxy.display} for {url} presented a "
            "certificate not issued by the pinned authority CA (pin mismatch)",
            inspecting_proxy_hint(url),
        )
    return TrustError(
        f"the server at {url} presented a certificate not issued by the pinned authority CA",
        "the token's pin does not match this server: check the URL, or create a token on the right authority",
    )


def inspecting_proxy_hint(url: str) -> str:
    target = urlsplit(url).netloc.rpartition("@")[2]
    return (
        "a TLS-inspecting proxy is in the way: it answers TLS with its own certificate, which the "
        f"pin refuses; have {target} exempted from TLS inspection on the proxy (CONNECT passed "
        "through untouched), or list it in no_proxy if this host can reach it directly"
    )


def unreachable(url: str, exc: BaseException) -> UnreachableError:
    return UnreachableError(
        f"cannot reach the authority at {url}: {exc or exc.__class__.__name__}",
        "check the URL (from the token), that `meshagent authority serve` runs there, and that "
        "this host can reach that address and port",
    )


def request(
    url: str,
    context: ssl.SSLContext,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
    proxy: ProxyConfig = DIRECT,
) -> Response:
    """One HTTPS request with `http.client` (directly, or in a CONNECT tunnel through the proxy
    `proxy` names for `url`); transport failures become UnreachableError / TrustError."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    via = proxy.for_url(url)
    if via is None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPSConnection(via.host, via.port, timeout=timeout, context=context)
        conn.set_tunnel(host, port, headers=via.authorization())
    stage = "proxy" if via is not None else "authority"
    try:
        if via is not None:
            # Connect (and CONNECT) apart from the request, so a failure names the hop it was on.
            try:
                conn.sock = socket.create_connection((via.host, via.port), timeout)
            except OSError as exc:
                raise proxy_unreachable(via, url, str(exc) or exc.__class__.__name__) from None
            open_tunnel(conn, via, url)
            stage = "authority"
            conn.sock = context.wrap_socket(conn.sock, server_hostname=host)
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        content = response.read()
        return Response(response.status, content, {k.lower(): v for k, v in response.getheaders()})
    except ssl.SSLCertVerificationError:
        raise not_the_authority(url, via) from None
    except (OSError, http.client.HTTPException) as exc:
        if stage == "proxy" and via is not None:
            raise proxy_unreachable(via, url, str(exc) or exc.__class__.__name__) from None
        raise unreachable(url, exc) from None
    finally:
        conn.close()


def open_tunnel(conn: http.client.HTTPSConnection, via: ProxyURL, url: str) -> None:
    """CONNECT on the socket `conn` holds; the proxy's refusal becomes proxy_refused."""
    # RFC 9110's authority-form needs an IPv6 address in brackets; Python 3.11's set_tunnel
    # strips them and its _tunnel does not put them back (3.12 does, and leaves bracketed ones).
    target = conn._tunnel_host  # type: ignore[attr-defined]
    if target and ":" in target and not target.startswith("["):
        conn._tunnel_host = f"[{target}]"  # type: ignore[attr-defined]
    try:
        conn._tunnel()  # type: ignore[attr-defined]  # http.client's own CONNECT (set_tunnel)
    except OSError as exc:
        match = _TUNNEL_STATUS.match(str(exc))
        if match:
            raise proxy_refused(via, url, int(match.group(1)), match.group(2)) from None
        raise proxy_unreachable(via, url, f"no answer to CONNECT: {exc}") from None
    finally:
        conn._tunnel_host = target  # type: ignore[attr-defined]  # the Host header brackets it itself
