"""How many CPUs this process may use.

`default_threads(environ)` is the engine's thread count without `--threads`: a user's own
OMP_NUM_THREADS (as torch would take it), else `usable_cpus()`: the CPUs in this process's
affinity mask, capped by the cgroup CPU quota (a container limited to 2 CPUs on a 64-core host
gets 2; libgomp and torch see only the affinity mask, so they would start 64 threads there).
How the engine shares those CPUs with busy neighbours is server/engine/threads.py's business.

Nothing here imports torch or knows about the engine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def default_threads(environ: Mapping[str, str], cpus: Callable[[], int] | None = None) -> int:
    """OMP_NUM_THREADS when it is a positive integer, else `cpus()` (default usable_cpus())."""
    try:
        threads = int(environ.get("OMP_NUM_THREADS", ""))
    except ValueError:  # unset, or a list ("4,2") meant for nested regions
        threads = 0
    return threads if threads >= 1 else (cpus or usable_cpus)()


def usable_cpus(
    cgroup_root: Path = CGROUP_ROOT,
    affinity: Callable[[], int] | None = None,
) -> int:
    """CPUs this process may run on, capped by the cgroup CPU quota (rounded up); at least 1."""
    cpus = (affinity or _affinity_count)()
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup CPU quota in CPUs (quota / period), or None: no quota, or none we can read.

    cgroup v2: `cpu.max` = "QUOTA PERIOD" or "max PERIOD". cgroup v1: `cpu.cfs_quota_us` (-1 = none)
    over `cpu.cfs_period_us`, under the `cpu` or `cpu,cpuacct` controller. Only the cgroup root
    as this process sees it is read (a container's own cgroup, under a cgroup namespace).
    """
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        fields = v2.split()
        if len(fields) == 2 and fields[0] != "max":
            return _ratio(fields[0], fields[1])
        return None
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota, period = (
            _read(root / controller / "cpu.cfs_quota_us"),
            _read(root / controller / "cpu.cfs_period_us"),
        )
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    """quota / period as CPUs; None for no quota (-1), a zero period or text that is not a number."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:
        return None
    return q / p
