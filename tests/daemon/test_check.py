"""`meshagent check`'s cluster discovery line, read from the directory the agent cached."""

from __future__ import annotations

import json
from pathlib import Path

from agent.check import discovery_check
from agent.daemon import HOST_CONFIG_CACHE

NOW = 1_800_000_000.0


def cached(state_dir: Path, discovery: dict[str, object] | None, services: int = 2) -> None:
    doc: dict[str, object] = {
        "host_id": "h1",
        "catalog": [],
        "policy": {"ports": {}},
        "services": [{"name": f"s{i}", "namespace": "shop"} for i in range(services)],
        "generated_at": NOW - 5,
    }
    if discovery is not None:
        doc["discovery"] = discovery
    (state_dir / HOST_CONFIG_CACHE).write_text(json.dumps(doc))


def test_unreachable_api_is_a_warning_with_since_and_a_hint(tmp_path: Path) -> None:
    cached(
        tmp_path,
        {"source": "kubernetes", "state": "unreachable", "since": NOW - 300, "updated_at": NOW - 900},
    )
    result = discovery_check(tmp_path, NOW)
    assert (result.ok, result.warning) == (True, True)
    assert "cannot reach the Kubernetes API since 2027-01-15 07:55:00 UTC (300s ago)" in result.detail
    assert "the last known 2 Service(s) (of 2027-01-15 07:45:00 UTC (900s ago)) are served" in result.detail
    assert "kube.unreachable" in result.hint


def test_unreachable_before_anything_was_discovered_says_none_is_served(tmp_path: Path) -> None:
    cached(
        tmp_path,
        {"source": "kubernetes", "state": "unreachable", "since": NOW - 10, "updated_at": None},
        services=0,
    )
    result = discovery_check(tmp_path, NOW)
    assert result.warning
    assert "none are served" in result.detail


def test_reachable_api_passes_without_hint(tmp_path: Path) -> None:
    cached(tmp_path, {"source": "kubernetes", "state": "ok", "since": None, "updated_at": NOW - 60})
    result = discovery_check(tmp_path, NOW)
    assert (result.ok, result.warning, result.hint) == (True, False, "")
    assert "reaches the Kubernetes API; 2 Service(s)" in result.detail


def test_no_controller_or_no_cache_passes(tmp_path: Path) -> None:
    no_cache = discovery_check(tmp_path, NOW)
    assert (no_cache.ok, no_cache.warning) == (True, False)
    assert "not fetched" in no_cache.detail
    cached(tmp_path, None)
    plain = discovery_check(tmp_path, NOW)
    assert (plain.ok, plain.warning) == (True, False)
    assert "not used" in plain.detail


def test_unreadable_cache_fails_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / HOST_CONFIG_CACHE).write_text("{not json")
    result = discovery_check(tmp_path, NOW)
    assert not result.ok
    assert result.hint
