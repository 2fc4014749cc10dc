"""Real legacy apps started inside a test host's namespace: nginx, redis, postgres."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

from tests.mesh.conftest import wait_for
from tests.netns.netns import Host

PG_BIN = next(Path("/usr/lib/postgresql").glob("*/bin"), Path("/usr/lib/postgresql/15/bin"))


def nginx(host: Host, tmp: Path, port: int = 8080, body: str = "hello\n") -> Path:
    root = tmp / "nginx"
    (root / "www").mkdir(parents=True, exist_ok=True)
    (root / "www" / "index.html").write_text(body)
    conf = root / "nginx.conf"
    conf.write_text(f"""
daemon off;
user root;  # workers read the test's private temp directory
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  server {{
    listen {port} reuseport; listen [::]:{port}; root {root}/www;
    location /fail {{ return 500; }}
  }}
}}
""")
    host.popen("nginx", "-c", str(conf), "-p", str(root))
    wait_for(
        lambda: host.run("curl", "-sf", f"http://127.0.0.1:{port}/", check=False).returncode == 0, "nginx up"
    )
    return root


def redis(host: Host, port: int = 6379) -> None:
    host.popen(
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "0.0.0.0",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    )
    wait_for(
        lambda: host.run("redis-cli", "-p", str(port), "ping", check=False).stdout.strip() == "PONG",
        "redis up",
    )


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
