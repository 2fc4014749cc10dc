"""The authority's registry of join tokens and enrolled hosts.

One small interface (`Registry`) and one implementation on SQLite in WAL mode. Every state
change is one transaction, so concurrent enrollments neither lose nor duplicate records, and a
crash mid-way leaves either the old state or the new one. A shared SQL database for several
replicas is another implementation of the same interface.

Token consumption and host creation commit together with the signed certificate: a signing
failure leaves the token unused, and a host that lost the response can retry with the same
token *and the same key* and gets the same certificate back (SPIRE's spire#2454 burned tokens
on interrupted attestation). Renewal mirrors it: once serial S renewed, S can only fetch the
certificate it was issued (same key), and each renewal request is single-use (`renewal_proofs`).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from agent.errors import RejectedError

SCHEMA = """
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
CREATE INDEX IF NOT EXISTS hosts_previous_serial ON hosts(previous_serial);
"""


# The reports file's schema, by PRAGMA user_version (1: the first).
REPORTS_VERSION = 1
REPORTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS host_reports (
    host_id     TEXT PRIMARY KEY,
    received_at REAL NOT NULL,          -- the authority's clock
    report      TEXT NOT NULL           -- JSON, as health.HostReport.to_json wrote it
);
"""


@dataclass(frozen=True)
class Registration:
    """What the operator declared at token time for the host's Kubernetes objects: labels a
    Service selects it by, the app's named ports, and the inbound proxy port (None: 4143).
    Stored as given once validated (kube_export.check_registration); kept raw here so a row
    written by hand never makes the registry unreadable."""

    labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[tuple[str, int, str], ...] = ()  # (name, port, protocol)
    proxy_port: int | None = None
    unreadable: bool = False  # the stored columns did not parse


@dataclass(frozen=True)
class TokenRecord:
    hash: str
    identity: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    host_id: str | None
    registration: Registration = Registration()


@dataclass(frozen=True)
class HostRecord:
    id: str
    identity: str
    host_name: str
    addresses: tuple[str, ...]
    serial: str
    not_after: datetime
    cert_pem: str
    enrolled_at: datetime
    last_renewal: datetime | None
    revoked_at: datetime | None
    registration: Registration = Registration()

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class Issued:
    """What a signing callback returns: the new certificate's serial, expiry and PEM."""

    serial: str
    not_after: datetime
    cert_pem: str


@dataclass(frozen=True)
class StaticEntry:
    """An operator's catalog entry: a network (and ports) where a destination proves `identity`."""

    id: str
    cidr: str
    ports: tuple[int, ...]
    identity: str
    # The destination's proxy expects Linkerd's transport header on this port (None: plain TLS).
    opaque_port: int | None = None


@dataclass(frozen=True)
class PolicyRecord:
    identity: str
    port: int  # 0: default
    default_policy: str
    allow: tuple[str, ...]


@dataclass(frozen=True)
class RenewalRequest:
    """A verified renewal: who asked (presented serial), for which key, and its one-time proof."""

    presented_serial: str
    key_fingerprint: str  # sha256 of the CSR's SPKI
    proof: str  # digest identifying this exact request
    proof_expires_at: datetime  # after this, the freshness check refuses the request anyway


@dataclass(frozen=True)
class NewHost:
    host_name: str
    addresses: tuple[str, ...]


class Registry(Protocol):
    def add_token(
        self,
        token_hash: str,
        identity: str,
        now: datetime,
        expires_at: datetime,
        registration: Registration = Registration(),
    ) -> None: ...

    def list_tokens(self) -> list[TokenRecord]: ...

    def enroll(
        self,
        token_hash: str,
        key_fingerprint: str,
        host: NewHost,
        now: datetime,
        sign: Callable[[str], Issued],
    ) -> HostRecord: ...

    def find_by_serial(self, serial: str) -> HostRecord | None: ...

    def set_api_token(self, host_id: str, token_hash: str) -> None: ...

    def find_by_api_token(self, token_hash: str) -> HostRecord | None: ...

    def renew(
        self, host_id: str, request: RenewalRequest, now: datetime, sign: Callable[[], Issued]
    ) -> HostRecord: ...

    def list_hosts(self) -> list[HostRecord]: ...

    def revoke(self, ref: str, now: datetime) -> HostRecord: ...

    def update_registration(self, ref: str, change: Callable[[HostRecord], Registration]) -> HostRecord: ...

    def add_static_entry(
        self,
        cidr: str,
        ports: tuple[int, ...],
        identity: str,
        now: datetime,
        opaque_port: int | None = None,
    ) -> StaticEntry: ...

    def remove_static_entry(self, entry_id: str) -> None: ...

    def static_entries(self) -> list[StaticEntry]: ...

    def set_policy(self, record: PolicyRecord) -> None: ...

    def set_policies(self, records: Sequence[PolicyRecord]) -> None: ...

    def remove_policy(self, identity: str, port: int) -> None: ...

    def policies(self, identity: str | None = None) -> list[PolicyRecord]: ...

    def record_report(self, host_id: str, report_json: str, at: datetime | float) -> None: ...

    def reports(self) -> dict[str, tuple[float, str]]: ...

    def data_version(self) -> int: ...


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


# Columns added after registries were first created: added at open when missing.
_ADDED_COLUMNS = {
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


def _registration(row: sqlite3.Row) -> Registration:
    try:
        labels = json.loads(row["kube_labels"]) if row["kube_labels"] else {}
        ports = json.loads(row["kube_ports"]) if row["kube_ports"] else []
        return Registration(
            labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
            ports=tuple((str(n), int(p), str(proto)) for n, p, proto in ports),
            proxy_port=row["proxy_port"],
        )
    except (ValueError, TypeError, AttributeError, RecursionError):
        # A row altered by hand: the host stays listed; export refuses it (kube_export).
        return Registration(unreadable=True)


def _registration_columns(reg: Registration) -> tuple[str | None, str | None, int | None]:
    return (
        json.dumps(dict(reg.labels)) if reg.labels else None,
        json.dumps([list(p) for p in reg.ports]) if reg.ports else None,
        reg.proxy_port,
    )


def _host(row: sqlite3.Row) -> HostRecord:
    return HostRecord(
        id=row["id"],
        identity=row["identity"],
        host_name=row["host_name"],
        addresses=tuple(json.loads(row["addresses"])),
        serial=row["serial"],
        not_after=datetime.fromtimestamp(row["not_after"], UTC),
        cert_pem=row["cert_pem"],
        enrolled_at=datetime.fromtimestamp(row["enrolled_at"], UTC),
        last_renewal=_dt(row["last_renewal"]),
        revoked_at=_dt(row["revoked_at"]),
        registration=_registration(row),
    )


class SqliteRegistry:
    """The registry in one SQLite file (WAL: readers never block the writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection serves the event loop and worker threads (asyncio.to_thread): a
        # transaction begun on one thread must not interleave with another thread's statements
        # ("cannot start a transaction within a transaction"). Reentrant: callbacks run inside.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
        self._db.execute("PRAGMA busy_timeout=30000")
        self._upgrade()
        self._db.executescript(SCHEMA)
        self._watch = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._reports = self._open_reports()

    def _upgrade(self) -> None:
        """Add the columns a registry from an older version lacks (new ones get the schema)."""
        for table, added in _ADDED_COLUMNS.items():
            columns = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for column, kind in added:
                if not columns or column in columns:
                    continue
                try:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:
                    # Another worker opening the same registry added it first.
                    if "duplicate column" not in str(exc):
                        raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._watch.close()
            self._reports.close()

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        """Every row of a read on the shared connection, under the lock."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _row(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, params).fetchone()
            return row

    # --- health reports (agent/authority/health.py) --------------------------------------

    def _open_reports(self) -> sqlite3.Connection:
        """The agents' health reports, in a file of their own beside the registry: a report
        every interval from every host must not look like a registry change to `data_version`
        (the directory's long poll would wake every host on every report)."""
        path = self.path.with_name(self.path.stem + "-reports" + self.path.suffix)
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # a lost report is resent within an interval
        db.execute("PRAGMA busy_timeout=30000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version < REPORTS_VERSION:  # both steps are idempotent: two openers may race
            db.execute(REPORTS_SCHEMA)
            db.execute(f"PRAGMA user_version = {REPORTS_VERSION}")
        return db

    def record_report(self, host_id: str, report_json: str, at: datetime | float) -> None:
        """Keep `report_json` (checked by health.parse_report) as the host's last report."""
        when = at.timestamp() if isinstance(at, datetime) else float(at)
        with self._lock:
            self._reports.execute(
                "INSERT OR REPLACE INTO host_reports (host_id, received_at, report) VALUES (?, ?, ?)",
                (host_id, when, report_json),
            )

    def reports(self) -> dict[str, tuple[float, str]]:
        """Every host's last report: host id -> (received at, Unix time; the report's JSON)."""
        with self._lock:
            rows = self._reports.execute("SELECT host_id, received_at, report FROM host_reports").fetchall()
        return {str(r[0]): (float(r[1]), str(r[2])) for r in rows}

    def data_version(self) -> int:
        """Changes whenever the registry file was written, by this process or another (SQLite's
        PRAGMA data_version, read on a connection of its own: it ignores its own connection's
        writes). Compare for inequality; health reports do not change it."""
        with self._lock:
            return int(self._watch.execute("PRAGMA data_version").fetchone()[0])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE: take the write lock up front so two writers never both read "unused".
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add_token(
        self,
        token_hash: str,
        identity: str,
        now: datetime,
        expires_at: datetime,
        registration: Registration = Registration(),
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO tokens (hash, identity, created_at, expires_at, kube_labels, kube_ports,"
                " proxy_port) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_hash, identity, _ts(now), _ts(expires_at), *_registration_columns(registration)),
            )

    def list_tokens(self) -> list[TokenRecord]:
        rows = self._rows("SELECT * FROM tokens ORDER BY created_at")
        return [
            TokenRecord(
                hash=r["hash"],
                identity=r["identity"],
                created_at=datetime.fromtimestamp(r["created_at"], UTC),
                expires_at=datetime.fromtimestamp(r["expires_at"], UTC),
                used_at=_dt(r["used_at"]),
                host_id=r["host_id"],
                registration=_registration(r),
            )
            for r in rows
        ]

    def enroll(
        self,
        token_hash: str,
        key_fingerprint: str,
        host: NewHost,
        now: datetime,
        sign: Callable[[str], Issued],
    ) -> HostRecord:
        """Consume the token and record the host, atomically. `sign(identity)` issues the cert."""
        with self._transaction() as db:
            token = db.execute("SELECT * FROM tokens WHERE hash = ?", (token_hash,)).fetchone()
            if token is None:
                raise RejectedError(
                    "the join token is not known to this authority",
                    "create a token on this authority: meshagent authority token create",
                    code="token_unknown",
                )
            if token["used_at"] is not None:
                if token["used_by_key"] == key_fingerprint and token["host_id"]:
                    # The same host retrying with the same key: hand back what it was issued.
                    row = db.execute("SELECT * FROM hosts WHERE id = ?", (token["host_id"],)).fetchone()
                    if row is not None and row["revoked_at"] is None:
                        return _host(row)
                raise RejectedError(
                    "the join token was already used",
                    "tokens are single-use: create a new one with meshagent authority token create",
                    code="token_used",
                )
            if token["expires_at"] <= _ts(now):
                raise RejectedError(
                    "the join token has expired",
                    "create a new one (meshagent authority token create --ttl ...)",
                    code="token_expired",
                )
            issued = sign(token["identity"])
            host_id = "h-" + secrets.token_hex(6)
            # The token's labels and ports become the host's, as stored (validated when written).
            db.execute(
                "INSERT INTO hosts (id, identity, host_name, addresses, serial, not_after, cert_pem,"
                " enrolled_at, key_fp, kube_labels, kube_ports, proxy_port)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    host_id,
                    token["identity"],
                    host.host_name,
                    json.dumps(list(host.addresses)),
                    issued.serial,
                    _ts(issued.not_after),
                    issued.cert_pem,
                    _ts(now),
                    key_fingerprint,
                    token["kube_labels"],
                    token["kube_ports"],
                    token["proxy_port"],
                ),
            )
            db.execute(
                "UPDATE tokens SET used_at = ?, used_by_key = ?, host_id = ? WHERE hash = ?",
                (_ts(now), key_fingerprint, host_id, token_hash),
            )
            row = db.execute("SELECT * FROM hosts WHERE id = ?", (host_id,)).fetchone()
            return _host(row)

    def set_api_token(self, host_id: str, token_hash: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE hosts SET api_token_hash = ? WHERE id = ?", (token_hash, host_id))

    def find_by_api_token(self, token_hash: str) -> HostRecord | None:
        row = self._row("SELECT * FROM hosts WHERE api_token_hash = ?", (token_hash,))
        return None if row is None else _host(row)

    def find_by_serial(self, serial: str) -> HostRecord | None:
        row = self._row("SELECT * FROM hosts WHERE serial = ? OR previous_serial = ?", (serial, serial))
        return None if row is None else _host(row)

    def renew(
        self, host_id: str, request: RenewalRequest, now: datetime, sign: Callable[[], Issued]
    ) -> HostRecord:
        """Renew `host_id` from its current certificate, or hand back what its previous one was
        issued (the answer was lost). `sign()` issues the new certificate, inside the transaction.

        Two rules make a captured request worthless (issue #15): each request is answered once
        (its proof is kept until its timestamp leaves the freshness window, so the table stays
        small), and the previous serial never gets a *new* certificate, only the current one and
        only for the same key. Either alone leaves a hole: proofs alone let the old key renew
        again with a fresh signature; serial binding alone lets an exact replay rotate the
        host's token away from it.
        """
        with self._transaction() as db:
            db.execute("DELETE FROM renewal_proofs WHERE expires_at < ?", (_ts(now),))
            if db.execute("SELECT 1 FROM renewal_proofs WHERE digest = ?", (request.proof,)).fetchone():
                raise RejectedError(
                    "this renewal request was already answered: a request is single-use",
                    "a replayed or duplicated request; the host renews by itself with a new one "
                    "(meshagent renew)",
                    code="renewal_replayed",
                )
            row = db.execute("SELECT * FROM hosts WHERE id = ?", (host_id,)).fetchone()
            if row is None or row["revoked_at"] is not None:
                raise RejectedError(
                    "this host has been revoked",
                    code="host_revoked",
                    hint="enroll again with a new join token if it should be back",
                )
            presented = request.presented_serial
            retry = presented == row["previous_serial"] and presented != row["serial"]
            if retry and request.key_fingerprint != row["key_fp"]:
                raise RejectedError(
                    "the presented certificate was already renewed; only the current one can renew",
                    "renew with the host's current certificate; a host that lost it enrolls again",
                    code="stale_certificate",
                )
            if presented not in (row["serial"], row["previous_serial"]):
                raise RejectedError(
                    "the presented certificate is not this host's current one",
                    code="stale_certificate",
                    hint="enroll again with a new join token",
                )
            db.execute(
                "INSERT INTO renewal_proofs (digest, host_id, expires_at) VALUES (?, ?, ?)",
                (request.proof, host_id, _ts(request.proof_expires_at)),
            )
            if retry:  # the answer was lost: the same certificate again, nothing re-signed
                return _host(row)
            issued = sign()
            db.execute(
                "UPDATE hosts SET serial = ?, previous_serial = ?, not_after = ?, cert_pem = ?,"
                " last_renewal = ?, key_fp = ? WHERE id = ?",
                (
                    issued.serial,
                    presented,
                    _ts(issued.not_after),
                    issued.cert_pem,
                    _ts(now),
                    request.key_fingerprint,
                    host_id,
                ),
            )
            return _host(db.execute("SELECT * FROM hosts WHERE id = ?", (host_id,)).fetchone())

    def list_hosts(self) -> list[HostRecord]:
        rows = self._rows("SELECT * FROM hosts ORDER BY enrolled_at")
        return [_host(r) for r in rows]

    def revoke(self, ref: str, now: datetime) -> HostRecord:
        """Revoke by host id, or by host name when exactly one unrevoked host has it."""
        with self._transaction() as db:
            host_id = _find_one(db, ref, "revoke")
            db.execute(
                "UPDATE hosts SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (_ts(now), host_id)
            )
            return _host(db.execute("SELECT * FROM hosts WHERE id = ?", (host_id,)).fetchone())

    def update_registration(self, ref: str, change: Callable[[HostRecord], Registration]) -> HostRecord:
        """Replace the labels/ports of the host `ref` (id, or unique unrevoked name) with
        `change(host)`, in one transaction: `change` may refuse by raising, and nothing is written."""
        with self._transaction() as db:
            host_id = _find_one(db, ref, "edit it")
            host = _host(db.execute("SELECT * FROM hosts WHERE id = ?", (host_id,)).fetchone())
            if host.revoked:
                raise RejectedError(
                    f"host {ref!r} ({host.id}) is revoked",
                    "enroll it again with a new join token; revoked hosts are not exported",
                    code="host_revoked",
                )
            db.execute(
                "UPDATE hosts SET kube_labels = ?, kube_ports = ?, proxy_port = ? WHERE id = ?",
                (*_registration_columns(change(host)), host_id),
            )
            return _host(db.execute("SELECT * FROM hosts WHERE id = ?", (host_id,)).fetchone())

    # --- catalog and policy (operator-managed) -------------------------------------------

    def add_static_entry(
        self,
        cidr: str,
        ports: tuple[int, ...],
        identity: str,
        now: datetime,
        opaque_port: int | None = None,
    ) -> StaticEntry:
        entry = StaticEntry("c-" + secrets.token_hex(4), cidr, ports, identity, opaque_port)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO catalog (id, cidr, ports, identity, created_at, opaque_port)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (entry.id, cidr, json.dumps(list(ports)), identity, _ts(now), opaque_port),
            )
        return entry

    def remove_static_entry(self, entry_id: str) -> None:
        with self._transaction() as db:
            if db.execute("DELETE FROM catalog WHERE id = ?", (entry_id,)).rowcount == 0:
                raise RejectedError(
                    f"no catalog entry {entry_id!r}",
                    code="entry_unknown",
                    hint="list entries with: meshagent authority catalog list",
                )

    def static_entries(self) -> list[StaticEntry]:
        rows = self._rows("SELECT * FROM catalog ORDER BY created_at")
        return [
            StaticEntry(r["id"], r["cidr"], tuple(json.loads(r["ports"])), r["identity"], r["opaque_port"])
            for r in rows
        ]

    def set_policy(self, record: PolicyRecord) -> None:
        self.set_policies([record])

    def set_policies(self, records: Sequence[PolicyRecord]) -> None:
        """Add or replace every record in one transaction: all of them are stored, or none."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO policies (identity, port, default_policy, allow) VALUES (?, ?, ?, ?)",
                [(r.identity, r.port, r.default_policy, json.dumps(list(r.allow))) for r in records],
            )

    def remove_policy(self, identity: str, port: int) -> None:
        with self._transaction() as db:
            if (
                db.execute("DELETE FROM policies WHERE identity = ? AND port = ?", (identity, port)).rowcount
                == 0
            ):
                raise RejectedError(
                    f"no policy for {identity} port {port or 'default'}",
                    code="policy_unknown",
                    hint="list policies with: meshagent authority policy list",
                )

    def policies(self, identity: str | None = None) -> list[PolicyRecord]:
        if identity is None:
            rows = self._rows("SELECT * FROM policies ORDER BY identity, port")
        else:
            rows = self._rows("SELECT * FROM policies WHERE identity = ? ORDER BY port", (identity,))
        return [
            PolicyRecord(r["identity"], r["port"], r["default_policy"], tuple(json.loads(r["allow"])))
            for r in rows
        ]


def _find_one(db: sqlite3.Connection, ref: str, verb: str) -> str:
    """The id of the host `ref` names: its id, or its name when exactly one unrevoked host has it."""
    rows = db.execute("SELECT id FROM hosts WHERE id = ?", (ref,)).fetchall()
    if not rows:
        rows = db.execute(
            "SELECT id FROM hosts WHERE host_name = ? AND revoked_at IS NULL", (ref,)
        ).fetchall()
    if not rows:
        raise RejectedError(
            f"no enrolled host with id or name {ref!r}",
            code="host_unknown",
            hint="list hosts with: meshagent authority hosts",
        )
    if len(rows) > 1:
        ids = ", ".join(r["id"] for r in rows)
        raise RejectedError(
            f"{len(rows)} hosts are named {ref!r} ({ids})",
            code="host_ambiguous",
            hint=f"{verb} by host id instead",
        )
    return str(rows[0]["id"])
