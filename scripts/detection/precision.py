"""Which type autocast runs in, for training, validation and inference alike.

On CUDA: fp16 (with a GradScaler in training), or the config's ``amp_dtype``. On a CPU: bf16 where oneDNN runs bf16
instructions (AVX512-BF16 or AMX, not held below them by ``ONEDNN_MAX_CPU_ISA``), and no autocast elsewhere, because
emulated bf16 is far slower than fp32 there.
"""

from __future__ import annotations

import os

import torch

__all__ = ["autocast_type", "cpu_runs_bf16", "onednn_isa_cap", "precision_name"]

# oneDNN's ISA caps (its ONEDNN_MAX_CPU_ISA values) that stop short of native bf16 convolutions
ISAS_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


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


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN is held to, where ``ONEDNN_MAX_CPU_ISA`` (or its older name ``DNNL_MAX_CPU_ISA``) holds it below
    bf16 instructions; ``None`` where it is not held there."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(name, "").strip().upper()
        if cap:
            return f"{name}={cap}" if cap in ISAS_BELOW_BF16 else None
    return None


def cpu_runs_bf16() -> bool:
    """Whether oneDNN runs bf16 instructions here (AVX512-BF16 or AMX, and no ISA cap below them): there its bf16
    convolutions take about half the time of fp32 ones (ResNet50-FPN, 2 cores of an AMD EPYC); elsewhere bf16 is
    emulated and far slower."""
    check = torch.cpu  # private checks of torch's own (its inductor uses them): their absence means no bf16
    has_bf16 = any(
        getattr(check, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return has_bf16 and onednn_isa_cap() is None


def precision_name(dtype: torch.dtype | None, amp: bool, device: torch.device) -> str:
    """How a log line names the precision on ``device``, with the reason or the switch that changes it."""
    if dtype is not None:
        return f"{str(dtype).removeprefix('torch.')} autocast (amp; --amp False: fp32)"
    if not amp:
        return "fp32"
    if device.type != "cpu":
        return f"fp32 (amp on, but autocast runs on CUDA and on CPUs with bf16 instructions, not on {device.type})"
    cap = onednn_isa_cap()
    return (
        f"fp32 (amp on, but {cap} holds oneDNN below bf16)"
        if cap
        else "fp32 (amp on, but this CPU has no bf16 instructions)"
    )
