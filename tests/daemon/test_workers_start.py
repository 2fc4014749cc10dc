"""`meshagent run` with workers whose start fails before the pool takes the workers it forked."""

from __future__ import annotations

from pathlib import Path

import psutil

from tests.support import free_port, run_cli


def test_failed_start_ends_the_forked_workers_silently(tmp_path: Path) -> None:
    """No identity: exit 4 with the hint, and the two workers forked at start (before the
    identity is read) end with the agent: no worker log line after it, no process left."""
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[identity]\nstate_dir = "{tmp_path / "state"}"\n'
        f"[intercept]\nenabled = false\nadmin_port = {free_port()}\ninbound_port = {free_port()}\n"
        f'outbound_port = {free_port()}\n[proxy]\nlisten = "127.0.0.1"\nworkers = 2\n'
    )
    proc = run_cli("run", "--config", str(config))  # returns once every writer of its pipes is gone
    assert proc.returncode == 4, proc.stderr
    assert "no identity" in proc.stderr
    assert "worker." not in proc.stderr + proc.stdout, proc.stderr
    left = [p for p in psutil.process_iter(["cmdline"]) if str(config) in " ".join(p.info["cmdline"] or [])]
    assert not left, left
