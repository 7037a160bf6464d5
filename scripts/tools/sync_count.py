"""Count the aten ops of a block of code that would make the host wait for a GPU (a host sync)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "SyncCounter"]

# ops whose result (a Python number, or a shape) depends on tensor values: on a GPU each one waits for the device
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), bool(t), int(t), float(t)
        "nonzero",  # torch.where(cond) and nonzero: the output shape is data dependent
        "nonzero_static",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "equal",  # torch.equal returns a Python bool
    }
)
# ops that are a host sync only when an index is a boolean mask (its number of True values sets the shape)
_MASK_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def _blocking_transfer(name: str, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """``"copy(src->dst)"`` for a blocking copy between the CPU and another device, else None."""
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
        src, dst = args[0].device, kwargs.get("device") or args[0].device
        non_blocking = bool(kwargs.get("non_blocking", False))
    elif name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        src, dst = args[1].device, args[0].device
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    else:
        return None
    src, dst = torch.device(src), torch.device(dst)
    if src.type == dst.type or "cpu" not in (src.type, dst.type) or non_blocking:
        return None
    return f"copy({src.type}->{dst.type})"


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """
    A dispatch mode that counts, per aten op name, the host-synchronising ops run inside it: `SYNC_OPS`,
    ``index``/``index_put`` with a boolean or uint8 index, and blocking copies between the CPU and a device (counted
    as ``copy(cpu->cuda)`` or ``copy(cuda->cpu)``; none on a CPU-only run). The sync is on a GPU; on a CPU the same
    value-dependent ops are counted, so a CPU test can show that a code path has none. ``total`` is the sum,
    ``counts`` the breakdown, and ``devices`` the device types the counted ops ran on.

    Example::

        with SyncCounter() as sync:
            loss = detector(images, targets)
        assert sync.total == 0, sync.counts
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.devices: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]  # "index_put_.default" -> "index_put_"
        transfer = _blocking_transfer(name, args, kwargs)
        if transfer is not None or name in SYNC_OPS or (name in _MASK_INDEX_OPS and _has_mask_index(args)):
            self.counts[transfer or name] += 1
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.devices[first.device.type if first is not None else "none"] += 1
        return func(*args, **kwargs)
