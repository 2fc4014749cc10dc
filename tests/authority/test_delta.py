"""The directory's delta encoding (agent/identity/delta.py, agent/authority/delta.py): a delta
applied to the document held equals the full render, on SQLite and PostgreSQL, for each kind
of change; it is computed once per (from, to) pair; a client that did not ask (or names a
version the replica does not have) gets the whole document; a woken poll after a revocation at
1,000 hosts is a few hundred bytes, not the directory."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.authority.api import create_app
from agent.authority.service import Authority, RenderedConfig
from agent.authority.storage import HostRecord
from agent.identity import delta
from agent.identity.pki import generate_key, make_csr, sign_possession
from tests.pgcluster import PgCluster
from tests.support import init_authority


def _enroll(authority: Authority, identity: str, name: str, address: str) -> Any:
    token = authority.create_tokens(identity, "https://127.0.0.1:1", timedelta(minutes=5))[0]
    key = generate_key()
    return key, authority.enroll(token.secret, make_csr(key).decode(), name, [address])


def _open(tmp_path: Path, backend: str, request: pytest.FixtureRequest, name: str) -> Authority:
    extra: tuple[str, ...] = ()
    if backend == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        extra = ("--database", cluster.create_database(name))
    init_authority(tmp_path / "authority", *extra)
    return Authority.open(tmp_path / "authority")


class Holder:
    """A host that holds its last document and moves on by deltas only."""

    def __init__(self, authority: Authority, host: HostRecord) -> None:
        self.authority, self.host = authority, host
        full = authority.render_host_config(host)
        assert full.delta_base is None and delta.is_version(full.version)
        self.doc, self.version, self.etag = json.loads(full.body), full.version, full.etag
        self.delta_sizes: list[int] = []

    def follow(self) -> RenderedConfig:
        """Move to the current directory by a delta; check it against a full render."""
        answer = self.authority.render_host_config(self.host, delta_base=self.version)
        assert answer.delta_base == self.version, "the base version is kept: a delta"
        self.delta_sizes.append(len(answer.body))
        doc = delta.apply(self.doc, json.loads(answer.body), self.version)
        full = self.authority.render_host_config(self.host)
        assert answer.etag == full.etag and answer.version == full.version
        assert delta.digest(doc) == full.etag.strip('"')
        assert {**doc, "generated_at": 0} == {**json.loads(full.body), "generated_at": 0}
        self.doc, self.version, self.etag = doc, answer.version, answer.etag
        return answer


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_delta_applied_equals_the_full_render_for_each_kind_of_change(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    authority = _open(tmp_path, backend, request, "changes")
    _, web = _enroll(authority, "shop/web", "web-1", "198.18.0.1")
    _, db = _enroll(authority, "shop/db", "db-1", "198.18.0.2")
    api_key, api = _enroll(authority, "shop/api", "api-2", "198.18.0.60")
    api_chain = api.chain_pem.decode()
    for i in range(3, 20):
        _enroll(authority, "shop/api", f"api-{i}", f"198.18.0.{i}")
    holder = Holder(authority, db.host)

    _enroll(authority, "shop/web", "web-2", "198.18.0.40")  # enroll: one catalog entry in
    holder.follow()
    authority.registry.revoke(web.host.id, authority.clock())  # revoke: out of the catalog, in revoked
    revoked = holder.follow()
    assert [e["host_id"] for e in holder.doc["revoked"]] == [web.host.id]
    assert b'"splice":{"catalog":[[' in revoked.body and b'"revoked":[[' in revoked.body
    _enroll(authority, "shop/api", "api-50", "198.18.0.50")
    holder.follow()
    authority.set_policy("shop/db", 5432, "deny", ("spiffe://cluster.local/ns/shop/sa/web",))
    policy = holder.follow()  # policy: the host's own member, set whole; the shared parts as they were
    assert holder.doc["policy"]["ports"]["5432"]["default"] == "deny"
    assert b'"splice":{}' in policy.body and b'"catalog"' not in policy.body
    authority.add_static_entry("198.18.1.0/24", (443,), "shop/pay")
    holder.follow()
    authority.set_discovered([{"name": "api", "namespace": "shop", "cluster_ips": ["198.19.2.1"]}])
    holder.follow()  # services appear: set whole (nothing to splice yet)
    authority.set_discovered(
        [
            {"name": "api", "namespace": "shop", "cluster_ips": ["198.19.2.1"]},
            {"name": "pay", "namespace": "shop", "cluster_ips": ["198.19.2.2"]},
        ]
    )
    holder.follow()  # ... then spliced
    authority.set_discovery_state(False, 1.0)
    holder.follow()
    # renew: no directory names a live host's serial; the delta from a version to itself
    # carries only the host's own members.
    held = holder.version
    csr = make_csr(generate_key())
    now = int(time.time())
    authority.renew(api_chain, csr.decode(), now, sign_possession(api_key, csr, now))
    renewed = holder.follow()
    assert b'"splice":{}' in renewed.body and renewed.version == held
    assert max(holder.delta_sizes) < 2000


def test_a_delta_is_computed_once_for_all_the_hosts_that_hold_the_same_version(tmp_path: Path) -> None:
    init_authority(tmp_path / "authority")
    authority = Authority.open(tmp_path / "authority")
    hosts = [_enroll(authority, "shop/web", f"web-{i}", f"198.18.0.{i + 1}")[1].host for i in range(12)]
    before = {h.id: authority.render_host_config(h) for h in hosts}
    authority.registry.revoke(hosts[-1].id, authority.clock())
    computed = authority.deltas.computed
    answers = [authority.render_host_config(h, delta_base=before[h.id].version) for h in hosts[:-1]]
    assert authority.deltas.computed == computed + 1
    assert all(a.delta_base == before[hosts[0].id].version for a in answers)
    for host, answer in zip(hosts[:-1], answers, strict=True):
        doc = delta.apply(json.loads(before[host.id].body), json.loads(answer.body), answer.delta_base or "")
        assert delta.digest(doc) == answer.etag.strip('"')  # each host's own policy and host_id


def test_an_unknown_base_or_a_replica_that_never_saw_it_answers_the_whole_document(tmp_path: Path) -> None:
    init_authority(tmp_path / "authority")
    one = Authority.open(tmp_path / "authority")
    _, web = _enroll(one, "shop/web", "web-1", "198.18.0.1")
    held = one.render_host_config(web.host)
    _enroll(one, "shop/db", "db-1", "198.18.0.2")
    # Another replica on the same registry: the same state has the same version and ETag...
    other = Authority.open(tmp_path / "authority")
    assert other.render_host_config(web.host).version == one.render_host_config(web.host).version
    # ... but it never served the held version: it cannot make a delta from it.
    assert other.render_host_config(web.host, delta_base=held.version).delta_base is None
    assert one.render_host_config(web.host, delta_base="0" * 64).delta_base is None
    # The replica that served it answers with a delta, the same for the same registry state.
    assert one.render_host_config(web.host, delta_base=held.version).delta_base == held.version


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://authority")


def _get(app: Any, token: str, **headers: str) -> httpx.Response:
    import asyncio

    async def get() -> httpx.Response:
        async with _client(app) as client:
            return await client.get(
                "/v1/host/config", headers={"authorization": f"Bearer {token}", **headers}
            )

    return asyncio.run(get())


def test_the_api_answers_226_to_who_asks_and_the_whole_document_to_an_old_agent(tmp_path: Path) -> None:
    init_authority(tmp_path / "authority")
    authority = Authority.open(tmp_path / "authority")
    _, web = _enroll(authority, "shop/web", "web-1", "198.18.0.1")
    _, db = _enroll(authority, "shop/db", "db-1", "198.18.0.2")
    app = create_app(authority)
    first = _get(app, web.api_token)
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    version, etag = first.headers[delta.VERSION_HEADER], first.headers["etag"]
    authority.registry.revoke(db.host.id, authority.clock())
    asking = {"if-none-match": etag, "a-im": delta.DELTA_IM, delta.BASE_HEADER: version}

    answer = _get(app, web.api_token, **asking)
    assert answer.status_code == 226
    assert answer.headers["im"] == delta.DELTA_IM and answer.headers["delta-base"] == etag
    assert answer.headers["content-type"] == delta.DELTA_MEDIA_TYPE
    doc = delta.apply(first.json(), answer.json(), version)
    assert delta.digest(doc) == answer.headers["etag"].strip('"')
    gzipped = _get(app, web.api_token, **asking, **{"accept-encoding": "gzip"})
    assert gzipped.status_code == 226 and gzipped.headers["content-encoding"] == "gzip"
    assert gzipped.json() == {**answer.json(), "set": {**answer.json()["set"], "generated_at": ANY}}

    old_agent = _get(app, web.api_token, **{"if-none-match": etag})  # no A-IM: as before #18's deltas
    assert old_agent.status_code == 200 and old_agent.headers["content-type"] == "application/json"
    assert old_agent.json()["catalog"] == doc["catalog"]
    refused = _get(app, web.api_token, **{**asking, "a-im": f"{delta.DELTA_IM};q=0"})
    assert refused.status_code == 200
    unknown = _get(app, web.api_token, **{**asking, delta.BASE_HEADER: "f" * 64})
    assert unknown.status_code == 200 and "im" not in unknown.headers
    malformed = _get(app, web.api_token, **{**asking, delta.BASE_HEADER: "../etc"})
    assert malformed.status_code == 200
    current = _get(app, web.api_token, **{**asking, "if-none-match": answer.headers["etag"]})
    assert current.status_code == 304


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY = _Any()


def test_a_woken_poll_after_a_revocation_at_1000_hosts_is_small(tmp_path: Path) -> None:
    init_authority(tmp_path / "authority")
    authority = Authority.open(tmp_path / "authority")
    registry = authority.registry
    enrolled = [
        _enroll(authority, "shop/web", f"web-{i}", f"198.18.{i // 250}.{i % 250 + 1}")[1] for i in range(1000)
    ]
    app = create_app(authority)
    hosts = enrolled[:20]  # twenty of the thousand pollers: each answer is its own render
    firsts = [_get(app, h.api_token, **{"accept-encoding": "gzip"}) for h in hosts]
    full_bytes = int(firsts[0].headers.get("content-length", "0"))
    assert len(firsts[0].content) > 150_000 and full_bytes > 10_000  # the document; gzip on the wire
    registry.revoke(enrolled[500].host.id, authority.clock())
    computed = authority.deltas.computed
    sizes: list[int] = []
    for host, first in zip(hosts, firsts, strict=True):
        headers = {
            "if-none-match": first.headers["etag"],
            "a-im": delta.DELTA_IM,
            delta.BASE_HEADER: first.headers[delta.VERSION_HEADER],
            "accept-encoding": "gzip",
        }
        answer = _get(app, host.api_token, **headers)
        assert answer.status_code == 226
        sizes.append(int(answer.headers.get("content-length", len(answer.content))))
        doc = delta.apply(first.json(), answer.json(), first.headers[delta.VERSION_HEADER])
        assert delta.digest(doc) == answer.headers["etag"].strip('"')
        assert enrolled[500].host.id in [e["host_id"] for e in doc["revoked"]]
    assert authority.deltas.computed == computed + 1  # once, not per host
    # Bytes on the wire per woken poll: the revoked entry, the catalog entry out, the host's
    # policy; against ~13 KB gzipped (193 KB plain) for the whole directory.
    assert max(sizes) < 1500, sizes
    assert max(sizes) * 8 < full_bytes
