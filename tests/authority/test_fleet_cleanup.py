"""bench/fleet.py leaves nothing running however it ends early: SIGTERM (it unwinds), SIGKILL
(the parent-death signal stops the replicas, haproxy and the shards; the reaper stops
PostgreSQL, which pg_ctl daemonized), and its own parent dying (its parent-death signal).

A short real run (20 hosts, real replicas behind haproxy) is killed once its agents are
enrolled; every process it had started (its "processes:" line, and its descendants at that
moment) must be gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests import pgcluster

ROOT = Path(__file__).resolve().parents[2]
FLEET = [sys.executable, "-m", "bench.fleet", "--hosts", "20", "--procs", "1", "--steady", "300",
         "--heartbeat", "1", "--renewals", "0"]  # fmt: skip


def _started(out: subprocess.Popen[str], fleet_pid: int) -> list[psutil.Process]:
    """Read the run's output until its agents are enrolled: the processes it started then."""
    assert out.stdout is not None
    named: dict[str, int] = {}
    lines = []
    for line in out.stdout:
        lines.append(line)
        if line.startswith("processes: "):
            named = json.loads(line.removeprefix("processes: "))
        if line.startswith("enroll: "):
            break
    else:
        raise AssertionError("the run ended before enrolling:\n" + "".join(lines))
    fleet = psutil.Process(fleet_pid)
    procs = {p.pid: p for p in fleet.children(recursive=True)}
    for pid in named.values():
        procs.setdefault(pid, psutil.Process(pid))  # (PostgreSQL and the reaper: not our children)
    assert {"r0", "r1", "haproxy", "shard0", "reaper"} <= named.keys(), named
    return [fleet, *procs.values()]


def _running(p: psutil.Process) -> bool:
    """Still running (a reused pid is another process: is_running checks its start time; a
    zombie has exited, only its parent has not reaped it yet)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(procs: list[psutil.Process], timeout_s: float = 60) -> None:
    """Until none of `procs` runs; AssertionError naming the survivors after `timeout_s`."""
    names = {p.pid: " ".join(p.cmdline()[:6]) for p in procs if _running(p)}
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, [(p.pid, names.get(p.pid)) for p in alive]


def _run(tmp_path: Path, database: str, wrapped: bool = False) -> tuple[subprocess.Popen[str], int]:
    argv = [*FLEET, "--database", database, "--replicas", "2", "--workdir", str(tmp_path / "run")]
    if wrapped:  # a parent of its own between us and the run: the parent that dies
        argv = [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])", *argv]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fleet_pid = proc.pid
    if wrapped:
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(proc.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        fleet_pid = children[0].pid
    return proc, fleet_pid


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_killed_fleet_run_leaves_no_process(tmp_path: Path, signum: int) -> None:
    proc, pid = _run(tmp_path, "sqlite")
    try:
        started = _started(proc, pid)
        os.kill(pid, signum)
        _gone(started)
    finally:
        _stop(proc)


@pytest.mark.skipif(not pgcluster.available(), reason="PostgreSQL server binaries not installed")
def test_a_fleet_run_on_postgresql_killed_9_leaves_no_postgresql(tmp_path: Path) -> None:
    proc, pid = _run(tmp_path, "postgresql")
    try:
        started = _started(proc, pid)
        assert any(p.name() == "postgres" for p in started)
        os.kill(pid, signal.SIGKILL)
        _gone(started)
    finally:
        _stop(proc)


def test_a_fleet_run_whose_parent_dies_leaves_no_process(tmp_path: Path) -> None:
    proc, pid = _run(tmp_path, "sqlite", wrapped=True)
    try:
        started = _started(proc, pid)
        proc.kill()  # the run's parent, not the run
        _gone(started)
    finally:
        _stop(proc)
