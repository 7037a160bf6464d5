"""
GPU-only behaviour: bf16 training without a GradScaler, MONAI's host box loss of a batch without boxes under fp16,
pinned MetaTensor batches copied without blocking, the compiled step under fp16 (with and without CUDA graphs), and
sliding-window outputs stitched on the GPU. Skipped without CUDA (CI has none). The GradScaler's fp16 overflow
handling is in `test_fp16_amp.py`, which runs on the CPU too.
"""

from __future__ import annotations

import math

import pytest
import torch
from bundle_helpers import TINY, make_phantoms, parse, save_tiny_model
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.data.utils import no_collation
from training_helpers import finite_weights, make_trainer, tiny_sample

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.slow]


def cuda_trainer(tmp_path, epochs: int, guard_kwargs: dict | None = None, loader=None):
    """The tiny detector on the GPU under AMP (fp16 autocast + GradScaler), guarded."""
    return make_trainer(tmp_path, epochs, loader=loader, guard_kwargs=guard_kwargs, device="cuda", amp=True)


def test_bf16_training_runs_the_heads_in_bf16_without_a_scaler(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=2, device="cuda", amp=True, amp_dtype="bfloat16")
    seen: list[torch.dtype] = []
    trainer.network.classification_head.register_forward_hook(lambda module, args, out: seen.append(out[0].dtype))
    trainer.run()
    assert trainer.scaler is None and trainer.autocast_type == torch.bfloat16 and set(seen) == {torch.bfloat16}
    assert guard.counters["events"] == 0 and math.isfinite(trainer.state.output.loss)
    assert finite_weights(trainer.network)


def test_batch_without_boxes_trains_on_the_gpu(tmp_path):
    # MONAI returns the box loss of a batch without box samples as a CPU tensor; the fused decision must not mind
    samples = [tiny_sample(i) for i in range(2)]
    samples[1]["box"], samples[1]["label"] = torch.zeros((0, 6)), torch.zeros((0,), dtype=torch.long)
    loader = torch.utils.data.DataLoader(Dataset([samples[1], samples[0]]), batch_size=1, collate_fn=no_collation)
    trainer, guard = cuda_trainer(tmp_path, epochs=2, loader=loader)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.run()
    assert [o.loss_reg for o in outputs][::2] == [0.0, 0.0] and all(o.loss_reg > 0 for o in outputs[1::2])
    assert guard.counters["events"] == 0 and all(math.isfinite(o.loss) for o in outputs)


@pytest.mark.parametrize("options", [True, {"mode": "reduce-overhead"}], ids=["compiled", "cuda_graphs"])
def test_the_compiled_step_under_fp16_amp_equals_the_eager_one(tmp_path, options):
    from test_compile import check_compiled_step

    check_compiled_step(tmp_path, options, device="cuda", amp=True, rtol=1e-2)


def test_pinned_metatensor_batches_keep_their_files_and_train_without_blocking(tmp_path):
    """train.json's loader on CUDA (``pin_memory``) and trainer (``non_blocking``): the crops arrive pinned, still
    MetaTensors that name their files, and train."""
    loader = DataLoader(
        Dataset([tiny_sample(i) for i in range(2)]), batch_size=1, collate_fn=no_collation, pin_memory=True
    )
    first = next(iter(loader))[0]["image"]
    assert isinstance(first, MetaTensor) and first.is_pinned() and first.meta["filename_or_obj"].endswith("00.nii.gz")
    trainer, guard = make_trainer(tmp_path, epochs=1, loader=loader, device="cuda", amp=True, non_blocking=True)
    reports = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: reports.append(e.state.output))
    trainer.run()
    assert [r.files for r in reports] == [("/data/case_00.nii.gz",), ("/data/case_01.nii.gz",)]
    assert all(math.isfinite(r.loss) for r in reports) and finite_weights(trainer.network)
    assert guard.counters["events"] == 0


def test_auto_stitching_on_the_gpu_gives_the_host_stitched_detections(tmp_path):
    """``stitch_device`` "auto": the windows' outputs stitched on the GPU, boxes decoded and selected there, with the
    detections of the zoo's host stitching (windows on the GPU in both)."""
    datalist = make_phantoms(str(tmp_path / "data"))
    model = str(tmp_path / "model.pt")
    save_tiny_model(model)
    image = None
    results = {}
    for stitch in ("cpu", "auto"):
        overrides = {**TINY, "device": "$torch.device('cuda:0')", "amp": False, "val_patch_size": [32, 32, 16]}
        parser = parse(
            "inference.json",
            **overrides,
            stitch_device=stitch,
            model_path=model,
            dataset_dir=str(tmp_path / "data"),
            data_list_file_path=datalist,
        )
        detector = parser.get_parsed_content("detector").eval()
        parser.get_parsed_content("detector_ops")
        if image is None:
            item = {"image": str(tmp_path / "data" / "images" / "val_000.nii.gz")}
            image = parser.get_parsed_content("preprocessing")(item)["image"].to("cuda")
        with torch.no_grad():
            results[stitch] = detector([image], use_inferer=True)[0]
    host, device = results["cpu"], results["auto"]
    assert device["box"].device.type == "cuda" and host["box"].device.type == "cpu" and len(host["box"]) > 0
    for key in ("box", "label_scores"):
        torch.testing.assert_close(device[key].cpu(), host[key], rtol=1e-4, atol=1e-4)
    assert torch.equal(device["label"].cpu(), host["label"])
