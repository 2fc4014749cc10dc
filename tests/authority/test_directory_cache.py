"""The host directory's shared parts cached per registry version (service.render_host_config):
every render equals a fresh, uncached one, and its ETag moves exactly when its body does."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.authority.service import Authority, RenderedConfig, canonical_json
from agent.authority.storage import HostRecord
from agent.identity import transport
from agent.identity.client import AuthorityClient
from agent.identity.pki import generate_key, make_csr, sign_possession
from agent.identity.store import IdentityStore
from agent.identity.transport import DIRECT, Response
from tests.pgcluster import PgCluster
from tests.support import init_authority, run_cli, running_authority


def _enroll(authority: Authority, identity: str, name: str, address: str) -> Any:
    token = authority.create_tokens(identity, "https://127.0.0.1:1", timedelta(minutes=5))[0]
    key = generate_key()
    return key, authority.enroll(token.secret, make_csr(key).decode(), name, [address])


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    init_authority(tmp_path / "authority")
    authority = Authority.open(tmp_path / "authority")
    now = authority.clock()
    authority.clock = lambda: now  # generated_at equal in the cached and the fresh render
    return authority


def _fresh(authority: Authority, host: HostRecord) -> bytes:
    """The directory built from the registry now, no cache: what a render must equal."""
    return canonical_json(authority.host_config(host))


class Steps:
    def __init__(self, authority: Authority, host: HostRecord) -> None:
        self.authority, self.host = authority, host
        self.last = self.check()

    def check(self) -> RenderedConfig:
        rendered = self.authority.render_host_config(self.host, gzip=True)
        assert rendered.body == _fresh(self.authority, self.host)
        doc = json.loads(rendered.body)
        del doc["generated_at"]
        assert rendered.etag == f'"{hashlib.sha256(canonical_json(doc)).hexdigest()}"'  # (README)
        assert rendered.gzip is not None
        assert gzip.decompress(rendered.gzip) == rendered.body
        assert zlib.decompressobj(wbits=31).decompress(rendered.gzip) == rendered.body  # one member
        return rendered

    def moved(self, expected: bool) -> None:
        rendered = self.check()
        assert (rendered.body != self.last.body) is expected
        assert (rendered.etag != self.last.etag) is expected
        self.last = rendered


def test_each_change_moves_the_body_and_etag_and_nothing_else_does(authority: Authority) -> None:
    _, web = _enroll(authority, "shop/web", "web-1", "198.18.0.1")
    db_key, db = _enroll(authority, "shop/db", "db-1", "198.18.0.2")
    steps = Steps(authority, db.host)
    steps.moved(False)

    authority.registry.revoke(web.host.id, authority.clock())
    steps.moved(True)  # the catalog loses web-1, the revoked list gains it
    _enroll(authority, "shop/web", "web-2", "198.18.0.3")
    steps.moved(True)
    authority.set_policy("shop/db", 5432, "deny", ("spiffe://cluster.local/ns/shop/sa/web",))
    steps.moved(True)
    authority.set_policy("shop/web", 8080, "deny", ())  # another identity's: the version moves
    steps.moved(False)
    entry = authority.add_static_entry("198.18.1.0/24", (443,), "shop/pay")
    steps.moved(True)
    authority.registry.remove_static_entry(entry.id)
    steps.moved(True)
    authority.set_discovered([{"name": "api", "namespace": "shop", "cluster_ips": ["198.18.2.1"]}])
    steps.moved(True)
    authority.set_discovery_state(False, 1.0)
    steps.moved(True)
    authority.record_report(db.host, _report(db.host))
    steps.moved(False)
    # The renewing host's own directory does not name its serial: unchanged, same ETag.
    csr = make_csr(generate_key())
    now = int(time.time())
    authority.renew(db.chain_pem.decode(), csr.decode(), now, sign_possession(db_key, csr, now))
    steps.moved(False)


def test_a_revoked_certificate_leaves_the_list_when_it_expires_without_a_write(
    authority: Authority,
) -> None:
    _, web = _enroll(authority, "shop/web", "web-1", "198.18.0.1")
    _, db = _enroll(authority, "shop/db", "db-1", "198.18.0.2")
    authority.registry.revoke(web.host.id, authority.clock())
    steps = Steps(authority, db.host)
    assert b'"revoked":[{' in steps.last.body
    later = authority.clock() + timedelta(days=400)
    authority.clock = lambda: later
    steps.moved(True)
    assert b'"revoked":[]' in steps.last.body


def test_renders_in_threads_see_a_revocation_at_once(authority: Authority) -> None:
    hosts = [_enroll(authority, "shop/web", f"web-{i}", f"198.18.0.{i + 1}")[1].host for i in range(8)]
    before = authority.render_host_config(hosts[0])
    authority.registry.revoke(hosts[-1].id, authority.clock())
    with ThreadPoolExecutor(8) as pool:
        rendered = list(pool.map(authority.render_host_config, hosts[:-1] * 4))
    assert all(r.body == _fresh(authority, h) for r, h in zip(rendered, hosts[:-1] * 4, strict=True))
    assert rendered[0].etag != before.etag
    assert len({r.etag for r in rendered}) == len(hosts) - 1  # one per host (its host_id), all new


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_renewal_wakes_no_long_poll_and_a_later_revocation_lists_the_new_serial(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    extra: tuple[str, ...] = ()
    if backend == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        extra = ("--database", cluster.create_database("renewal"))
    init_authority(tmp_path / "authority", *extra)
    authority = Authority.open(tmp_path / "authority")
    web_key, web = _enroll(authority, "shop/web", "web-1", "198.18.0.1")
    _, db = _enroll(authority, "shop/db", "db-1", "198.18.0.2")
    before = authority.render_host_config(db.host)
    version = authority.registry.data_version()

    csr = make_csr(generate_key())
    now = int(time.time())
    renewed = authority.renew(web.chain_pem.decode(), csr.decode(), now, sign_possession(web_key, csr, now))
    assert renewed.host.serial != web.host.serial
    if backend == "postgresql":  # (SQLite's data_version moves on any commit)
        assert authority.registry.data_version() == version  # no long poll woken
    after = authority.render_host_config(db.host)
    assert (_doc(after), after.etag) == (_doc(before), before.etag)

    authority.registry.revoke(web.host.id, authority.clock())
    assert authority.registry.data_version() != version
    revoked = authority.render_host_config(db.host)
    assert revoked.etag != before.etag
    (entry,) = json.loads(revoked.body)["revoked"]
    assert entry["serials"] == [renewed.host.serial, web.host.serial]


def test_the_api_gzips_the_directory_for_who_asks_and_the_daemon_client_inflates_it(
    tmp_path: Path,
) -> None:
    with running_authority(tmp_path / "authority") as auth:
        state = tmp_path / "web"
        run_cli(
            "enroll",
            auth.token("shop/web"),
            "--state-dir",
            str(state),
            "--address",
            "198.18.0.10",
            check=True,
        )
        store = IdentityStore(state)
        token = store.api_token()
        answers: list[Response] = []

        def recorded(*args: Any) -> Response:
            answers.append(transport.request(*args))
            return answers[-1]

        with AuthorityClient(store.load_authority(), DIRECT, recorded) as client:
            fetched = client.fetch_host_config(token)
            polled = client.fetch_host_config(token, fetched.etag, wait_s=1)
        assert answers[0].headers["content-encoding"] == "gzip"
        assert answers[0].body.startswith(b"\x1f\x8b")  # (http.client does not decode it)
        assert polled.not_modified and polled.etag == fetched.etag

        def get(encoding: str) -> httpx.Response:
            headers = {"authorization": f"Bearer {token}", "accept-encoding": encoding}
            return httpx.get(f"{auth.url}/v1/host/config", headers=headers, verify=auth.tls, timeout=30)

        plain = get("identity")
        refused = get("gzip;q=0, identity")
        assert "content-encoding" not in plain.headers and "content-encoding" not in refused.headers
        assert plain.headers["etag"] == fetched.etag  # one ETag whatever the encoding
        assert fetched.doc is not None
        assert {**fetched.doc, "generated_at": 0} == {**plain.json(), "generated_at": 0}
        assert len(answers[0].body) < len(plain.content)


def _doc(rendered: RenderedConfig) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(rendered.body)
    del doc["generated_at"]
    return doc


def _report(host: HostRecord) -> dict[str, Any]:
    now = time.time()
    return {
        "agent_version": "0.18.0",
        "ready": True,
        "reason": "",
        "directory_updated_at": now - 5,
        "refresh_interval_s": 30.0,
        "probes": [],
        "certificate": {"serial": host.serial, "not_after": now + 3600, "renewal_error": ""},
    }
