"""Process metrics (Prometheus' standard names) from psutil, and giving memory back."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import psutil

_PROC = psutil.Process(os.getpid())
_trim: list[Callable[[int], int] | None] = []  # malloc_trim, once looked up (None: not glibc)


def rss_bytes() -> int:
    return int(_PROC.memory_info().rss)


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


def render_process() -> Iterator[str]:
    with _PROC.oneshot():
        cpu = _PROC.cpu_times()
        mem = _PROC.memory_info()
        fds = _PROC.num_fds()
        started = _PROC.create_time()
    soft_fd_limit = _PROC.rlimit(psutil.RLIMIT_NOFILE)[0]
    for name, kind, help_text, value in (
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            cpu.user + cpu.system,
        ),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", mem.rss),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", mem.vms),
        ("process_open_fds", "gauge", "Number of open file descriptors.", fds),
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
