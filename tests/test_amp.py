"""Mixed precision settings: fp16 with a GradScaler by default on CUDA, bf16 (no scaler) as an option."""

from __future__ import annotations

import math

import torch
from bundle_helpers import TINY, parse
from conftest import make_trainer


def test_bf16_on_cuda_needs_no_grad_scaler():
    # the scaler expression only: a GradScaler made without CUDA disables itself, which is all this needs
    cuda = {**TINY, "device": "$torch.device('cuda:0')", "amp": True}
    assert isinstance(parse("train.json", **cuda).get_parsed_content("scaler"), torch.amp.GradScaler)
    assert parse("train.json", **cuda, amp_dtype="bfloat16").get_parsed_content("scaler") is None
    assert parse("train.json", **{**cuda, "amp": False}).get_parsed_content("scaler") is None


def test_the_step_runs_under_the_autocast_type_asked_for(tmp_path):
    for dtype, expected in ((None, torch.bfloat16), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        trainer, guard = make_trainer(tmp_path / str(dtype), epochs=1, amp=True, amp_dtype=dtype)
        seen: list[torch.dtype] = []
        head = trainer.network.classification_head
        hook = head.register_forward_hook(lambda module, args, out, seen=seen: seen.append(out[0].dtype))
        trainer.run()
        hook.remove()
        assert trainer.amp_dtype == expected and seen and set(seen) == {expected}
        assert guard.counters["events"] == 0 and math.isfinite(trainer.state.output.loss)
