"""Versioned schema migrations for the registry, one numbered list per dialect.

Each database records the migrations it has in `schema_migrations`; opening a registry applies
the missing ones in order, all in one transaction, under a lock: on PostgreSQL a transaction-
scoped advisory lock (replicas starting at once: one applies, the others wait and then find
nothing to do), on SQLite `BEGIN IMMEDIATE` (the file's write lock). A migration is only ever
appended: one that shipped is never edited, a later one changes what it made.

SQLite registries created before this module (no `schema_migrations`) get migration 1 like a new
file: it creates what is missing and adds the columns older versions lacked, so they open as is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.logs import get_logger

if TYPE_CHECKING:
    import psycopg

log = get_logger("meshagent.authority")

# Any number unlikely to be used by another application sharing the database.
ADVISORY_LOCK_KEY = 0x6D657368_61676E74 & 0x7FFF_FFFF_FFFF_FFFF  # "meshagnt"

_TRACKING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...] = ()
    # For steps SQL alone cannot say idempotently (SQLite's ADD COLUMN when missing).
    run: Callable[[Any], None] | None = None


def _split(script: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in script.split(";\n") if s.strip())


# --- SQLite ---------------------------------------------------------------------------------

SQLITE_BASELINE = """
CREATE TABLE IF NOT EXISTS tokens (
    hash        TEXT PRIMARY KEY,
    identity    TEXT NOT NULL,          -- NAMESPACE/NAME
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    used_at     REAL,
    used_by_key TEXT,                   -- sha256 of the enrolling key's SPKI
    host_id     TEXT,
    kube_labels TEXT,                   -- JSON object: the operator's labels for the host's objects
    kube_ports  TEXT,                   -- JSON list of [name, port, protocol]
    proxy_port  INTEGER                 -- the host's inbound proxy port (NULL: the default)
);
CREATE TABLE IF NOT EXISTS hosts (
    id              TEXT PRIMARY KEY,
    identity        TEXT NOT NULL,
    host_name       TEXT NOT NULL,
    addresses       TEXT NOT NULL,      -- JSON list
    serial          TEXT NOT NULL,      -- current certificate (hex)
    previous_serial TEXT,               -- may fetch the current cert again if the answer was lost
    not_after       REAL NOT NULL,
    cert_pem        TEXT NOT NULL,
    enrolled_at     REAL NOT NULL,
    last_renewal    REAL,
    revoked_at      REAL,
    api_token_hash  TEXT,               -- sha256 of the host's bearer token for catalog/policy reads
    key_fp          TEXT,               -- sha256 of the current certificate's SPKI
    kube_labels     TEXT,               -- copied from the token at enrollment, editable
    kube_ports      TEXT,
    proxy_port      INTEGER
);
-- Renewal requests already answered, kept until their timestamp is too old to be accepted.
CREATE TABLE IF NOT EXISTS renewal_proofs (
    digest      TEXT PRIMARY KEY,       -- sha256 over the presented serial and the signed message
    host_id     TEXT NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS renewal_proofs_expiry ON renewal_proofs(expires_at);
CREATE TABLE IF NOT EXISTS catalog (
    id          TEXT PRIMARY KEY,
    cidr        TEXT NOT NULL,
    ports       TEXT NOT NULL,          -- JSON list, empty: every port
    identity    TEXT NOT NULL,          -- NAMESPACE/NAME the destination proves
    created_at  REAL NOT NULL,
    opaque_port INTEGER                 -- its proxy port expecting Linkerd's transport header
);
CREATE TABLE IF NOT EXISTS policies (
    identity    TEXT NOT NULL,          -- the hosts (NAMESPACE/NAME) this policy applies to
    port        INTEGER NOT NULL,       -- 0: the default for every other port
    default_policy TEXT NOT NULL,
    allow       TEXT NOT NULL,          -- JSON list of SPIFFE IDs or globs
    PRIMARY KEY (identity, port)
);
CREATE INDEX IF NOT EXISTS hosts_serial ON hosts(serial);
CREATE INDEX IF NOT EXISTS hosts_api_token ON hosts(api_token_hash);
CREATE INDEX IF NOT EXISTS hosts_previous_serial ON hosts(previous_serial)
"""

# Columns added to registries before migrations existed (issues #2-#16): a file of that time
# may lack any of them.
_SQLITE_ADDED_COLUMNS = {
    "hosts": (
        ("api_token_hash", "TEXT"),
        ("key_fp", "TEXT"),
        ("kube_labels", "TEXT"),
        ("kube_ports", "TEXT"),
        ("proxy_port", "INTEGER"),
    ),
    "tokens": (("kube_labels", "TEXT"), ("kube_ports", "TEXT"), ("proxy_port", "INTEGER")),
    "catalog": (("opaque_port", "INTEGER"),),
}


def _sqlite_add_columns(db: sqlite3.Connection) -> None:
    for table, added in _SQLITE_ADDED_COLUMNS.items():
        columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        for column, kind in added:
            if columns and column not in columns:  # (no table yet: the baseline creates it whole)
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


# Every certificate issued to a host until it expires, so a revocation can list them all: a
# host that renewed several times holds several valid certificates, not only the current one and
# the one before. The backfill knows the current and previous serials only, and gives both the
# current certificate's expiry (an upper bound: listing a serial past its expiry is harmless).
_CERTIFICATES = """
CREATE TABLE host_certificates (
    host_id   TEXT NOT NULL,
    serial    TEXT NOT NULL,
    not_after {time} NOT NULL,
    PRIMARY KEY (host_id, serial)
);
CREATE INDEX host_certificates_by_host ON host_certificates (host_id, not_after);
INSERT INTO host_certificates (serial, host_id, not_after) SELECT serial, id, not_after FROM hosts;
INSERT INTO host_certificates (serial, host_id, not_after)
    SELECT previous_serial, id, not_after FROM hosts
    WHERE previous_serial IS NOT NULL AND previous_serial <> serial
"""

# data_version on SQLite: a row bumped by the transactions that change a rendered document, as
# on PostgreSQL. (PRAGMA data_version moved on every commit: a renewal, a token, a host's API
# token woke every long poll of every host.)
_SQLITE_VERSION_ROW = """
CREATE TABLE registry_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO registry_version (id, version) VALUES (1, 1)
"""

# The service catalog (#20): what each host carries (set at `token create`, copied to the host
# at enrollment, editable with `authority host set`) and the change log. Metadata is a table of
# its own, not a column of hosts: `SELECT * FROM hosts` (every directory render) stays as small.
# Events: the newest events.RETAINED_PER_HOST of each host are kept (storage prunes on insert).
_HOST_CATALOG = """
ALTER TABLE tokens ADD COLUMN meta TEXT;
CREATE TABLE host_meta (
    host_id     TEXT PRIMARY KEY,
    meta        TEXT NOT NULL,
    updated_at  {time} NOT NULL
);
CREATE TABLE host_events (
    id          {serial},
    host_id     TEXT NOT NULL,
    at          {time} NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL,
    actor       TEXT NOT NULL
);
CREATE INDEX host_events_by_host ON host_events (host_id, id)
"""

# Traffic policy (#21): the operator's route objects (HTTPRoute, TrafficSplit, ServiceProfile,
# Service) as validated at apply, one row each. Objects, not compiled policy: backends resolve
# against hosts and Services that change, so the directory compiles them at render.
# `route_policy`: when an object was first stored. Until then the directory leaves `routes` out,
# so its bytes (and ETag) are a pre-#21 replica's during a rolling upgrade; from then on `[]`
# means "no policy" (an absent key would let hosts keep routes the operator removed).
_ROUTE_OBJECTS = """
CREATE TABLE route_objects (
    kind        TEXT NOT NULL,
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    api_version TEXT NOT NULL,
    body        TEXT NOT NULL,          -- canonical JSON of the validated object (never status)
    source      TEXT NOT NULL,          -- file | cluster
    created_at  {time} NOT NULL,        -- creationTimestamp, else the first apply: precedence ties
    applied_at  {time} NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE route_policy (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    since       {time} NOT NULL
)
"""

SQLITE: tuple[Migration, ...] = (
    # Columns first: the baseline's indexes name columns an old file may lack.
    Migration(1, "baseline", _split(SQLITE_BASELINE), run=_sqlite_add_columns),
    Migration(2, "host_certificates", _split(_CERTIFICATES.format(time="REAL"))),
    Migration(3, "registry_version", _split(_SQLITE_VERSION_ROW)),
    Migration(
        4,
        "host_catalog",
        _split(_HOST_CATALOG.format(time="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT")),
    ),
    Migration(5, "route_objects", _split(_ROUTE_OBJECTS.format(time="REAL"))),
)


def _applied(rows: Sequence[Sequence[Any]]) -> set[int]:
    return {int(r[0]) for r in rows}


def migrate_sqlite(db: sqlite3.Connection, migrations: Sequence[Migration] = SQLITE) -> list[int]:
    """Apply the missing migrations to `db` (autocommit mode); returns the versions applied."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(_TRACKING)
        done = _applied(db.execute("SELECT version FROM schema_migrations").fetchall())
        applied = []
        for m in migrations:
            if m.version in done:
                continue
            if m.run is not None:
                m.run(db)
            for statement in m.statements:
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, datetime('now'))",
                (m.version, m.name),
            )
            applied.append(m.version)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    if applied:
        log.info("registry.migrated", dialect="sqlite", versions=",".join(map(str, applied)))
    return applied


# --- PostgreSQL -----------------------------------------------------------------------------

POSTGRES_BASELINE = """
CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,
    identity    TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL,
    used_at     DOUBLE PRECISION,
    used_by_key TEXT,
    host_id     TEXT,
    kube_labels TEXT,
    kube_ports  TEXT,
    proxy_port  INTEGER,
    seq         BIGSERIAL               -- insertion order (SQLite's rowid)
);
CREATE TABLE hosts (
    id              TEXT PRIMARY KEY,
    identity        TEXT NOT NULL,
    host_name       TEXT NOT NULL,
    addresses       TEXT NOT NULL,
    serial          TEXT NOT NULL,
    previous_serial TEXT,
    not_after       DOUBLE PRECISION NOT NULL,
    cert_pem        TEXT NOT NULL,
    enrolled_at     DOUBLE PRECISION NOT NULL,
    last_renewal    DOUBLE PRECISION,
    revoked_at      DOUBLE PRECISION,
    api_token_hash  TEXT,
    key_fp          TEXT,
    kube_labels     TEXT,
    kube_ports      TEXT,
    proxy_port      INTEGER,
    seq             BIGSERIAL
);
CREATE TABLE renewal_proofs (
    digest      TEXT PRIMARY KEY,
    host_id     TEXT NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX renewal_proofs_expiry ON renewal_proofs(expires_at);
CREATE TABLE catalog (
    id          TEXT PRIMARY KEY,
    cidr        TEXT NOT NULL,
    ports       TEXT NOT NULL,
    identity    TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    opaque_port INTEGER,
    seq         BIGSERIAL
);
CREATE TABLE policies (
    identity    TEXT NOT NULL,
    port        INTEGER NOT NULL,
    default_policy TEXT NOT NULL,
    allow       TEXT NOT NULL,
    PRIMARY KEY (identity, port)
);
CREATE INDEX hosts_serial ON hosts(serial);
CREATE INDEX hosts_api_token ON hosts(api_token_hash);
CREATE INDEX hosts_previous_serial ON hosts(previous_serial);
-- The agents' last health reports: written every interval, so not part of data_version.
CREATE TABLE host_reports (
    host_id     TEXT PRIMARY KEY,
    received_at DOUBLE PRECISION NOT NULL,
    report      TEXT NOT NULL
);
-- data_version: bumped by every transaction that changes a rendered document, on any replica.
CREATE TABLE registry_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO registry_version (id, version) VALUES (1, 1)
"""

# data_version on PostgreSQL: the sum of VERSION_SLOTS counter rows, a changing transaction
# bumping one slot picked at random. One row made every enrollment of every replica wait for the
# commit before it (the row's lock is held until the commit's WAL flush); with 16 slots two
# commits wait for each other only when they pick the same slot. The sum still moves on every
# such commit and is the same for every replica reading the same state.
VERSION_SLOTS = 16  # (the migration below spells it: a shipped migration never changes)
_POSTGRES_VERSION_SLOTS = """
ALTER TABLE registry_version DROP CONSTRAINT IF EXISTS registry_version_id_check;
ALTER TABLE registry_version ADD CONSTRAINT registry_version_slot CHECK (id BETWEEN 1 AND 16);
INSERT INTO registry_version (id, version) SELECT slot, 0 FROM generate_series(2, 16) AS slot
"""

POSTGRES: tuple[Migration, ...] = (
    Migration(1, "baseline", _split(POSTGRES_BASELINE)),
    Migration(2, "host_certificates", _split(_CERTIFICATES.format(time="DOUBLE PRECISION"))),
    Migration(3, "registry_version_slots", _split(_POSTGRES_VERSION_SLOTS)),
    Migration(
        4,
        "host_catalog",
        # (host_reports.state: the report's event-relevant state, storage.report changes)
        (
            *_split(_HOST_CATALOG.format(time="DOUBLE PRECISION", serial="BIGSERIAL PRIMARY KEY")),
            "ALTER TABLE host_reports ADD COLUMN state TEXT",
        ),
    ),
    Migration(5, "route_objects", _split(_ROUTE_OBJECTS.format(time="DOUBLE PRECISION"))),
)


def migrate_postgres(conn: psycopg.Connection[Any], migrations: Sequence[Migration] = POSTGRES) -> list[int]:
    """Apply the missing migrations over `conn` (autocommit mode); returns the versions applied.
    Safe when several replicas start at once: the advisory lock serializes them."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        conn.execute(_TRACKING)
        done = _applied(conn.execute("SELECT version FROM schema_migrations").fetchall())
        for m in migrations:
            if m.version in done:
                continue
            if m.run is not None:
                m.run(conn)
            for statement in m.statements:
                conn.execute(statement.encode())  # (bytes: no parameters, no placeholder parsing)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, now()::text)",
                (m.version, m.name),
            )
            applied.append(m.version)
    if applied:
        log.info("registry.migrated", dialect="postgresql", versions=",".join(map(str, applied)))
    return applied
