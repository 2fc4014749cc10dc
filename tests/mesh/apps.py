"""Real legacy apps in a test host: nginx and redis (shared with the demo), and postgres."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

from agent.demo.apps import nginx as nginx  # re-exported for the tests
from agent.demo.apps import redis as redis
from agent.netlab import Host
from tests.mesh.conftest import wait_for

PG_BIN = next(Path("/usr/lib/postgresql").glob("*/bin"), Path("/usr/lib/postgresql/15/bin"))


def postgres(host: Host, cleanup: list[Path], port: int = 5432) -> None:
    """A throwaway cluster, run as the postgres user (pytest's own temp dirs are root-only)."""
    top = Path(tempfile.mkdtemp(prefix="meshagent-pg-"))
    cleanup.append(top)
    data, sock = top / "data", top / "sock"
    data.mkdir()
    sock.mkdir()
    os.chmod(top, 0o755)
    shutil.chown(data, "postgres", "postgres")
    shutil.chown(sock, "postgres", "postgres")
    uid = pwd.getpwnam("postgres").pw_uid
    host.run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", user=uid)
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n"
    )
    host.popen(
        str(PG_BIN / "postgres"),
        "-D",
        str(data),
        "-c",
        "listen_addresses=*",
        "-c",
        f"port={port}",
        "-c",
        f"unix_socket_directories={sock}",
        "-c",
        "fsync=off",
        user=uid,
    )
    wait_for(
        lambda: (
            host.run(str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), check=False).returncode
            == 0
        ),
        "postgres up",
        timeout=30,
    )
