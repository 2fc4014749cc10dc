"""SQLite's schema on the migrations mechanism: a registry.db written before it existed opens as
is (nothing lost, the missing columns added), a new one is migrated once by concurrent openers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from agent.authority.host_meta import HostMeta, parse_meta
from agent.authority.kube_routes import RouteObject
from agent.authority.migrations import POSTGRES, SQLITE, migrate_sqlite
from agent.authority.storage import NewHost, SqliteRegistry
from tests.authority.test_registry_contract import _issued

# A registry of the first versions (issue #2): no api tokens, no Kubernetes columns, no catalog,
# no policies, no schema_migrations.
_OLD_SCHEMA = """
CREATE TABLE tokens (hash TEXT PRIMARY KEY, identity TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, used_at REAL, used_by_key TEXT, host_id TEXT);
CREATE TABLE hosts (id TEXT PRIMARY KEY, identity TEXT NOT NULL, host_name TEXT NOT NULL,
    addresses TEXT NOT NULL, serial TEXT NOT NULL, previous_serial TEXT, not_after REAL NOT NULL,
    cert_pem TEXT NOT NULL, enrolled_at REAL NOT NULL, last_renewal REAL, revoked_at REAL);
INSERT INTO tokens VALUES ('t1', 'shop/web', 1.0, 2.0, 1.5, 'fp', 'h-1');
INSERT INTO hosts VALUES ('h-1', 'shop/web', 'web-1', '["198.18.0.1"]', '0a', NULL, 1e10, 'PEM',
    1.5, NULL, NULL);
"""


def test_a_registry_from_before_migrations_opens_with_its_records(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:
        db.executescript(_OLD_SCHEMA)
    registry = SqliteRegistry(path)
    [host] = registry.list_hosts()
    assert (host.id, host.host_name, host.addresses, host.serial) == ("h-1", "web-1", ("198.18.0.1",), "0a")
    assert registry.find_by_serial("0a") == host
    assert registry.list_tokens()[0].host_id == "h-1"
    registry.set_api_token("h-1", "api")  # a column the old file lacked
    assert registry.find_by_api_token("api") == host
    assert registry.static_entries() == [] and registry.policies() == []
    # Its certificate is known to the issued-certificates table (a revocation lists it).
    assert registry.unexpired_serials(["h-1"], datetime(1970, 1, 2, tzinfo=UTC)) == {"h-1": ["0a"]}
    registry.close()
    db = sqlite3.connect(path, isolation_level=None)
    assert db.execute("SELECT version, name FROM schema_migrations").fetchall() == [
        (1, "baseline"),
        (2, "host_certificates"),
        (3, "registry_version"),
        (4, "host_catalog"),
        (5, "route_objects"),
    ]
    assert migrate_sqlite(db) == []  # a second open applies nothing
    db.close()


def test_three_processes_opening_a_new_registry_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    opener = (
        "from pathlib import Path; from agent.authority.storage import SqliteRegistry; "
        + f" SqliteRegistry(Path({str(path)!r})).close()"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", opener], stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [m.version for m in SQLITE]


def test_a_registry_of_migration_3_gains_metadata_and_events_losing_nothing(tmp_path: Path) -> None:
    """#20's migration 4 on a registry (and a reports file of version 1) written before it."""
    path = tmp_path / "registry.db"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate_sqlite(db, SQLITE[:3]) == [1, 2, 3]
    db.executescript(  # a token and a host of that time
        "INSERT INTO tokens (hash, identity, created_at, expires_at, used_at, host_id)"
        " VALUES ('t1', 'shop/web', 1.0, 2.0, 1.5, 'h-1');"
        "INSERT INTO hosts (id, identity, host_name, addresses, serial, not_after, cert_pem, enrolled_at)"
        " VALUES ('h-1', 'shop/web', 'web-1', '[]', '0a', 1e10, 'PEM', 1.5);"
    )
    db.close()
    reports = sqlite3.connect(tmp_path / "registry-reports.db", isolation_level=None)
    reports.executescript(
        "CREATE TABLE host_reports (host_id TEXT PRIMARY KEY, received_at REAL NOT NULL,"
        " report TEXT NOT NULL);"
        "INSERT INTO host_reports VALUES ('h-1', 5.0, '{}'); PRAGMA user_version = 1;"
    )
    reports.close()
    registry = SqliteRegistry(path)
    [host] = registry.list_hosts()
    assert (host.id, host.serial) == ("h-1", "0a")
    assert registry.list_tokens()[0].meta == HostMeta()
    assert registry.host_meta() == {"h-1": HostMeta()} and registry.events() == []
    assert registry.reports() == {"h-1": (5.0, "{}")}
    meta = parse_meta({"owner_team": "db", "slos": ["availability=99.5"]})
    registry.set_host_meta("h-1", meta, "cli:test", datetime(2026, 1, 1, tzinfo=UTC))
    registry.add_token(
        "t2", "shop/web", datetime(2026, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC), meta=meta
    )
    new = registry.enroll(
        "t2", "k", NewHost("web-2", ()), datetime(2026, 1, 1, tzinfo=UTC), lambda i: _issued("0b")
    )
    assert registry.host_meta() == {"h-1": meta, new.id: meta}
    assert [(e.host_id, e.kind) for e in registry.events()] == [
        (new.id, "enrolled"),
        ("h-1", "metadata_changed"),
    ]
    registry.record_report("h-1", "{}", 6.0, state="s")
    registry.close()
    with sqlite3.connect(tmp_path / "registry-reports.db") as check:
        assert check.execute("SELECT received_at, state FROM host_reports").fetchall() == [(6.0, "s")]
        assert check.execute("PRAGMA user_version").fetchone()[0] == 2


def test_both_dialects_number_their_migrations_alike_and_contiguously() -> None:
    """A migration is appended with the next number on both lists (#20 took 4, #21 takes 5): two
    branches both adding "4" would make one of them never run on a database that has the other."""
    assert [m.version for m in SQLITE] == list(range(1, len(SQLITE) + 1))
    assert [m.version for m in POSTGRES] == [m.version for m in SQLITE]
    assert [m.name for m in POSTGRES][3:] == [m.name for m in SQLITE][3:]  # (3 differs by design)


def test_a_registry_of_migration_4_gains_route_objects_losing_nothing(tmp_path: Path) -> None:
    """#21's migration 5 on a registry #20 wrote: its hosts stay, the table is there and empty,
    and a route object stored now reads back (and moves the version, as any operator write)."""
    path = tmp_path / "registry.db"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate_sqlite(db, SQLITE[:4]) == [1, 2, 3, 4]
    db.execute(
        "INSERT INTO hosts (id, identity, host_name, addresses, serial, not_after, cert_pem, enrolled_at)"
        " VALUES ('h-1', 'shop/web', 'web-1', '[\"198.18.0.1\"]', '0a', 1e10, 'PEM', 1.5)"
    )
    db.close()
    registry = SqliteRegistry(path)
    try:
        assert [h.id for h in registry.list_hosts()] == ["h-1"]
        assert registry.route_objects() == [] and registry.route_policy_since() is None
        before = registry.data_version()
        obj = RouteObject(
            "TrafficSplit",
            "shop",
            "web-split",
            "split.smi-spec.io/v1alpha2",
            {
                "kind": "TrafficSplit",
                "spec": {"service": "web", "backends": [{"service": "web", "weight": 1}]},
            },
            "file",
            10.0,
        )
        registry.put_route_objects([obj])
        assert registry.route_objects() == [obj] and registry.route_policy_since() is not None
        assert registry.data_version() != before
    finally:
        registry.close()
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT max(version) FROM schema_migrations").fetchone() == (5,)
