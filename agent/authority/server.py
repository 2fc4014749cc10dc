"""Run the authority's API under uvicorn (uvloop + httptools), TLS with the API certificate.

The socket is bound here (a busy port is a message); slow and hostile clients are bounded by
`httpguard` (uvicorn's protocol and loop with deadlines and a connection cap).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
from dataclasses import asdict
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from agent.errors import MeshagentError
from agent.logs import get_logger

from .api import Contained, create_app
from .httpguard import LIMITS_ENV, GuardedProtocol, Limits, current_limits, limits_with
from .service import Authority

__all__ = ["bind", "limits_with", "parse_listen", "serve"]

log = get_logger("meshagent.authority")

_DIR_ENV = "MESHAGENT_AUTHORITY_DIR"


def app_from_env() -> Contained:
    """Factory used by uvicorn's worker processes (each opens its own registry connection)."""
    return create_app(Authority.open(Path(os.environ[_DIR_ENV])))


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - all interfaces is the documented default


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is a message, not uvicorn's exit 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise MeshagentError(
                f"cannot listen on {where}: the address is already in use",
                f"another process holds port {port} (see `ss -ltnp 'sport = :{port}'`): stop it, "
                "or give `authority serve` another --listen",
                code="address_in_use",
            ) from None
        raise MeshagentError(
            f"cannot listen on {where}: {exc.strerror or exc}",
            "give --listen an address of this machine (0.0.0.0:PORT for all) and a port it may bind",
            code="listen_failed",
        ) from None
    sock.set_inheritable(True)  # (uvicorn's worker processes serve the same socket)
    return sock


def serve(directory: Path, listen: str, workers: int = 1, limits: Limits | None = None) -> None:
    authority = Authority.open(directory)  # fail fast, in this process, on a broken directory
    host, port = parse_listen(listen)
    limits = limits or current_limits()
    os.environ[_DIR_ENV] = str(directory.resolve())
    os.environ[LIMITS_ENV] = json.dumps(asdict(limits))
    current_limits.cache_clear()
    sock = bind(host, port)
    config = uvicorn.Config(
        "agent.authority.server:app_from_env" if workers > 1 else create_app(authority),
        factory=workers > 1,
        host=host,
        port=port,
        workers=workers,
        loop="agent.authority.httpguard:new_loop",
        http=GuardedProtocol,
        timeout_keep_alive=limits.idle_timeout,
        ssl_certfile=str(authority.material.api_cert_file),
        ssl_keyfile=str(authority.material.api_key_file),
        ssl_version=ssl.PROTOCOL_TLS_SERVER,
        ssl_ciphers="ECDHE+AESGCM:ECDHE+CHACHA20",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )
    log.info(
        "authority.serving",
        listen=f"{host}:{port}",
        dir=str(directory),
        workers=workers,
        trust_domain=authority.material.settings.trust_domain,
        ca_pin=authority.ca_pin,
        **asdict(limits),
    )
    if workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
