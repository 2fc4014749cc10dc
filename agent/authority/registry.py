"""Which registry an authority directory uses, and opening it.

Resolution, first that applies: the `--database` URL, the environment's
MESHAGENT_AUTHORITY_DATABASE, the URL `authority init --database` recorded in the directory
(`database.url`), and otherwise SQLite at `<directory>/registry.db`. A `postgresql://` URL
(libpq's form: `postgresql://USER@HOST:PORT/DB`, or a unix socket with `?host=/run/postgresql`)
selects PostgreSQL; `sqlite` names the embedded file explicitly. A password never belongs in the
URL the directory records: libpq reads PGPASSWORD or ~/.pgpass (PGPASSFILE).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from agent.errors import ConfigError

from .storage import Registry, SqliteRegistry

DATABASE_ENV = "MESHAGENT_AUTHORITY_DATABASE"
RECORDED_FILE = "database.url"
SQLITE = "sqlite"
_POSTGRES_SCHEMES = ("postgresql", "postgres")

_URL_HINT = (
    "give a libpq URL: postgresql://USER@HOST:5432/DBNAME, or over a unix socket "
    "postgresql:///DBNAME?host=/run/postgresql (or 'sqlite' for the embedded registry.db); "
    "put the password in PGPASSWORD or ~/.pgpass, not in the URL"
)


def check_url(url: str) -> str:
    """`url` when it names a database this authority can use (else a ConfigError with a hint)."""
    if url == SQLITE:
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"database URL {redact(url)!r} is malformed: {exc}", _URL_HINT) from None
    if parts.scheme not in _POSTGRES_SCHEMES:
        raise ConfigError(
            f"database URL {redact(url)!r} is not a PostgreSQL URL (scheme {parts.scheme or 'missing'!r})",
            _URL_HINT,
        )
    return url


def redact(url: str) -> str:
    """`url` without a password (in the user part or a `password=` parameter); else unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    params = parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and all(k != "password" for k, _ in params):
        return url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.split(':', 1)[0]}{at}{hostport}"
    query = urlencode([(k, v) for k, v in params if k != "password"], safe="/")
    # (urlunsplit would drop the empty authority of postgresql:///db?host=/socket)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def has_password(url: str) -> bool:
    return redact(url) != url and url != SQLITE


def recorded(directory: Path) -> str | None:
    """The URL `authority init --database` recorded in `directory`, if any."""
    try:
        text = (directory / RECORDED_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def record(directory: Path, url: str) -> str:
    """Record `url` (password removed) as the directory's database; returns what was written."""
    kept = redact(check_url(url))
    (directory / RECORDED_FILE).write_text(kept + "\n")
    return kept


def resolve(directory: Path, database: str | None = None) -> tuple[str, str]:
    """(URL or 'sqlite', where it came from: flag, env, recorded or default)."""
    if database:
        return check_url(database), "--database"
    if os.environ.get(DATABASE_ENV):
        return check_url(os.environ[DATABASE_ENV]), DATABASE_ENV
    saved = recorded(directory)
    if saved:
        return check_url(saved), str(directory / RECORDED_FILE)
    return SQLITE, "default"


def open_registry(directory: Path, database: str | None = None) -> Registry:
    """The registry of the authority in `directory` (see the module's resolution order)."""
    url, _ = resolve(directory, database)
    if url == SQLITE:
        return SqliteRegistry(directory / "registry.db")
    from .storage_pg import PostgresRegistry  # psycopg: PostgreSQL authorities only

    return PostgresRegistry(url)
