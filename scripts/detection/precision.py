"""Which type autocast runs in: fp16 on CUDA, bf16 on a CPU, or the type the config names (``amp_dtype``)."""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "cpu_runs_bf16"]


def autocast_dtype(device: torch.device, amp_dtype: str | None = None) -> torch.dtype:
    """The autocast type on ``device``: ``amp_dtype`` (``"float16"``, ``"bfloat16"``) when given, else fp16 on CUDA
    (with a GradScaler in training) and bf16 on a CPU (fp16 autocast is slow there)."""
    if amp_dtype:
        return getattr(torch, amp_dtype)
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def cpu_runs_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX): there oneDNN's bf16 convolutions take about half
    the time of fp32 ones (ResNet50-FPN, 2 cores of an AMD EPYC); elsewhere bf16 is emulated and no faster."""
    check = torch.cpu  # private checks of torch's own (its inductor uses them): their absence means no bf16
    return any(
        getattr(check, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
