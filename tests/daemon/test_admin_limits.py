"""The admin port is bounded: idle connections are evicted or time out, never starve the agent."""

from __future__ import annotations

import resource
import socket
from pathlib import Path

from tests.daemon.conftest import running_agent

IDLE = 1200  # more than systemd's default soft file limit (1,024)


def _systemd_like_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_admin_connections_cannot_lock_out_ready(tmp_path: Path, enrolled: Path) -> None:
    extra = "admin_max_connections = 50\nadmin_timeout_s = 1.0\n"
    with running_agent(tmp_path, enrolled, extra, preexec_fn=_systemd_like_limit) as agent:
        idle: list[socket.socket] = []
        try:
            for _ in range(IDLE):
                idle.append(socket.create_connection(("127.0.0.1", agent.admin_port), timeout=5))
            # A fresh request is still answered, again and again, while 1,200 sit idle.
            for _ in range(5):
                assert agent.get("/ready") == (200, "ready\n")
            admin = agent.status()["admin"]
            assert admin["max_connections"] == 50
            assert admin["open"] <= 50
            assert admin["evicted_idle"] + admin["timed_out"] >= IDLE - 50
            # Idle connections are closed by the agent after admin_timeout_s.
            agent.wait_for(lambda: all(_closed_by_peer(s) for s in idle), "idle connections closed", 10)
            assert agent.status()["admin"]["timed_out"] >= 1
        finally:
            for s in idle:
                s.close()
        assert agent.get("/live") == (200, "live\n")
    assert "Traceback" not in agent.log.read_text()


def test_a_slow_request_times_out(tmp_path: Path, enrolled: Path) -> None:
    with (
        running_agent(tmp_path, enrolled, "admin_timeout_s = 0.5\n") as agent,
        socket.create_connection(("127.0.0.1", agent.admin_port), timeout=5) as s,
    ):
        s.sendall(b"GET /ready HTTP/1.1\r\n")  # never finishes its headers
        agent.wait_for(lambda: _closed_by_peer(s), "slow request closed", 5)
