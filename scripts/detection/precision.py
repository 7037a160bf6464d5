"""Which type autocast runs in, for training, validation and inference alike.

On CUDA: fp16 (with a GradScaler in training), or the config's ``amp_dtype``. On a CPU: bf16 where the CPU has bf16
instructions (AVX512-BF16 or AMX), and no autocast elsewhere, because emulated bf16 is far slower than fp32 there.
"""

from __future__ import annotations

import torch

__all__ = ["autocast_type", "cpu_runs_bf16", "precision_name"]


def autocast_type(device: torch.device, amp: bool, amp_dtype: str | None = None) -> torch.dtype | None:
    """
    The type autocast runs in on ``device`` (``None``: no autocast, fp32).

    Args:
        device: where the network runs.
        amp: whether mixed precision is asked for.
        amp_dtype: the type on CUDA instead of fp16 (``"float16"``, ``"bfloat16"``); a CPU has one choice, bf16 or
            fp32 (a ResNet50 training step in bf16 took 30 s against 0.7 s in fp32 with oneDNN held to AVX2).
    """
    if not amp:
        return None
    if device.type == "cuda":
        return getattr(torch, amp_dtype) if amp_dtype else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_runs_bf16() else None


def cpu_runs_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX): there oneDNN's bf16 convolutions take about half
    the time of fp32 ones (ResNet50-FPN, 2 cores of an AMD EPYC); elsewhere bf16 is emulated and far slower."""
    check = torch.cpu  # private checks of torch's own (its inductor uses them): their absence means no bf16
    return any(
        getattr(check, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def precision_name(dtype: torch.dtype | None, amp: bool) -> str:
    """How a log line names the precision, with the switch that changes it."""
    if dtype is not None:
        return f"{str(dtype).removeprefix('torch.')} autocast (amp; --amp False: fp32)"
    return "fp32 (amp on, but this CPU has no bf16 instructions)" if amp else "fp32"
