"""The agent killed under load: clients see errors only while it is down, SSH never does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.mesh import apps
from tests.mesh.conftest import PY, Mesh, wait_for
from tests.netns.sshd import start_sshd

pytestmark = pytest.mark.netns

B = "198.18.3.2"
LOOP = str(Path(__file__).parent / "tools" / "http_loop.py")


def parse(out: str) -> list[tuple[float, bool]]:
    return [(float(t), r.startswith("ok")) for t, r in (line.split(" ", 1) for line in out.splitlines())]


def test_kill_9_and_restart_under_load(mesh: Mesh) -> None:
    apps.nginx(mesh.b, mesh.tmp, 8080)
    _, ssh = start_sshd(mesh.b, mesh.tmp / "ssh", [B])
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", [B], inbound_policy="all-authenticated")
    b.start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)

    def ssh_ok() -> bool:
        return (
            mesh.a.run(*ssh, f"root@{B}", "echo", "ssh-ok", check=False, timeout=30).stdout.strip()
            == "ssh-ok"
        )

    assert ssh_ok()
    load = mesh.a.popen(PY, LOOP, B, "8080", "12", "0.05")
    time.sleep(2.5)
    assert b.proc is not None
    killed_at = time.time()
    b.proc.kill()  # SIGKILL: no cleanup at all, the rules stay behind
    b.proc.wait(timeout=10)
    assert ssh_ok(), "SSH must work while the agent is down"
    time.sleep(1.5)
    # A log of its own: the killed run's "daemon.ready" must not count as the new run's.
    b.log = mesh.tmp / "agent-b-restarted.log"
    b.start()  # re-applies its rules over the stale ones and serves again
    ready_at = time.time()
    assert ssh_ok()
    out, _ = load.communicate(timeout=60)
    results = parse(out)

    before = [ok for t, ok in results if t < killed_at - 0.2]
    during = [ok for t, ok in results if killed_at < t < ready_at]
    after = [ok for t, ok in results if t > ready_at]  # ready means every worker serves
    assert before and all(before), "errors before the kill"
    assert not all(during), "the kill did not interrupt anything: the test proves nothing"
    assert after and all(after), f"{after.count(False)} errors after the agent was back"
    first_ok = min(t for t, ok in results if t > killed_at and ok)
    assert first_ok - ready_at < 5.0, "traffic did not resume once the agent was ready"
