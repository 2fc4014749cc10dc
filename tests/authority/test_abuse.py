"""Slow, oversized and silent clients beside real ones, against a real `authority serve`:
the real requests are answered while the bad clients still hold their connections.

The limits (agent/authority/httpguard.py, api.py; README "Resource bounds"):
- a request head: 32 KiB, within the header timeout (10 s; TLS handshake included) from its
  first byte; a body: 64 KiB (MAX_BODY), within the body timeout (10 s) once the head is in;
- connections: max_connections per worker (16,384 or the file limit less 64); past it the
  connection waiting longest for a request head (a slow head, a silent or idle one) is
  closed. Connections busy with a request (a slow body) are not shed: up to the cap of them
  can hold a replica until the body timeout releases them (the one flood these bounds leave
  to the network in front: a per-source connection limit in the balancer);
- everything is non-blocking on the event loop: a slow client costs a connection and a
  timer, never a thread.

Here the timeouts are a minute, so that nothing a test waits for could come from a bad client
being timed out: each real request is answered while every slow body, the slow oversized
body and the slow heads the cap did not shed are still connected.
"""

from __future__ import annotations

import itertools
import select
import ssl
from pathlib import Path

import httpx
import pytest

from agent.authority.httpguard import Limits
from agent.config import ProxySettings
from agent.identity.pki import generate_key, make_csr
from tests.authority.test_api_hostile import _authority_with as _authority
from tests.authority.test_api_hostile import _connect
from tests.support import AuthorityProcess

_names = itertools.count()


def _open(sock: ssl.SSLSocket) -> bool:
    """Still connected: nothing to read, or what there is is not the end (TLS 1.3 tickets)."""
    while sock.pending() or select.select([sock], [], [], 0)[0]:
        sock.setblocking(False)
        try:
            if sock.recv(65536) == b"":
                return False
        except ssl.SSLWantReadError:
            return True
        except (ConnectionError, ssl.SSLError, OSError):
            return False
        finally:
            sock.setblocking(True)
    return True


def _enrolled(auth: AuthorityProcess) -> str:
    """A real host's API token."""
    name = f"real-{next(_names)}"
    body = {
        "token_secret": auth.token().rsplit(".", 1)[1],  # (ma1.<authority>.<secret>)
        "csr": make_csr(generate_key()).decode(),
        "host_name": name,
        "addresses": [],
    }
    r = httpx.post(f"{auth.url}/v1/enroll", json=body, verify=auth.tls, timeout=30)
    assert r.status_code == 200, r.text
    token: str = r.json()["api_token"]
    return token


def _report(auth: AuthorityProcess, api_token: str, client: httpx.Client) -> int:
    doc = {"agent_version": "test", "ready": True, "reason": "", "refresh_interval_s": 30.0, "probes": []}
    r = client.post(f"{auth.url}/v1/host/report", json=doc, headers={"authorization": f"Bearer {api_token}"})
    return r.status_code


def test_slow_and_oversized_clients_do_not_hold_up_real_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _authority(tmp_path, monkeypatch, header_timeout=60, body_timeout=60, max_connections=120) as auth:
        api_token = _enrolled(auth)
        bad: dict[str, list[ssl.SSLSocket]] = {
            "slow_body": [],
            "oversized": [],
            "slow_head": [],
            "silent": [],
        }
        try:
            # Bodies that come a byte at a time: their requests are in (not shed), unanswered.
            for _ in range(40):
                sock = _connect(auth)
                sock.sendall(b"POST /v1/enroll HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n{")
                bad["slow_body"].append(sock)
            # A body past the limit, sent slowly: 60 KiB in, the rest still to come.
            sock = _connect(auth)
            sock.sendall(b"POST /v1/renew HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
            sock.sendall(b"f000\r\n" + b" " * 0xF000 + b"\r\n")
            bad["oversized"].append(sock)
            # Heads that never end, and connections that never say a word: 120 of them, over
            # the cap with the bodies (the cap sheds the ones waiting longest for a head).
            for i in range(120):
                try:
                    sock = _connect(auth)
                except (ConnectionError, ssl.SSLError, OSError):
                    continue  # shed during its handshake: the cap at work
                if i % 2:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: a\r\nx-slow: ")
                bad["slow_head" if i % 2 else "silent"].append(sock)

            # Real requests, each on a new connection and then kept alive.
            with httpx.Client(verify=auth.tls, timeout=30) as client:
                assert client.get(f"{auth.url}/healthz").status_code == 200
                assert _report(auth, api_token, client) == 204
                assert _report(auth, api_token, client) == 204  # (the kept-alive connection)
                config = client.get(
                    f"{auth.url}/v1/host/config", headers={"authorization": f"Bearer {api_token}"}
                )
                assert config.status_code == 200
            assert _enrolled(auth)

            # ... while the slow bodies and the oversized one were still connected: nothing
            # real waited for them to go.
            assert all(_open(s) for s in bad["slow_body"] + bad["oversized"])
            assert any(_open(s) for s in bad["slow_head"] + bad["silent"])  # the cap shed the oldest only
            # The oversized body, once past 64 KiB, is refused.
            refused = bad["oversized"][0]
            try:
                refused.sendall(b"2000\r\n" + b" " * 0x2000 + b"\r\n")
                status_line = refused.recv(200).split(b"\r\n")[0]
            except (ConnectionError, ssl.SSLError, OSError):
                status_line = b""  # a reset may overtake the answer: the close is the refusal
            assert status_line in (b"", b"HTTP/1.1 413 Request Entity Too Large") or b" 413 " in status_line
        finally:
            for socks in bad.values():
                for sock in socks:
                    sock.close()
        assert auth.log_path is not None
        log = auth.log_path.read_text()
        assert "connections.shed" in log and "Traceback" not in log


def test_malformed_requests_on_a_kept_alive_connection_leave_it_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's broken JSON is a 400 on its own connection, which stays usable (the next
    request on it is answered): a bad request costs one answer, not a connection."""
    with _authority(tmp_path, monkeypatch) as auth:
        api_token = _enrolled(auth)
        with httpx.Client(verify=auth.tls, timeout=30) as client:
            for body in (b'{"ready": tru', b"[[[[[[[[", b"\xff\xfe"):
                r = client.post(
                    f"{auth.url}/v1/host/report",
                    content=body,
                    headers={"authorization": f"Bearer {api_token}", "content-type": "application/json"},
                )
                assert r.status_code == 400 and r.json()["code"], r.text
            assert _report(auth, api_token, client) == 204
            connections = client._transport._pool.connections  # (what was reused)
            assert len(connections) == 1


def test_the_idle_timeout_keeps_a_reports_connection_between_reports() -> None:
    """Above the agents' default report interval (a report reuses its connection, no TLS
    handshake a report) and above the agent's 60 s client bound (the client closes first)."""
    limits = Limits()
    assert limits.idle_timeout > ProxySettings().refresh_interval_s
    assert limits.idle_timeout > 60
