"""Process metrics (Prometheus' standard names) from psutil."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil

_PROC = psutil.Process(os.getpid())


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
