"""The agent's side of the directory deltas and keep-alive (agent/identity/client.py) against a
real `authority serve`: a long poll woken by a change returns the whole document rebuilt from
a delta, equal to a full fetch; a delta that does not check out is dropped for a full fetch;
the long poll and the reports each reuse one connection across AuthorityClient objects (as
the daemon makes them), and a connection the authority closed meanwhile is replaced."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.identity import delta, transport
from agent.identity.client import AuthorityClient, close_kept_connections, kept_connection
from agent.identity.store import IdentityStore
from agent.identity.transport import DIRECT, Response
from tests.support import AuthorityProcess, run_cli, running_authority


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[AuthorityProcess]:
    with running_authority(tmp_path / "authority") as auth:
        yield auth
    close_kept_connections()


def _enrolled(auth: AuthorityProcess, state: Path, address: str = "198.18.0.10") -> IdentityStore:
    run_cli("enroll", auth.token("shop/web"), "--state-dir", str(state), "--address", address, check=True)
    return IdentityStore(state)


def _catalog_add(auth: AuthorityProcess, cidr: str) -> None:
    run_cli(
        "authority", "catalog", "add", "--dir", str(auth.directory), "--cidr", cidr,
        "--port", "5432", "--identity", "shop/db", check=True,
    )  # fmt: skip


def _poll_during(client: AuthorityClient, token: str, etag: str, change: Any) -> Any:
    """A long poll of `etag`, answered by `change()` made while it waits."""
    answers: list[Any] = []
    poll = threading.Thread(target=lambda: answers.append(client.fetch_host_config(token, etag, 30)))
    poll.start()
    time.sleep(0.3)  # (parked; if not yet, the change is still newer than etag: same answer)
    change()
    poll.join(40)
    assert answers
    return answers[0]


def test_a_woken_long_poll_is_rebuilt_from_a_delta_on_kept_connections(
    authority: AuthorityProcess, tmp_path: Path
) -> None:
    host = _enrolled(authority, tmp_path / "web")
    token = host.api_token()
    ref = host.load_authority()
    with AuthorityClient(ref) as client:
        first = client.fetch_host_config(token)
    assert first.doc is not None and not first.delta
    with AuthorityClient(ref) as client:  # a new client per call, as the daemon does
        woken = _poll_during(client, token, first.etag, lambda: _catalog_add(authority, "198.18.9.0/24"))
    assert woken.delta and not woken.not_modified and woken.etag != first.etag
    with AuthorityClient(ref) as client:
        full = client.fetch_host_config(token)  # no etag: the whole document
        again = _poll_during(client, token, woken.etag, lambda: _catalog_add(authority, "198.18.8.0/24"))
    assert full.etag == woken.etag and not full.delta
    assert {**woken.doc, "generated_at": 0} == {**full.doc, "generated_at": 0}
    assert "198.18.9.0/24" in [e["cidr"] for e in woken.doc["catalog"]]
    assert again.delta and "198.18.8.0/24" in [e["cidr"] for e in again.doc["catalog"]]

    report = {
        "agent_version": "0.1",
        "ready": True,
        "reason": "",
        "directory_updated_at": time.time(),
        "refresh_interval_s": 10.0,
        "probes": [],
    }
    for _ in range(3):
        with AuthorityClient(ref) as client:
            client.send_report(token, report)
    # Four directory requests and three reports, on one connection each.
    assert kept_connection(ref.url, ref.ca_pin, DIRECT, "directory").opened == 1
    assert kept_connection(ref.url, ref.ca_pin, DIRECT, "report").opened == 1


def _tampering(answers: list[Response]) -> Any:
    """A transport that changes one catalog entry of every 226's delta (as a broken proxy or
    authority might): the document it makes no longer matches the ETag."""

    def send(*args: Any) -> Response:
        response = transport.request(*args)
        if response.status == 226:
            body = response.body
            if response.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            doc = json.loads(body)
            for ops in doc["splice"].values():
                for op in ops:
                    for item in op[2]:
                        item["cidr"] = "198.18.77.0/24"
            headers = {k: v for k, v in response.headers.items() if k != "content-encoding"}
            response = Response(226, json.dumps(doc).encode(), headers)
        answers.append(response)
        return response

    return send


def test_a_tampered_delta_is_dropped_for_the_whole_document(
    authority: AuthorityProcess, tmp_path: Path
) -> None:
    host = _enrolled(authority, tmp_path / "web")
    token = host.api_token()
    answers: list[Response] = []
    with AuthorityClient(host.load_authority(), DIRECT, _tampering(answers)) as client:
        first = client.fetch_host_config(token)
        woken = _poll_during(client, token, first.etag, lambda: _catalog_add(authority, "198.18.9.0/24"))
        full = client.fetch_host_config(token)
    assert [a.status for a in answers] == [200, 226, 200, 200]  # the 226 refused, then fetched whole
    assert not woken.delta and woken.etag == full.etag
    assert {**woken.doc, "generated_at": 0} == {**full.doc, "generated_at": 0}
    assert "198.18.77.0/24" not in [e["cidr"] for e in woken.doc["catalog"]]


def test_a_kept_connection_the_authority_closed_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHAGENT_AUTHORITY_LIMITS", json.dumps({"idle_timeout": 1}))
    with running_authority(tmp_path / "authority") as auth:
        host = _enrolled(auth, tmp_path / "web")
        ref = host.load_authority()
        try:
            with AuthorityClient(ref) as client:
                first = client.fetch_host_config(host.api_token())
                time.sleep(2.5)  # past the authority's 1 s idle timeout: it closed the connection
                second = client.fetch_host_config(host.api_token())
            assert second.etag == first.etag and second.doc == {**first.doc, "generated_at": ANY}
            assert kept_connection(ref.url, ref.ca_pin, DIRECT, "directory").opened == 2
        finally:
            close_kept_connections()


def test_apply_refuses_deltas_that_do_not_fit_the_document() -> None:
    held = {"catalog": [{"cidr": "198.18.0.1/32"}], "policy": {}, "host_id": "h1"}
    base = "a" * 64
    good = {"base": base, "version": "b" * 64, "set": {"host_id": "h1"}, "remove": [], "splice": {}}
    assert delta.apply(held, good, base) == held
    bad = [
        {**good, "base": "c" * 64},  # made for another version
        {**good, "splice": {"catalog": [[1, 1, []]]}},  # out of range
        {**good, "splice": {"catalog": [[-1, 0, []]]}},
        {**good, "splice": {"policy": [[0, 0, []]]}},  # not a list member
        {**good, "splice": {"catalog": [[0, 0]]}},
        {**good, "set": []},
        "not a delta",
    ]
    for doc in bad:
        with pytest.raises(delta.DeltaError):
            delta.apply(held, doc, base)
    assert held == {"catalog": [{"cidr": "198.18.0.1/32"}], "policy": {}, "host_id": "h1"}  # untouched


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY = _Any()
