"""Real legacy apps in a test host: nginx and redis (shared with the demo), and postgres."""

from __future__ import annotations

import os
import pwd
import shutil
import sys
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


GRPC_SERVER = """
import sys, time
from concurrent import futures
import grpc

def say(request, context):
    if request == b"fail":
        context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b"hi " + request

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
handler = grpc.unary_unary_rpc_method_handler(say)
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("demo.Echo", {"Say": handler})])
server.add_insecure_port("0.0.0.0:" + sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


def grpc_echo(host: Host, port: int) -> None:
    """A gRPC server (grpcio, no generated code): /demo.Echo/Say answers b"hi " + the request,
    UNAVAILABLE for b"fail" and NOT_FOUND for b"missing"."""
    proc = host.popen(sys.executable, "-c", GRPC_SERVER, str(port))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
