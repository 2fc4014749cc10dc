"""Faults at the command line: a message that names the fix and the documented exit code,
never a traceback (each through the real CLI)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.daemon.test_faults import tmpfs  # noqa: F401 - fixture
from tests.support import AuthorityProcess, run_cli

from .conftest import enroll


def _fill(mnt: Path) -> None:
    """Fill the file system to its last block."""
    subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/filler", "bs=4k"], capture_output=True, check=False)


def _assert_fails(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out
    for word in words:
        assert word in out, out


def test_enroll_on_a_full_disk_exits_9(tmpfs: Path, authority: AuthorityProcess) -> None:  # noqa: F811
    _fill(tmpfs)
    proc = run_cli(
        "enroll", authority.token(), "--state-dir", str(tmpfs / "state"), "--address", "198.51.100.7"
    )
    _assert_fails(proc, 9, "No space left on device", "free space")


def test_renew_on_a_full_disk_exits_9(tmpfs: Path, authority: AuthorityProcess) -> None:  # noqa: F811
    state = tmpfs / "state"
    enroll(authority, state)
    _fill(tmpfs)
    _assert_fails(run_cli("renew", "--state-dir", str(state)), 9, "No space left on device")
    # The identity on disk is whole: status still reads it.
    assert run_cli("status", "--state-dir", str(state)).returncode == 0


def test_renew_on_a_read_only_disk_exits_9(tmpfs: Path, authority: AuthorityProcess) -> None:  # noqa: F811
    state = tmpfs / "state"
    enroll(authority, state)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    _assert_fails(run_cli("renew", "--state-dir", str(state)), 9, "Read-only file system")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_enroll_token_file_not_a_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "token"
    if kind == "directory":
        path.mkdir()
    proc = run_cli("enroll", "--token-file", str(path), "--state-dir", str(tmp_path / "state"))
    _assert_fails(proc, 2, "--token-file", "no such file" if kind == "missing" else "is a directory")


@pytest.mark.parametrize("command", [["run"], ["config", "show"], ["check"]])
def test_config_not_utf8_exits_3(tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "agent.toml"
    config.write_bytes(b'[log]\nlevel = "\xff\xfe"\n')
    _assert_fails(run_cli(*command, "--config", str(config)), 3, "not UTF-8", str(config))


@pytest.mark.parametrize("which", ["inbound_port", "admin_port"])
def test_run_with_a_port_in_use_names_it(tmp_path: Path, enrolled: Path, which: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "agent.toml"
        config.write_text(
            f'[identity]\nstate_dir = "{enrolled}"\n[intercept]\nenabled = false\n{which} = {port}\n'
            '[proxy]\nlisten = "127.0.0.1"\n[telemetry]\nadmin_listen = "127.0.0.1"\n'
        )
        proc = run_cli("run", "--config", str(config), timeout=30)
    _assert_fails(proc, 1, f"127.0.0.1:{port}", "already in use", f"intercept.{which}", "ss -ltnp")
