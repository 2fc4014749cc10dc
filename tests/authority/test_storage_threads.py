"""The registry's one SQLite connection used from the event loop and from worker threads at once
(the Kubernetes controller writes policies through asyncio.to_thread while enrollments run)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

from agent.authority.storage import PolicyRecord, SqliteRegistry

ROUNDS = 300


def test_transactions_from_two_threads_do_not_interleave(tmp_path: Path) -> None:
    registry = SqliteRegistry(tmp_path / "registry.db")
    now = datetime(2025, 1, 1, tzinfo=UTC)
    errors: list[BaseException] = []

    def policies() -> None:
        try:
            for i in range(ROUNDS):
                registry.set_policies([PolicyRecord(f"shop/app-{i}", 8080, "deny", ())])
                registry.policies()
        except BaseException as exc:  # the assertion below reports it
            errors.append(exc)

    writer = threading.Thread(target=policies)
    writer.start()
    try:
        for i in range(ROUNDS):
            registry.add_static_entry(f"198.18.{i // 256}.{i % 256}/32", (80,), "shop/web", now)
            registry.list_hosts()
    finally:
        writer.join()

    assert errors == []
    assert len(registry.policies()) == ROUNDS
    assert len(registry.static_entries()) == ROUNDS
    registry.close()
