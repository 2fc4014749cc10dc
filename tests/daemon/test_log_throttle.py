"""A warning a client can cause at will is logged at once, then at most once per interval per
kind with how many were left out (a flood of 8,000 failed handshakes was 8,000 lines)."""

from __future__ import annotations

import logging

import pytest

from agent.logs import StructLogger, Throttled


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"event": record.getMessage(), **getattr(record, "fields", {})})


@pytest.fixture
def lines() -> Lines:
    handler = Lines()
    logger = logging.getLogger("meshagent.test.throttle")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def test_first_of_each_kind_at_once_then_one_line_per_interval(lines: Lines) -> None:
    throttled = Throttled(StructLogger(logging.getLogger("meshagent.test.throttle")), "tls.handshake_failed")
    for i in range(8000):
        throttled.warning("inbound:handshake timed out", now=i / 1000, peer=f"198.18.0.{i % 250}")
    throttled.warning("inbound:unknown ca", now=8.0, peer="198.18.0.9")
    throttled.warning("inbound:handshake timed out", now=10.5, peer="198.18.0.1")
    assert [(r.get("peer"), r.get("suppressed")) for r in lines.records] == [
        ("198.18.0.0", None),  # the first at once
        ("198.18.0.9", None),  # another kind is not held back by the first
        ("198.18.0.1", 7999),  # after the interval: one line, and what was left out
    ]


def test_kinds_from_outside_stay_bounded(lines: Lines) -> None:
    throttled = Throttled(StructLogger(logging.getLogger("meshagent.test.throttle")), "x", max_kinds=8)
    for i in range(1000):
        throttled.warning(f"kind-{i}", now=0.0)
    assert len(throttled._kinds) <= 8
    assert len(lines.records) == 1000  # each new kind logged once
