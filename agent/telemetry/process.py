"""Process metrics (Prometheus' standard names) from psutil, and giving memory back."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import psutil

_PROC = psutil.Process(os.getpid())
_trim: list[Callable[[int], int] | None] = []  # malloc_trim, once looked up (None: not glibc)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/statm: the calling process's own even
    in a worker (`_PROC` was made before the fork and names the supervisor), and no psutil code
    touched (pages a worker would copy)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return int(psutil.Process().memory_info().rss)


def return_free_memory() -> bool:
    """Give the C heap's free pages back to the kernel: glibc's malloc_trim(0), which also
    releases free pages inside the heap, not only at its top (a peak of TLS handshakes leaves
    the heap fragmented, and free() alone returned none of it). False where there is no
    malloc_trim (not glibc). ctypes is loaded on first use (~0.3 MB): an agent that never
    peaks never pays for it."""
    if not _trim:
        import ctypes

        try:
            _trim.append(ctypes.CDLL(None).malloc_trim)
        except AttributeError:
            _trim.append(None)
    trim = _trim[0]
    if trim is None:
        return False
    trim(0)
    return True


def own_memory() -> tuple[int, int]:
    """This process's (PSS, RSS) in bytes from /proc/self/smaps_rollup, without psutil: a
    worker reports its own memory this way (psutil's code and objects are pages a worker would
    otherwise copy from the shared image). (0, 0) where the file cannot be read."""
    pss = rss = 0
    try:
        with open("/proc/self/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return pss, rss


class TreeMemory(NamedTuple):
    pss: int  # Σ proportional set size: shared pages counted once, as cgroup memory.current does
    rss: int  # Σ resident set size: pages shared by forked workers counted in each


def tree_memory(pids: Iterable[int]) -> TreeMemory:
    """Σ PSS and Σ RSS over exactly these processes (one gone meanwhile counts 0). PSS reads
    /proc/PID/smaps_rollup (about a millisecond for the agent); where it cannot be read, that
    process's RSS stands in for its PSS. A pid given twice counts once."""
    pss = rss = 0
    for pid in dict.fromkeys(pids):
        try:
            p = _PROC if pid == _PROC.pid else psutil.Process(pid)
            try:
                full = p.memory_full_info()
                pss += int(getattr(full, "pss", full.rss))
                rss += int(full.rss)
            except psutil.AccessDenied:
                r = int(p.memory_info().rss)
                pss, rss = pss + r, rss + r
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return TreeMemory(pss, rss)


def _others(pids: Iterable[int]) -> tuple[float, int]:
    """CPU seconds and open fds of the agent's other processes (its workers)."""
    cpu_s, fds = 0.0, 0
    for pid in pids:
        if pid == _PROC.pid:
            continue
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                t = p.cpu_times()
                cpu_s += t.user + t.system
                fds += p.num_fds()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return cpu_s, fds


def render_process(pids: Iterable[int] = (), dead_cpu_s: float = 0.0) -> Iterator[str]:
    """Prometheus' process metrics for the agent's whole process tree: this process plus `pids`
    (the live workers). CPU seconds and open fds are summed, with `dead_cpu_s` (the
    CPU of exited workers, from their rusage) added so the counter never goes down; resident
    and virtual memory, fd limit and start time are this process's own. The tree's memory is
    `meshagent_memory_bytes{kind="pss_total"|"rss_total"}`."""
    pids = [p for p in pids if p != _PROC.pid]
    with _PROC.oneshot():
        cpu = _PROC.cpu_times()
        mem = _PROC.memory_info()
        fds = _PROC.num_fds()
        started = _PROC.create_time()
    soft_fd_limit = _PROC.rlimit(psutil.RLIMIT_NOFILE)[0]
    others_cpu, others_fds = _others(pids)
    tree = tree_memory([_PROC.pid, *pids])
    for name, kind, help_text, value in (
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds (every process of the agent, "
            "exited workers included).",
            cpu.user + cpu.system + others_cpu + dead_cpu_s,
        ),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", mem.rss),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", mem.vms),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors (every process of the agent).",
            fds + others_fds,
        ),
        ("process_max_fds", "gauge", "Maximum number of open file descriptors.", soft_fd_limit),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            started,
        ),
    ):
        yield f"# HELP {name} {help_text}"
        yield f"# TYPE {name} {kind}"
        yield f"{name} {value}"
    yield (
        "# HELP meshagent_memory_bytes Memory of the agent's whole process tree: pss_total counts "
        "pages the workers share once (as the cgroup does), rss_total counts them in each process."
    )
    yield "# TYPE meshagent_memory_bytes gauge"
    yield f'meshagent_memory_bytes{{kind="pss_total"}} {tree.pss}'
    yield f'meshagent_memory_bytes{{kind="rss_total"}} {tree.rss}'
