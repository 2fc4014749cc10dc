"""`meshagent demo --json --duration 20`: every step it reports, and nothing left behind."""

from __future__ import annotations

import json
import subprocess

import pytest

from agent.netlab import namespaces, netns_supported
from tests.support import MESHAGENT

pytestmark = pytest.mark.netns


def _demo_processes() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "meshagent-demo-" in line and "ps -eo" not in line]


def test_demo_proves_every_plane_and_leaves_nothing(tmp_path: object) -> None:
    if netns_supported():
        pytest.skip(str(netns_supported()))
    before = set(namespaces())
    proc = subprocess.run(
        [*MESHAGENT, "demo", "--json", "--duration", "20"], capture_output=True, text=True, timeout=600
    )
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["step"]: s for s in doc["steps"]}
    names = [s["step"] for s in doc["steps"]]
    assert names == [
        "world",
        "authority",
        "apps",
        "enroll",
        "enroll",
        "enroll",
        "agents",
        "first_mtls",
        "traffic",
        "wire",
        "stat",
        "refused",
        "ready",
        "removed",
    ]
    assert all(s["ok"] for s in doc["steps"])

    enrolled = {s["host"]: s["spiffe_id"] for s in doc["steps"] if s["step"] == "enroll"}
    assert enrolled == {
        "web": "spiffe://cluster.local/ns/shop/sa/web",
        "cache": "spiffe://cluster.local/ns/shop/sa/cache",
        "cluster": "spiffe://cluster.local/ns/demo/sa/client",
    }
    assert all(s["not_after"].endswith("Z") for s in doc["steps"] if s["step"] == "enroll")
    assert 0 < steps["first_mtls"]["token_to_mtls_seconds"]["web"] < 60
    assert steps["traffic"]["http"] == {"ok": 90, "server_errors": 10}
    assert steps["wire"]["tls13_handshakes"] >= 100 and steps["wire"]["payload_in_clear"] is False
    inbound = [r for r in steps["stat"]["rows"] if r["direction"] == "inbound"]
    assert inbound[0]["peer_identity"] == "client.demo.serviceaccount.identity.linkerd.cluster.local"
    assert inbound[0]["requests"] >= 101 and 0.85 < inbound[0]["success_rate"] < 0.95
    assert steps["refused"]["reason"].startswith("not_authorized")

    assert set(namespaces()) == before, "the demo left namespaces behind"
    assert _demo_processes() == [], "the demo left processes behind"
    assert (
        "meshagent" not in subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    )


def test_keep_then_down_removes_the_world() -> None:
    if netns_supported():
        pytest.skip(str(netns_supported()))
    before = set(namespaces())
    proc = subprocess.run(
        [*MESHAGENT, "demo", "--json", "--keep", "--duration", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        doc = json.loads(proc.stdout)
        assert doc["ok"], proc.stdout[-2000:]
        kept = next(s for s in doc["steps"] if s["step"] == "kept")
        assert set(kept["namespaces"]) <= set(namespaces())  # still up for exploring
    finally:
        down = subprocess.run([*MESHAGENT, "demo", "down"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "removed 3 namespaces" in down.stdout
    assert set(namespaces()) == before
    assert _demo_processes() == []
