"""The authority's registry of join tokens and enrolled hosts.

One small interface (`Registry`), its rules written once over SQL (`SqlRegistry`), and two
backends: SQLite in WAL mode here (the embedded default) and PostgreSQL for replicas
(storage_pg.py). Every state change is one transaction, so concurrent enrollments neither lose
nor duplicate records, and a crash mid-way leaves either the old state or the new one. Rows a
decision depends on are read `for_update` (PostgreSQL: `SELECT ... FOR UPDATE`; SQLite's
`BEGIN IMMEDIATE` already holds the whole file), so two replicas never both see a token unused.

Token consumption and host creation commit together with the signed certificate: a signing
failure leaves the token unused, and a host that lost the response can retry with the same
token *and the same key* and gets the same certificate back (SPIRE's spire#2454 burned tokens
on interrupted attestation). Renewal mirrors it: once serial S renewed, S can only fetch the
certificate it was issued (same key), and each renewal request is single-use (`renewal_proofs`).
"""

from __future__ import annotations

import atexit
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import ExitCode, MeshagentError, RejectedError
from agent.logs import get_logger

from . import events as ev
from .events import Event
from .host_meta import HostMeta, MetaInvalid, loads_meta
from .migrations import migrate_sqlite

if TYPE_CHECKING:
    from .kube_routes import RouteObject

log = get_logger("meshagent.authority")

# The reports file's schema, by PRAGMA user_version (1: the first; 2: the `state` column).
REPORTS_VERSION = 2
REPORTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS host_reports (
    host_id     TEXT PRIMARY KEY,
    received_at REAL NOT NULL,          -- the authority's clock
    report      TEXT NOT NULL           -- JSON, as health.HostReport.to_json wrote it
);
"""


# Health reports are written behind, in one statement per this many seconds per process: at
# 1,000 reports a second across replicas, a commit each would be most of the database's work.
REPORT_FLUSH_S = 1.0
_UPSERT_REPORT = (
    "INSERT INTO host_reports (host_id, received_at, report, state) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (host_id) DO UPDATE SET received_at = excluded.received_at, report = excluded.report,"
    " state = excluded.state"
    " WHERE excluded.received_at >= host_reports.received_at"  # a replica's older one never wins
)
ReportRow = tuple[str, float, str]  # (host id, received at: Unix time, the report's JSON)
# What a host's stored report held before a batch overwrote it: (received at, state or None).
StoredState = dict[str, tuple[float, str | None]]


@dataclass(frozen=True)
class ReportChange:
    """A host's report whose state (health.report_state: version, start, readiness, probes)
    differs from the one stored before it, found when the batch holding it was written."""

    host_id: str
    old_state: str
    new_state: str
    received_at: float
    report: str  # the new report's JSON


class ReportBuffer:
    """The last report of each host, kept in memory and written by `write` in one batch at most
    every `interval` seconds: a report is written at once (by its caller) when no batch was in
    the last interval, otherwise by a thread of its own (started by the first report) at the end
    of the interval, with every other report taken meanwhile; close() writes what is left. A
    quiet fleet's reports are seen everywhere at once; a busy one costs a statement a second.

    What it costs: a process that dies loses the reports of its last interval (the agents send
    theirs again every report interval, so a host looks silent one interval longer at most),
    and other processes (replicas, `authority hosts`) see a report up to `interval` late.
    A failed write (database away) keeps the batch for the next one, unless newer reports came."""

    def __init__(
        self, write: Callable[[Sequence[ReportRow]], None], interval: float = REPORT_FLUSH_S
    ) -> None:
        self._write = write
        self._interval = interval
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one batch in flight at a time
        self._pending: dict[str, tuple[float, str]] = {}
        self._flushing: dict[str, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written_at = -float("inf")  # monotonic: when the last batch was taken

    def add(self, host_id: str, when: float, report: str) -> None:
        with self._lock:
            kept = self._pending.get(host_id)
            if kept is None or kept[0] <= when:
                self._pending[host_id] = (when, report)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="registry-reports", daemon=True)
                self._thread.start()
                atexit.register(self.close)  # a graceful stop (SIGTERM) loses nothing
            # (after close() no thread writes later: at once)
            due = self._stop.is_set() or time.monotonic() - self._written_at >= self._interval
        if due and self._flush_lock.acquire(blocking=False):
            try:
                self._flush_locked()
            except Exception as exc:  # kept for the thread's next round
                log.warning("registry.reports_unwritten", error=str(exc)[:200])
            finally:
                self._flush_lock.release()

    def unwritten(self) -> dict[str, tuple[float, str]]:
        """Reports taken but not yet committed (the batch being written, then newer ones)."""
        with self._lock:
            return {**self._flushing, **self._pending}

    def flush(self) -> None:
        """Write what is pending now, in one batch (raises what the write raised)."""
        with self._flush_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
            self._flushing = batch
            self._written_at = time.monotonic()
        try:
            if batch:
                self._write([(h, when, report) for h, (when, report) in batch.items()])
        except BaseException:
            with self._lock:
                for host_id, kept in batch.items():
                    self._pending.setdefault(host_id, kept)
            raise
        finally:
            with self._lock:
                self._flushing = {}

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self._pending:
                    self.flush()
            except Exception as exc:  # (kept for the next round; the API serves on meanwhile)
                log.warning("registry.reports_unwritten", error=str(exc)[:200], pending=len(self._pending))

    def close(self) -> None:
        """Stop the thread and write what is left (a failure is logged: those reports are lost)."""
        atexit.unregister(self.close)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.flush()
        except Exception as exc:
            log.warning("registry.reports_lost", error=str(exc)[:200], count=len(self._pending))


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
    meta: HostMeta = HostMeta()  # noqa: RUF009 - frozen; copied to the host at enrollment


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
    # The certificate before the last renewal: still valid until it expires (a revocation lists it).
    previous_serial: str | None = None

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
        meta: HostMeta | None = None,
    ) -> None: ...

    def list_tokens(self) -> list[TokenRecord]: ...

    def enroll(
        self,
        token_hash: str,
        key_fingerprint: str,
        host: NewHost,
        now: datetime,
        sign: Callable[[str], Issued],
        api_token_hash: str | None = None,
    ) -> HostRecord: ...

    def find_by_serial(self, serial: str) -> HostRecord | None: ...

    def set_api_token(self, host_id: str, token_hash: str) -> None: ...

    def find_by_api_token(self, token_hash: str) -> HostRecord | None: ...

    def renew(
        self,
        host_id: str,
        request: RenewalRequest,
        now: datetime,
        sign: Callable[[], Issued],
        api_token_hash: str | None = None,
    ) -> HostRecord: ...

    def list_hosts(self) -> list[HostRecord]: ...

    def revoke(self, ref: str, now: datetime, actor: str = "unknown") -> HostRecord: ...

    def set_host_meta(
        self,
        ref: str,
        meta: HostMeta | Callable[[HostMeta], HostMeta],
        actor: str,
        now: datetime | None = None,
    ) -> HostRecord: ...

    def host_meta(self, host_ids: Sequence[str] | None = None) -> dict[str, HostMeta]: ...

    def record_event(self, host_id: str, kind: str, detail: str, actor: str, at: datetime) -> None: ...

    def record_events(self, items: Sequence[tuple[str, str, str, str, datetime]]) -> None: ...

    def events(self, host_id: str | None = None, limit: int = ev.DEFAULT_LIMIT) -> list[Event]: ...

    def latest_events(self, host_ids: Sequence[str]) -> dict[str, Event]: ...

    def on_report_change(self, callback: Callable[[Sequence[ReportChange]], None]) -> None: ...

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

    def set_policy(self, record: PolicyRecord, actor: str = "unknown") -> None: ...

    def set_policies(self, records: Sequence[PolicyRecord], actor: str = "unknown") -> None: ...

    def remove_policy(self, identity: str, port: int, actor: str = "unknown") -> None: ...

    def policies(self, identity: str | None = None) -> list[PolicyRecord]: ...

    def put_route_objects(self, objs: Sequence[RouteObject], replace_source: str | None = None) -> None: ...

    def route_objects(self) -> list[RouteObject]: ...

    def route_policy_since(self) -> float | None: ...

    def remove_route_object(self, kind: str, namespace: str, name: str) -> bool: ...

    def record_report(
        self, host_id: str, report_json: str, at: datetime | float, state: str | None = None
    ) -> None: ...

    def reports(self) -> dict[str, tuple[float, str]]: ...

    def flush_reports(self) -> None: ...

    def data_version(self) -> int: ...

    def unexpired_serials(self, host_ids: Sequence[str], now: datetime) -> dict[str, list[str]]: ...

    def close(self) -> None: ...


class RegistryUnavailable(MeshagentError):
    """The registry's database cannot be reached (PostgreSQL down, restarting, network away).
    The API answers 503 with Retry-After; the pool reconnects by itself on a later call."""

    code = "registry_unavailable"
    exit_code = ExitCode.UNREACHABLE


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class Row(Protocol):
    """A result row by column name: sqlite3.Row or psycopg's dict_row."""

    def __getitem__(self, key: str, /) -> Any: ...


class Tx(Protocol):
    """One transaction (or, from `_read`, one read) in a backend's SQL: `?` placeholders."""

    def one(self, sql: str, params: Sequence[object] = (), *, for_update: bool = False) -> Row | None: ...

    def all(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...

    def run(self, sql: str, params: Sequence[object] = ()) -> int: ...

    def many(self, sql: str, params: Sequence[Sequence[object]]) -> None: ...

    def changed(self) -> None:
        """This transaction changes what a host's rendered document says (data_version moves)."""


def _registration(row: Row) -> Registration:
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


def _host(row: Row) -> HostRecord:
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
        previous_serial=row["previous_serial"],
    )


def _the_host(tx: Tx, host_id: str) -> HostRecord:
    row = tx.one("SELECT * FROM hosts WHERE id = ?", (host_id,))
    assert row is not None  # (read in the transaction that just wrote it)
    return _host(row)


class SqlRegistry:
    """The registry's rules, once, over a backend's transactions (SQLite or PostgreSQL)."""

    # Forgetting expired renewal proofs, in passing (PostgreSQL skips rows another renewal is
    # deleting: two purges locking the same rows in different orders would deadlock).
    _PURGE_PROOFS = "DELETE FROM renewal_proofs WHERE expires_at < ?"
    # Insertion order, for rows created at the same instant (SQLite's implicit rowid).
    _SEQ = "rowid"

    _report_buffer: ReportBuffer

    def _transaction(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def _stored_reports(self) -> dict[str, tuple[float, str]]:
        raise NotImplementedError

    def _write_reports(self, rows: Sequence[ReportRow], states: dict[str, str]) -> StoredState:
        """Upsert `rows` (with `states`), in one transaction that first reads, locked, the
        stored received_at and state of the hosts in `states`; returns what it read."""
        raise NotImplementedError

    # --- health reports (agent/authority/health.py): written behind, see ReportBuffer ------

    def _start_reports(self) -> None:
        self._report_buffer = ReportBuffer(self._flush_batch)
        # The state of each report not yet written (host -> (received at, state)): the buffer
        # holds the newest report per host, this its state, matched by received_at at write.
        self._states: dict[str, tuple[float, str]] = {}
        self._states_lock = threading.Lock()
        self._report_watchers: list[Callable[[Sequence[ReportChange]], None]] = []

    def record_report(
        self, host_id: str, report_json: str, at: datetime | float, state: str | None = None
    ) -> None:
        """Keep `report_json` (checked by health.parse_report) as the host's last report. This
        process sees it at once; others once it is flushed (REPORT_FLUSH_S). `state`
        (health.report_state) is stored beside it: when a batch is written, each report whose
        state differs from the stored one's is passed to the `on_report_change` callbacks."""
        when = at.timestamp() if isinstance(at, datetime) else float(at)
        if state is not None:
            with self._states_lock:
                held = self._states.get(host_id)
                if held is None or held[0] <= when:
                    self._states[host_id] = (when, state)
        self._report_buffer.add(host_id, when, report_json)

    def on_report_change(self, callback: Callable[[Sequence[ReportChange]], None]) -> None:
        """Call `callback` (in the writing thread, after the commit) with the reports of a
        written batch whose state changed. The stored rows are read locked in the batch's
        transaction, so across replicas each change is seen by exactly one writer."""
        self._report_watchers.append(callback)

    def _flush_batch(self, rows: Sequence[ReportRow]) -> None:
        with self._states_lock:
            states = {h: self._states[h][1] for h, when, _ in rows if self._states.get(h, (None,))[0] == when}
        old = self._write_reports(rows, states)
        with self._states_lock:
            for host_id, when, _ in rows:
                held = self._states.get(host_id)
                if held is not None and held[0] <= when:
                    del self._states[host_id]
        changes = []
        for host_id, when, report in rows:
            before = old.get(host_id)
            new_state = states.get(host_id)
            if before is None or before[1] is None or new_state is None or when < before[0]:
                continue  # a first report, an older agent's or authority's row, or a late report
            if before[1] != new_state:
                changes.append(ReportChange(host_id, before[1], new_state, when, report))
        for watcher in self._report_watchers if changes else ():
            try:
                watcher(changes)
            except Exception as exc:  # a bug there must not lose the next batches
                log.error("registry.report_change_failed", error=f"{type(exc).__name__}: {exc}"[:300])

    def reports(self) -> dict[str, tuple[float, str]]:
        """Every host's last report: host id -> (received at, Unix time; the report's JSON)."""
        found = self._stored_reports()
        for host_id, (when, report) in self._report_buffer.unwritten().items():
            if host_id not in found or found[host_id][0] <= when:
                found[host_id] = (when, report)
        return found

    def flush_reports(self) -> None:
        """Write the reports taken so far now (close() does too)."""
        self._report_buffer.flush()

    def _read(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        with self._read() as tx:
            return tx.all(sql, params)

    def _row(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        with self._read() as tx:
            return tx.one(sql, params)

    def add_token(
        self,
        token_hash: str,
        identity: str,
        now: datetime,
        expires_at: datetime,
        registration: Registration = Registration(),
        meta: HostMeta | None = None,
    ) -> None:
        """`meta`: what the enrolled host will carry (copied to it at enrollment)."""
        stored = meta.to_json() if meta is not None and not meta.empty else None
        with self._transaction() as tx:
            tx.run(
                "INSERT INTO tokens (hash, identity, created_at, expires_at, kube_labels, kube_ports,"
                " proxy_port, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    token_hash,
                    identity,
                    _ts(now),
                    _ts(expires_at),
                    *_registration_columns(registration),
                    stored,
                ),
            )

    def list_tokens(self) -> list[TokenRecord]:
        rows = self._rows(f"SELECT * FROM tokens ORDER BY created_at, {self._SEQ}")  # noqa: S608 - a class constant
        return [
            TokenRecord(
                hash=r["hash"],
                identity=r["identity"],
                created_at=datetime.fromtimestamp(r["created_at"], UTC),
                expires_at=datetime.fromtimestamp(r["expires_at"], UTC),
                used_at=_dt(r["used_at"]),
                host_id=r["host_id"],
                registration=_registration(r),
                meta=_meta(r["meta"]),
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
        api_token_hash: str | None = None,
    ) -> HostRecord:
        """Consume the token and record the host, atomically. `sign(identity)` issues the cert;
        `api_token_hash`, when given, becomes the host's bearer token in the same transaction
        (one commit per enrollment, not two). The token row is locked first: a second replica
        presenting it waits, then sees it used."""
        presigned = self._presign(token_hash, now, sign) if self._SIGN_OUTSIDE_LOCK else None
        with self._transaction() as tx:
            token = tx.one("SELECT * FROM tokens WHERE hash = ?", (token_hash,), for_update=True)
            if token is None:
                raise RejectedError(
                    "the join token is not known to this authority",
                    "create a token on this authority: meshagent authority token create",
                    code="token_unknown",
                )
            if token["used_at"] is not None:
                if token["used_by_key"] == key_fingerprint and token["host_id"]:
                    # The same host retrying with the same key: hand back what it was issued.
                    row = tx.one("SELECT * FROM hosts WHERE id = ?", (token["host_id"],))
                    if row is not None and row["revoked_at"] is None:
                        if api_token_hash is not None:
                            row = tx.one(
                                "UPDATE hosts SET api_token_hash = ? WHERE id = ? RETURNING *",
                                (api_token_hash, row["id"]),
                            )
                            assert row is not None
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
            # (A token's identity never changes: a certificate signed before the lock still fits.)
            issued = (
                presigned[1] if presigned and presigned[0] == token["identity"] else sign(token["identity"])
            )
            host_id = "h-" + secrets.token_hex(6)
            # The token's labels and ports become the host's, as stored (validated when written).
            values = (
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
                api_token_hash,
            )
            event = (
                ev.token_actor(token_hash[:12]),
                ev.clip(
                    f"as {token['identity']} from {host.host_name} ({', '.join(host.addresses)}),"
                    f" certificate {issued.serial}" + (", metadata from the token" if token["meta"] else "")
                ),
            )
            return _host(self._record_enrollment(tx, values, token_hash, now, token["meta"], event))

    # Sign before taking the write lock (SQLite: the lock is the whole file's, and a signature
    # is a third of an enrollment's time in it). PostgreSQL locks only the token's row: signing
    # under it costs nobody else anything, and reading the token first would be a round trip more.
    _SIGN_OUTSIDE_LOCK = True

    def _presign(
        self, token_hash: str, now: datetime, sign: Callable[[str], Issued]
    ) -> tuple[str, Issued] | None:
        """(identity, certificate) for a token that looks usable, read without a lock; the
        transaction checks it again and uses the certificate only if the token still fits."""
        peek = self._row("SELECT identity, used_at, expires_at FROM tokens WHERE hash = ?", (token_hash,))
        if peek is None or peek["used_at"] is not None or peek["expires_at"] <= _ts(now):
            return None
        return peek["identity"], sign(peek["identity"])

    # The columns _record_enrollment's values fill, in order.
    _HOST_COLUMNS = (
        "id, identity, host_name, addresses, serial, not_after, cert_pem, enrolled_at, key_fp,"
        " kube_labels, kube_ports, proxy_port, api_token_hash"
    )

    def _record_enrollment(
        self,
        tx: Tx,
        values: Sequence[object],
        token_hash: str,
        now: datetime,
        meta: str | None,
        event: tuple[str, str],
    ) -> Row:
        """Insert the host (`values`: _HOST_COLUMNS), mark the token used, keep the serial, and
        mark the registry changed (a new host is in the catalog); copy the token's metadata
        (`meta`, JSON or None) and record the `enrolled` event ((actor, detail)); the host's row."""
        row = tx.one(
            f"INSERT INTO hosts ({self._HOST_COLUMNS}) VALUES ({', '.join('?' * 13)}) RETURNING *",  # noqa: S608 - constants
            values,
        )
        assert row is not None
        host_id, serial, not_after, key_fp = values[0], values[4], values[5], values[8]
        tx.run(
            "UPDATE tokens SET used_at = ?, used_by_key = ?, host_id = ? WHERE hash = ?",
            (_ts(now), key_fp, host_id, token_hash),
        )
        # (A new host has no expired certificates to forget: no DELETE here.)
        tx.run(
            "INSERT INTO host_certificates (serial, host_id, not_after) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (serial, host_id, not_after),
        )
        if meta is not None:
            tx.run(
                "INSERT INTO host_meta (host_id, meta, updated_at) VALUES (?, ?, ?)",
                (host_id, meta, _ts(now)),
            )
        # (A new host has no events to prune.)
        tx.run(
            "INSERT INTO host_events (host_id, at, kind, detail, actor) VALUES (?, ?, ?, ?, ?)",
            (host_id, _ts(now), ev.ENROLLED, event[1], event[0]),
        )
        tx.changed()
        return row

    @staticmethod
    def _issued(tx: Tx, host_id: str, issued: Issued, now: datetime) -> None:
        """Keep the serial until the certificate expires (a revocation lists them all); forget
        the host's expired ones in passing."""
        tx.run(
            "INSERT INTO host_certificates (serial, host_id, not_after) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (issued.serial, host_id, _ts(issued.not_after)),
        )
        tx.run("DELETE FROM host_certificates WHERE host_id = ? AND not_after <= ?", (host_id, _ts(now)))

    def unexpired_serials(self, host_ids: Sequence[str], now: datetime) -> dict[str, list[str]]:
        """Every certificate issued to these hosts that has not expired at `now`, oldest first."""
        found: dict[str, list[str]] = {h: [] for h in host_ids}
        if not host_ids:
            return found
        marks = ", ".join("?" for _ in host_ids)
        rows = self._rows(
            # Only placeholders are formatted in: the ids are parameters.
            f"SELECT host_id, serial FROM host_certificates WHERE host_id IN ({marks}) AND not_after > ?"  # noqa: S608
            " ORDER BY host_id, not_after",
            (*host_ids, _ts(now)),
        )
        for row in rows:
            found[row["host_id"]].append(row["serial"])
        return found

    def set_api_token(self, host_id: str, token_hash: str) -> None:
        with self._transaction() as tx:
            tx.run("UPDATE hosts SET api_token_hash = ? WHERE id = ?", (token_hash, host_id))

    def find_by_api_token(self, token_hash: str) -> HostRecord | None:
        row = self._row("SELECT * FROM hosts WHERE api_token_hash = ?", (token_hash,))
        return None if row is None else _host(row)

    def find_by_serial(self, serial: str) -> HostRecord | None:
        row = self._row("SELECT * FROM hosts WHERE serial = ? OR previous_serial = ?", (serial, serial))
        return None if row is None else _host(row)

    def renew(
        self,
        host_id: str,
        request: RenewalRequest,
        now: datetime,
        sign: Callable[[], Issued],
        api_token_hash: str | None = None,
    ) -> HostRecord:
        """Renew `host_id` from its current certificate, or hand back what its previous one was
        issued (the answer was lost). `sign()` issues the new certificate, inside the transaction;
        `api_token_hash`, when given, becomes the host's bearer token in the same transaction.

        Two rules make a captured request worthless (issue #15): each request is answered once
        (its proof is kept until its timestamp leaves the freshness window, so the table stays
        small), and the previous serial never gets a *new* certificate, only the current one and
        only for the same key. Either alone leaves a hole: proofs alone let the old key renew
        again with a fresh signature; serial binding alone lets an exact replay rotate the
        host's token away from it. The host row is locked first: the same request at two
        replicas is answered by one, the other then finds its proof.
        """
        with self._transaction() as tx:
            row = tx.one("SELECT * FROM hosts WHERE id = ?", (host_id,), for_update=True)
            tx.run(self._PURGE_PROOFS, (_ts(now),))
            if tx.one("SELECT 1 FROM renewal_proofs WHERE digest = ?", (request.proof,)):
                raise RejectedError(
                    "this renewal request was already answered: a request is single-use",
                    "a replayed or duplicated request; the host renews by itself with a new one "
                    "(meshagent renew)",
                    code="renewal_replayed",
                )
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
            tx.run(
                "INSERT INTO renewal_proofs (digest, host_id, expires_at) VALUES (?, ?, ?)",
                (request.proof, host_id, _ts(request.proof_expires_at)),
            )
            if retry:  # the answer was lost: the same certificate again, nothing re-signed
                if api_token_hash is not None:
                    row = tx.one(
                        "UPDATE hosts SET api_token_hash = ? WHERE id = ? RETURNING *",
                        (api_token_hash, host_id),
                    )
                    assert row is not None
                return _host(row)
            issued = sign()
            renewed = tx.one(
                "UPDATE hosts SET serial = ?, previous_serial = ?, not_after = ?, cert_pem = ?,"
                " last_renewal = ?, key_fp = ?, api_token_hash = COALESCE(?, api_token_hash)"
                " WHERE id = ? RETURNING *",
                (
                    issued.serial,
                    presented,
                    _ts(issued.not_after),
                    issued.cert_pem,
                    _ts(now),
                    request.key_fingerprint,
                    api_token_hash,
                    host_id,
                ),
            )
            assert renewed is not None  # (the row is locked: it exists)
            self._issued(tx, host_id, issued, now)
            _add_event(
                tx,
                host_id,
                ev.RENEWED,
                f"certificate {presented} -> {issued.serial}, valid until {issued.not_after.isoformat()}",
                ev.ACTOR_AGENT,
                now,
            )
            # No tx.changed(): nothing any host's directory renders moves. The catalog names no
            # serial, and the revoked list names the serials of revoked hosts only, which never
            # renew (refused above, the row locked); their revocation bumps the version and is
            # rendered with the serials current then.
            return _host(renewed)

    def list_hosts(self) -> list[HostRecord]:
        rows = self._rows(f"SELECT * FROM hosts ORDER BY enrolled_at, {self._SEQ}")  # noqa: S608 - a class constant
        return [_host(r) for r in rows]

    def revoke(self, ref: str, now: datetime, actor: str = "unknown") -> HostRecord:
        """Revoke by host id, or by host name when exactly one unrevoked host has it. The first
        revocation is recorded as a `revoked` event by `actor`; revoking again changes nothing."""
        with self._transaction() as tx:
            host_id = _find_one(tx, ref, "revoke")
            if tx.run(
                "UPDATE hosts SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (_ts(now), host_id)
            ):
                _add_event(tx, host_id, ev.REVOKED, "", actor, now)
            tx.changed()
            return _the_host(tx, host_id)

    # --- the service catalog: metadata and the change log (#20) -----------------------------

    def set_host_meta(
        self,
        ref: str,
        meta: HostMeta | Callable[[HostMeta], HostMeta],
        actor: str,
        now: datetime | None = None,
    ) -> HostRecord:
        """Replace the metadata of the host `ref` (id, or unique unrevoked name) with `meta`, or
        with `meta(current)` (an edit: read and written in one transaction, the host's row
        locked; it may refuse by raising), recording `metadata_changed` (which fields) by
        `actor` when it differs. No host's directory renders metadata: data_version does not
        move, no long poll wakes."""
        now = now or datetime.now(UTC)
        with self._transaction() as tx:
            host_id = _find_one(tx, ref, "set its metadata")
            tx.one("SELECT id FROM hosts WHERE id = ?", (host_id,), for_update=True)
            row = tx.one("SELECT meta FROM host_meta WHERE host_id = ?", (host_id,))
            before = _meta(row["meta"] if row else None)
            if callable(meta):
                meta = meta(before)
            if before != meta:
                tx.run(
                    "INSERT INTO host_meta (host_id, meta, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (host_id) DO UPDATE"
                    " SET meta = excluded.meta, updated_at = excluded.updated_at",
                    (host_id, meta.to_json(), _ts(now)),
                )
                _add_event(tx, host_id, ev.METADATA_CHANGED, _meta_change(before, meta), actor, now)
            return _the_host(tx, host_id)

    def host_meta(self, host_ids: Sequence[str] | None = None) -> dict[str, HostMeta]:
        """host id -> its metadata (HostMeta() when it has none): of `host_ids`, or every host."""
        if host_ids is None:
            rows = self._rows(
                "SELECT h.id AS host_id, m.meta FROM hosts h LEFT JOIN host_meta m ON m.host_id = h.id"
            )
            return {r["host_id"]: _meta(r["meta"]) for r in rows}
        found = {h: HostMeta() for h in host_ids}
        ids = list(found)
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            marks = ", ".join("?" for _ in chunk)
            for r in self._rows(f"SELECT host_id, meta FROM host_meta WHERE host_id IN ({marks})", chunk):  # noqa: S608 - placeholders only
                found[r["host_id"]] = _meta(r["meta"])
        return found

    def record_event(self, host_id: str, kind: str, detail: str, actor: str, at: datetime) -> None:
        """Add an event to `host_id`'s log (keeping its newest events.RETAINED_PER_HOST)."""
        self.record_events([(host_id, kind, detail, actor, at)])

    def record_events(self, items: Sequence[tuple[str, str, str, str, datetime]]) -> None:
        """Add events ((host_id, kind, detail, actor, at) each) in one transaction: a batch of
        reports can change thousands of hosts at once (a fleet-wide agent upgrade)."""
        if not items:
            return
        with self._transaction() as tx:
            for host_id, kind, detail, actor, at in items:
                _add_event(tx, host_id, kind, detail, actor, at)

    def events(self, host_id: str | None = None, limit: int = ev.DEFAULT_LIMIT) -> list[Event]:
        """The newest `limit` events (of `host_id`, or of every host), newest first: in the
        order they were recorded."""
        limit = max(1, min(int(limit), ev.MAX_LIMIT))
        if host_id is None:
            rows = self._rows("SELECT * FROM host_events ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._rows(
                "SELECT * FROM host_events WHERE host_id = ? ORDER BY id DESC LIMIT ?", (host_id, limit)
            )
        return [_event(r) for r in rows]

    def latest_events(self, host_ids: Sequence[str]) -> dict[str, Event]:
        """Each host's newest event (a host without any is left out), one query per 500 hosts:
        the fleet list's "last change" without a query per host."""
        found: dict[str, Event] = {}
        ids = list(dict.fromkeys(host_ids))
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            marks = ", ".join("?" for _ in chunk)
            rows = self._rows(
                "SELECT * FROM host_events WHERE id IN"  # noqa: S608 - placeholders only
                f" (SELECT max(id) FROM host_events WHERE host_id IN ({marks}) GROUP BY host_id)",
                chunk,
            )
            found.update((r["host_id"], _event(r)) for r in rows)
        return found

    def update_registration(self, ref: str, change: Callable[[HostRecord], Registration]) -> HostRecord:
        """Replace the labels/ports of the host `ref` (id, or unique unrevoked name) with
        `change(host)`, in one transaction: `change` may refuse by raising, and nothing is written."""
        with self._transaction() as tx:
            host_id = _find_one(tx, ref, "edit it")
            row = tx.one("SELECT * FROM hosts WHERE id = ?", (host_id,), for_update=True)
            assert row is not None
            host = _host(row)
            if host.revoked:
                raise RejectedError(
                    f"host {ref!r} ({host.id}) is revoked",
                    "enroll it again with a new join token; revoked hosts are not exported",
                    code="host_revoked",
                )
            tx.run(
                "UPDATE hosts SET kube_labels = ?, kube_ports = ?, proxy_port = ? WHERE id = ?",
                (*_registration_columns(change(host)), host_id),
            )
            tx.changed()
            return _the_host(tx, host_id)

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
        with self._transaction() as tx:
            tx.run(
                "INSERT INTO catalog (id, cidr, ports, identity, created_at, opaque_port)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (entry.id, cidr, json.dumps(list(ports)), identity, _ts(now), opaque_port),
            )
            tx.changed()
        return entry

    def remove_static_entry(self, entry_id: str) -> None:
        with self._transaction() as tx:
            if tx.run("DELETE FROM catalog WHERE id = ?", (entry_id,)) == 0:
                raise RejectedError(
                    f"no catalog entry {entry_id!r}",
                    code="entry_unknown",
                    hint="list entries with: meshagent authority catalog list",
                )
            tx.changed()

    def static_entries(self) -> list[StaticEntry]:
        rows = self._rows(f"SELECT * FROM catalog ORDER BY created_at, {self._SEQ}")  # noqa: S608 - a class constant
        return [
            StaticEntry(r["id"], r["cidr"], tuple(json.loads(r["ports"])), r["identity"], r["opaque_port"])
            for r in rows
        ]

    def set_policy(self, record: PolicyRecord, actor: str = "unknown") -> None:
        self.set_policies([record], actor)

    def set_policies(self, records: Sequence[PolicyRecord], actor: str = "unknown") -> None:
        """Add or replace every record in one transaction: all of them are stored, or none.
        Each enrolled host of an identity whose policy this changes gets a `policy_changed`
        event by `actor` (a record equal to the stored one changes nothing, logs nothing)."""
        with self._transaction() as tx:
            identities = sorted({r.identity for r in records})
            stored: dict[tuple[str, int], tuple[str, tuple[str, ...]]] = {}
            for i in range(0, len(identities), _CHUNK):
                chunk = identities[i : i + _CHUNK]
                marks = ", ".join("?" for _ in chunk)
                for row in tx.all(f"SELECT * FROM policies WHERE identity IN ({marks})", chunk):  # noqa: S608
                    stored[(row["identity"], row["port"])] = (
                        row["default_policy"],
                        tuple(json.loads(row["allow"])),
                    )
            tx.many(
                "INSERT INTO policies (identity, port, default_policy, allow) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (identity, port) DO UPDATE"
                " SET default_policy = excluded.default_policy, allow = excluded.allow",
                [(r.identity, r.port, r.default_policy, json.dumps(list(r.allow))) for r in records],
            )
            tx.changed()
            changes: dict[str, list[str]] = {}
            for r in records:
                before = stored.get((r.identity, r.port))
                if before != (r.default_policy, r.allow):
                    was = f"{before[0]} ({len(before[1])} allowed)" if before else "none"
                    now = f"{r.default_policy} ({len(r.allow)} allowed)"
                    changes.setdefault(r.identity, []).append(f"{_port_name(r.port)}: {was} -> {now}")
            for identity, lines in changes.items():
                _add_identity_event(tx, identity, ev.POLICY_CHANGED, "; ".join(lines), actor)

    def remove_policy(self, identity: str, port: int, actor: str = "unknown") -> None:
        with self._transaction() as tx:
            if tx.run("DELETE FROM policies WHERE identity = ? AND port = ?", (identity, port)) == 0:
                raise RejectedError(
                    f"no policy for {identity} port {port or 'default'}",
                    code="policy_unknown",
                    hint="list policies with: meshagent authority policy list",
                )
            tx.changed()
            _add_identity_event(tx, identity, ev.POLICY_CHANGED, f"{_port_name(port)}: removed", actor)

    def policies(self, identity: str | None = None) -> list[PolicyRecord]:
        if identity is None:
            rows = self._rows("SELECT * FROM policies ORDER BY identity, port")
        else:
            rows = self._rows("SELECT * FROM policies WHERE identity = ? ORDER BY port", (identity,))
        return [
            PolicyRecord(r["identity"], r["port"], r["default_policy"], tuple(json.loads(r["allow"])))
            for r in rows
        ]

    # --- route objects (#21, traffic policy) ---------------------------------------------

    def put_route_objects(self, objs: Sequence[RouteObject], replace_source: str | None = None) -> None:
        """Upsert `objs` in one transaction (all stored, or none). With `replace_source`, the
        stored objects of that source not in `objs` are deleted too (the controller's "the
        cluster wins"). An object without a creationTimestamp keeps the time it was first
        applied (precedence ties). The version moves only when a row changed: a controller
        putting the same objects on every resync wakes no long poll."""
        now = time.time()
        keys = {(o.kind, o.namespace, o.name) for o in objs}
        with self._transaction() as tx:
            stored = {
                (r["kind"], r["namespace"], r["name"]): r for r in tx.all("SELECT * FROM route_objects", ())
            }
            rows, changed = [], False
            for obj in objs:
                body = _canonical(obj.body)
                before = stored.get((obj.kind, obj.namespace, obj.name))
                created = obj.created_at
                if before is not None and not _has_creation_timestamp(obj.body):
                    created = float(before["created_at"])
                row = (obj.api_version, body, obj.source, created)
                if before is None or row != (
                    before["api_version"],
                    before["body"],
                    before["source"],
                    float(before["created_at"]),
                ):
                    changed = True
                rows.append(
                    (obj.kind, obj.namespace, obj.name, obj.api_version, body, obj.source, created, now)
                )
            if rows:
                tx.run(
                    "INSERT INTO route_policy (id, since) VALUES (1, ?) ON CONFLICT (id) DO NOTHING", (now,)
                )
                tx.many(
                    "INSERT INTO route_objects"
                    " (kind, namespace, name, api_version, body, source, created_at, applied_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (kind, namespace, name) DO UPDATE SET api_version = excluded.api_version,"
                    " body = excluded.body, source = excluded.source, created_at = excluded.created_at,"
                    " applied_at = excluded.applied_at",
                    rows,
                )
            gone = []
            if replace_source is not None:
                gone = [k for k, r in stored.items() if r["source"] == replace_source and k not in keys]
            if gone:
                tx.many("DELETE FROM route_objects WHERE kind = ? AND namespace = ? AND name = ?", gone)
            if changed or gone:
                tx.changed()

    def route_objects(self) -> list[RouteObject]:
        """Every stored route object, by (kind, namespace, name). A row whose body is not a JSON
        object (written by hand) is left out and logged: one bad row must not hide the others."""
        from .kube_routes import RouteObject  # (kube_routes reads the registry's records)

        objects = []
        for r in self._rows("SELECT * FROM route_objects ORDER BY kind, namespace, name"):
            try:
                body = json.loads(r["body"])
            except ValueError:
                body = None
            if not isinstance(body, dict):
                log.warning(
                    "registry.route_object_unreadable",
                    kind=r["kind"],
                    namespace=r["namespace"],
                    name=r["name"],
                )
                continue
            objects.append(
                RouteObject(
                    kind=r["kind"],
                    namespace=r["namespace"],
                    name=r["name"],
                    api_version=r["api_version"],
                    body=body,
                    source=r["source"],
                    created_at=float(r["created_at"]),
                )
            )
        return objects

    def route_policy_since(self) -> float | None:
        """When a route object was first stored (Unix time), None if never: until then the
        directory leaves `routes` out, as an authority from before #21 does."""
        row = self._row("SELECT since FROM route_policy WHERE id = 1")
        return None if row is None else float(row["since"])

    def remove_route_object(self, kind: str, namespace: str, name: str) -> bool:
        """Delete one stored object; False when there was none (nothing changes then)."""
        with self._transaction() as tx:
            found = (
                tx.run(
                    "DELETE FROM route_objects WHERE kind = ? AND namespace = ? AND name = ?",
                    (kind, namespace, name),
                )
                > 0
            )
            if found:
                tx.changed()
        return found


def _canonical(body: Any) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _has_creation_timestamp(body: Any) -> bool:
    metadata = body.get("metadata") if isinstance(body, dict) else None
    return isinstance(metadata, dict) and bool(metadata.get("creationTimestamp"))


_CHUNK = 500  # ids per IN (...) list: SQLite's default limit is 32,766 parameters


def _meta(text: str | None) -> HostMeta:
    """Stored metadata; HostMeta() for none, or for a row altered by hand that no longer parses."""
    if not text:
        return HostMeta()
    try:
        return loads_meta(text)
    except (MetaInvalid, ValueError, RecursionError):
        log.warning("registry.meta_unreadable", length=len(text))
        return HostMeta()


def _event(row: Row) -> Event:
    return Event(
        int(row["id"]),
        row["host_id"],
        datetime.fromtimestamp(row["at"], UTC),
        row["kind"],
        row["detail"],
        row["actor"],
    )


def _add_event(tx: Tx, host_id: str, kind: str, detail: str, actor: str, at: datetime) -> None:
    """Insert an event and forget the host's events beyond the newest RETAINED_PER_HOST (an
    index range: host_events_by_host)."""
    if kind not in ev.KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    tx.run(
        "INSERT INTO host_events (host_id, at, kind, detail, actor) VALUES (?, ?, ?, ?, ?)",
        (host_id, _ts(at), kind, ev.clip(detail), actor[:200]),
    )
    tx.run(
        "DELETE FROM host_events WHERE host_id = ? AND id <= (SELECT id FROM host_events WHERE host_id = ?"
        " ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (host_id, host_id, ev.RETAINED_PER_HOST),
    )


def _port_name(port: int) -> str:
    return f"port {port}" if port else "default"


def _add_identity_event(tx: Tx, identity: str, kind: str, detail: str, actor: str) -> None:
    """An event for every unrevoked host of `identity` (two statements whatever their number),
    keeping each one's newest RETAINED_PER_HOST."""
    tx.run(
        "INSERT INTO host_events (host_id, at, kind, detail, actor)"
        " SELECT id, ?, ?, ?, ? FROM hosts WHERE identity = ? AND revoked_at IS NULL",
        (time.time(), kind, ev.clip(detail), actor[:200], identity),
    )
    tx.run(
        "DELETE FROM host_events WHERE id IN (SELECT id FROM (SELECT e.id, row_number() OVER"
        " (PARTITION BY e.host_id ORDER BY e.id DESC) AS n FROM host_events e"
        " JOIN hosts h ON h.id = e.host_id WHERE h.identity = ? AND h.revoked_at IS NULL) AS ranked"
        " WHERE n > ?)",
        (identity, ev.RETAINED_PER_HOST),
    )


def _meta_change(before: HostMeta, after: HostMeta) -> str:
    """Which fields changed, for the event: 'owner_team: "a" -> "b"; slos: ...'."""
    old, new = before.to_doc(), after.to_doc()
    parts = []
    for key in new:
        if old[key] == new[key]:
            continue
        if key == "slos":
            parts.append(
                "slos: "
                + (", ".join(s.spec() for s in before.slos) or "none")
                + " -> "
                + (", ".join(s.spec() for s in after.slos) or "none")
            )
        elif key == "links":
            parts.append("links: " + (", ".join(t for t, _ in after.links) or "none"))
        elif key == "description":
            parts.append("description changed")
        else:
            parts.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return "; ".join(parts)


def _find_one(tx: Tx, ref: str, verb: str) -> str:
    """The id of the host `ref` names: its id, or its name when exactly one unrevoked host has it."""
    rows = tx.all("SELECT id FROM hosts WHERE id = ?", (ref,))
    if not rows:
        rows = tx.all("SELECT id FROM hosts WHERE host_name = ? AND revoked_at IS NULL", (ref,))
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


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.bumped = False

    def one(self, sql: str, params: Sequence[object] = (), *, for_update: bool = False) -> Row | None:
        # (for_update: the IMMEDIATE transaction already holds the file's write lock.) fetchall:
        # the statement runs to its end, so an INSERT ... RETURNING is not left in progress.
        rows: list[sqlite3.Row] = self.db.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def all(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return list(self.db.execute(sql, params).fetchall())

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        return self.db.execute(sql, params).rowcount

    def many(self, sql: str, params: Sequence[Sequence[object]]) -> None:
        self.db.executemany(sql, params)

    def changed(self) -> None:
        if not self.bumped:  # (once per transaction; SQLite has one writer at a time anyway)
            self.db.execute("UPDATE registry_version SET version = version + 1 WHERE id = 1")
            self.bumped = True


SQLITE_BUSY_WAIT_S = 30.0


def _open_wal(path: Path) -> sqlite3.Connection:
    """A connection to `path` in WAL mode that waits up to SQLITE_BUSY_WAIT_S for other openers.

    Switching the journal mode can answer SQLITE_BUSY at once, without calling the busy handler
    (while another connection runs WAL recovery, or the last one closing checkpoints and removes
    the WAL): replicas starting together on one file saw "database is locked" here. The mode is
    persistent, so retrying until it is set is safe."""
    db = sqlite3.connect(path, timeout=SQLITE_BUSY_WAIT_S, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_WAIT_S * 1000)}")
    deadline = time.monotonic() + SQLITE_BUSY_WAIT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return db
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.05)


class SqliteRegistry(SqlRegistry):
    """The registry in one SQLite file (WAL: readers never block the writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection serves the event loop and worker threads (asyncio.to_thread): a
        # transaction begun on one thread must not interleave with another thread's statements
        # ("cannot start a transaction within a transaction"). Reentrant: callbacks run inside.
        self._lock = threading.RLock()
        self._db = _open_wal(path)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
        migrate_sqlite(self._db)
        self._watch = sqlite3.connect(
            path, timeout=SQLITE_BUSY_WAIT_S, isolation_level=None, check_same_thread=False
        )
        self._watch_lock = threading.Lock()
        self._reports = self._open_reports()
        self._reports_lock = threading.Lock()
        self._start_reports()

    def close(self) -> None:
        self._report_buffer.close()
        with self._lock, self._watch_lock, self._reports_lock:
            self._db.close()
            self._watch.close()
            self._reports.close()

    @contextmanager
    def _read(self) -> Iterator[Tx]:
        with self._lock:
            yield _SqliteTx(self._db)

    @contextmanager
    def _transaction(self) -> Iterator[Tx]:
        # IMMEDIATE: take the write lock up front so two writers never both read "unused".
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- health reports (agent/authority/health.py) --------------------------------------

    def _open_reports(self) -> sqlite3.Connection:
        """The agents' health reports, in a file of their own beside the registry: a report
        every interval from every host must not take the registry's write lock."""
        path = self.path.with_name(self.path.stem + "-reports" + self.path.suffix)
        db = _open_wal(path)
        db.execute("PRAGMA synchronous=NORMAL")  # a lost report is resent within an interval
        if db.execute("PRAGMA user_version").fetchone()[0] < REPORTS_VERSION:
            db.execute("BEGIN IMMEDIATE")  # (two openers may race: the second finds it done)
            try:
                db.execute(REPORTS_SCHEMA)
                columns = {r[1] for r in db.execute("PRAGMA table_info(host_reports)")}
                if "state" not in columns:  # version 2: the report's state (health.report_state)
                    db.execute("ALTER TABLE host_reports ADD COLUMN state TEXT")
                db.execute(f"PRAGMA user_version = {REPORTS_VERSION}")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return db

    def _write_reports(self, rows: Sequence[ReportRow], states: dict[str, str]) -> StoredState:
        old: StoredState = {}
        with self._reports_lock:
            self._reports.execute("BEGIN IMMEDIATE")
            try:
                ids = list(states)
                for i in range(0, len(ids), _CHUNK):
                    chunk = ids[i : i + _CHUNK]
                    marks = ", ".join("?" for _ in chunk)
                    for host_id, received_at, state in self._reports.execute(
                        f"SELECT host_id, received_at, state FROM host_reports WHERE host_id IN ({marks})",  # noqa: S608
                        chunk,
                    ):
                        old[host_id] = (float(received_at), state)
                self._reports.executemany(_UPSERT_REPORT, [(h, w, r, states.get(h)) for h, w, r in rows])
            except BaseException:
                self._reports.execute("ROLLBACK")
                raise
            self._reports.execute("COMMIT")
        return old

    def _stored_reports(self) -> dict[str, tuple[float, str]]:
        with self._reports_lock:
            rows = self._reports.execute("SELECT host_id, received_at, report FROM host_reports").fetchall()
        return {str(r[0]): (float(r[1]), str(r[2])) for r in rows}

    def data_version(self) -> int:
        """The registry_version row, bumped by every transaction that changes what a host's
        directory renders, by this process or another sharing the file (renewals, tokens, API
        tokens and health reports do not move it). Read on a connection of its own, so a render
        never queues behind a write transaction. Compare for inequality."""
        with self._watch_lock:
            row = self._watch.execute("SELECT version FROM registry_version WHERE id = 1").fetchone()
        return int(row[0])
