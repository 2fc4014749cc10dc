"""How many CPUs the agent may use, for `proxy.workers = "auto"`.

The affinity mask (a cpuset, taskset) says which CPUs the agent may run on; a cgroup CPU quota
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`: systemd's CPUQuota=, a container's --cpus) says how
much of them it may use. A worker per visible CPU under a 2-CPU quota on a 32-CPU host would be
30 processes that only take turns.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
PROC_CGROUP: Final = Path("/proc/self/cgroup")
MAX_WORKERS: Final = 64


def auto_workers(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """One worker per CPU the agent may use: its affinity CPUs, fewer under a CPU quota (rounded
    up: 1.5 CPUs is 2), at most 64."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, min(MAX_WORKERS, cpus))


def cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The CPUs the agent's cgroup quota allows, rounded up, or None when there is none (or it
    cannot be read). The smallest over the agent's cgroup and its ancestors, which all apply."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        # "0::/system.slice/meshagent.service" (v2), "4:cpu,cpuacct:/user.slice" (v1)
        _id, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not controllers:
            limits += _quotas(cgroup_root, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            for mount in dict.fromkeys((controllers, "cpu")):
                found = _quotas(cgroup_root / mount, path, _v1_quota)
                if found:
                    limits += found
                    break
    return min(limits) if limits else None


def _quotas(mount: Path, path: str, read: Callable[[Path], int | None]) -> list[int]:
    """Each quota set on `path` or an ancestor under `mount`. In a container the mount is the
    container's own cgroup, and `path` (the host's name for it) may not exist below it: then
    only the mount's own files count."""
    found: list[int] = []
    here = mount / path.strip("/")
    for directory in (here, *here.parents):
        quota = read(directory)
        if quota is not None:
            found.append(quota)
        if directory == mount:
            break
    return found


def _v2_quota(directory: Path) -> int | None:
    """cpu.max: "max 100000" (no quota) or "150000 100000" (1.5 CPUs)."""
    try:
        fields = (directory / "cpu.max").read_text().split()
        if not fields or fields[0] == "max":
            return None
        period = int(fields[1]) if len(fields) > 1 else 100000
        return _cpus(int(fields[0]), period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> int | None:
    """cpu.cfs_quota_us (-1: no quota) over cpu.cfs_period_us."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _cpus(quota, period) if quota > 0 else None


def _cpus(quota: int, period: int) -> int | None:
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
