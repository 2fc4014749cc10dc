"""storage.ReportBuffer: health reports written behind, a batch at most once an interval."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.authority.storage import ReportBuffer, ReportRow, SqliteRegistry


class Store:
    """What the buffer writes to: the batches, in order; fails while `down`."""

    def __init__(self) -> None:
        self.batches: list[list[ReportRow]] = []
        self.down = False

    def write(self, rows: Sequence[ReportRow]) -> None:
        if self.down:
            raise OSError("database away")
        self.batches.append(sorted(rows))


def test_a_report_after_a_quiet_interval_is_written_at_once_the_others_together() -> None:
    store = Store()
    buffer = ReportBuffer(store.write, interval=3600)  # (the thread never wakes in this test)
    buffer.add("h-1", 1.0, "a")
    assert store.batches == [[("h-1", 1.0, "a")]]  # nothing written this interval: at once
    buffer.add("h-2", 2.0, "b")
    buffer.add("h-1", 3.0, "c")
    buffer.add("h-1", 2.5, "late")  # older than the one kept: dropped
    assert len(store.batches) == 1
    assert buffer.unwritten() == {"h-1": (3.0, "c"), "h-2": (2.0, "b")}
    buffer.flush()
    assert store.batches[1] == [("h-1", 3.0, "c"), ("h-2", 2.0, "b")]  # one batch
    assert buffer.unwritten() == {}
    buffer.close()


def test_a_failed_write_keeps_the_batch_unless_newer_reports_came() -> None:
    store = Store()
    buffer = ReportBuffer(store.write, interval=3600)
    store.down = True
    buffer.add("h-1", 1.0, "a")  # the write at once fails: logged, kept
    buffer.add("h-2", 1.0, "b")
    with pytest.raises(OSError):
        buffer.flush()
    buffer.add("h-2", 2.0, "newer")
    store.down = False
    buffer.close()  # writes what is left, then stops
    assert store.batches == [[("h-1", 1.0, "a"), ("h-2", 2.0, "newer")]]
    buffer.add("h-3", 1.0, "c")  # after close: written at once, no thread started
    assert store.batches[-1] == [("h-3", 1.0, "c")]


def test_a_process_that_exits_without_closing_writes_its_reports(tmp_path: Path) -> None:
    """The second report waits for the next batch; the process ends first (no close()):
    the exit writes it (a graceful stop of `authority serve` loses nothing)."""
    script = (
        "from pathlib import Path; from agent.authority.storage import SqliteRegistry;"
        f" r = SqliteRegistry(Path({str(tmp_path / 'registry.db')!r}));"
        " r.record_report('h-1', 'first', 1.0); r.record_report('h-2', 'second', 2.0)"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    registry = SqliteRegistry(tmp_path / "registry.db")
    try:
        assert registry.reports() == {"h-1": (1.0, "first"), "h-2": (2.0, "second")}
    finally:
        registry.close()
