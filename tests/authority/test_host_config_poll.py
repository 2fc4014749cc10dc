"""GET /v1/host/config: ETag and long poll, woken by registry writes from other processes and by
discovery; the waiters bounded; POST /v1/host/report stored.

The in-process tests run the app on httpx's ASGI transport (set_discovered lives in the
authority's memory); the process tests run a real `authority serve` with its slow-client
guard's timeouts at 1 s, to show a long poll outlives them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from agent.authority.api import DirectoryWatch, create_app, release_long_polls
from agent.authority.openapi import OPENAPI
from agent.authority.service import Authority, canonical_json
from agent.authority.storage import SqliteRegistry
from agent.errors import RejectedError
from agent.identity.client import AuthorityClient
from agent.identity.pki import generate_key, make_csr
from agent.identity.store import IdentityStore
from tests.support import AuthorityProcess, init_authority, run_cli, running_authority

SERVICE = {
    "name": "orders",
    "namespace": "shop",
    "cluster_ips": ["198.19.0.10"],
    "ports": [{"port": 80, "name": "http", "protocol": "TCP", "opaque": False}],
    "endpoints": [
        {
            "address": "198.18.5.2",
            "ports": {"80": 8080},
            "identity": "spiffe://cluster.local/ns/shop/sa/orders",
            "server_name": "orders.shop.serviceaccount.identity.linkerd.cluster.local",
            "proxy_port": 4143,
            "source": "pod:shop/orders-7d9",
        }
    ],
}


@dataclass
class Setup:
    authority: Authority
    token: str
    directory: Path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    directory = tmp_path / "authority"
    init_authority(directory)
    authority = Authority.open(directory)
    secret = authority.create_tokens("shop/web", "https://127.0.0.1:1", timedelta(minutes=5))[0].secret
    result = authority.enroll(secret, make_csr(generate_key()).decode(), "web", ["198.18.0.10"])
    yield Setup(authority, result.api_token, directory)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://authority")


def _auth(token: str, etag: str | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {token}"}
    if etag:
        headers["if-none-match"] = etag
    return headers


async def _parked(app: Any, count: int) -> None:
    """Until `count` requests wait in the long poll (the test's own sequencing, not a timing)."""
    watch = app.app.state.directory_watch
    for _ in range(1000):
        if watch.waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{watch.waiting} waiting, expected {count}")


def test_the_etag_is_stable_and_the_hash_of_the_canonical_document(setup: Setup) -> None:
    app = create_app(setup.authority)

    async def run() -> None:
        async with _client(app) as http:
            first = await http.get("/v1/host/config", headers=_auth(setup.token))
            second = await http.get("/v1/host/config", headers=_auth(setup.token))
        assert first.status_code == second.status_code == 200
        assert first.headers["etag"] == second.headers["etag"]
        doc = first.json()
        assert doc["services"] == []
        without_time = {k: v for k, v in doc.items() if k != "generated_at"}
        assert first.headers["etag"] == f'"{hashlib.sha256(canonical_json(without_time)).hexdigest()}"'
        # The body is the canonical serialization (pieces assembled, not re-encoded).
        assert first.content == canonical_json(doc)
        schema = {"$ref": "#/components/schemas/HostConfig", "components": OPENAPI["components"]}
        jsonschema.validate(doc, schema)

    asyncio.run(run())


def test_unchanged_is_304_at_once_without_wait_and_after_the_wait_with_one(setup: Setup) -> None:
    app = create_app(setup.authority)

    async def run() -> None:
        async with _client(app) as http:
            etag = (await http.get("/v1/host/config", headers=_auth(setup.token))).headers["etag"]
            r = await http.get("/v1/host/config", headers=_auth(setup.token, etag))
            assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", etag)
            r = await http.get("/v1/host/config", headers=_auth(setup.token, f'W/{etag}, "other"'))
            assert r.status_code == 304  # weak comparison, lists
            r = await http.get("/v1/host/config", headers=_auth(setup.token, '"stale"'))
            assert r.status_code == 200 and r.headers["etag"] == etag
            started = time.monotonic()
            r = await http.get("/v1/host/config?wait=1.5", headers=_auth(setup.token, etag))
            assert r.status_code == 304 and time.monotonic() - started >= 1.5
            assert app.app.state.directory_watch.waiting == 0
            for bad in ("61", "-1", "x", "1e3", "0x10"):
                r = await http.get(f"/v1/host/config?wait={bad}", headers=_auth(setup.token, etag))
                assert r.status_code == 400 and r.json()["code"] == "invalid_request", bad
            r = await http.get("/v1/host/config?wait=5", headers=_auth("nope", etag))
            assert r.status_code == 401

    asyncio.run(run())


def test_set_discovered_wakes_a_poller_from_another_thread(setup: Setup) -> None:
    app = create_app(setup.authority)

    async def run() -> None:
        async with _client(app) as http:
            etag = (await http.get("/v1/host/config", headers=_auth(setup.token))).headers["etag"]
            poll = asyncio.create_task(http.get("/v1/host/config?wait=50", headers=_auth(setup.token, etag)))
            await _parked(app, 1)
            # The same (empty) list: nothing changed, nobody is woken.
            await asyncio.to_thread(setup.authority.set_discovered, [])
            await asyncio.sleep(0.2)
            assert not poll.done()
            await asyncio.to_thread(setup.authority.set_discovered, [SERVICE])
            r = await asyncio.wait_for(poll, 20)  # (a 304 would come after 50 s)
            assert r.status_code == 200 and r.headers["etag"] != etag
            assert r.json()["services"] == [SERVICE] == setup.authority.discovered()

    asyncio.run(run())


def test_a_write_through_another_registry_connection_wakes_a_poller(setup: Setup) -> None:
    """What the CLI does: another SqliteRegistry on the same file (data_version moves)."""
    app = create_app(setup.authority)

    async def run() -> None:
        async with _client(app) as http:
            etag = (await http.get("/v1/host/config", headers=_auth(setup.token))).headers["etag"]
            poll = asyncio.create_task(http.get("/v1/host/config?wait=50", headers=_auth(setup.token, etag)))
            await _parked(app, 1)
            other = Authority(setup.authority.material, SqliteRegistry(setup.directory / "registry.db"))
            other.add_static_entry("198.18.9.0/24", (5432,), "shop/db")
            r = await asyncio.wait_for(poll, 20)
            assert r.status_code == 200
            assert "198.18.9.0/24" in [e["cidr"] for e in r.json()["catalog"]]
            # Revoked meanwhile: the poll ends with the refusal, not a stale directory.
            etag = r.headers["etag"]
            poll = asyncio.create_task(http.get("/v1/host/config?wait=50", headers=_auth(setup.token, etag)))
            await _parked(app, 1)
            other.registry.revoke(setup.authority.authenticate(setup.token).id, other.clock())
            r = await asyncio.wait_for(poll, 20)
            assert r.status_code == 403 and r.json()["code"] == "host_revoked"

    asyncio.run(run())


def test_waiters_are_bounded_past_the_bound_the_answer_is_immediate(setup: Setup) -> None:
    app = create_app(setup.authority, max_waiters=2)

    async def run() -> None:
        async with _client(app) as http:
            etag = (await http.get("/v1/host/config", headers=_auth(setup.token))).headers["etag"]
            polls = [
                asyncio.create_task(http.get("/v1/host/config?wait=50", headers=_auth(setup.token, etag)))
                for _ in range(2)
            ]
            await _parked(app, 2)
            r = await asyncio.wait_for(
                http.get("/v1/host/config?wait=50", headers=_auth(setup.token, etag)), 20
            )
            assert r.status_code == 304 and r.headers["retry-after"] == "50"
            setup.authority.set_discovered([SERVICE])
            answers = await asyncio.wait_for(asyncio.gather(*polls), 20)
            assert [a.status_code for a in answers] == [200, 200]
            assert app.app.state.directory_watch.waiting == 0

    asyncio.run(run())


def test_a_client_that_goes_away_frees_its_place_at_once(setup: Setup) -> None:
    """Driven at the ASGI level: the server's disconnect message ends the wait (the slot is not
    held for the rest of the 50 s)."""
    app = create_app(setup.authority, max_waiters=1)

    async def run() -> None:
        async with _client(app) as http:
            etag = (await http.get("/v1/host/config", headers=_auth(setup.token))).headers["etag"]
        gone = asyncio.Event()
        messages: list[dict[str, Any]] = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await gone.wait()  # then the client has gone
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "https",
            "path": "/v1/host/config",
            "raw_path": b"/v1/host/config",
            "query_string": b"wait=50",
            "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in _auth(setup.token, etag).items()],
            "client": ("127.0.0.1", 1),
            "server": ("authority", 443),
        }
        call = asyncio.create_task(app(scope, receive, send))
        await _parked(app, 1)
        gone.set()
        await asyncio.wait_for(call, 20)
        assert app.app.state.directory_watch.waiting == 0
        async with _client(app) as http:  # the one place is free again
            poll = asyncio.create_task(http.get("/v1/host/config?wait=50", headers=_auth(setup.token, etag)))
            await _parked(app, 1)
            setup.authority.set_discovered([SERVICE])
            assert (await asyncio.wait_for(poll, 20)).status_code == 200

    asyncio.run(run())


def test_a_stopping_server_answers_parked_polls_at_once(setup: Setup) -> None:
    """release_long_polls (the server's shutdown calls it): 304 and close, not a wait for
    uvicorn's graceful-shutdown timeout that ends in a cut request."""
    app = create_app(setup.authority)

    async def run() -> None:
        async with _client(app) as http:
            etag = (await http.get("/v1/host/config", headers=_auth(setup.token))).headers["etag"]
            poll = asyncio.create_task(http.get("/v1/host/config?wait=50", headers=_auth(setup.token, etag)))
            await _parked(app, 1)
            release_long_polls()
            r = await asyncio.wait_for(poll, 20)
            assert (r.status_code, r.headers["connection"], r.headers["retry-after"]) == (304, "close", "1")
            # No new waiter is parked while stopping.
            r = await asyncio.wait_for(
                http.get("/v1/host/config?wait=50", headers=_auth(setup.token, etag)), 20
            )
            assert r.status_code == 304
            assert app.app.state.directory_watch.waiting == 0

    asyncio.run(run())


# --- a real `authority serve` ---------------------------------------------------------------


@pytest.fixture
def guarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AuthorityProcess]:
    """An authority whose head, body and keep-alive timeouts are all 1 s."""
    limits = {"header_timeout": 1, "body_timeout": 1, "idle_timeout": 1}
    monkeypatch.setenv("MESHAGENT_AUTHORITY_LIMITS", json.dumps(limits))
    with running_authority(tmp_path / "authority") as auth:
        yield auth


def _enrolled(auth: AuthorityProcess, state: Path) -> IdentityStore:
    run_cli(
        "enroll", auth.token("shop/web"), "--state-dir", str(state), "--address", "198.18.0.10", check=True
    )
    return IdentityStore(state)


def test_a_long_poll_outlives_the_guard_timeouts_and_a_cli_write_answers_it(
    guarded: AuthorityProcess, tmp_path: Path
) -> None:
    host = _enrolled(guarded, tmp_path / "web")
    token = host.api_token()
    with AuthorityClient(host.load_authority()) as client:
        first = client.fetch_host_config(token)
        assert first.doc is not None and first.etag and not first.not_modified
        assert first.doc["services"] == []
        assert client.host_config(token)["catalog"] == first.doc["catalog"]  # the old call

        started = time.monotonic()
        same = client.fetch_host_config(token, first.etag, wait_s=3)
        assert same.not_modified and same.doc is None and same.etag == first.etag
        assert time.monotonic() - started >= 3  # held past the 1 s timeouts, then answered

        answers: list[Any] = []
        poll = threading.Thread(
            target=lambda: answers.append(client.fetch_host_config(token, first.etag, 50))
        )
        started = time.monotonic()
        poll.start()
        run_cli(
            "authority", "catalog", "add", "--dir", str(guarded.directory), "--cidr", "198.18.9.0/24",
            "--port", "5432", "--identity", "shop/db", check=True,
        )  # fmt: skip
        poll.join(40)
        assert answers and not answers[0].not_modified
        assert time.monotonic() - started < 40  # the write answered it, not the 50 s wait
        assert "198.18.9.0/24" in [e["cidr"] for e in answers[0].doc["catalog"]]
        assert answers[0].etag != first.etag


def test_reports_are_stored_and_bad_ones_refused(guarded: AuthorityProcess, tmp_path: Path) -> None:
    host = _enrolled(guarded, tmp_path / "web")
    report = {
        "agent_version": "0.1",
        "ready": True,
        "reason": "",
        "directory_updated_at": time.time(),
        "refresh_interval_s": 10.0,
        "probes": [{"port": 8080, "kind": "tcp", "ok": True, "detail": "", "since": time.time()}],
    }
    with AuthorityClient(host.load_authority()) as client:
        client.send_report(host.api_token(), report)
        with pytest.raises(RejectedError) as refused:
            client.send_report(host.api_token(), {**report, "ready": "yes"})
        assert refused.value.code == "invalid_request"
        with pytest.raises(RejectedError) as refused:
            client.send_report("not-a-token", report)
        assert refused.value.code == "unauthenticated"
    registry = SqliteRegistry(guarded.directory / "registry.db")
    try:
        (stored,) = registry.reports().values()
        assert json.loads(stored[1])["probes"][0]["port"] == 8080
    finally:
        registry.close()


def test_a_discovery_change_wakes_the_waiters_once(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """set_discovered wakes the waiters at once; the version poll must not see the same change
    again and wake them a second time (every waiter would render twice)."""
    polls = {"n": 0}
    real = setup.authority.version

    def counted() -> tuple[int, int, bytes]:
        polls["n"] += 1
        return real()

    watch = DirectoryWatch(setup.authority, max_waiters=4, interval_s=0.01)

    async def run() -> None:
        first = watch.admit()
        assert first is not None
        await asyncio.to_thread(setup.authority.set_discovered, [SERVICE])
        await asyncio.wait_for(first.wait(), 20)
        second = watch.changed()
        monkeypatch.setattr(setup.authority, "version", counted)
        for _ in range(2000):  # until the poll ran (and compared) several times since the wake
            if polls["n"] >= 5:
                break
            await asyncio.sleep(0.01)
        assert polls["n"] >= 5
        assert not second.is_set()
        watch.leave()

    asyncio.run(run())
