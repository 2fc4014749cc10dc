"""Real legacy apps started inside a namespace host: nginx and redis (the demo's and the tests')."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from agent.netlab import Host


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def nginx(host: Host, workdir: Path, port: int = 8080, body: str = "hello\n", http2: bool = False) -> Path:
    """nginx serving `body` at / and a 500 at /fail, all state under `workdir`/nginx; with
    `http2`, cleartext HTTP/2 only (prior knowledge, h2c) on IPv4."""
    root = workdir / "nginx"
    (root / "www").mkdir(parents=True, exist_ok=True)
    (root / "www" / "index.html").write_text(body)
    conf = root / "nginx.conf"
    listen = f"listen {port} http2;" if http2 else f"listen {port} reuseport; listen [::]:{port};"
    conf.write_text(f"""
daemon off;
user root;  # workers read a private temp directory
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  server {{
    {listen} root {root}/www;
    location /fail {{ return 500; }}
  }}
}}
""")
    host.popen("nginx", "-c", str(conf), "-p", str(root))
    curl_h2 = ["--http2-prior-knowledge"] if http2 else []
    wait_until(
        lambda: host.run("curl", "-sf", *curl_h2, f"http://127.0.0.1:{port}/", check=False).returncode == 0,
        "nginx",
    )
    return root


def redis(host: Host, port: int = 6379) -> None:
    host.popen(
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "0.0.0.0",  # noqa: S104 - inside its own namespace
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    )
    wait_until(
        lambda: host.run("redis-cli", "-p", str(port), "ping", check=False).stdout.strip() == "PONG", "redis"
    )
