"""The authority's API under hostile input, against a real `meshagent authority serve` process:
every refusal is a JSON error with a code, no traceback reaches its log, bodies and slow
clients are bounded."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.errors import ExitCode
from tests.support import AuthorityProcess, init_authority, run_cli, running_authority


def _log(auth: AuthorityProcess) -> str:
    assert auth.log_path is not None
    return auth.log_path.read_text()


def _rss_kib(auth: AuthorityProcess) -> int:
    assert auth.proc is not None
    for line in Path(f"/proc/{auth.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _connect(auth: AuthorityProcess, timeout: float = 10) -> ssl.SSLSocket:
    host, port = auth.url.removeprefix("https://").rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=timeout)
    return auth.tls.wrap_socket(raw, server_hostname=host)


def _read_response(sock: ssl.SSLSocket, data: bytes = b"") -> tuple[int, dict[str, str]]:
    """Status and JSON body of one response (`data`: what was already read of it)."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), json.loads(body[:length]) if length else {}


def _answered(sock: ssl.SSLSocket) -> bytes | None:
    """What the server has sent so far (b"" when it closed), None when nothing yet. TLS 1.3
    session tickets make the socket readable without any application data."""
    if not sock.pending() and not select.select([sock], [], [], 0)[0]:
        return None
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except ssl.SSLWantReadError:
        return None
    finally:
        sock.setblocking(True)


HUNDRED_MB = 100 * 1024 * 1024


def _stream_until_refused(
    sock: ssl.SSLSocket, head: bytes, chunk: bytes, framed: bool = True
) -> tuple[int, bytes | None]:
    """Send `head`, then `chunk` (chunked if `framed`), up to 100 MB or until the server
    answers or closes: (bytes sent, what was read of the answer). One buffer is reused: the
    test never holds the 100 MB."""
    sock.sendall(head)
    data = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if framed else chunk
    sent = 0
    try:
        while sent < HUNDRED_MB:
            answer = _answered(sock)
            if answer is not None:
                return sent, answer
            sock.sendall(data)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        return sent, b""
    return sent, None


def _post(auth: AuthorityProcess, path: str, content: bytes) -> httpx.Response:
    return httpx.post(
        f"{auth.url}{path}",
        content=content,
        headers={"content-type": "application/json"},
        verify=auth.tls,
        timeout=30,
    )


def _assert_refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["code"] == code and doc["message"] and "hint" in doc, doc


# -- defect 6: every bad request is a JSON error with a code, never a traceback --------------


def test_deeply_nested_json_is_a_400_not_a_traceback(authority: AuthorityProcess) -> None:
    for path in ("/v1/enroll", "/v1/renew"):
        for body in (b"[" * 60_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
            _assert_refused(_post(authority, path, body), 400, "invalid_request")
    assert httpx.get(f"{authority.url}/healthz", verify=authority.tls).status_code == 200
    assert "Traceback" not in _log(authority)


def test_huge_or_odd_renewal_timestamps_are_a_400(authority: AuthorityProcess, tmp_path: Path) -> None:
    state = tmp_path / "host"
    run_cli("enroll", authority.token(), "--state-dir", str(state), "--json", check=True)
    chain = (state / "identity" / "cert.pem").read_text()
    from agent.identity.pki import generate_key, make_csr

    csr = make_csr(generate_key()).decode()
    for ts in (10**400, -(10**400), 2**63, -(2**63), True):
        r = httpx.post(
            f"{authority.url}/v1/renew",
            verify=authority.tls,
            json={"certificate_chain": chain, "csr": csr, "timestamp": ts, "signature": "AA=="},
        )
        _assert_refused(r, 400, "invalid_request")
    # Big but finite numbers in other fields and a float timestamp: refusals too, never a 500.
    for doc in (
        {"certificate_chain": chain, "csr": csr, "timestamp": 1.5e308, "signature": "AA=="},
        {"certificate_chain": chain, "csr": csr, "timestamp": int(time.time()), "signature": 10**400},
    ):
        r = _post(authority, "/v1/renew", json.dumps(doc).encode())
        _assert_refused(r, 400, "invalid_request")
    assert "Traceback" not in _log(authority)


def test_malformed_bodies_of_every_kind_are_json_400s(authority: AuthorityProcess) -> None:
    bodies = [
        b"",
        b"\xff\xfe\x00",
        b"null",
        b"[]",
        b'"x"',
        b"1e999999",
        b"NaN",
        b'{"token_secret": ' + b"9" * 5000 + b"}",  # past Python's int digit limit
        b'{"token_secret": 1}',
        b'{"token_secret": "x", "csr": "x", "host_name": "h", "addresses": "1.2.3.4"}',
        b'{"token_secret": "\\ud800", "csr": "x", "host_name": "h", "addresses": []}',
        ("{" + '"k":0,' * 5000 + '"z":0}').encode(),
    ]
    for path in ("/v1/enroll", "/v1/renew"):
        for body in bodies:
            r = _post(authority, path, body)
            assert r.status_code == 400, (path, body[:40], r.text)
            assert r.json()["code"] in ("invalid_request", "invalid_csr"), r.text
    assert "Traceback" not in _log(authority)


def test_what_is_not_http_is_a_json_400_and_a_huge_head_a_431(authority: AuthorityProcess) -> None:
    for garbage in (
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
    ):
        with _connect(authority) as sock:
            sock.sendall(garbage)
            status, doc = _read_response(sock)
        assert status == 400 and doc["code"] == "invalid_request" and doc["hint"], garbage
    with _connect(authority) as sock:
        # Headers without end, refused at 32 KiB: the sending stops at the answer or the close.
        head = b"GET /healthz HTTP/1.1\r\nhost: x\r\n"
        sent, answer = _stream_until_refused(sock, head, b"x-a: a\r\n" * 1000, framed=False)
        try:
            status, doc = _read_response(sock, answer or b"")
        except OSError:
            status, doc = 0, {}  # a reset may overtake the answer: the close is the refusal
    assert sent < HUNDRED_MB // 2, "the authority kept reading the head"
    assert status in (0, 431) and doc.get("code", "head_too_large") == "head_too_large"
    log = _log(authority)
    assert "Traceback" not in log and "Invalid HTTP request" not in log
    assert log.count("requests.malformed") == 1  # one line for the lot (at most one per 10 s)


# -- defect 7: the size check comes before the body is read ----------------------------------


def test_a_declared_100_mb_body_is_refused_before_it_is_read(authority: AuthorityProcess) -> None:
    before = _rss_kib(authority)
    with _connect(authority) as sock:
        head = (
            b"POST /v1/enroll HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % HUNDRED_MB
        )
        sock.sendall(head)
        status, doc = _read_response(sock)  # answered with no body byte sent
    assert status == 413 and doc["code"] == "body_too_large" and doc["hint"]
    r = _post(authority, "/v1/renew", b" " * (64 * 1024 + 1))
    _assert_refused(r, 413, "body_too_large")
    assert _rss_kib(authority) - before < 30 * 1024


def test_a_streamed_100_mb_body_stops_being_read_at_the_limit(authority: AuthorityProcess) -> None:
    before = _rss_kib(authority)
    chunk = b" " * (1024 * 1024)
    with _connect(authority) as sock:
        head = (
            b"POST /v1/enroll HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        sent, answer = _stream_until_refused(sock, head, chunk)
        try:
            status, doc = _read_response(sock, answer or b"")
        except (ConnectionError, ssl.SSLError, OSError):
            status, doc = 0, {}  # a reset may overtake the answer: the close is the refusal
    assert sent < HUNDRED_MB // 2, "the authority kept reading"
    assert status in (0, 413) and doc.get("code", "body_too_large") == "body_too_large"
    assert _rss_kib(authority) - before < 30 * 1024
    assert httpx.get(f"{authority.url}/healthz", verify=authority.tls).status_code == 200
    assert "Traceback" not in _log(authority)


# -- defect 4: slow clients are bounded ------------------------------------------------------


@contextlib.contextmanager
def _authority_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **limits: float
) -> Iterator[AuthorityProcess]:
    """A real authority whose limits are set (as `authority serve` passes them to its workers)."""
    monkeypatch.setenv("MESHAGENT_AUTHORITY_LIMITS", json.dumps(limits))
    with running_authority(tmp_path / "authority") as auth:
        yield auth


def _open_fds(auth: AuthorityProcess) -> int:
    assert auth.proc is not None
    return len(os.listdir(f"/proc/{auth.proc.pid}/fd"))


def test_slow_headers_do_not_stop_enrollment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """300 connections that send half a head, against an authority with 200 file descriptors:
    the cap sheds the connections waiting longest, so a real enrollment and /healthz still get
    through at once (the header timeout is long here: the cap is what is proven)."""
    with _authority_with(tmp_path, monkeypatch, max_connections=50, header_timeout=60) as auth:
        assert auth.proc is not None
        resource.prlimit(auth.proc.pid, resource.RLIMIT_NOFILE, (200, 200))
        slow: list[ssl.SSLSocket] = []
        try:
            for _ in range(300):
                try:
                    sock = _connect(auth, timeout=5)
                    slow.append(sock)
                    sock.sendall(b"POST /v1/enroll HTTP/1.1\r\nhost: x\r\ncontent-")
                except OSError:
                    pass  # shed by the authority already: what the cap is for
            r = httpx.get(f"{auth.url}/healthz", verify=auth.tls, timeout=10)
            assert r.status_code == 200
            state = tmp_path / "host"
            proc = run_cli("enroll", auth.token(), "--state-dir", str(state), "--json", timeout=60)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert _open_fds(auth) < 50 + 40
        finally:
            for sock in slow:
                sock.close()
        assert "connections.shed" in _log(auth)
        assert "Traceback" not in _log(auth)


def test_a_declared_but_unsent_body_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _authority_with(tmp_path, monkeypatch, body_timeout=1, header_timeout=1, idle_timeout=1) as auth:
        with _connect(auth, timeout=15) as sock:
            sock.sendall(b"POST /v1/enroll HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
            status, doc = _read_response(sock)
            assert status == 408 and doc["code"] == "request_timeout"
            assert sock.recv(100) == b""  # and closed
        # Half a head: closed without an answer.
        with _connect(auth, timeout=15) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            assert sock.recv(100) == b""
        # An idle keep-alive connection, after its request: closed.
        with _connect(auth, timeout=15) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            status, _ = _read_response(sock)
            assert status == 200
            assert sock.recv(100) == b""
        # Kept alive, then half of the next head: closed too (the idle timer stops at its first
        # byte, the head's deadline runs from there).
        with _connect(auth, timeout=15) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            status, _ = _read_response(sock)
            assert status == 200
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert sock.recv(100) == b""
        # A silent TCP connection (no TLS hello) is dropped as well.
        host, port = auth.url.removeprefix("https://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=15) as raw:
            assert raw.recv(100) == b""
        assert "Traceback" not in _log(auth)


def test_serve_on_a_busy_port_says_which_and_what_to_do(tmp_path: Path) -> None:
    init_authority(tmp_path / "authority")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = run_cli(
            "authority", "serve", "--dir", str(tmp_path / "authority"), "--listen", f"127.0.0.1:{port}"
        )
    assert proc.returncode == ExitCode.FAILURE, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "already in use" in proc.stderr
    assert "--listen" in proc.stderr and "Traceback" not in proc.stderr


# -- defect 13: discovery's port -------------------------------------------------------------


def test_discovery_port_must_be_a_tcp_port(authority: AuthorityProcess) -> None:
    token = (authority.directory / "prometheus-token").read_text().strip()
    url = f"{authority.url}/v1/prometheus/targets"
    auth_header = {"authorization": f"Bearer {token}"}
    for port in ("-1", "0", "65536", "1" + "0" * 23, "1_0", " 80", "80.0", "x", ""):
        r = httpx.get(url, params={"port": port}, headers=auth_header, verify=authority.tls)
        _assert_refused(r, 400, "invalid_request")
        assert "1 to 65535" in r.json()["hint"]
    for port in ("1", "4191", "65535"):
        r = httpx.get(url, params={"port": port}, headers=auth_header, verify=authority.tls)
        assert r.status_code == 200, r.text


# -- defect 2 (API side): what a host claims is checked before anything is stored -------------


def test_a_bad_host_name_or_address_is_a_400_and_nothing_is_stored(
    authority: AuthorityProcess, tmp_path: Path
) -> None:
    from agent.authority.tokens import parse_token
    from agent.identity.pki import generate_key, make_csr

    token = authority.token()
    secret = parse_token(token).secret
    csr = make_csr(generate_key()).decode()
    url = f"{authority.url}/v1/enroll"
    claims: list[tuple[object, object]] = [
        ("legacy-1", ["not-an-ip"]),
        ("legacy-1", ["198.18.0.10/24"]),
        ("legacy-1", [17]),
        ("legacy-1", ["198.18.0.10"] * 65),
        ("legacy-1\x1b[31m", ["198.18.0.10"]),
        ("a" * 300, ["198.18.0.10"]),
        ("bad_name", []),
    ]
    for host_name, addresses in claims:
        doc = {"token_secret": secret, "csr": csr, "host_name": host_name, "addresses": addresses}
        r = httpx.post(url, json=doc, verify=authority.tls)
        _assert_refused(r, 400, "invalid_request")
        assert r.json()["hint"], r.json()
    hosts = json.loads(
        run_cli("authority", "hosts", "--dir", str(authority.directory), "--json", check=True).stdout
    )
    assert hosts == []
    # The token was not spent: the same host enrolls with good claims.
    proc = run_cli(
        "enroll",
        token,
        "--state-dir",
        str(tmp_path / "host"),
        "--host-name",
        "legacy-1",
        "--address",
        "198.18.0.10",
        "--json",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in _log(authority)


# -- defect 13: bad requests leave nothing behind ----------------------------------------------


def test_bad_requests_leave_the_authoritys_memory_where_it_was(authority: AuthorityProcess) -> None:
    """2,000 bad requests of eight kinds (10,000 measured +0.6 MB, was +37 MB with a traceback
    kept and logged per crash): the RSS grows by less than 10 MB, the log holds no traceback."""
    url = authority.url
    big_csr = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    with httpx.Client(verify=authority.tls, timeout=30) as c:
        kinds = [
            lambda: c.post(f"{url}/v1/enroll", content=b"{not json"),
            lambda: c.post(f"{url}/v1/enroll", content=b"[" * 60_000),
            lambda: c.post(
                f"{url}/v1/enroll",
                json={"token_secret": "x" * 43, "csr": big_csr, "host_name": "h", "addresses": []},
            ),
            lambda: c.post(
                f"{url}/v1/renew",
                json={"certificate_chain": "x", "csr": "y", "timestamp": 10**30, "signature": "z"},
            ),
            lambda: c.get(f"{url}/v1/nope"),
            lambda: c.get(f"{url}/v1/prometheus/targets?port=-1"),
            lambda: c.post(f"{url}/v1/enroll", content=b" " * 70_000),
            lambda: c.get(f"{url}/v1/host/config", headers={"authorization": "Bearer nope"}),
        ]
        for kind in kinds * 10:  # warm up: first-use imports and caches are not growth
            kind()
        before = _rss_kib(authority)
        for i in range(2000):
            assert kinds[i % len(kinds)]().status_code in (400, 401, 404, 413)
    assert _rss_kib(authority) - before < 10 * 1024
    assert "Traceback" not in _log(authority)


def test_an_unforeseen_failure_is_a_json_500_and_one_log_line(authority: AuthorityProcess) -> None:
    """The registry replaced by junk under a running authority: the failure nobody wrote a
    refusal for. The client gets `internal`, the log one line naming the exception type."""
    from agent.authority.tokens import parse_token
    from agent.identity.pki import generate_key, make_csr

    secret = parse_token(authority.token()).secret
    for name in ("registry.db", "registry.db-wal", "registry.db-shm"):
        path = authority.directory / name
        if path.exists():
            path.write_bytes(b"not a database " * 512)
    doc = {
        "token_secret": secret,
        "csr": make_csr(generate_key()).decode(),
        "host_name": "h",
        "addresses": [],
    }
    r = httpx.post(f"{authority.url}/v1/enroll", json=doc, verify=authority.tls)
    _assert_refused(r, 500, "internal")
    lines = [line for line in _log(authority).splitlines() if "request.failed" in line]
    assert len(lines) == 1 and "error_type=" in lines[0], lines
    assert "Traceback" not in _log(authority)
