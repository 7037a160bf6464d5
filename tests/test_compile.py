"""
``detector#compile_network``: the sync-free training forward with its network compiled (torch.compile, inductor on
the CPU here) gives the eager step's losses and update, keeps MONAI's state-dict keys, and a refused step still
leaves weights and optimiser bitwise as they were. `tests/test_gpu.py` runs the same check on CUDA under fp16 AMP,
with and without CUDA graphs.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from training_helpers import assert_same_state, make_trainer, state_of, tiny_detector, tiny_loader

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow


def update(trainer, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the step changed in the floating-point weights and buffers, flattened."""
    now = trainer.network.state_dict()
    return torch.cat([(now[k] - v).flatten().double().cpu() for k, v in start.items() if v.is_floating_point()])


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_compiled_step(
    tmp_path, options: bool | dict[str, Any] = True, device: str = "cpu", amp: bool = False, rtol: float = 1e-4
) -> None:
    """The compiled step against the eager one from the same weights and draws; then a NaN voxel and NaN logits."""
    eager, _ = make_trainer(tmp_path / "eager", epochs=1, device=device, amp=amp)
    compiled, _ = make_trainer(tmp_path / "compiled", epochs=1, device=device, amp=amp)
    compiled.network.load_state_dict(eager.network.state_dict())
    compiled.detector.set_compiled(options)
    for trainer in (eager, compiled) if amp and device == "cuda" else ():
        trainer.scaler._init_scale = 2.0**8  # the tiny network overflows fp16 at the default 2**16 now and then
    keys = list(eager.network.state_dict())
    batches = list(tiny_loader(2))

    start = {k: v.clone() for k, v in eager.network.state_dict().items()}
    reports = []
    for trainer in (eager, compiled):
        torch.manual_seed(1)  # the same random draws of the sampler
        reports.append(trainer.train_step(batches[0], fire_events=False))
    assert compiled.detector._compiled is not None  # the step ran the compiled forward
    assert reports[1].event is None and math.isfinite(reports[1].loss)
    for name in ("loss", "loss_cls", "loss_reg", "grad_norm", "positive_score", "negative_score"):
        assert math.isclose(getattr(reports[1], name), getattr(reports[0], name), rel_tol=rtol), name
    assert relative_difference(update(compiled, start), update(eager, start)) < rtol  # the step's update
    assert list(compiled.network.state_dict()) == list(compiled.detector.network.state_dict()) == keys

    before = state_of(compiled)
    bad = copy.deepcopy(batches[1])
    bad[0]["image"][0, 3, 3, 3] = math.nan
    assert compiled.train_step(bad, fire_events=False).event == "input"
    assert_same_state(before, state_of(compiled))

    with torch.no_grad():
        compiled.network.classification_head.cls_logits.bias.fill_(math.inf)
    before = state_of(compiled)
    assert compiled.train_step(batches[1], fire_events=False).event == "logits"  # the heads' check, fused
    assert_same_state(before, state_of(compiled))


def test_compiling_needs_the_sync_free_path():
    detector = tiny_detector()
    detector.set_sync_free(False)
    with pytest.raises(ValueError, match="sync_free"):
        detector.set_compiled(True)


def test_the_compiled_step_equals_the_eager_one_and_refuses_like_it(tmp_path):
    check_compiled_step(tmp_path)
