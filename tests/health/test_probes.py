"""Probes: config parsing, the pure state machine (table), and the runner against real servers
on 127.0.0.1 (a TCP listener, a tiny HTTP server, /bin/true, /bin/false, a command that hangs).
Rounds are driven by hand (`run_round`) and counted; nothing waits on wall time."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.health.probes import ProbeResult, ProbeRunner, ProbeSpec, ProbeState, parse_probes, step

# --- config --------------------------------------------------------------------------------------


def test_parse_probes_defaults_and_kinds() -> None:
    specs = parse_probes(
        [
            {"port": 8080, "kind": "http", "path": "/healthz", "expect_status": 204, "interval_s": 5},
            {"port": 5432, "kind": "tcp", "failure_threshold": 2, "success_threshold": 2},
            {"port": 8080, "kind": "exec", "command": ["/bin/true"], "timeout_s": 0.5},
        ]
    )
    http, tcp, ex = specs
    assert (http.path, http.expect_status, http.interval_s, http.timeout_s) == ("/healthz", 204, 5.0, 1.0)
    assert (tcp.failure_threshold, tcp.success_threshold, tcp.interval_s) == (2, 2, 10.0)
    assert ex.command == ("/bin/true",) and ex.timeout_s == 0.5
    assert [s.label for s in specs] == ["http :8080/healthz", "tcp :5432", "exec :8080 (/bin/true)"]


@pytest.mark.parametrize(
    ("doc", "message", "hint"),
    [
        ({"port": 80}, "health.probes[0].kind must be one of tcp, http, exec, got None", ""),
        ({"kind": "tcp"}, "health.probes[0] has no port", ""),
        ({"port": 0, "kind": "tcp"}, "health.probes[0].port must be an integer 1..65535, got 0", ""),
        ({"port": True, "kind": "tcp"}, "port must be an integer", ""),
        ({"port": 80, "kind": "tcp", "pth": "/"}, "unknown key health.probes[0].pth", "another kind"),
        ({"port": 80, "kind": "http", "pth": "/"}, "unknown key health.probes[0].pth", "did you mean"),
        ({"port": 80, "kind": "http", "periodSeconds": 5}, "unknown key", "a http probe takes"),
        ({"port": 80, "kind": "http", "path": "healthz"}, "path must be an absolute request path", ""),
        ({"port": 80, "kind": "http", "path": "/a b"}, "path must be an absolute request path", ""),
        ({"port": 80, "kind": "http", "expect_status": 99}, "expect_status must be an integer 100..599", ""),
        ({"port": 80, "kind": "exec"}, "command must be a non-empty list", "/bin/sh"),
        ({"port": 80, "kind": "exec", "command": "/bin/true"}, "command must be a non-empty list", ""),
        ({"port": 80, "kind": "exec", "command": [""]}, "command must be a non-empty list", ""),
        ({"port": 80, "kind": "tcp", "interval_s": 0}, "interval_s must be between 1 and 3600", ""),
        ({"port": 80, "kind": "tcp", "interval_s": "5"}, "interval_s must be a number", ""),
        ({"port": 80, "kind": "tcp", "timeout_s": 20}, "timeout_s (20) is longer than its interval_s", ""),
        (
            {"port": 80, "kind": "tcp", "failure_threshold": 0},
            "failure_threshold must be an integer 1..100",
            "",
        ),
        ("tcp", "health.probes[0] must be a table", ""),
    ],
)
def test_parse_probes_refusals_name_the_key(doc: Any, message: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_probes([doc])
    assert message in info.value.message
    assert hint in info.value.hint


def test_parse_probes_refuses_a_second_probe_of_one_kind_per_port_and_too_many() -> None:
    with pytest.raises(ConfigError, match=r"health.probes\[1\]: a second tcp probe of port 80"):
        parse_probes([{"port": 80, "kind": "tcp"}, {"port": 80, "kind": "tcp"}])
    assert len(parse_probes([{"port": 80, "kind": "tcp"}, {"port": 80, "kind": "http"}])) == 2
    with pytest.raises(ConfigError, match="at most 32"):
        parse_probes([{"port": p, "kind": "tcp"} for p in range(1, 34)])
    with pytest.raises(ConfigError, match="must be a list of tables"):
        parse_probes({"port": 80})  # type: ignore[arg-type]


# --- the state machine -------------------------------------------------------------------------

OK, BAD = ProbeResult(True, "ok"), ProbeResult(False, "refused")


@pytest.mark.parametrize(
    ("failure_threshold", "success_threshold", "results", "oks"),
    [
        # Failing until the first pass (success_threshold 1), as Kubernetes' readiness.
        (3, 1, [OK], [True]),
        (3, 1, [BAD, BAD, OK], [False, False, True]),
        # Failing only after 3 failures in a row; a pass in between resets the count.
        (3, 1, [OK, BAD, BAD, BAD, BAD], [True, True, True, False, False]),
        (3, 1, [OK, BAD, BAD, OK, BAD, BAD, BAD], [True, True, True, True, True, True, False]),
        # Back after success_threshold passes in a row; a failure in between resets that count.
        (1, 2, [OK, OK, BAD, OK, BAD, OK, OK], [False, True, False, False, False, False, True]),
        (1, 1, [OK, BAD, OK, BAD], [True, False, True, False]),
    ],
)
def test_step_applies_the_thresholds(
    failure_threshold: int, success_threshold: int, results: list[ProbeResult], oks: list[bool]
) -> None:
    spec = ProbeSpec(8080, "tcp", failure_threshold=failure_threshold, success_threshold=success_threshold)
    state = ProbeState.initial(0.0)
    seen = []
    for t, result in enumerate(results, start=1):
        before = state
        state = step(state, result, float(t), spec)
        seen.append(state.ok)
        # `since` moves exactly when ok flips.
        assert state.since == (float(t) if state.ok != before.ok else before.since)
    assert seen == oks


def test_step_detail_says_a_failure_has_not_counted_yet() -> None:
    spec = ProbeSpec(8080, "tcp")
    state = step(ProbeState.initial(0), OK, 1, spec)
    state = step(state, ProbeResult(False, "connection refused"), 2, spec)
    assert state.ok and state.detail == "connection refused (1 of 3 failures to turn failing)"
    state = step(step(state, BAD, 3, spec), ProbeResult(False, "x" * 500), 4, spec)
    assert not state.ok and state.detail == "x" * 200 and state.since == 4


# --- the runner, against real servers on 127.0.0.1 -----------------------------------------------


@contextmanager
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


def free_port() -> int:
    with listener() as sock:
        return int(sock.getsockname()[1])


@asynccontextmanager
async def http_app(status: dict[str, int]) -> AsyncIterator[int]:
    """A tiny HTTP server answering `status["code"]` to every request; yields its port."""
    paths: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        paths.append(line.split()[1])
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        code = status["code"]
        if code == 0:  # hang: never answer
            await asyncio.sleep(3600)
        writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    status["paths"] = paths  # type: ignore[assignment]
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def test_runner_flips_within_failure_threshold_rounds_and_back_on_recovery() -> None:
    async def main() -> None:
        app = {"code": 200}
        async with http_app(app) as port:
            changes: list[int] = []
            clock = iter(range(100, 1000))
            runner = ProbeRunner(
                parse_probes([{"port": port, "kind": "http", "path": "/healthz"}]),
                clock=lambda: float(next(clock)),
                on_change=lambda: changes.append(runner.rounds),
            )
            (first,) = runner.results()
            assert (first["ok"], first["detail"], first["since"]) == (False, "not probed yet", 100.0)
            assert await runner.run_round() is True
            assert runner.all_ok() and runner.results()[0]["detail"] == "GET /healthz: status 200"
            ok_since = runner.results()[0]["since"]
            app["code"] = 503  # the app fails: Ready must be false within 3 rounds
            rounds_to_fail = 0
            while runner.all_ok():
                await runner.run_round()
                rounds_to_fail += 1
                assert rounds_to_fail <= 3
            assert rounds_to_fail == 3
            (failing,) = runner.results()
            assert failing["detail"] == "GET /healthz: status 503, expected 200-399"
            assert failing["since"] > ok_since
            app["code"] = 200  # recovery: back after one passing round (success_threshold 1)
            assert await runner.run_round() is True and runner.all_ok()
            assert changes == [0, 3, 4]  # on_change at each flip, before the round is counted
            assert set(app["paths"]) == {b"/healthz"}  # type: ignore[arg-type]

    asyncio.run(main())


def test_http_expect_status_and_timeout() -> None:
    async def main() -> None:
        app = {"code": 204}
        async with http_app(app) as port:
            runner = ProbeRunner(
                parse_probes(
                    [
                        {
                            "port": port,
                            "kind": "http",
                            "expect_status": 204,
                            "timeout_s": 0.2,
                            "failure_threshold": 1,
                        }
                    ]
                )
            )
            await runner.run_round()
            assert runner.all_ok()
            app["code"] = 200  # not the one expected
            await runner.run_round()
            assert runner.results()[0]["detail"] == "GET /: status 200, expected 204"
            app["code"] = 0  # the app hangs: the probe gives up at its timeout
            await runner.run_round()
            assert runner.results()[0]["detail"] == "GET /: no answer within 0.2s"

    asyncio.run(main())


def test_tcp_probe_against_a_listener_and_a_closed_port() -> None:
    async def main() -> None:
        with listener() as sock:
            port = sock.getsockname()[1]
            runner = ProbeRunner(parse_probes([{"port": port, "kind": "tcp", "failure_threshold": 1}]))
            await runner.run_round()
            assert runner.all_ok() and runner.results()[0]["detail"] == "connected"
        await runner.run_round()  # the listener is gone
        (result,) = runner.results()
        assert not result["ok"] and result["detail"] == f"connect to 127.0.0.1:{port}: Connection refused"

    asyncio.run(main())


def test_http_probe_of_something_that_is_not_http() -> None:
    async def main() -> None:
        async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"\x00\x01 hello\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(babble, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        runner = ProbeRunner(parse_probes([{"port": port, "kind": "http"}]))
        await runner.run_round()
        server.close()
        (result,) = runner.results()
        assert not result["ok"] and result["detail"].startswith("GET /: not an HTTP answer")
        assert result["detail"].isprintable()

    asyncio.run(main())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_exec_probes_true_false_missing_and_killed_on_timeout(tmp_path: Any) -> None:
    pidfile = tmp_path / "child.pid"

    async def main() -> None:
        specs = parse_probes(
            [
                {"port": 1, "kind": "exec", "command": ["/bin/true"]},
                {"port": 2, "kind": "exec", "command": ["/bin/false"], "failure_threshold": 1},
                {"port": 3, "kind": "exec", "command": ["/bin/sh", "-c", "echo 'db down' >&2; exit 3"]},
                {"port": 4, "kind": "exec", "command": [str(tmp_path / "missing")]},
                # Hangs past its timeout, with a child of its own that must die with it.
                {
                    "port": 5,
                    "kind": "exec",
                    "command": ["/bin/sh", "-c", f"sleep 30 >/dev/null 2>&1 & echo $! > {pidfile}; wait"],
                    "timeout_s": 0.5,
                },
            ]
        )
        runner = ProbeRunner(specs)
        await runner.run_round()
        results = runner.results()
        assert [r["ok"] for r in results] == [True, False, False, False, False]
        assert results[0]["detail"] == "exit 0"
        assert results[1]["detail"] == "/bin/false: exit 1"
        assert results[2]["detail"] == "/bin/sh: exit 3: db down"
        assert results[3]["detail"].startswith(f"cannot run {tmp_path / 'missing'}: No such file")
        assert results[4]["detail"] == "/bin/sh did not finish within 0.5s: killed"

    asyncio.run(main())
    child = int(pidfile.read_text())
    # Killed with its group: gone once the kernel has delivered the SIGKILL (waited for, up to
    # 5 s; without the group kill it lives its 30 s).
    for _ in range(100):
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child)


def test_results_shape_is_the_reports() -> None:
    runner = ProbeRunner(parse_probes([{"port": free_port(), "kind": "tcp"}]), clock=lambda: 7.0)
    assert runner.results() == [
        {"port": runner.specs[0].port, "kind": "tcp", "ok": False, "detail": "not probed yet", "since": 7.0}
    ]
