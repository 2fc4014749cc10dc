"""The registry on PostgreSQL: several `authority serve` replicas share one database.

The rules are storage.SqlRegistry's; this module supplies transactions over a psycopg 3
connection pool. What replicas need beyond SQLite:
- rows a decision depends on are locked (`SELECT ... FOR UPDATE`): a join token presented at two
  replicas at once is consumed by one, the other then finds it used;
- `data_version` is the sum of counter rows (migrations.VERSION_SLOTS), one of them bumped by
  every transaction that changes a rendered document, so each replica's long-poll watch sees
  every replica's writes without all their commits queueing on one row (health reports are
  their own table, written behind in one statement a second: storage.ReportBuffer);
- an enrollment is four round trips: BEGIN, the token locked, one statement (CTEs) inserting
  the host with its API token, marking the token used, keeping the serial and bumping a slot,
  COMMIT; psycopg prepares statements a connection repeats (its prepare_threshold);
- the database going away is `RegistryUnavailable` (the API answers 503), and the pool checks a
  connection before lending it, so the first call after PostgreSQL is back simply works.

psycopg is imported here only: SQLite authorities and hosts never need it.
"""

from __future__ import annotations

import logging
import random
import select
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent.errors import MeshagentError
from agent.logs import get_logger

from .events import ENROLLED
from .migrations import VERSION_SLOTS, migrate_postgres
from .storage import RegistryUnavailable, ReportRow, Row, SqlRegistry, StoredState, Tx

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

log = get_logger("meshagent.authority")

INSTALL_HINT = "install the PostgreSQL extra: pip install 'meshagent[postgresql]'"
# A request waits this long for a connection before the API answers 503: clients retry.
POOL_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 3  # libpq's connect_timeout: a blackholed server fails fast too
# Per process (each uvicorn worker has its own pool): the API's 8 registry threads plus the
# directory watch's own thread and one spare, so a busy API never starves the watch of a
# connection (a pool timeout would read as "the database is away").
POOL_MAX = 10
# The pool's reconnection backoff doubles without bound (1, 2, 4, ... 64 s): after a long outage
# it could wait a minute after PostgreSQL is back. Giving up an attempt after this long (tries at
# 0 and ~1 s) lets the next request start a new one at once: the pool is back within about a
# second of PostgreSQL, whatever the outage's length.
RECONNECT_GIVE_UP_S = 2.0
# While the database is away (the last attempt failed), one caller per BREAKER_S probes, waiting
# PROBE_TIMEOUT_S for a connection; every other one fails at once, so no request is held 3 s.
BREAKER_S = 1.0
PROBE_TIMEOUT_S = 0.5


class PostgresMissing(MeshagentError):
    code = "postgresql_missing"


def _psycopg() -> tuple[Any, Any]:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise PostgresMissing(
            f"the authority's database is PostgreSQL but psycopg is not installed ({exc.name})",
            INSTALL_HINT,
        ) from None
    return psycopg, psycopg_pool


def describe(url: str) -> str:
    """Where the URL points, for messages: host (or socket dir), port, database; never a password."""
    pg, _ = _psycopg()
    try:
        params = pg.conninfo.conninfo_to_dict(url)
    except pg.ProgrammingError:
        return "(an unparsable URL)"
    host = params.get("host") or "the default socket"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{host}{port}/{params.get('dbname') or params.get('user') or ''}"


def _ended_by_server(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server ended this idle connection (a shutdown's FATAL message, or EOF after a
    crash), without a round trip: an idle connection has nothing to read otherwise. (psycopg_pool's
    check_connection sends a query, tripling the cost of every registry call, and backs off a
    second before trying another connection.)"""
    if conn.closed or conn.broken:
        return True
    # poll, not select: select() refuses descriptors above 1023, which an authority holding
    # thousands of long polls hands to the connections its pool opens later.
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.bump = False

    @staticmethod
    def _sql(sql: str) -> bytes:
        # The shared SQL uses `?`; psycopg's placeholders are %s (no literal % or ? in our SQL).
        return sql.replace("?", "%s").encode()

    def one(self, sql: str, params: Sequence[object] = (), *, for_update: bool = False) -> Row | None:
        query = sql + " FOR UPDATE" if for_update else sql
        row: Row | None = self.conn.execute(self._sql(query), params).fetchone()
        return row

    def all(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return list(self.conn.execute(self._sql(sql), params).fetchall())

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        return self.conn.execute(self._sql(sql), params).rowcount

    def many(self, sql: str, params: Sequence[Sequence[object]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self._sql(sql), params)

    def changed(self) -> None:
        self.bump = True


class PostgresRegistry(SqlRegistry):
    """The registry in a PostgreSQL database (libpq URL), shared by any number of replicas."""

    _SEQ = "seq"
    _SIGN_OUTSIDE_LOCK = False  # (only the token's row is locked while signing)
    _PURGE_PROOFS = (
        "DELETE FROM renewal_proofs WHERE digest IN"
        " (SELECT digest FROM renewal_proofs WHERE expires_at < ? FOR UPDATE SKIP LOCKED)"
    )

    def __init__(self, url: str, pool_max: int = POOL_MAX) -> None:
        pg, pool = _psycopg()
        # The pool logs every failed reconnection attempt unstructured; registry.unavailable
        # (below) says it once per failed call instead.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self.url = url
        self.where = describe(url)
        self._down = False  # the last attempt failed: only probes wait for a connection
        self._next_probe = 0.0  # monotonic: no probe before then
        self._down_reason = ""
        self._probe = threading.Lock()
        self._errors: tuple[type[BaseException], ...] = (pg.OperationalError, pool.PoolTimeout)
        self._pool: psycopg_pool.ConnectionPool[Any] = pool.ConnectionPool(
            url,
            min_size=1,
            max_size=pool_max,
            open=False,
            timeout=POOL_TIMEOUT_S,
            reconnect_timeout=RECONNECT_GIVE_UP_S,
            kwargs={
                "autocommit": True,
                "row_factory": pg.rows.dict_row,
                "connect_timeout": CONNECT_TIMEOUT_S,
                "application_name": "meshagent-authority",
            },
            name="meshagent-registry",
        )
        # Migrations on a connection of their own: at start, libpq's own words say what is wrong
        # (refused, no such database, authentication) rather than the pool's timeout.
        with self._unavailable_as_error():
            with pg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                migrate_postgres(conn)
            self._pool.open(wait=False)
        self._start_reports()

    def close(self) -> None:
        self._report_buffer.close()
        self._pool.close()

    def _unavailable(self, reason: str) -> RegistryUnavailable:
        return RegistryUnavailable(
            f"the authority cannot reach its database at {self.where}: {reason[:300]}",
            "it retries on every request, nothing was changed: try again in a moment. Operators: "
            "check that PostgreSQL is running and reachable (pg_isready) and the URL given by "
            "--database, MESHAGENT_AUTHORITY_DATABASE or the authority directory's database.url",
        )

    @contextmanager
    def _unavailable_as_error(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, self._errors[1]):  # PoolTimeout: no connection could be made
                first = "no connection could be made"
            if not self._down:
                self._down, self._next_probe = True, time.monotonic() + BREAKER_S
            self._down_reason = first
            log.warning("registry.unavailable", database=self.where, error=first[:200])
            raise self._unavailable(first) from None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection the server has not ended: after a PostgreSQL restart, the pool's
        idle connections are dead; each is closed here (the pool replaces it) and the next taken.

        While the database is away, registry calls must not each wait for a connection: once an
        attempt failed, one caller per BREAKER_S probes with a short wait and every other one
        fails at once (the API's 503 arrives in time), until a probe gets a connection."""
        timeout = POOL_TIMEOUT_S
        probing = False
        if self._down:
            # Half open: one probe a BREAKER_S at most, with a short wait; every other caller
            # fails at once until a probe gets a connection.
            now = time.monotonic()
            if now < self._next_probe or not self._probe.acquire(blocking=False):
                raise self._unavailable(self._down_reason)
            self._next_probe = now + BREAKER_S
            probing, timeout = True, PROBE_TIMEOUT_S
        try:
            for _ in range(self._pool.max_size + 1):
                with self._pool.connection(timeout=timeout) as conn:
                    if _ended_by_server(conn):
                        conn.close()
                        continue
                    self._down = False
                    yield conn
                    return
        finally:
            if probing:
                self._probe.release()
        raise RegistryUnavailable(
            f"the authority's connections to {self.where} keep being closed by the server",
            "check PostgreSQL's log (restarting, or terminating connections)",
        )

    @contextmanager
    def _read(self) -> Iterator[Tx]:
        with self._unavailable_as_error(), self._connection() as conn:
            yield _PgTx(conn)

    @contextmanager
    def _transaction(self) -> Iterator[Tx]:
        with self._unavailable_as_error(), self._connection() as conn, conn.transaction():
            tx = _PgTx(conn)
            yield tx
            if tx.bump:
                # Last: the slot's lock is held only from here to the commit. Slot 1, the row a
                # replica from before migration 3 reads alone: during a rolling upgrade it still
                # sees revocations and policy changes at once. Only enrollments, the frequent
                # writers, spread over the slots.
                conn.execute(_BUMP, (1,))

    # One statement: the host (with its API token), the token used, the serial kept, a version
    # slot bumped (a new host is in every directory's catalog). Data-modifying CTEs all run, each
    # once, whether or not the outer query reads them.
    # The token's metadata and the `enrolled` event ride along (#20): still one statement.
    _ENROLL = (
        f"WITH host AS (INSERT INTO hosts ({SqlRegistry._HOST_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})"  # noqa: S608
        " RETURNING *),"
        " used AS (UPDATE tokens SET used_at = %s, used_by_key = %s, host_id = %s WHERE hash = %s),"
        " kept AS (INSERT INTO host_certificates (serial, host_id, not_after) VALUES (%s, %s, %s)"
        " ON CONFLICT DO NOTHING),"
        " meta AS (INSERT INTO host_meta (host_id, meta, updated_at)"
        " SELECT %s, m, %s FROM (SELECT %s::text AS m) AS given WHERE m IS NOT NULL),"
        " event AS (INSERT INTO host_events (host_id, at, kind, detail, actor) VALUES (%s, %s, %s, %s, %s)),"
        " bumped AS (UPDATE registry_version SET version = version + 1 WHERE id = %s)"
        " SELECT * FROM host"
    ).encode()

    def _record_enrollment(
        self,
        tx: Tx,
        values: Sequence[object],
        token_hash: str,
        now: datetime,
        meta: str | None,
        event: tuple[str, str],
    ) -> Row:
        assert isinstance(tx, _PgTx)
        host_id, serial, not_after, key_fp = values[0], values[4], values[5], values[8]
        at = now.timestamp()
        params = (
            *values,
            *(at, key_fp, host_id, token_hash),
            *(serial, host_id, not_after),
            *(host_id, at, meta),
            *(host_id, at, ENROLLED, event[1], event[0]),
            _slot(),
        )
        row: Row | None = tx.conn.execute(self._ENROLL, params).fetchone()
        assert row is not None
        return row

    # --- health reports: a table of their own, outside data_version ------------------------

    def _write_reports(self, rows: Sequence[ReportRow], states: dict[str, str]) -> StoredState:
        """One statement for the whole batch (arrays unnested), autocommitted; when reports
        carry a state, in a transaction that first locks the stored rows of those hosts (in id
        order: two replicas' batches never deadlock on them) and reads their state."""
        params = (
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [states.get(r[0]) for r in rows],
        )
        old: StoredState = {}
        if not states:
            with self._read() as tx:
                assert isinstance(tx, _PgTx)
                tx.conn.execute(_UPSERT_REPORTS, params)
            return old
        with self._transaction() as tx:
            assert isinstance(tx, _PgTx)
            for row in tx.conn.execute(_LOCK_REPORTS, (sorted(states),)).fetchall():
                old[str(row["host_id"])] = (float(row["received_at"]), row["state"])
            tx.conn.execute(_UPSERT_REPORTS, params)
        return old

    def _stored_reports(self) -> dict[str, tuple[float, str]]:
        rows = self._rows("SELECT host_id, received_at, report FROM host_reports")
        return {str(r["host_id"]): (float(r["received_at"]), str(r["report"])) for r in rows}

    def data_version(self) -> int:
        """The sum of the version slots every replica's document-changing transactions bump
        (compare for inequality)."""
        row = self._row("SELECT sum(version) AS version FROM registry_version")
        assert row is not None  # (migration 1 inserts a row)
        return int(row["version"])


_BUMP = b"UPDATE registry_version SET version = version + 1 WHERE id = %s"
_UPSERT_REPORTS = (
    b"INSERT INTO host_reports (host_id, received_at, report, state)"
    b" SELECT * FROM unnest(%s::text[], %s::float8[], %s::text[], %s::text[])"
    b" ON CONFLICT (host_id) DO UPDATE SET received_at = excluded.received_at, report = excluded.report,"
    b" state = excluded.state"
    b" WHERE excluded.received_at >= host_reports.received_at"  # a replica's older one never wins
)
_LOCK_REPORTS = (
    b"SELECT host_id, received_at, state FROM host_reports WHERE host_id = ANY(%s::text[])"
    b" ORDER BY host_id FOR UPDATE"
)


def _slot() -> int:
    """A version slot for this transaction to bump (see migrations.VERSION_SLOTS)."""
    return random.randint(1, VERSION_SLOTS)  # noqa: S311 - spreading locks, not a secret
