"""The agent's report: its body (checked by the authority's own parser) and the loop that sends
it at once on a change and otherwise every interval. Driven by pokes, not by wall time."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.authority.health import parse_report
from agent.errors import UnreachableError
from agent.health.report import Reporter, build_report


def test_build_report_is_what_the_authority_accepts() -> None:
    probes = [{"port": 8080, "kind": "http", "ok": False, "detail": "GET /: status 503", "since": 5.0}]
    doc = build_report(
        not_ready_reasons=["proxy: listeners not up", "x" * 2000],
        directory_updated_at=10.5,
        refresh_interval_s=30.0,
        probes=probes,
    )
    assert doc["ready"] is False and len(doc["reason"]) == 1000 and doc["reason"].endswith("...")
    report = parse_report(doc)
    assert (report.ready, report.refresh_interval_s, report.directory_updated_at) == (False, 30.0, 10.5)
    assert report.probes[0].detail == "GET /: status 503"
    ready = build_report(not_ready_reasons=[], directory_updated_at=None, refresh_interval_s=5)
    assert (ready["ready"], ready["reason"], ready["probes"]) == (True, "", [])
    assert parse_report(ready).ready


def test_reporter_sends_at_once_on_a_change_not_on_a_poke_alone() -> None:
    async def main() -> None:
        state: dict[str, Any] = {"reasons": [], "fail": False}
        sent: list[dict[str, Any]] = []
        arrived, refused = asyncio.Event(), asyncio.Event()

        def build() -> dict[str, Any]:
            return build_report(
                not_ready_reasons=state["reasons"], directory_updated_at=1.0, refresh_interval_s=30
            )

        def send(doc: dict[str, Any]) -> None:
            if state["fail"]:
                loop.call_soon_threadsafe(refused.set)
                raise UnreachableError("authority down")
            sent.append(doc)
            loop.call_soon_threadsafe(arrived.set)

        loop = asyncio.get_running_loop()
        # Interval and recheck far away: only the first report and pokes can send.
        reporter = Reporter(build, send, interval_s=3600, recheck_s=3600)
        stop = asyncio.Event()
        task = asyncio.create_task(reporter.run(stop))

        async def next_report() -> dict[str, Any]:
            await asyncio.wait_for(arrived.wait(), 10)
            arrived.clear()
            return sent[-1]

        assert (await next_report())["ready"] is True
        state["reasons"] = ["proxy: listeners not up"]
        reporter.poke()
        assert (await next_report())["reason"] == "proxy: listeners not up"
        reporter.poke()  # nothing changed: nothing sent (the loop has woken and gone back to wait)
        state["fail"] = True
        state["reasons"] = []
        reporter.poke()  # a change, but the authority is down: counted, logged, the loop lives
        await asyncio.wait_for(refused.wait(), 10)
        stop.set()  # the loop finishes the send under way, then ends
        await asyncio.wait_for(task, 10)
        assert (reporter.sent, reporter.failures) == (2, 1) and len(sent) == 2
        assert reporter.last_error == "authority_unreachable: authority down"

    asyncio.run(main())


def test_a_multi_line_reason_is_reported_on_one_line_and_accepted() -> None:
    """A failed renewal's reason carries the subprocess's stderr, newlines and all: the report
    must still be one the authority accepts (it refuses control characters)."""

    doc = build_report(
        not_ready_reasons=["task rotation: renew_failed: Traceback\n  File x\r\n\x1b[31mboom"],
        directory_updated_at=1.0,
        refresh_interval_s=30.0,
        probes=[{"port": 80, "kind": "exec", "ok": False, "detail": "exit 1:\nline two\t", "since": 1.0}],
    )
    assert "\n" not in doc["reason"] and "\n" not in doc["probes"][0]["detail"]
    report = parse_report(doc)
    assert not report.ready and "boom" in report.reason
