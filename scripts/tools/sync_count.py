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


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """
    A dispatch mode that counts, per aten op name, the host-synchronising ops run inside it: `SYNC_OPS` and
    ``index``/``index_put`` with a boolean or uint8 index (the sync is on a GPU; on a CPU the same ops are counted,
    so a CPU test can show that a code path has none). ``total`` is the sum, ``counts`` the breakdown, and
    ``devices`` the device types the counted ops ran on.

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
        name = func.__name__.split(".")[0]  # "index_put_.default" -> "index_put_"
        if name in SYNC_OPS or (name in _MASK_INDEX_OPS and _has_mask_index(args)):
            self.counts[name] += 1
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.devices[first.device.type if first is not None else "none"] += 1
        return func(*args, **(kwargs or {}))
