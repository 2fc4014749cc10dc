"""Nothing the fleet benchmark starts outlives it.

Three ways a run can end early, and what stops its processes in each:
- SIGINT, SIGTERM, SIGHUP to bench/fleet.py: it unwinds (`stop_on_signals`), and its context
  managers stop the replicas, haproxy, PostgreSQL and the shards as on a normal exit.
- SIGKILL (or a crash) of bench/fleet.py: the processes it forked itself (replicas, haproxy,
  shards) get the parent-death signal the kernel sends when it dies (`die_with_parent`,
  `pdeathsig_prefix`). PostgreSQL cannot: `pg_ctl` daemonizes the postmaster, which is nobody's
  child of ours. So a `Reaper`, a small process of its own session that holds a pipe from the
  run, stops what was registered with it (`pg_ctl stop -m immediate`, process groups, temp
  dirs) when that pipe closes without a "done": whatever way the run died.
- The parent of bench/fleet.py dying (a closed terminal, `timeout` killed): the run itself has a
  parent-death signal (SIGTERM), and unwinds as above.

    .venv/bin/python -m bench.fleet_reaper     # (started by `Reaper`; reads its commands on stdin)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send this process `signum` when the thread that forked it exits (its
    parent process, for a child forked by the main thread). Linux only; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def pdeathsig_prefix(signame: str = "TERM") -> list[str]:
    """A command prefix that gives an exec'd program a parent-death signal (util-linux setpriv:
    no preexec_fn, which is unsafe in a process with threads). Empty where setpriv is missing."""
    return ["setpriv", f"--pdeathsig={signame}", "--"] if shutil.which("setpriv") else []


class Reaper:
    """The run's watchdog process (see the module's doc). Register each thing as it starts;
    `close()` at the very end of a clean run (everything already stopped): the reaper then
    exits doing nothing."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet_reaper"],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C or kill of the run's group does not reach it
            cwd=Path(__file__).resolve().parent.parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, doc: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(doc).encode() + b"\n")
        self.proc.stdin.flush()

    def kill_group(self, pid: int) -> None:
        """SIGTERM (then SIGKILL) the process group led by `pid` if the run dies."""
        with contextlib.suppress(psutil.Error):
            self._send({"group": pid, "created": psutil.Process(pid).create_time()})

    def run_command(self, argv: list[str]) -> None:
        self._send({"run": argv})

    def remove(self, path: Path) -> None:
        self._send({"remove": str(path)})

    def close(self) -> None:
        """The run ended cleanly: nothing left to do."""
        with contextlib.suppress(OSError, ValueError):
            self._send({"done": True})
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _reap(groups: list[tuple[int, float]], commands: list[list[str]], paths: list[str]) -> None:
    """Groups first (the replicas hold PostgreSQL connections), then commands, then files."""
    alive = []
    for pid, created in groups:
        with contextlib.suppress(psutil.Error, OSError):
            if psutil.Process(pid).create_time() == created:  # not a reused pid
                os.killpg(pid, signal.SIGTERM)
                alive.append(pid)
    for pid in alive:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(timeout=10)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    for argv in commands:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, capture_output=True, timeout=60, check=False)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP):  # only the pipe's end matters
        signal.signal(signum, signal.SIG_IGN)
    groups: list[tuple[int, float]] = []
    commands: list[list[str]] = []
    paths: list[str] = []
    for line in sys.stdin.buffer:
        doc = json.loads(line)
        if doc.get("done"):
            return
        if "group" in doc:
            groups.append((doc["group"], doc["created"]))
        elif "run" in doc:
            commands.append(doc["run"])
        elif "remove" in doc:
            paths.append(doc["remove"])
    _reap(groups, commands, paths)  # the pipe closed without "done": the run died


if __name__ == "__main__":
    main()
