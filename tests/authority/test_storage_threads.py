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


OPENERS = 8
OPEN_ROUNDS = 40


def test_replicas_opening_one_new_file_at_once_all_open(tmp_path: Path) -> None:
    """Authority replicas start together on one SQLite file: switching it to WAL can answer
    "database is locked" at once, without waiting, while another opener holds it (CI saw a
    replica exit so). Each opener must wait its turn instead; threads race as processes do."""
    failures: list[str] = []
    opened: list[SqliteRegistry] = []

    def open_registry(path: Path, start: threading.Barrier) -> None:
        start.wait()
        try:
            opened.append(SqliteRegistry(path))
        except Exception as exc:  # the assertion below reports it
            failures.append(f"{path.parent.name}: {exc!r}")

    for round_ in range(OPEN_ROUNDS):
        path = tmp_path / f"round-{round_}" / "registry.db"
        path.parent.mkdir()
        start = threading.Barrier(OPENERS)
        openers = [threading.Thread(target=open_registry, args=(path, start)) for _ in range(OPENERS)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join()
        for registry in opened:
            assert registry.list_hosts() == []
            registry.close()
        opened.clear()
    assert failures == []
