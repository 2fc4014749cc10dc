"""Which proxy reaches the authority (flag, config key, environment, no_proxy), and both
transports (http.client for the daemon, httpx for enroll/renew) through a loopback CONNECT proxy.

The namespace test with a real tinyproxy and a TLS-inspecting stand-in is
tests/netns/test_https_proxy.py.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import describe, load_config
from agent.errors import ConfigError, TrustError, UnreachableError
from agent.identity import transport, transport_httpx
from agent.identity.client import RequestFn
from agent.identity.transport import (
    ProxyConfig,
    bypasses,
    parse_proxy_url,
    proxy_from_environment,
    redact,
    resolve_proxy,
)

# --- selection -------------------------------------------------------------------------------


def test_flag_beats_key_beats_environment() -> None:
    env = {"HTTPS_PROXY": "http://env:1", "https_proxy": "http://lower:2"}
    assert resolve_proxy("http://key:3", None, "http://flag:4", env).source == "--https-proxy"
    chosen = resolve_proxy("http://key:3", None, None, env)
    assert (chosen.proxy, chosen.source) == (
        parse_proxy_url("http://key:3", ""),
        "config authority.https_proxy",
    )
    assert resolve_proxy(None, None, None, env).source == "env HTTPS_PROXY"
    assert resolve_proxy(None, None, None, {"https_proxy": "http://lower:2"}).source == "env https_proxy"
    assert resolve_proxy(None, None, None, {}).proxy is None


def test_an_empty_key_or_flag_means_direct_whatever_the_environment() -> None:
    env = {"HTTPS_PROXY": "http://env:1"}
    assert resolve_proxy("", None, None, env).proxy is None
    assert resolve_proxy("http://key:3", None, "", env).proxy is None
    assert resolve_proxy("", None, None, env).describe() == "direct (config authority.https_proxy (empty))"


def test_no_proxy_key_replaces_the_environment() -> None:
    env = {"HTTPS_PROXY": "http://env:1", "NO_PROXY": "auth.corp"}
    assert resolve_proxy(None, None, None, env).for_url("https://auth.corp:8443") is None
    via_key = resolve_proxy(None, "other.example", None, env)
    assert via_key.for_url("https://auth.corp:8443") is not None
    assert via_key.for_url("https://x.other.example:8443") is None
    assert (
        resolve_proxy(None, None, None, {"HTTPS_PROXY": "http://e:1", "no_proxy": "*"}).for_url("https://a:1")
        is None
    )


@pytest.mark.parametrize(
    ("host", "port", "entries", "expected"),
    [
        ("auth.corp.example", 8443, "corp.example", True),
        ("auth.corp.example", 8443, ".corp.example", True),
        ("corp.example", 8443, ".corp.example", True),
        ("evilcorp.example", 8443, "corp.example", False),
        ("auth.corp.example", 8443, "corp.example:443", False),
        ("auth.corp.example", 8443, "corp.example:8443", True),
        ("AUTH.Corp.Example.", 8443, "corp.example", True),
        ("10.1.2.3", 8443, "10.0.0.0/8", True),
        ("10.1.2.3", 8443, "10.1.2.3", True),
        ("10.1.2.3", 8443, "10.1.2.3:8443", True),
        ("10.1.2.3", 8443, "10.1.2.3:443", False),
        ("11.1.2.3", 8443, "10.0.0.0/8", False),
        ("2001:db8::5", 8443, "2001:db8::/32", True),
        ("2001:db8::5", 8443, "[2001:db8::5]:8443", True),
        ("2001:db8::5", 8443, "[2001:db8::5]:443", False),
        ("10.1.2.3", 8443, "corp.example", False),
        ("anything", 1, "*", True),
        ("auth", 8443, "", False),
    ],
)
def test_no_proxy_entries(host: str, port: int, entries: str, expected: bool) -> None:
    parsed = resolve_proxy("http://p:1", entries, None, {}).no_proxy
    assert bypasses(host, port, parsed) is expected


def test_proxy_urls_and_their_passwords() -> None:
    proxy = parse_proxy_url("http://us%40er:p%3Ass@proxy.example:3128", "x")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == (
        "proxy.example",
        3128,
        "us@er",
        "p:ss",
    )
    assert proxy.display == "http://us@er:***@proxy.example:3128"
    assert proxy.authorization() == {"Proxy-Authorization": "Basic dXNAZXI6cDpzcw=="}
    assert parse_proxy_url(proxy.url, "x") == proxy
    assert parse_proxy_url("10.0.0.1:8080", "x").port == 8080  # a bare host:port is http://
    assert parse_proxy_url("http://[2001:db8::1]:3128", "x").display == "http://[2001:db8::1]:3128"
    assert "p:ss" not in resolve_proxy(proxy.url, "a,b").describe()
    for bad in ("https://proxy:3128", "socks5://proxy:1080", "http://proxy:99999", "http://proxy:3128/path"):
        with pytest.raises(ConfigError) as err:
            parse_proxy_url(bad.replace("proxy", "u:hunter2@proxy"), "authority.https_proxy")
        assert "hunter2" not in err.value.message and "authority.https_proxy" in err.value.message


def test_the_daemon_hands_its_choice_to_the_renewal_process() -> None:
    chosen = resolve_proxy("http://u:pw@proxy:3128", "10.0.0.0/8,.corp", None, {})
    env = {"HTTPS_PROXY": "http://something-else:1", **chosen.child_env()}
    again = proxy_from_environment(env)
    assert (again.proxy, again.no_proxy) == (chosen.proxy, chosen.no_proxy)
    direct = resolve_proxy("", None, None, {"HTTPS_PROXY": "http://p:1"})
    assert proxy_from_environment({"HTTPS_PROXY": "http://p:1", **direct.child_env()}).proxy is None


# --- the config keys ---------------------------------------------------------------------------


def test_config_keys_env_overrides_and_show_hides_the_password(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[authority]\nhttps_proxy = "http://u:hunter2@proxy:3128"\nno_proxy = ".corp"\n')
    cfg = load_config(path, environ={})
    assert (cfg.authority.https_proxy, cfg.authority.no_proxy) == ("http://u:hunter2@proxy:3128", ".corp")
    rows = {r["key"]: r for r in describe(cfg)}
    assert rows["authority.https_proxy"]["value"] == "http://u:***@proxy:3128"
    assert rows["authority.https_proxy"]["env"] == "MESHAGENT_AUTHORITY_HTTPS_PROXY"
    env = load_config(path, environ={"MESHAGENT_AUTHORITY_HTTPS_PROXY": "http://other:8080"})
    assert env.authority.https_proxy == "http://other:8080"
    assert load_config(tmp_path / "none.toml", environ={}).authority.https_proxy is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('https_proxy = "ftp://proxy:21"', "scheme 'ftp'"),
        ("https_proxy = 3128", "must be a string"),
        ('no_proxy = ["a"]', "must be a string"),
        ('https_proxi = "http://p:1"', "did you mean authority.https_proxy"),
    ],
)
def test_bad_config_keys_name_the_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[authority]\n{text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(path) in err.value.message and fragment in err.value.message + err.value.hint


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ("http://user:hunter2@proxy:3128", "http://user:***@proxy:3128"),
        ("user:hunter2@proxy:3128", "user:***@proxy:3128"),  # no scheme: a valid setting too
        ("http://user:hun@ter2@proxy:3128", "http://user:***@proxy:3128"),  # an unencoded @
        ("http://user:hun/ter2@proxy:3128", "http://user:***@proxy:3128"),  # an unencoded /
        ("via http://u:hunter2@p:1 (from env)", "via http://u:***@p:1 (from env)"),
        ("http://proxy:3128", "http://proxy:3128"),
        ("ops@example.com", "ops@example.com"),
    ],
)
def test_the_password_is_never_shown(setting: str, shown: str) -> None:
    assert redact(setting) == shown


# --- both transports through a loopback CONNECT proxy --------------------------------------------


def _tls_server_context() -> tuple[ssl.SSLContext, str]:
    """A server context and the PEM of the self-signed CA it presents (the pinned CA here)."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test authority")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*_write_pair(pem, key))
    return ctx, pem


def _write_pair(pem: str, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="proxytest-"))
    (directory / "c.pem").write_text(pem)
    (directory / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(directory / "c.pem"), str(directory / "k.pem")


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"hello": "authority"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class _ConnectProxy:
    """A loopback CONNECT proxy: records each CONNECT's target and headers; answers `status`
    (200: a blind tunnel, like tinyproxy)."""

    status: int = 200
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    sock: socket.socket = field(default_factory=socket.socket)

    def start(self) -> int:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()
        return int(self.sock.getsockname()[1])

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    def _one(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:])
            target = lines[0].split()[1]
            self.seen.append((target, headers))
            if self.status != 200:
                client.sendall(f"HTTP/1.1 {self.status} Go Away\r\nContent-Length: 0\r\n\r\n".encode())
                return
            host, _, port = target.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port))) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=_copy, args=(upstream, client), daemon=True).start()
                _copy(client, upstream)


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def authority() -> Iterator[tuple[str, str]]:
    """A loopback HTTPS server (URL, its CA's PEM)."""
    ctx, pem = _tls_server_context()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", pem
    server.shutdown()


TRANSPORTS = pytest.mark.parametrize(
    "send", [transport.request, transport_httpx.request], ids=["http.client", "httpx"]
)


def _verified(pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pem)
    ctx.check_hostname = False
    return ctx


@TRANSPORTS
def test_through_the_proxy_with_credentials(authority: tuple[str, str], send: RequestFn) -> None:
    url, pem = authority
    proxy = _ConnectProxy()
    port = proxy.start()
    chosen = resolve_proxy(f"http://u%20x:pw@127.0.0.1:{port}", None, None, {})
    response = send(url, _verified(pem), "GET", "/v1/authority", None, {}, 5.0, chosen)
    assert response.status == 200 and response.body == b'{"hello": "authority"}'
    target, headers = proxy.seen[-1]
    assert target == url.removeprefix("https://")
    assert headers["Proxy-Authorization"] == "Basic dSB4OnB3"  # "u x:pw"


@TRANSPORTS
def test_an_ipv6_authority_is_bracketed_in_connect(send: RequestFn) -> None:
    """RFC 9110's authority-form: `CONNECT [::1]:PORT`; Python 3.11's tunnel and httpcore both
    wrote `CONNECT ::1:PORT`, which proxies refuse or misread."""
    ctx, pem = _tls_server_context()

    class _V6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    server = _V6(("::1", 0), _Hello)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"https://[::1]:{server.server_address[1]}"
        proxy = _ConnectProxy()
        chosen = resolve_proxy(f"http://127.0.0.1:{proxy.start()}", None, None, {})
        response = send(url, _verified(pem), "GET", "/v1/authority", None, {}, 5.0, chosen)
        assert response.status == 200 and response.body == b'{"hello": "authority"}'
        assert [target for target, _ in proxy.seen] == [f"[::1]:{server.server_address[1]}"]
    finally:
        server.shutdown()


@TRANSPORTS
def test_no_proxy_skips_it(authority: tuple[str, str], send: RequestFn) -> None:
    url, pem = authority
    proxy = _ConnectProxy()
    chosen = resolve_proxy(f"http://127.0.0.1:{proxy.start()}", "127.0.0.0/8", None, {})
    assert send(url, _verified(pem), "GET", "/", None, {}, 5.0, chosen).status == 200
    assert proxy.seen == []


@TRANSPORTS
@pytest.mark.parametrize(
    ("status", "hint"), [(407, "credentials"), (403, "forbids"), (502, "could not connect")]
)
def test_a_refused_connect_names_the_status(
    authority: tuple[str, str], send: RequestFn, status: int, hint: str
) -> None:
    url, pem = authority
    proxy = _ConnectProxy(status=status)
    chosen = resolve_proxy(f"http://u:hunter2@127.0.0.1:{proxy.start()}", None, None, {})
    with pytest.raises(UnreachableError) as err:
        send(url, _verified(pem), "GET", "/", None, {}, 5.0, chosen)
    assert err.value.code == "proxy_refused"
    assert f"HTTP {status}" in err.value.message and hint in err.value.hint
    assert "hunter2" not in err.value.message + err.value.hint


@TRANSPORTS
def test_an_unreachable_proxy_is_named(authority: tuple[str, str], send: RequestFn) -> None:
    url, pem = authority
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        chosen = resolve_proxy(f"http://127.0.0.1:{port}", None, None, {})
        with pytest.raises(UnreachableError) as err:
            send(url, _verified(pem), "GET", "/", None, {}, 5.0, chosen)
    assert err.value.code == "proxy_unreachable"
    assert f"cannot reach the proxy http://127.0.0.1:{port}" in err.value.message


@TRANSPORTS
def test_another_ca_through_the_proxy_is_a_pin_mismatch(authority: tuple[str, str], send: RequestFn) -> None:
    url, _ = authority
    _, other_pem = _tls_server_context()
    proxy = _ConnectProxy()
    chosen = resolve_proxy(f"http://127.0.0.1:{proxy.start()}", None, None, {})
    with pytest.raises(TrustError) as err:
        send(url, _verified(other_pem), "GET", "/", None, {}, 5.0, chosen)
    assert "pin mismatch" in err.value.message and "TLS-inspecting proxy" in err.value.hint


def test_the_daemon_does_not_load_httpx() -> None:
    import subprocess
    import sys

    code = "import sys, agent.daemon, agent.identity.client; print('httpx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_direct_is_the_default() -> None:
    assert ProxyConfig().for_url("https://a:1") is None
