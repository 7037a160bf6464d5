"""Mixed precision settings: fp16 with a GradScaler by default on CUDA, bf16 (no scaler) as an option; training,
validation and inference autocast in bf16 on a CPU with bf16 instructions and not at all on other CPUs."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from bundle_helpers import TINY, parse
from monai.data.box_utils import box_iou
from scripts.detection import precision
from scripts.evaluation import evaluator
from scripts.tools import fault_matrix
from training_helpers import make_trainer, tiny_detector, tiny_sample


def test_bf16_on_cuda_needs_no_grad_scaler():
    # the scaler expression only: a GradScaler made without CUDA disables itself, which is all this needs
    cuda = {**TINY, "device": "$torch.device('cuda:0')", "amp": True}
    assert isinstance(parse("train.json", **cuda).get_parsed_content("scaler"), torch.amp.GradScaler)
    assert parse("train.json", **cuda, amp_dtype="bfloat16").get_parsed_content("scaler") is None
    assert parse("train.json", **{**cuda, "amp": False}).get_parsed_content("scaler") is None


@pytest.mark.slow
@pytest.mark.parametrize("bf16_cpu", [True, False])
def test_the_cpu_step_runs_in_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, caplog, bf16_cpu):
    # emulated bf16 made a ResNet50 step 40x slower than fp32 (oneDNN held to AVX2): amp falls back to fp32 there
    monkeypatch.setattr(precision, "cpu_runs_bf16", lambda: bf16_cpu)
    expected = torch.bfloat16 if bf16_cpu else torch.float32
    for amp, amp_dtype in ((True, None), (True, "float16"), (False, None)):  # amp_dtype names the type on CUDA
        trainer, guard = make_trainer(tmp_path / f"{amp}{amp_dtype}", epochs=1, amp=amp, amp_dtype=amp_dtype)
        seen: list[torch.dtype] = []
        head = trainer.network.classification_head
        hook = head.register_forward_hook(lambda module, args, out, seen=seen: seen.append(out[0].dtype))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="scripts.detection.trainer"):
            trainer.run()
        hook.remove()
        said = "bfloat16 autocast" if amp and bf16_cpu else "fp32 (amp on, but" if amp else "fp32"
        assert f"training in {said}" in caplog.text
        assert seen and set(seen) == {expected if amp else torch.float32}
        assert trainer.autocast_type == (expected if amp and bf16_cpu else None)
        assert guard.counters["events"] == 0 and math.isfinite(trainer.state.output.loss)


def test_the_autocast_type_on_cuda_is_fp16_or_the_one_asked_for():
    cuda = torch.device("cuda", 0)  # no CUDA needed: the choice only
    assert precision.autocast_type(cuda, True) == torch.float16
    assert precision.autocast_type(cuda, True, "bfloat16") == torch.bfloat16
    assert precision.autocast_type(cuda, False, "bfloat16") is None
    assert precision.precision_name(torch.bfloat16, True, cuda) == "bfloat16 autocast (amp; --amp False: fp32)"
    assert precision.precision_name(None, False, cuda) == "fp32"
    mps = torch.device("mps")
    assert precision.autocast_type(mps, True) is None
    assert precision.precision_name(None, True, mps).endswith("not on mps)")


@pytest.mark.parametrize(
    "cap, bf16", [(None, True), ("AVX2", False), ("avx512_core_vnni", False), ("AVX512_CORE_BF16", True), ("ALL", True)]
)
def test_onednn_held_below_bf16_means_fp32(monkeypatch, cap, bf16):
    # with ONEDNN_MAX_CPU_ISA=AVX2 on this bf16 CPU, a bf16 ResNet50 step took 30.5 s against 0.74 s in fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    cpu = torch.device("cpu")
    assert precision.cpu_runs_bf16() is bf16
    assert precision.autocast_type(cpu, True) == (torch.bfloat16 if bf16 else None)
    said = precision.precision_name(precision.autocast_type(cpu, True), True, cpu)
    assert said == (
        "bfloat16 autocast (amp; --amp False: fp32)"
        if bf16
        else f"fp32 (amp on, but ONEDNN_MAX_CPU_ISA={cap.upper()} holds oneDNN below bf16)"
    )


def test_a_cpu_without_bf16_instructions_is_named(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    cpu = torch.device("cpu")
    assert precision.autocast_type(cpu, True) is None
    assert precision.precision_name(None, True, cpu) == "fp32 (amp on, but this CPU has no bf16 instructions)"


class AutocastProbe(torch.nn.Module):
    """Stands in for the detector: records whether autocast is on for the inputs' device, and in which type."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, inputs: list[torch.Tensor], use_inferer: bool = False) -> list:
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return []


@pytest.mark.parametrize("bf16_cpu", [True, False])
def test_validation_and_inference_autocast_on_a_cpu_only_where_it_runs_bf16(monkeypatch, bf16_cpu):
    monkeypatch.setattr(precision, "cpu_runs_bf16", lambda: bf16_cpu)
    probe, image = AutocastProbe(), [torch.zeros(1, 8, 8, 4)]
    evaluator.DetectionInferer(amp=True)(image, probe)
    evaluator.DetectionInferer(amp=False)(image, probe)
    # amp_dtype names the type on CUDA; on a CPU the choice is bf16 or nothing
    evaluator.DetectionInferer(amp=True, amp_dtype="float16")(image, probe)
    assert probe.seen == [(bf16_cpu, torch.bfloat16), (False, torch.bfloat16), (bf16_cpu, torch.bfloat16)]


def test_the_detector_under_bf16_autocast_finds_what_it_finds_in_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_runs_bf16", lambda: True)
    detector = tiny_detector()
    detector.eval()
    with torch.no_grad():  # every anchor scores about 0.5, so there are boxes to compare
        detector.network.classification_head.cls_logits.bias.zero_()
    image = [tiny_sample(0, shape=(64, 64, 32))["image"]]
    dtypes: list[torch.dtype] = []
    head = detector.network.classification_head
    head.register_forward_hook(lambda module, args, out: dtypes.append(out[0].dtype))
    with torch.no_grad():
        fp32 = evaluator.DetectionInferer(amp=False)(image, detector)[0]
        bf16 = evaluator.DetectionInferer(amp=True)(image, detector)[0]
    assert dtypes[0] == torch.float32 and set(dtypes[1:]) == {torch.bfloat16}
    assert bf16["box"].dtype == torch.float32 and torch.isfinite(bf16["box"]).all() and len(bf16["box"]) > 0
    # bf16's best box is one that fp32 also scores among its best (scores to bf16's 3 significant digits)
    best = bf16["label_scores"].argmax()
    assert float(fp32["label_scores"].max()) == pytest.approx(float(bf16["label_scores"][best]), abs=1e-2)
    near = fp32["box"][fp32["label_scores"] >= bf16["label_scores"][best] - 1e-2]
    assert box_iou(bf16["box"][best : best + 1], near).max() > 0.5


def test_the_configs_give_amp_to_the_inferer_and_the_evaluator_refuses_it():
    assert parse("train.json", **{**TINY, "amp": True}).get_parsed_content("validate#inferer").amp
    assert not parse("train.json", **TINY).get_parsed_content("validate#inferer").amp
    assert parse("inference.json", **{**TINY, "amp": True}).get_parsed_content("inferer").amp
    with pytest.raises(ValueError, match="give amp to its inferer"):
        evaluator.DetectionEvaluator("cpu", val_data_loader=[], network=torch.nn.Identity(), amp=True)


@pytest.mark.parametrize("bf16_cpu", [True, False])
def test_the_fault_matrix_runs_its_amp_row_wherever_amp_autocasts(monkeypatch, bf16_cpu):
    monkeypatch.setattr(precision, "cpu_runs_bf16", lambda: bf16_cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = {f.name: f.runs_here() for f in fault_matrix._faults(0.01, 0.001, iterations=100)}
    assert rows["healthy sgd, amp"] is bf16_cpu
    assert rows["fp16 overflow, 10-iteration burst"] is False  # a GradScaler's fault: CUDA only
    assert rows["healthy sgd"] and rows["nan voxel, data_check off"]
