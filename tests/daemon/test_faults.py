"""Faults under a running daemon: its state directory goes read-only or fills up."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import running_agent
from tests.support import AuthorityProcess, run_cli

from .conftest import enroll


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs of our own (root only): a file system we may fill and make read-only."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=False).returncode:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


def test_refresh_survives_a_read_only_state_dir_and_says_so(
    tmp_path: Path, tmpfs: Path, authority: AuthorityProcess
) -> None:
    state = tmpfs / "state"
    enroll(authority, state)
    with running_agent(tmp_path, state) as agent:
        cache = state / "host-config.json"
        agent.wait_for(cache.exists, "first directory cached")
        assert agent.get("/ready")[0] == 200
        _remount(tmpfs, "ro")
        # The agent writes its cache when the directory changes (it long polls): change it.
        run_cli(
            "authority", "catalog", "add", "--dir", str(authority.directory),
            "--cidr", "198.18.9.0/24", "--identity", "orders/api",
        )  # fmt: skip
        try:

            def failing() -> bool:
                task = agent.status()["tasks"]["directory-refresh"]
                return bool(task["failing"] >= 3)

            agent.wait_for(failing, "refresh failures reported")
            status = agent.status()
            task = status["tasks"]["directory-refresh"]
            assert "Read-only file system" in task["last_error"]
            assert task["state"] in ("retrying", "running")
            code, body = agent.get("/ready")
            assert code == 503
            assert "task directory-refresh" in body and "Read-only file system" in body
            assert any(e["kind"] == "directory-refresh" for e in status["last_errors"])
            assert "task.failed" in agent.log.read_text()
            # The operator sees it without --json, failing task first, and Prometheus too.
            shown = run_cli("status", "--state-dir", str(state), "--config", str(tmp_path / "agent.toml"))
            tasks = [line for line in shown.stdout.splitlines() if line.startswith("  task")]
            assert "directory-refresh" in tasks[0] and "FAILING" in tasks[0], shown.stdout
            assert "Read-only file system" in tasks[0]
            assert "\nadmin " in shown.stdout
            metrics = agent.get("/metrics")[1]
            assert 'meshagent_task_failing{task="directory-refresh"}' in metrics
            assert "meshagent_ready 0" in metrics
        finally:
            _remount(tmpfs, "rw")
        # The task was retried, not lost: it recovers on its own once the disk is writable.
        agent.wait_for(lambda: agent.get("/ready")[0] == 200, "ready again")
        assert agent.status()["tasks"]["directory-refresh"]["failing"] == 0
        assert "task.recovered" in agent.log.read_text()
        assert agent.stop() == 0
    assert "Traceback" not in agent.log.read_text()
