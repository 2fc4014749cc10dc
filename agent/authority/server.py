"""Run the authority's API under uvicorn (uvloop + httptools), TLS with the API certificate."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from agent.logs import get_logger

from .api import Contained, create_app
from .service import Authority

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


def serve(directory: Path, listen: str, workers: int = 1) -> None:
    authority = Authority.open(directory)  # fail fast, in this process, on a broken directory
    host, port = parse_listen(listen)
    os.environ[_DIR_ENV] = str(directory.resolve())
    config = uvicorn.Config(
        "agent.authority.server:app_from_env" if workers > 1 else create_app(authority),
        factory=workers > 1,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
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
    )
    server = uvicorn.Server(config)
    if workers > 1:
        sock = config.bind_socket()
        Multiprocess(config, sockets=[sock]).run()
    else:
        server.run()
