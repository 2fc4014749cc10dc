"""Run the authority's API under uvicorn (uvloop + httptools), TLS with the API certificate.

The socket is bound here (a busy port is a message); slow and hostile clients are bounded by
`httpguard` (uvicorn's protocol and loop with deadlines and a connection cap). With
`--kubernetes` the controller (`kube_controller`) runs as a task on the same event loop, started
and stopped by the ASGI lifespan, so it shares the Authority (and wakes long polls) directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import ssl
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.supervisors import Multiprocess

from agent.errors import MeshagentError, RejectedError
from agent.logs import get_logger

from . import discovery
from .api import Contained, create_app, error
from .httpguard import LIMITS_ENV, GuardedProtocol, Limits, current_limits, limits_with
from .service import Authority

if TYPE_CHECKING:
    from .kube_controller import Controller, ControllerSettings

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


CONTROLLER_STATUS_PATH = "/v1/kubernetes/status"


class WithController:
    """The app plus the Kubernetes controller: started by the lifespan's startup, stopped (Lease
    released) by its shutdown. `GET /v1/kubernetes/status` answers `Controller.status()` to a
    holder of the Prometheus discovery token (it names the API server's errors and the Lease
    holder: not for every host)."""

    def __init__(self, app: ASGIApp, controller: Controller, directory: Path) -> None:
        self.app, self.controller, self.directory = app, controller, directory
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http" and scope["path"] == CONTROLLER_STATUS_PATH:
            await self._status(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._task = asyncio.create_task(self.controller.run(self._stop), name="kube-controller")
                self._task.add_done_callback(_controller_ended)
                log.info("kube.controller_started", identity=self.controller.settings.identity)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._stop.set()
                if self._task is not None:
                    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(self._task, timeout=8)  # releases the Lease
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _status(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            discovery.authorize(self.directory, headers.get("authorization", ""))
        except RejectedError as exc:
            response = error(exc.code, exc.message, exc.hint)
        else:
            response = JSONResponse(self.controller.status())
        await response(scope, receive, send)


def _controller_ended(task: asyncio.Task[None]) -> None:
    """The controller ending with an error leaves the authority serving without it: say so."""
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    log.error(
        "kube.controller_failed", error_type=type(exc).__name__, error=str(exc),
        hint="the authority keeps serving without registration or discovery; restart it",
    )  # fmt: skip


def controller_for(authority: Authority, settings: ControllerSettings) -> Controller:
    """The controller, connected now: a kubeconfig that cannot be read fails here, at start."""
    from .kube_client import KubeClient  # loads lightkube: controller mode only
    from .kube_controller import Controller

    controller = Controller(authority, settings, client=KubeClient.connect(settings.kubeconfig))
    if settings.discovery:
        # Until the first discovery, hosts keep their Services rather than be served none.
        authority.await_discovery()
    return controller


def serve(
    directory: Path,
    listen: str,
    workers: int = 1,
    limits: Limits | None = None,
    kubernetes: ControllerSettings | None = None,
) -> None:
    authority = Authority.open(directory)  # fail fast, in this process, on a broken directory
    if kubernetes is not None and workers > 1:
        raise MeshagentError(
            "--kubernetes runs the controller in one process: it cannot be combined with --workers",
            "run `authority serve --kubernetes` with --workers 1 (replicas coordinate through the "
            "Lease), or run a second authority with --kubernetes beside the multi-worker one",
            code="invalid_request",
        )
    controller = controller_for(authority, kubernetes) if kubernetes is not None else None
    host, port = parse_listen(listen)
    limits = limits or current_limits()
    os.environ[_DIR_ENV] = str(directory.resolve())
    os.environ[LIMITS_ENV] = json.dumps(asdict(limits))
    current_limits.cache_clear()
    sock = bind(host, port)
    config = uvicorn.Config(
        "agent.authority.server:app_from_env" if workers > 1 else _app(authority, controller, directory),
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
        lifespan="on" if controller is not None else "auto",
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


def _app(authority: Authority, controller: Controller | None, directory: Path) -> ASGIApp:
    app = create_app(authority)
    return WithController(app, controller, directory) if controller is not None else app
