"""The authority's API under hostile input, against a real `meshagent authority serve` process:
every refusal is a JSON error with a code, no traceback reaches its log, bodies and slow
clients are bounded."""

from __future__ import annotations

import json
import select
import socket
import ssl
import time
from pathlib import Path

import httpx

from tests.support import AuthorityProcess, run_cli


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


# -- defect 7: the size check comes before the body is read ----------------------------------

HUNDRED_MB = 100 * 1024 * 1024


def _stream_until_refused(sock: ssl.SSLSocket, head: bytes, chunk: bytes) -> tuple[int, bytes | None]:
    """Send `head`, then `chunk` chunked, up to 100 MB or until the server answers or closes:
    (body bytes sent, what was read of the answer). One buffer is reused: the test never holds
    the 100 MB."""
    sock.sendall(head)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    try:
        while sent < HUNDRED_MB:
            answer = _answered(sock)
            if answer is not None:
                return sent, answer
            sock.sendall(framed)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        return sent, b""
    return sent, None


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
