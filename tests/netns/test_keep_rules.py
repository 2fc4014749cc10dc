"""`proxy.on_stop = "keep-rules"` means no plaintext window across a restart (issue #15, defect 14).

A restart is what the unit runs: ExecStopPost, ExecStartPre (both read from the shipped unit
file, run with the unit's MESHAGENT_CONFIG), then `run`, which applies the plan (`intercept
apply` runs the same `apply_plan`). Meanwhile a client opens connection after connection to
the peer's app: each is answered by the proxy (captured) or refused (fail closed: no listener
while the agent is down), and not one reaches the app directly.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from agent.netlab import Host

from .intercept_support import BACKENDS, PROXY_UID, TOOLS, meshagent, require_backend, start_who

pytestmark = pytest.mark.netns

UNIT = Path(__file__).resolve().parents[2] / "agent" / "units" / "meshagent.service"
APP = 8080
RESTARTS = 2


def unit_commands(key: str) -> list[list[str]]:
    """The meshagent arguments of each `key=@MESHAGENT@ ...` line of the shipped unit."""
    out = []
    for line in UNIT.read_text().splitlines():
        if line.startswith(f"{key}=@MESHAGENT@ "):
            out.append(shlex.split(line.split("@MESHAGENT@ ", 1)[1]))
    assert out, f"no {key} line in {UNIT}"
    return out


def write_agent_config(path: Path, backend: str, on_stop: str) -> Path:
    path.write_text(
        f'[proxy]\non_stop = "{on_stop}"\n\n[intercept]\nbackend = "{backend}"\nproxy_user = {PROXY_UID}\n'
    )
    return path


def restart(a: Host, cfg: Path) -> None:
    env = {"MESHAGENT_CONFIG": str(cfg)}
    for args in unit_commands("ExecStopPost") + unit_commands("ExecStartPre"):
        meshagent(a, *args, env=env)
    meshagent(a, "intercept", "apply", env=env)  # what `run` does once its listeners are up


def counted_restarts(a: Host, b: Host, cfg: Path, tmp_path: Path) -> dict[str, int]:
    stop = tmp_path / "stop"
    loop = a.popen(sys.executable, str(TOOLS / "conn_loop.py"), b.ip4, str(APP), str(stop))
    assert loop.stdout is not None and loop.stdout.readline().strip() == "started"
    try:
        for _ in range(RESTARTS):
            restart(a, cfg)
    finally:
        stop.touch()
    out, _err = loop.communicate(timeout=30)
    counts: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return counts


@pytest.mark.parametrize("backend", BACKENDS[:2])  # legacy's restore commits like iptables-nft's
def test_keep_rules_restart_has_no_window(two_hosts: tuple[Host, Host], tmp_path: Path, backend: str) -> None:
    a, b = two_hosts
    require_backend(a, backend)
    start_who(a, "proxy", ":::4140")
    start_who(b, "app-b", f":::{APP}")
    cfg = write_agent_config(tmp_path / "agent.toml", backend, "keep-rules")
    meshagent(a, "intercept", "apply", "--config", str(cfg))
    counts = counted_restarts(a, b, cfg, tmp_path)
    assert counts.get("proxy", 0) > 0, counts
    assert counts.get("app-b", 0) == 0, f"plaintext connections during keep-rules restarts: {counts}"


def test_remove_rules_still_removes(two_hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """The default (fail open) is unchanged: the unit's stop and start commands remove the rules."""
    a, _b = two_hosts
    cfg = write_agent_config(tmp_path / "agent.toml", "nft", "remove-rules")
    for key in ("ExecStopPost", "ExecStartPre"):
        meshagent(a, "intercept", "apply", "--config", str(cfg))
        for args in unit_commands(key):
            meshagent(a, *args, env={"MESHAGENT_CONFIG": str(cfg)})
        assert "meshagent" not in a.run("nft", "list", "tables").stdout, key
