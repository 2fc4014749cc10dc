"""A worker's own memory figures: measured in the worker, not in the process it was forked from."""

from __future__ import annotations

import os

from agent.telemetry.process import own_memory, rss_bytes


def test_rss_and_pss_are_the_calling_process_s_after_a_fork() -> None:
    """The module's psutil handle is made at import, before any fork: a child asking it would
    get its parent's figures. The child here holds 64 MB more than the parent: its figures say so."""
    parent_rss = rss_bytes()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # Against the child's own figures before the ballast: a fork starts the child's RSS
            # below its parent's (no page-table entries for file pages), by more as a test
            # session grows, so the parent's figure is no fixed baseline. The parent's figure,
            # what the bug gave, would not move at all.
            before_rss, (before_pss, before_own_rss) = rss_bytes(), own_memory()
            ballast = bytearray(64 * 2**20)  # zero-filled: resident in the child only
            pss, rss = own_memory()
            grown = 48 * 2**20
            ok = rss_bytes() - before_rss > grown and rss - before_own_rss > grown
            ok = ok and pss - before_pss > grown
            os.write(write_end, b"ok" if ok and ballast else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read()
    _pid, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert outcome == b"ok"
    assert rss_bytes() < parent_rss + 48 * 2**20  # and the parent's own figure is not the child's
