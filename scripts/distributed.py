"""Process-group helpers for `configs/multi_gpu_train.json` (torchrun: nccl on CUDA, gloo on CPU)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import ignite.distributed as idist
import torch
import torch.distributed as dist

__all__ = [
    "init_process_group",
    "destroy_process_group",
    "local_device",
    "is_distributed",
    "is_rank0",
    "rank0_first",
    "gather_lists",
]

T = TypeVar("T")


def local_device() -> torch.device:
    """This process's device: ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_process_group(backend: str | None = None) -> None:
    """Join the torchrun process group (``nccl`` on CUDA, ``gloo`` on CPU) unless already joined."""
    if is_distributed():
        return
    if "RANK" not in os.environ:
        raise RuntimeError(
            "multi_gpu_train.json needs torchrun: torchrun --nproc_per_node=N -m monai.bundle run training "
            "--config_file \"['configs/train.json','configs/multi_gpu_train.json']\""
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    # ignite sets up its own view of the group with collectives on first use; do it now, on every rank, so that
    # rank-0-only handlers (checkpoint savers) do not wait for ranks that never come
    idist.sync()


def destroy_process_group() -> None:
    """Leave the process group after a barrier, so no rank exits while another still needs it."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process is one rank of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def is_rank0() -> bool:
    """Whether this process writes files (rank 0, or not distributed)."""
    return not is_distributed() or dist.get_rank() == 0


def rank0_first(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0, then on the other ranks (which then find what rank 0 made, e.g. the phantom data)."""
    if is_rank0():
        result = fn(*args, **kwargs)
    if is_distributed():
        dist.barrier()
    if not is_rank0():
        result = fn(*args, **kwargs)
    return result


def gather_lists(*lists: list) -> tuple[list, ...]:
    """Each list concatenated over the ranks in rank order (the lists as they are when not distributed).

    A collective: every rank must call it at the same point.
    """
    if not is_distributed():
        return lists
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lists)
    return tuple([x for g in gathered for x in g[i]] for i in range(len(lists)))
