"""How many loader processes a run gets: sized to the CPUs this process may use, not a fixed count."""

from __future__ import annotations

import os

__all__ = ["loader_workers"]


def loader_workers(cap: int = 8) -> int:
    """
    Loader worker processes for this process: the CPUs it may run on (its affinity, which container and job limits
    set), shared among the ranks torchrun starts on this machine (``LOCAL_WORLD_SIZE``), less one for the process
    itself, at most ``cap`` (each worker holds one volume in memory: about 0.5 GB at LUNA16 size).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(int(cap), cpus // ranks - 1))
