"""The registry on PostgreSQL as replicas use it: several registries (pools) on one database,
against a real throwaway cluster (tests/pgcluster.py): a join token raced at two of them,
migrations started by three processes at once, and the database going away and coming back."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from agent.authority.host_meta import HostMeta, parse_meta
from agent.authority.kube_routes import RouteObject
from agent.authority.migrations import ADVISORY_LOCK_KEY, POSTGRES, VERSION_SLOTS, migrate_postgres
from agent.authority.registry import DATABASE_ENV, open_registry, record, resolve
from agent.authority.storage import Issued, NewHost, PolicyRecord, Registry, RegistryUnavailable
from agent.errors import ConfigError, MeshagentError, RejectedError
from tests.pgcluster import PgCluster

NOW = datetime(2026, 1, 1, tzinfo=UTC)
_names = itertools.count()


def _database(pg: PgCluster) -> str:
    return pg.create_database(f"replicas_{next(_names)}")


def _issued(identity: str) -> Issued:
    return Issued("0a", NOW + timedelta(hours=24), "PEM")


def _until(condition: Callable[[], bool], what: str, limit_s: float = 30) -> None:
    """Polls `condition` (a state the test waits for, not a duration it assumes)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def _answers(registry: Registry) -> bool:
    try:
        registry.data_version()
    except RegistryUnavailable:
        return False
    return True


def _lock_waiters(url: str, locktype: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = %s AND NOT granted", (locktype,))
        return int(row.fetchone()[0])  # type: ignore[index]


def test_one_token_raced_at_two_replicas_enrolls_exactly_once(pg_cluster: PgCluster, tmp_path: Path) -> None:
    url = _database(pg_cluster)
    first, second = open_registry(tmp_path, url), open_registry(tmp_path, url)
    first.add_token("t1", "shop/web", NOW, NOW + timedelta(hours=1))
    signing, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def slow_sign(identity: str) -> Issued:
        signing.set()
        assert release.wait(30)
        return _issued(identity)

    def enroll(name: str, registry: Registry, key: str, sign: Callable[[str], Issued]) -> None:
        try:
            results[name] = registry.enroll("t1", key, NewHost(name, ()), NOW, sign).id
        except RejectedError as exc:
            results[name] = exc.code

    a = threading.Thread(target=enroll, args=("a", first, "key-a", slow_sign))
    a.start()
    assert signing.wait(30)  # replica A holds the token, mid-enrollment
    b = threading.Thread(target=enroll, args=("b", second, "key-b", _issued))
    b.start()
    # Replica B's SELECT ... FOR UPDATE waits on A's row lock (a transaction id lock).
    _until(lambda: _lock_waiters(url, "transactionid") == 1, "replica B waiting on the token's row")
    release.set()
    a.join()
    b.join()
    hosts = first.list_hosts()
    assert results == {"a": hosts[0].id, "b": "token_used"}
    assert len(second.list_hosts()) == 1
    first.close()
    second.close()


def test_many_tokens_raced_from_two_replicas_each_used_once(pg_cluster: PgCluster, tmp_path: Path) -> None:
    url = _database(pg_cluster)
    replicas = [open_registry(tmp_path, url) for _ in range(2)]
    tokens = [f"t{i}" for i in range(60)]
    for token in tokens:
        replicas[0].add_token(token, "shop/web", NOW, NOW + timedelta(hours=1))
    won: dict[int, list[str]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def storm(index: int) -> None:
        start.wait()
        for token in tokens:
            try:
                replicas[index].enroll(token, f"key-{index}", NewHost(token, ()), NOW, _issued)
                won[index].append(token)
            except RejectedError as exc:
                assert exc.code == "token_used"

    threads = [threading.Thread(target=storm, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won[0] + won[1]) == sorted(tokens)  # every token once, by one replica
    hosts = replicas[1].list_hosts()
    assert sorted(h.host_name for h in hosts) == sorted(tokens)
    assert {t.host_id for t in replicas[0].list_tokens()} == {h.id for h in hosts}
    for r in replicas:
        r.close()


_MIGRATE = "; ".join(
    [
        "import sys",
        "from agent.authority.storage_pg import PostgresRegistry",
        "PostgresRegistry(sys.argv[1]).close()",
    ]
)


def test_migrations_started_by_three_processes_at_once_apply_once(pg_cluster: PgCluster) -> None:
    url = _database(pg_cluster)
    with psycopg.connect(url, autocommit=True) as holder:
        # Hold the migration lock so all three are inside migrate_postgres together.
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        procs = [
            subprocess.Popen([sys.executable, "-c", _MIGRATE, url], stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        _until(lambda: _lock_waiters(url, "advisory") == 3, "three processes waiting to migrate")
        holder.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
        rows = holder.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == [m.version for m in POSTGRES]
        # The version's slots were made once (migrations.VERSION_SLOTS), their sum as at the start.
        slots = holder.execute("SELECT id, version FROM registry_version ORDER BY id").fetchall()
        assert slots == [(1, 1)] + [(i, 0) for i in range(2, VERSION_SLOTS + 1)]


def test_database_away_is_registry_unavailable_and_the_same_registry_recovers(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    url = _database(pg_cluster)
    registry = open_registry(tmp_path, url)
    registry.set_policy(PolicyRecord("shop/web", 0, "deny", ()))
    version = registry.data_version()
    pg_cluster.stop()
    try:
        with pytest.raises(RegistryUnavailable) as info:
            registry.set_policy(PolicyRecord("shop/web", 80, "deny", ()))
        assert info.value.code == "registry_unavailable"
        assert str(pg_cluster.socket_dir) in info.value.message
        assert "retries on every request" in info.value.hint
    finally:
        pg_cluster.start()
    # The same object, no reopen: the pool connects again (within about a second).
    _until(lambda: _answers(registry), "the registry answering again")
    assert registry.policies() == [PolicyRecord("shop/web", 0, "deny", ())]
    assert registry.data_version() == version
    registry.set_policy(PolicyRecord("shop/web", 80, "deny", ()))
    assert len(registry.policies()) == 2
    registry.close()


def test_a_killed_server_loses_nothing_committed(pg_cluster: PgCluster, tmp_path: Path) -> None:
    url = _database(pg_cluster)
    registry = open_registry(tmp_path, url)
    for i in range(20):
        registry.add_token(f"t{i}", "shop/web", NOW, NOW + timedelta(hours=1))
        registry.enroll(f"t{i}", f"k{i}", NewHost(f"h{i}", ()), NOW, _issued)
    pg_cluster.kill()
    try:
        with pytest.raises(RegistryUnavailable):
            registry.list_hosts()
    finally:
        pg_cluster.start()
    _until(lambda: _answers(registry), "the registry answering again")
    assert len(registry.list_hosts()) == 20
    assert all(t.used_at is not None for t in registry.list_tokens())
    registry.close()


def test_a_server_down_at_open_says_where_and_why(tmp_path: Path) -> None:
    with pytest.raises(RegistryUnavailable) as info:
        open_registry(tmp_path, f"postgresql:///meshagent?host={tmp_path}&user=meshagent")
    assert str(tmp_path) in info.value.message
    assert "No such file" in info.value.message or "connect" in info.value.message


def test_which_database_flag_then_env_then_recorded_then_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATABASE_ENV, raising=False)
    assert resolve(tmp_path) == ("sqlite", "default")
    kept = record(tmp_path, "postgresql://ops:s3cret@db.example:5432/mesh?sslmode=require&password=x")
    assert kept == "postgresql://ops@db.example:5432/mesh?sslmode=require"  # never the password
    assert "s3cret" not in (tmp_path / "database.url").read_text()
    assert resolve(tmp_path)[0] == kept
    monkeypatch.setenv(DATABASE_ENV, "postgresql:///env?host=/run/postgresql")
    assert resolve(tmp_path)[0] == "postgresql:///env?host=/run/postgresql"
    assert resolve(tmp_path, "sqlite") == ("sqlite", "--database")
    with pytest.raises(ConfigError) as info:
        resolve(tmp_path, "mysql://db/mesh")
    assert "PGPASSWORD" in info.value.hint and "postgresql://" in info.value.hint


def test_without_psycopg_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    with pytest.raises(MeshagentError) as info:
        open_registry(tmp_path, "postgresql:///meshagent?host=/run/postgresql")
    assert info.value.hint == "install the PostgreSQL extra: pip install 'meshagent[postgresql]'"


def test_a_restart_between_two_calls_is_not_seen_by_the_second(pg_cluster: PgCluster, tmp_path: Path) -> None:
    url = _database(pg_cluster)
    registry = open_registry(tmp_path, url)
    version = registry.data_version()  # the pool holds a connection the restart will end
    pg_cluster.restart()
    assert registry.data_version() == version  # a fresh connection, no 503 for this call
    pg_cluster.kill()
    pg_cluster.start()
    assert registry.data_version() == version
    registry.close()


def test_connections_on_descriptors_above_1023_work(pg_cluster: PgCluster, tmp_path: Path) -> None:
    """An authority holding thousands of long polls hands its pool descriptors above 1023, where
    select() refuses to look (a 500 on every call through that connection, for good)."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        registry = open_registry(tmp_path, _database(pg_cluster))
        registry.data_version()
        assert max(held) > 1023
        assert registry.list_hosts() == []
        registry.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_revocation_moves_the_row_a_replica_before_migration_3_reads(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """During a rolling upgrade an old replica reads `registry_version WHERE id = 1` alone: a
    revocation made through an upgraded replica must move that row, or the old replica's long
    polls never hear of it."""
    url = _database(pg_cluster)
    registry = open_registry(tmp_path, url)
    registry.add_token("t", "shop/web", NOW, NOW + timedelta(hours=1))
    host = registry.enroll("t", "key", NewHost("web", ()), NOW, _issued)

    def old_replicas_version() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT version FROM registry_version WHERE id = 1").fetchone()
            assert row is not None
            return int(row[0])

    before = old_replicas_version()
    registry.revoke(host.id, NOW)
    assert old_replicas_version() > before
    registry.close()


def test_a_database_of_migration_3_gains_metadata_and_events_losing_nothing(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """#20's migration 4 on a database a replica of the previous version made and used."""
    url = _database(pg_cluster)
    with psycopg.connect(url, autocommit=True) as conn:
        assert migrate_postgres(conn, POSTGRES[:3]) == [1, 2, 3]
        conn.execute(
            "INSERT INTO tokens (hash, identity, created_at, expires_at) VALUES ('t1', 'shop/web', 1, 4e9)"
        )
        conn.execute("INSERT INTO host_reports VALUES ('h-0', 5.0, '{}')")
    registry = open_registry(tmp_path, url)
    try:
        host = registry.enroll("t1", "key", NewHost("web", ()), NOW, _issued)
        assert registry.list_tokens()[0].meta == HostMeta()
        assert registry.host_meta() == {host.id: HostMeta()}
        assert registry.reports() == {"h-0": (5.0, "{}")}
        meta = parse_meta({"owner_team": "web", "slos": ["latency=99:300ms"]})
        registry.set_host_meta(host.id, meta, "cli:test", NOW)
        assert registry.host_meta([host.id]) == {host.id: meta}
        assert [e.kind for e in registry.events(host.id)] == ["metadata_changed", "enrolled"]
    finally:
        registry.close()


def test_a_database_of_migration_4_gains_route_objects_and_their_writes_move_slot_1(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """#21's migration 5 on a database #20's replicas made: its hosts stay, route objects store
    and read back, and every route write moves slot 1, the row a replica from before migration 3
    reads alone (operator writes, as revocations and policies: a rolling upgrade's old replicas
    still wake their long polls)."""
    url = _database(pg_cluster)
    with psycopg.connect(url, autocommit=True) as conn:
        assert migrate_postgres(conn, POSTGRES[:4]) == [1, 2, 3, 4]
        conn.execute(
            "INSERT INTO tokens (hash, identity, created_at, expires_at) VALUES ('t1', 'shop/web', 1, 4e9)"
        )

    def slot_1() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT version FROM registry_version WHERE id = 1").fetchone()
            assert row is not None
            return int(row[0])

    registry = open_registry(tmp_path, url)
    try:
        host = registry.enroll("t1", "key", NewHost("web", ()), NOW, _issued)
        assert [h.id for h in registry.list_hosts()] == [host.id]
        assert registry.route_objects() == []
        body = {"kind": "HTTPRoute", "metadata": {"name": "r", "namespace": "shop"}, "spec": {"rules": []}}
        obj = RouteObject("HTTPRoute", "shop", "r", "gateway.networking.k8s.io/v1", body, "file", 5.0)
        before = slot_1()
        registry.put_route_objects([obj])
        assert registry.route_objects() == [obj]
        assert slot_1() == before + 1
        assert registry.remove_route_object("HTTPRoute", "shop", "r") is True
        assert slot_1() == before + 2
    finally:
        registry.close()
