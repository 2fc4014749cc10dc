"""Three real `meshagent authority serve` replicas on one PostgreSQL database, behind haproxy in
TCP mode (tests/authority/replicas.py; tests/pgcluster.py): one join token raced at two
replicas, a revocation seen by every replica at once, a replica killed with SIGKILL in the
middle of a 2,000-host enrollment storm, and PostgreSQL restarted in the middle of another.

The storms use the fleet simulator's client (bench/fleet.py), which retries like an agent
behind a load balancer must: on a cut connection and on 503, with the same token and key, which
the registry answers with the same host (storage: enroll is idempotent for its key). What is
checked is the database: every token used once, one host row per token, nothing lost."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from agent.authority.ca import load_authority
from agent.authority.registry import open_registry
from agent.authority.service import Authority
from agent.authority.tokens import hash_secret
from agent.identity.pki import generate_key, make_csr, sign_possession
from bench.fleet_agents import FleetClient, SimHost, bounded, make_hosts
from tests.authority.replicas import Replicas
from tests.pgcluster import PgCluster
from tests.support import run_cli

_names = itertools.count()


@pytest.fixture(scope="module")
def fleet(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    url = pg_cluster.create_database("replicas")
    replicas = Replicas(tmp_path_factory.mktemp("replicas") / "authority", 3, url)
    with replicas:
        yield replicas


def _authority(fleet: Replicas) -> Authority:
    """The operator's side, in-process, on the replicas' database: tokens."""
    return Authority(load_authority(fleet.directory), open_registry(fleet.directory, fleet.database))


def _tokens(fleet: Replicas, identity: str, count: int) -> list[str]:
    authority = _authority(fleet)
    try:
        return [t.secret for t in authority.create_tokens(identity, fleet.url, timedelta(hours=1), count)]
    finally:
        authority.registry.close()


def _sql(fleet: Replicas, query: str, *params: object) -> list[tuple[Any, ...]]:
    assert fleet.database is not None
    with psycopg.connect(fleet.database) as conn:
        return conn.execute(query, params).fetchall()


def _enroll_at(
    url: str, fleet: Replicas, secret: str, name: str, address: str | None = None
) -> httpx.Response:
    """POST /v1/enroll at one replica (a fresh key: only the token matters here)."""
    body = {
        "token_secret": secret,
        "csr": make_csr(generate_key()).decode(),
        "host_name": name,
        "addresses": [],
    }
    return httpx.post(f"{url}/v1/enroll", json=body, verify=fleet.tls, timeout=30)


def _get(url: str, fleet: Replicas, bearer: str) -> httpx.Response:
    return httpx.get(url, headers={"authorization": f"Bearer {bearer}"}, verify=fleet.tls, timeout=30)


def _storm(fleet: Replicas, hosts: list[SimHost], during: Callable[[int], None], at: int) -> FleetClient:
    """Enroll `hosts` through haproxy, 32 at a time; `during(done)` runs in a thread once `at`
    enrollments have completed (the failure injected mid-storm). Returns the client (its
    counters) after every enrollment returned."""

    async def run() -> FleetClient:
        client = FleetClient(fleet.url, fleet.ca_file, shards=8, per_shard=64, deadline_s=90)
        done = 0
        injected: asyncio.Future[None] | None = None

        async def one(host: SimHost) -> None:
            nonlocal done, injected
            await client.enroll(host)
            done += 1
            if done == at:
                injected = asyncio.ensure_future(asyncio.to_thread(during, done))

        try:
            outcomes = await bounded(32, [partial(one, h) for h in hosts])
            assert injected is not None
            await injected
        finally:
            await client.aclose()
        assert [o for o in outcomes if o is not None] == []
        return client

    return asyncio.run(run())


def _assert_enrolled_exactly_once(fleet: Replicas, identity: str, hosts: list[SimHost]) -> None:
    """Every token used once, by one host row, the one its client was given; no other rows."""
    tokens = _sql(
        fleet,
        "SELECT hash, host_id FROM tokens WHERE identity = %s AND used_at IS NOT NULL",
        identity,
    )
    rows = _sql(fleet, "SELECT id FROM hosts WHERE identity = %s", identity)
    by_token = dict(tokens)
    assert len(by_token) == len(tokens) == len(hosts)  # no token used twice, none unused
    assert len(rows) == len({r[0] for r in rows}) == len(hosts)  # one host row per token
    assert (
        {by_token[hash_secret(h.token)] for h in hosts} == {h.host_id for h in hosts} == {r[0] for r in rows}
    )


def test_one_token_raced_at_two_replicas_enrolls_once(fleet: Replicas) -> None:
    identity = f"race/t{next(_names)}"
    secrets = _tokens(fleet, identity, 20)
    first, second = fleet.replicas[0].url, fleet.replicas[1].url
    barrier = threading.Barrier(2)

    def race(secret: str, url: str, name: str) -> int:
        barrier.wait()
        return _enroll_at(url, fleet, secret, name).status_code

    with ThreadPoolExecutor(2) as pool:
        for i, secret in enumerate(secrets):
            a = pool.submit(race, secret, first, f"a-{i}")
            b = pool.submit(race, secret, second, f"b-{i}")
            assert sorted([a.result(), b.result()]) == [200, 403]
    assert _sql(fleet, "SELECT count(*) FROM hosts WHERE identity = %s", identity) == [(20,)]


def _enrolled(fleet: Replicas, name: str, identity: str, address: str) -> SimHost:
    key = generate_key()
    host = SimHost(0, _tokens(fleet, identity, 1)[0], key, make_csr(key).decode(), name, address)
    body = {"token_secret": host.token, "csr": host.csr, "host_name": host.name, "addresses": [host.address]}
    response = httpx.post(f"{fleet.replicas[0].url}/v1/enroll", json=body, verify=fleet.tls, timeout=30)
    assert response.status_code == 200, response.text
    doc = response.json()
    host.host_id, host.chain, host.api_token = doc["host_id"], doc["certificate_chain"], doc["api_token"]
    return host


def _renew_at(url: str, fleet: Replicas, host: SimHost) -> httpx.Response:
    csr = make_csr(generate_key())
    now = int(time.time())
    body = {
        "certificate_chain": host.chain,
        "csr": csr.decode(),
        "timestamp": now,
        "signature": sign_possession(host.key, csr, now),
    }
    return httpx.post(f"{url}/v1/renew", json=body, verify=fleet.tls, timeout=30)


def _views(fleet: Replicas, host: SimHost, prometheus_token: str) -> list[tuple[str, dict[str, Any], str]]:
    """What each replica serves: (host config ETag, host config without generated_at, targets)."""
    views = []
    for replica in fleet.replicas:
        config = _get(f"{replica.url}/v1/host/config", fleet, host.api_token)
        assert config.status_code == 200, config.text
        doc = config.json()
        doc.pop("generated_at")
        targets = _get(f"{replica.url}/v1/prometheus/targets", fleet, prometheus_token)
        assert targets.status_code == 200, targets.text
        views.append((config.headers["etag"], doc, targets.text))
    return views


def test_a_revocation_is_seen_by_every_replica_at_once(fleet: Replicas) -> None:
    n = next(_names)
    victim = _enrolled(fleet, f"victim-{n}", f"revoke/v{n}", f"198.18.200.{n % 250 + 1}")
    other = _enrolled(fleet, f"other-{n}", f"revoke/o{n}", f"198.18.201.{n % 250 + 1}")
    prometheus_token = (fleet.directory / "prometheus-token").read_text().strip()
    before = _views(fleet, other, prometheus_token)
    assert all(v == before[0] for v in before)  # the same ETag, directory and targets from each
    assert f"{victim.address}/32" in json.dumps(before[0][1]) and victim.host_id in before[0][2]

    assert fleet.database is not None
    run_cli(
        "authority",
        "revoke",
        victim.host_id,
        "--dir",
        str(fleet.directory),
        "--database",
        fleet.database,
        check=True,
    )

    # No waiting: each replica reads the registry on every request.
    for replica in fleet.replicas:
        refused = _renew_at(replica.url, fleet, victim)
        assert refused.status_code == 403 and refused.json()["code"] == "host_revoked", refused.text
    after = _views(fleet, other, prometheus_token)
    assert all(v == after[0] for v in after)
    assert after[0][0] != before[0][0]
    assert f"{victim.address}/32" not in json.dumps(after[0][1]) and victim.host_id not in after[0][2]
    assert f"{other.address}/32" in json.dumps(after[0][1]) and other.host_id in after[0][2]


def test_a_replica_killed_mid_storm_loses_and_duplicates_nothing(fleet: Replicas) -> None:
    identity = f"storm/k{next(_names)}"
    hosts = make_hosts(_tokens(fleet, identity, 2000))
    victim = fleet.replicas[1]
    pid = victim.pid
    started = time.monotonic()

    def kill(done: int) -> None:
        fleet.kill(1)
        fleet.wait_state(1, "DOWN")

    try:
        client = _storm(fleet, hosts, kill, at=600)
        elapsed = time.monotonic() - started
        assert not victim.alive
        _assert_enrolled_exactly_once(fleet, identity, hosts)
        # The storm reached every replica, the killed one too, before the kill.
        served = {r.name: _served_enrollments(r.log_path) for r in fleet.replicas}
        assert all(count > 0 for count in served.values()), served
        print(
            f"2000 enrollments in {elapsed:.1f}s; retries {dict(client.calls.retries)}; by replica {served}"
        )
    finally:
        if not victim.alive:
            fleet.restart(1)
            fleet.wait_state(1, "UP")
    assert victim.pid != pid


def _served_enrollments(log_path: Path) -> int:
    return sum(1 for line in log_path.read_text().splitlines() if "event=host.enrolled" in line)


def test_postgresql_restarted_mid_storm_answers_503_then_recovers_without_restart(
    fleet: Replicas, pg_cluster: PgCluster
) -> None:
    identity = f"storm/p{next(_names)}"
    hosts = make_hosts(_tokens(fleet, identity, 600))
    witness = _enrolled(fleet, f"witness-{identity.replace('/', '-')}", f"{identity}-w", "198.18.202.1")
    pids = [r.pid for r in fleet.replicas]
    committed: list[tuple[Any, ...]] = []
    answers: list[dict[str, Any]] = []

    def restart_postgresql(done: int) -> None:
        committed.extend(_sql(fleet, "SELECT id FROM hosts WHERE identity = %s", identity))
        pg_cluster.stop()
        try:
            for replica in fleet.replicas:  # each says why, with a hint, and when to come back
                response = _get(f"{replica.url}/v1/host/config", fleet, witness.api_token)
                answers.append({"status": response.status_code, **response.headers, **response.json()})
        finally:
            pg_cluster.start()

    client = _storm(fleet, hosts, restart_postgresql, at=200)
    assert len(committed) >= 200
    for answer in answers:
        assert answer["status"] == 503 and answer["retry-after"] == "2", answer
        assert answer["code"] == "registry_unavailable" and answer["hint"], answer
    assert client.calls.retries, "no enrollment met the database away"
    assert [r.pid for r in fleet.replicas] == pids and all(r.alive for r in fleet.replicas)
    _assert_enrolled_exactly_once(fleet, identity, hosts)
    ids = {r[0] for r in _sql(fleet, "SELECT id FROM hosts WHERE identity = %s", identity)}
    assert {r[0] for r in committed} <= ids
    # The witness, enrolled before, still reads its directory through every replica.
    for replica in fleet.replicas:
        ok = _get(f"{replica.url}/v1/host/config", fleet, witness.api_token)
        assert ok.status_code == 200, ok.text
