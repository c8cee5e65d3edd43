"""Where the gateway's work runs: the model in the gateway process or in CTRModel, and how
many gateway processes (one per usable core)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ctr.settings import Settings


def runs_local(settings: Settings) -> bool:
    """Whether the gateway runs the model itself (CTR_MODEL_REPLICA; auto: on a CPU) rather than
    calling the CTRModel service; CTR_MODEL_URLS, when set, wins over both."""
    if settings.model_urls or settings.model_replica == "in-graph":
        return False
    return settings.model_replica == "local" or settings.device == "cpu" or not _gpu_visible()


def _gpu_visible() -> bool:
    """Whether an NVIDIA device node exists. Every process of `bentoml serve` imports
    service.py, so torch is not asked (its import costs each process ~180 MB): with a device
    node the model goes in-graph, and CTRModel finds out whether the GPU works."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def gateway_workers(settings: Settings) -> int:
    """CTR_GATEWAY_WORKERS, or for 0: a process per core when each runs the model itself (it does
    all of a request's work), else half the cores (CTRModel's processes need the rest)."""
    if settings.gateway_workers:
        return settings.gateway_workers
    cores = usable_cores()
    return cores if runs_local(settings) else max(1, cores // 2)


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's or pod's CPU limit), at least 1; os.cpu_count() is the host's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 file, or an unexpected one: no quota known
        pass
    return max(1, cores)
