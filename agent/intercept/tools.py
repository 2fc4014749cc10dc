"""The one place interception runs programs: a `Step` is argv plus stdin, run or printed.

Backends describe what they would do as a list of Steps (so `--dry-run` prints exactly what
`apply` runs) and run them here; a failing tool becomes an InterceptError quoting its stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.logs import get_logger

from .errors import InterceptError

log = get_logger("meshagent.intercept")

TOOL_TIMEOUT_S = 60.0
SEARCH_PATH = "/usr/sbin:/sbin:/usr/bin:/bin:/usr/local/sbin:/usr/local/bin"


@dataclass(frozen=True)
class Step:
    """One program run: `argv` with `stdin` fed to it. `what` says it in words."""

    argv: tuple[str, ...]
    stdin: str
    what: str

    def describe(self) -> str:
        head = f"# {self.what}\n# $ {' '.join(self.argv)}"
        return f"{head} <<'EOF'\n{self.stdin}EOF\n" if self.stdin else head + "\n"


def which(name: str) -> str | None:
    """Find a tool on PATH, then in the sbin directories (cron and sudo often lack them)."""
    return shutil.which(name) or shutil.which(name, path=SEARCH_PATH)


def read(argv: Sequence[str]) -> str:
    """Run a read-only tool and return its stdout; failure is an InterceptError."""
    proc = _run(argv, "")
    if proc.returncode != 0:
        raise InterceptError(
            f"`{' '.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip()}",
            "run as root (CAP_NET_ADMIN) and check that the tool works on this kernel",
        )
    return proc.stdout


def run(step: Step) -> None:
    proc = _run(step.argv, step.stdin)
    if proc.returncode != 0:
        log.error("intercept.step_failed", argv=" ".join(step.argv), rc=proc.returncode, stderr=proc.stderr)
        raise InterceptError(
            f"{step.what}: `{' '.join(step.argv)}` failed (exit {proc.returncode}): {proc.stderr.strip()}",
            "nothing of this step was applied (the transaction is atomic); "
            "`meshagent intercept apply --dry-run` prints the input that was refused",
        )
    log.info("intercept.step_done", what=step.what, argv=" ".join(step.argv))


def _run(argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C"}
    try:
        return subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, env=env
        )
    except FileNotFoundError:
        raise InterceptError(f"{argv[0]} is not installed", "install iptables or nftables") from None
    except subprocess.TimeoutExpired:
        raise InterceptError(
            f"`{' '.join(argv)}` did not finish in {TOOL_TIMEOUT_S:.0f}s",
            "another process may hold the xtables lock; try again",
        ) from None


def child(module: str, args: Sequence[str], doc: Any, timeout_s: float) -> Any:
    """Run `python -m agent.intercept.<module> ARGS` with `doc` as JSON on stdin; its JSON stdout.

    For the netlink work of an apply: pyroute2 costs ~10 MB of RSS for as long as it is
    imported, and `meshagent run` applies plans in-process, so it is imported only by a
    short-lived child (~0.3 s per apply), as renewal is. Failure is an InterceptError."""
    argv = [sys.executable, "-m", f"agent.intercept.{module}", *args]
    try:
        proc = subprocess.run(argv, input=json.dumps(doc), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise InterceptError(
            f"`{' '.join(argv[1:])}` did not finish in {timeout_s:.0f}s",
            "the host may be overloaded; try again",
        ) from None
    except OSError as exc:
        raise InterceptError(f"cannot start `{' '.join(argv[1:])}`: {exc}") from None
    if proc.returncode != 0:
        raise InterceptError(
            f"`{' '.join(argv[1:])}` failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}",
            "run as root (CAP_NET_ADMIN) and check that the kernel has nf_tables and nf_conntrack",
        )
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise InterceptError(f"`{' '.join(argv[1:])}` printed no JSON: {proc.stdout[-300:]!r}") from None
