"""A throwaway PostgreSQL 15 cluster for the tests and the bench.

`initdb` into a temp dir owned by an unprivileged user (PostgreSQL refuses to run as root),
`pg_ctl start` listening on a unix socket inside that dir only (optionally also on one TCP
address), trust authentication (nothing outside the dir can reach it), and cleanup that always
stops it and removes the dir.

    with pg_cluster() as pg:
        registry = open_registry(directory, pg.url)
        pg.stop()      # "PostgreSQL away"
        pg.start()     # back
        pg.kill()      # kill -9 the postmaster and its backends, like a crash
        pg.restart()

The fsync is off: a killed server still loses nothing committed (its writes are in the OS page
cache); only a machine crash would, and tests do not do that.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

PG_BIN = Path(os.environ.get("MESHAGENT_PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASE = "meshagent"
SUPERUSER = "meshagent"
# Unprivileged owners tried in order when we run as root.
_RUN_AS = ("postgres", "nobody")


def available() -> bool:
    """True when the PostgreSQL server binaries are installed (tests skip otherwise)."""
    return (PG_BIN / "initdb").exists() and (PG_BIN / "pg_ctl").exists()


def _run_as_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


class PgCluster:
    """One PostgreSQL cluster in its own temp dir; `url` is a libpq URL over its unix socket."""

    def __init__(self, tcp_host: str | None = None, tcp_port: int = 0, max_connections: int = 200) -> None:
        self.user = _run_as_user()
        # /tmp paths stay short: a unix socket path is limited to ~107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="meshagent-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir
        self.log = self.dir / "postgresql.log"
        self.port = tcp_port or (_free_tcp_port(tcp_host) if tcp_host else 5432)
        self.tcp_host = tcp_host
        self.max_connections = max_connections
        os.chmod(self.dir, 0o755)  # the client (maybe root, maybe another user) reaches the socket
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._initdb()

    # -- addresses -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The libpq URL of the `meshagent` database over the unix socket."""
        return self.database_url(DATABASE)

    def database_url(self, name: str) -> str:
        return (
            f"postgresql:///{name}?host={quote(str(self.socket_dir), safe='/')}"
            f"&port={self.port}&user={SUPERUSER}"
        )

    @property
    def tcp_url(self) -> str:
        if self.tcp_host is None:
            raise RuntimeError("this cluster was started without a TCP address")
        return f"postgresql://{SUPERUSER}@{self.tcp_host}:{self.port}/{DATABASE}"

    # -- lifecycle -------------------------------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        if self.user is None:
            return list(args)
        return ["runuser", "-u", self.user, "--", *args]

    def _initdb(self) -> None:
        subprocess.run(
            self._cmd(
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
            cwd=self.dir,
        )
        settings = {
            "listen_addresses": f"'{self.tcp_host or ''}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": str(self.max_connections),
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "logging_collector": "off",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/pgcluster.py\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    def start(self) -> None:
        proc = subprocess.run(
            self._cmd(
                str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"
            ),
            capture_output=True,
            text=True,
            cwd=self.dir,
        )
        if proc.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {proc.stderr}\n{tail}")
        self._ensure_database()

    def _ensure_database(self) -> None:
        # createdb over the socket, as the cluster's superuser; "already exists" is fine on a restart.
        proc = subprocess.run(
            [
                str(PG_BIN / "createdb"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                DATABASE,
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 and "already exists" not in proc.stderr:
            raise RuntimeError(f"createdb failed: {proc.stderr}")

    def create_database(self, name: str) -> str:
        """A fresh empty database in this cluster (one per test for isolation); returns its URL."""
        subprocess.run(
            [
                str(PG_BIN / "createdb"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                name,
            ],
            check=True,
            capture_output=True,
        )
        return self.database_url(name)

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: mode "smart", "fast" (default: disconnects clients) or "immediate"."""
        if not self.running():
            return
        subprocess.run(
            self._cmd(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"),
            check=True,
            capture_output=True,
            cwd=self.dir,
        )

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        return _alive(pid)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend (a crash); `start()` then runs crash recovery."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(_alive(v) for v in victims):
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres processes {victims} survived SIGKILL")
            time.sleep(0.02)
        # A killed postmaster may stay a zombie (its parent, pg_ctl, is gone and PID 1 may not reap
        # it): the next postmaster would take its lock file as a live server's. They are all dead.
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        (self.socket_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def close(self) -> None:
        """Stop (immediately) and remove everything; safe to call twice."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        if self.running():
            with contextlib.suppress(Exception):
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command may contain spaces and parentheses: the ppid is the 2nd field after the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _free_tcp_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def pg_cluster(tcp_host: str | None = None, max_connections: int = 200) -> Iterator[PgCluster]:
    """A started cluster for the duration of the block; always stopped and removed afterwards."""
    cluster = PgCluster(tcp_host=tcp_host, max_connections=max_connections)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
