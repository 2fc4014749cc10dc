"""Rotation under load: 60-second certificates, continuous traffic for 3 minutes, no failure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.netlab import netns_supported
from tests.mesh import apps
from tests.mesh.conftest import PY, build_mesh, wait_for

LOOP = str(Path(__file__).parent / "tools" / "http_loop.py")
B = "198.18.3.2"


@pytest.mark.slow
@pytest.mark.netns
def test_rotation_every_minute_under_load_fails_no_request(tmp_path: Path) -> None:
    if netns_supported():
        pytest.skip(str(netns_supported()))
    with build_mesh(tmp_path, "--cert-lifetime", "60s") as mesh:
        apps.nginx(mesh.b, mesh.tmp, 8080)
        a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
        b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", [B], inbound_policy="all-authenticated")
        b.start()
        a.start()
        wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)
        # New connections (a handshake each) and long-lived keep-alive ones, side by side.
        # A slow answer is not a failure (CI machines are busy): 10 s, as wrk's timeout below.
        loop = mesh.a.popen(PY, LOOP, B, "8080", "180", "0.1", "10")
        wrk = mesh.a.popen("wrk", "-t1", "-c4", "-d180s", "--timeout", "10s", f"http://{B}:8080/")
        loop_out, _ = loop.communicate(timeout=240)
        wrk_out, _ = wrk.communicate(timeout=240)

        lines = loop_out.splitlines()
        failures = [line for line in lines if " ok " not in line]
        assert len(lines) > 1000
        assert failures == []
        assert "Socket errors" not in wrk_out and "Non-2xx" not in wrk_out, wrk_out
        assert int(re.search(r"(\d+) requests in", wrk_out).group(1)) > 1000  # type: ignore[union-attr]
        for agent in (a, b):
            renewals = agent.log.read_text().count("tls.reloaded")
            assert renewals >= 5, f"{agent.host.name} rotated {renewals} times in 3 minutes"
