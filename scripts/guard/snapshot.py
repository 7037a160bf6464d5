"""The last good training state, kept on the network's device or in host memory, and how far the weights have moved
from it.

Ignite's `Checkpoint` writes to disk and GradScaler only skips fp16 overflow steps; rolling back within a run
needs an exact in-memory copy of everything a step changes, hence this small class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Drift", "Snapshot", "copy_state", "weights_finite"]


def copy_state(obj: Any, device: str | torch.device | None = None) -> Any:
    """
    A deep copy of a (nested) state dict with every tensor cloned, on ``device`` (``None``: where it is; a clone on a
    GPU is queued like any kernel, where a copy to pageable host memory waits for the device).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if device is None else obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: copy_state(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_state(v, device) for v in obj)
    return copy.deepcopy(obj)


def weights_finite(network: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``network`` is finite (one host sync)."""
    tensors = [t for t in (*network.parameters(), *network.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


@dataclass(frozen=True)
class Drift:
    """
    How far the weights went from a snapshot, per step since it was taken.

    Attributes:
        update_ratio: ``||w - w_snapshot|| / ||w_snapshot||`` per step.
        norm_growth: ``(||w|| / ||w_snapshot|| - 1)`` per step: how fast the weights' norm inflates.
    """

    update_ratio: float
    norm_growth: float

    def exceeded(self, max_update_ratio: float, max_norm_growth: float) -> str | None:
        """The first limit this drift is above, ``"update"`` or ``"norm_growth"`` (0: no limit), else ``None``."""
        if max_update_ratio and self.update_ratio > max_update_ratio:
            return "update"
        if max_norm_growth and self.norm_growth > max_norm_growth:
            return "norm_growth"
        return None


class Snapshot:
    """
    An exact copy of the network, optimiser, GradScaler and LR scheduler, taken with `take` and loaded back with
    `restore`.

    Args:
        network: the trained network.
        optimizer: its optimiser.
        scaler: the GradScaler of fp16 training, if any.
        lr_scheduler: the LR scheduler, if any.
        device: where the copy is kept: ``None`` on the tensors' own device (on a GPU: device memory, no host copy
            in the training loop), ``"cpu"`` in host memory (when device memory is short).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        lr_scheduler: Any = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.network = network
        self.device = device
        self.optimizer = optimizer
        self.scaler = scaler
        self.lr_scheduler = lr_scheduler
        self.state: dict[str, Any] | None = None
        self.iteration = 0  # the number of iterations completed when it was taken

    def network_state(self) -> dict[str, torch.Tensor]:
        """A copy of the network's current state dict (to measure it, then perhaps keep it with `take`)."""
        return copy_state(self.network.state_dict(), self.device)

    def take(self, iteration: int, network_state: dict[str, torch.Tensor] | None = None) -> None:
        """Copy everything (``network_state``: a `network_state` made just before)."""
        self.state = copy_state(
            {
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            },
            self.device,
        )
        self.state["network"] = network_state if network_state is not None else self.network_state()
        self.iteration = iteration

    def restore(self) -> None:
        """Load the snapshot back, exactly: parameters, buffers, optimiser, scaler and scheduler."""
        if self.state is None:
            raise RuntimeError("no snapshot has been taken")
        self.network.load_state_dict(self.state["network"])
        self.optimizer.load_state_dict(copy.deepcopy(self.state["optimizer"]))
        if self.scaler is not None and self.state["scaler"] is not None:
            self.scaler.load_state_dict(self.state["scaler"])
        if self.lr_scheduler is not None and self.state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(copy.deepcopy(self.state["lr_scheduler"]))

    def host_state(self) -> dict[str, Any]:
        """The snapshot in host memory, to be saved."""
        if self.state is None:
            raise RuntimeError("no snapshot has been taken")
        return copy_state(self.state, "cpu")

    def drift(self, network_state: dict[str, torch.Tensor], steps: int) -> Drift:
        """The update ratio and norm growth of ``network_state`` against the snapshot's trained parameters."""
        if self.state is None:
            raise RuntimeError("no snapshot has been taken")
        old = self.state["network"]
        names = [n for n, p in self.network.named_parameters() if p.requires_grad]
        moved = torch.nn.utils.get_total_norm([network_state[n].float() - old[n].float() for n in names])
        norm = torch.nn.utils.get_total_norm([old[n].float() for n in names]).clamp_min(1e-12)
        now = torch.nn.utils.get_total_norm([network_state[n].float() for n in names])
        # one host read once a window, after the step's; the norm ratio in float64, its change being ~1e-4
        ratio, norm_ratio = torch.stack([(moved / norm).double(), now.double() / norm.double()]).tolist()
        steps = max(steps, 1)
        return Drift(update_ratio=ratio / steps, norm_growth=(norm_ratio - 1) / steps)
