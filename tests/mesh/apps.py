"""Real legacy apps in a test host: nginx and redis (shared with the demo), and postgres."""

from __future__ import annotations

import os
import pwd
import shutil
import sys
import tempfile
import time
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

NAME = sys.argv[2].encode() if len(sys.argv) > 2 else b""

def who(request, context):
    return NAME

def say(request, context):
    if request == b"fail":
        context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b"hi " + request

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
handler = grpc.unary_unary_rpc_method_handler(say)
methods = {"Say": handler, "Who": grpc.unary_unary_rpc_method_handler(who)}
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("demo.Echo", methods)])
server.add_insecure_port("0.0.0.0:" + sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


def grpc_echo(host: Host, port: int, name: str = "") -> None:
    """A gRPC server (grpcio, no generated code): /demo.Echo/Say answers b"hi " + the request,
    UNAVAILABLE for b"fail" and NOT_FOUND for b"missing"; /demo.Echo/Who answers `name`."""
    proc = host.popen(sys.executable, "-c", GRPC_SERVER, str(port), name)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr


def nginx_linkerd(host: Host, workdir: Path, port: int = 8080, big_mb: int = 10) -> Path:
    """nginx for the Linkerd peer tests (HTTP/1 only): `/` a small page, `/big.bin` `big_mb` MB
    of random bytes, `/echo` the request body back (chunked), `/chunked` a chunked answer in
    three flushed parts, `/fail` a 500. The echo module comes with Debian's nginx-light."""
    root = workdir / "nginx-linkerd"
    www = root / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_text("hello from a meshed nginx\n")
    (www / "big.bin").write_bytes(os.urandom(big_mb * 2**20))
    conf = root / "nginx.conf"
    conf.write_text(f"""
load_module /usr/lib/nginx/modules/ngx_http_echo_module.so;
daemon off;
user root;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  client_max_body_size 16m; client_body_buffer_size 16m;
  server {{
    listen {port} reuseport; root {www};
    location /fail {{ return 500; }}
    location /echo {{ echo_read_request_body; echo_request_body; }}
    location /chunked {{ echo "part one"; echo_flush; echo "part two"; echo_flush; echo "the end"; }}
  }}
}}
""")
    host.popen("nginx", "-c", str(conf), "-p", str(root))
    wait_for(
        lambda: host.run("curl", "-sf", f"http://127.0.0.1:{port}/", check=False).returncode == 0,
        "nginx (linkerd peer tests)",
    )
    return root


def nginx_policy(host: Host, workdir: Path, name: str, ports: tuple[int, ...]) -> Path:
    """nginx for the traffic-policy proofs (#21), listening on every port of `ports`:
    `/who` answers `name`, `/flaky` a 503 for 10 % of requests (random per request), `/down`
    always 503, `/hang` holds the request 60 s, `/post` answers "posted". Every request is
    logged to ROOT/access.log as `METHOD URI STATUS` (what the backend really received).
    `nginx_fail_hard(host, root, True)` makes every request a 500 (a config reload: no
    connection dropped); False recovers. Returns ROOT."""
    root = workdir / f"nginx-policy-{name}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "mode.conf").write_text("")
    listen = " ".join(f"listen {port} reuseport;" for port in ports)
    conf = root / "nginx.conf"
    conf.write_text(f"""
load_module /usr/lib/nginx/modules/ngx_http_echo_module.so;
daemon off;
user root;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  log_format m '$request_method $uri $status';
  access_log {root}/access.log m;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  keepalive_requests 100000;
  split_clients "${{request_id}}" $flaky {{ 10% fail; * ok; }}
  server {{
    {listen}
    include {root}/mode.conf;
    location = /who {{ return 200 "{name}\\n"; }}
    location = /flaky {{ if ($flaky = fail) {{ return 503; }} return 200 "ok\\n"; }}
    location = /down {{ return 503; }}
    location = /hang {{ echo_sleep 60; echo late; }}
    location = /post {{ return 200 "posted\\n"; }}
  }}
}}
""")
    host.popen("nginx", "-c", str(conf), "-p", str(root))
    wait_for(
        lambda: host.run("curl", "-sf", f"http://127.0.0.1:{ports[0]}/who", check=False).returncode == 0,
        f"nginx ({name})",
    )
    return root


def _nginx_workers(root: Path) -> set[int]:
    """The pids of the nginx master's children (its workers), by the master's pid file."""
    master = (root / "nginx.pid").read_text().strip()
    return {int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()}


def nginx_fail_hard(host: Host, root: Path, fail: bool) -> None:
    """Every request answered 500 (True) or served again (False): `nginx -s reload`, which swaps
    the config without dropping connections; returns once the new mode answers and every worker
    of the old config has exited. Until then an old worker still answers the proxy's pooled
    keep-alive connections in the old mode: a new connection answering is not enough."""
    (root / "mode.conf").write_text("return 500;\n" if fail else "")
    old_workers = _nginx_workers(root)
    host.run("nginx", "-c", str(root / "nginx.conf"), "-p", str(root), "-s", "reload")
    want = "500" if fail else "200"
    port = next(
        int(p.split()[0]) for p in (root / "nginx.conf").read_text().split("listen ")[1:] if p[0].isdigit()
    )
    wait_for(
        lambda: (
            not old_workers & _nginx_workers(root)
            and host.run(
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"http://127.0.0.1:{port}/who",
                check=False,
            ).stdout
            == want
        ),
        f"nginx answering {want}",
    )


def access_log(root: Path) -> list[tuple[str, str, str]]:
    """The (method, uri, status) of every request the backend received so far. nginx logs a
    request after its response is sent, so a client may have its answer a moment before the
    line is written: read until two reads 0.2 s apart agree."""
    path = root / "access.log"

    def read() -> list[tuple[str, str, str]]:
        if not path.exists():
            return []
        return [tuple(line.split()) for line in path.read_text().splitlines() if line]  # type: ignore[misc]

    lines = read()
    while True:
        time.sleep(0.2)
        again = read()
        if again == lines:
            return lines
        lines = again
