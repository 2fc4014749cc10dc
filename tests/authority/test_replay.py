"""Renewal requests are single-use, against a real `meshagent authority serve` process.

A captured renewal replayed after the real one must be refused without touching the host's
record: its certificate stays renewable and its host token keeps working. A host whose answer
was lost must still finish, with the certificate the authority already issued (as an
interrupted enrollment does).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.identity import enroll as flows
from agent.identity.client import AuthorityClient
from agent.identity.pki import generate_key, load_certs, make_csr, sign_possession
from agent.identity.store import IdentityStore
from tests.support import AuthorityProcess, cli_json, run_cli


def _enrolled(auth: AuthorityProcess, state: Path) -> IdentityStore:
    run_cli("enroll", auth.token(), "--state-dir", str(state), "--host-name", "replayed", check=True)
    return IdentityStore(state)


def _post_renew(auth: AuthorityProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{auth.url}/v1/renew", verify=auth.tls, json=body, timeout=10)


def _serial(doc: dict[str, Any]) -> str:
    return format(load_certs(doc["certificate_chain"].encode())[0].serial_number, "x")


def _host_config_works(store: IdentityStore) -> None:
    with AuthorityClient(store.load_authority()) as client:
        assert client.host_config(store.api_token())["host_id"]


def test_a_replayed_renewal_is_refused_and_the_host_keeps_renewing(
    authority: AuthorityProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _enrolled(authority, tmp_path / "host")
    captured: list[dict[str, Any]] = []
    real_renew = AuthorityClient.renew

    def recording(self: AuthorityClient, chain: bytes, csr: bytes, ts: int, sig: str) -> dict[str, Any]:
        # What a wire tap would see: the request the host really sends.
        captured.append(
            {"certificate_chain": chain.decode(), "csr": csr.decode(), "timestamp": ts, "signature": sig}
        )
        return real_renew(self, chain, csr, ts, sig)

    monkeypatch.setattr(AuthorityClient, "renew", recording)
    renewed = flows.renew(store)  # the host's real renewal, in full
    monkeypatch.undo()
    assert len(captured) == 1

    replay = _post_renew(authority, captured[0])
    assert replay.status_code == 403, replay.text
    assert replay.json()["code"] == "renewal_replayed"
    assert replay.json()["hint"]

    # The host was not touched: same serial on record, its token still reads the catalog ...
    hosts = cli_json("authority", "hosts", "--dir", str(authority.directory))
    assert hosts[0]["serial"] == renewed.summary.serial
    _host_config_works(store)
    # ... and its next real renewal works (before the fix: host_unknown).
    again = cli_json("renew", "--state-dir", str(tmp_path / "host"))
    assert again["serial"] != renewed.summary.serial
    _host_config_works(store)


def test_the_old_certificate_cannot_renew_again_with_another_key(
    authority: AuthorityProcess, tmp_path: Path
) -> None:
    """Once serial S renewed, S's key can fetch only what it was issued, never a new certificate."""
    store = _enrolled(authority, tmp_path / "host")
    old = store.load()
    renewed = cli_json("renew", "--state-dir", str(tmp_path / "host"))

    csr = make_csr(generate_key())
    ts = int(time.time())
    r = _post_renew(
        authority,
        {
            "certificate_chain": old.chain_pem.decode(),
            "csr": csr.decode(),
            "timestamp": ts,
            "signature": sign_possession(old.key, csr, ts),
        },
    )
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "stale_certificate"
    hosts = cli_json("authority", "hosts", "--dir", str(authority.directory))
    assert hosts[0]["serial"] == renewed["serial"]
    _host_config_works(store)


def test_a_renewal_whose_answer_was_lost_finishes_with_the_issued_certificate(
    authority: AuthorityProcess, tmp_path: Path
) -> None:
    state = tmp_path / "host"
    store = _enrolled(authority, state)
    current = store.load()
    pending = store.pending_key()  # the key a renewal in flight keeps across retries
    csr = make_csr(pending)
    ts = int(time.time())
    lost_body = {
        "certificate_chain": current.chain_pem.decode(),
        "csr": csr.decode(),
        "timestamp": ts,
        "signature": sign_possession(current.key, csr, ts),
    }
    lost = _post_renew(authority, lost_body)
    assert lost.status_code == 200, lost.text  # ... and the host never saw it

    # The host retries with its old certificate and the same pending key: the same certificate.
    retried = json.loads(run_cli("renew", "--state-dir", str(state), "--json", check=True).stdout)
    assert retried["serial"] == _serial(lost.json())
    assert len(cli_json("authority", "hosts", "--dir", str(authority.directory))) == 1
    _host_config_works(store)  # the retry's token is the live one

    # The lost request itself, replayed, is refused; the host carries on.
    replay = _post_renew(authority, lost_body)
    assert replay.json()["code"] == "renewal_replayed"
    _host_config_works(store)
    nxt = cli_json("renew", "--state-dir", str(state))
    assert nxt["serial"] != retried["serial"]
