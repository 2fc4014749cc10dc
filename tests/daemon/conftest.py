"""A real `meshagent run` process on loopback, interception off, enrolled at a real authority."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import MESHAGENT, AuthorityProcess, free_port, run_cli


@dataclass
class RunningAgent:
    proc: subprocess.Popen[str]
    state: Path
    log: Path
    admin_port: int
    inbound_port: int

    def get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        """One admin request (HTTP/1.1, one per connection): status code and body."""
        with socket.create_connection(("127.0.0.1", self.admin_port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.decode().partition("\r\n\r\n")
        return int(head.split(" ")[1]), body

    def status(self) -> Any:
        return json.loads(self.get("/status")[1])

    def wait_for(self, check: Callable[[], object], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{what}: agent exited {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(OSError, ValueError):
                if check():
                    return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def enroll(authority: AuthorityProcess, state: Path) -> None:
    token = authority.token("shop/billing")
    run_cli(
        "enroll",
        token,
        "--state-dir",
        str(state),
        "--host-name",
        "h1",
        "--address",
        "198.51.100.7",
        check=True,
    )


@contextlib.contextmanager
def running_agent(tmp: Path, state: Path, extra: str = "", **popen: Any) -> Iterator[RunningAgent]:
    admin, inbound, outbound = free_port(), free_port(), free_port()
    config = tmp / "agent.toml"
    config.write_text(
        f'[identity]\nstate_dir = "{state}"\n[log]\nlevel = "debug"\n'
        f"[intercept]\nenabled = false\nadmin_port = {admin}\ninbound_port = {inbound}\n"
        f"outbound_port = {outbound}\n"
        f'[proxy]\nlisten = "127.0.0.1"\nrefresh_interval_s = 1.0\ndrain_timeout_s = 1.0\n'
        f'[telemetry]\nadmin_listen = "127.0.0.1"\n{extra}'
    )
    log = tmp / "agent.log"
    out = open(log, "a")  # noqa: SIM115 - kept open for the process's life
    proc = subprocess.Popen(
        [*MESHAGENT, "run", "--config", str(config)], stdout=out, stderr=out, text=True, **popen
    )
    agent = RunningAgent(proc, state, log, admin, inbound)
    try:
        agent.wait_for(lambda: "daemon.ready" in log.read_text(), "agent ready")
        yield agent
    finally:
        agent.stop()
        out.close()


@pytest.fixture
def enrolled(tmp_path: Path, authority: AuthorityProcess) -> Path:
    state = tmp_path / "state"
    enroll(authority, state)
    return state
