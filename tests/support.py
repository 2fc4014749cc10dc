"""Helpers shared by the test suites: run the CLI, start a real authority process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

MESHAGENT = [sys.executable, "-m", "agent.cli"]


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = False,
    prefix: list[str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `meshagent ARGS` as a real process; returns the completed process (text)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [*(prefix or []), *MESHAGENT, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"meshagent {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def cli_json(*args: str, **kw: Any) -> Any:
    proc = run_cli(*args, "--json", check=True, **kw)
    return json.loads(proc.stdout)


def metric_sum(text: str, family: str, *parts: str) -> float:
    """The sum of a Prometheus exposition's samples of `family` whose line holds every one of `parts`."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(family + "{") and all(p in line for p in parts)
    )


def metric_samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus exposition, keyed by its name and labels as written."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AuthorityProcess:
    directory: Path
    url: str
    proc: subprocess.Popen[str] | None = None
    log_path: Path | None = None
    workers: int = 1

    @property
    def ca_file(self) -> str:
        """The API CA: tests verify the authority like any client would (its SANs include 127.0.0.1)."""
        return str(self.directory / "api-ca.crt")

    @property
    def tls(self) -> ssl.SSLContext:
        """For httpx: verify the authority against its API CA."""
        return ssl.create_default_context(cafile=self.ca_file)

    def start(self) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        self.log_path = self.directory.parent / f"authority-{port}.log"
        log = open(self.log_path, "a")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen(
            [
                *MESHAGENT,
                "authority",
                "serve",
                "--dir",
                str(self.directory),
                "--listen",
                f"127.0.0.1:{port}",
                "--workers",
                str(self.workers),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"authority exited: {self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", verify=self.tls, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise AssertionError("authority did not come up within 20s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # The whole session: uvicorn's worker processes are our children too.
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def token(self, identity: str = "shop/billing", ttl: str = "1h") -> str:
        proc = run_cli(
            "authority",
            "token",
            "create",
            "--dir",
            str(self.directory),
            "--identity",
            identity,
            "--url",
            self.url,
            "--ttl",
            ttl,
            check=True,
        )
        return proc.stdout.strip()


def init_authority(directory: Path, *extra: str) -> None:
    run_cli(
        "authority",
        "init",
        "--dir",
        str(directory),
        "--trust-domain",
        "cluster.local",
        "--san",
        "127.0.0.1",
        *extra,
        check=True,
    )


@contextlib.contextmanager
def running_authority(directory: Path, *init_args: str, workers: int = 1) -> Iterator[AuthorityProcess]:
    if not (directory / "authority.json").exists():
        init_authority(directory, *init_args)
    auth = AuthorityProcess(directory, f"https://127.0.0.1:{free_port()}", workers=workers)
    auth.start()
    try:
        yield auth
    finally:
        auth.stop()


def issue_identity(authority_dir: Path, identity: str, state_dir: Path, lifetime: str | None = None) -> Any:
    """Enroll `state_dir` as `identity` in-process (no HTTP): for data-plane tests."""
    from agent.authority.service import Authority
    from agent.identity.pki import generate_key, load_certs, make_csr
    from agent.identity.store import IdentityStore

    if not (authority_dir / "authority.json").exists():
        extra = ["--cert-lifetime", lifetime] if lifetime else []
        init_authority(authority_dir, *extra)
    authority = Authority.open(authority_dir)
    token = authority.create_tokens(identity, "https://127.0.0.1:1", timedelta(minutes=5))[0]
    key = generate_key()
    result = authority.enroll(token.secret, make_csr(key).decode(), "test", [])
    store = IdentityStore(state_dir)
    return store.save(key, load_certs(result.chain_pem), load_certs(result.trust_bundle_pem))
