"""1,200 idle connections to an agent's admin port (more than systemd's default soft file
limit) neither starve its data plane nor make /ready unreachable."""

from __future__ import annotations

import subprocess

import pytest

from tests.mesh.conftest import PY, Mesh, wait_for
from tests.support import MESHAGENT

pytestmark = pytest.mark.netns

HOLD_IDLE = (
    "import socket, sys\n"
    "socks = []\n"
    "for _ in range(1200):\n"
    "    socks.append(socket.create_connection(('198.18.2.2', 4191), timeout=5))\n"
    "print(len(socks), flush=True)\n"
    "sys.stdin.readline()\n"
)


def test_idle_admin_flood_leaves_mesh_calls_and_ready_working(mesh: Mesh) -> None:
    mesh.b.popen(PY, "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", str(mesh.tmp))
    (mesh.tmp / "hello.txt").write_text("hello\n")
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
    b = mesh.enroll(
        mesh.b,
        "shop/legacy",
        "198.18.2.1",
        ["198.18.3.2", "198.18.2.2"],
        extra_config="[telemetry]\nadmin_max_connections = 100\nadmin_timeout_s = 30.0\n",
    )
    # As systemd would start it without LimitNOFILE: soft = hard = 1,024.
    out = open(b.log, "a")  # noqa: SIM115 - lives as long as the process
    b.proc = mesh.b.popen(
        "prlimit", "--nofile=1024:1024", *MESHAGENT, "run", "--config", str(b.config), stdout=out, stderr=out
    )
    wait_for(lambda: "daemon.ready" in b.log.read_text(), "b ready", b)
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)

    flood = mesh.cl.popen(PY, "-c", HOLD_IDLE, stdin=subprocess.PIPE)
    assert flood.stdout is not None and flood.stdin is not None
    try:
        assert flood.stdout.readline().strip() == "1200"
        ready = mesh.cl.run("curl", "-sS", "--max-time", "5", "http://198.18.2.2:4191/ready", check=False)
        assert ready.stdout == "ready\n", ready.stderr
        for _ in range(3):  # mesh calls through b's inbound proxy still work
            got = mesh.a.run(
                "curl", "-sS", "--max-time", "10", "http://198.18.3.2:8080/hello.txt", check=False
            )
            assert got.stdout == "hello\n", got.stderr + b.log.read_text()[-2000:]
        status = mesh.cl.run("curl", "-sS", "--max-time", "5", "http://198.18.2.2:4191/status").stdout
        assert '"evicted_idle"' in status
    finally:
        flood.stdin.close()
        flood.wait(timeout=10)
    assert "Traceback" not in b.log.read_text()
