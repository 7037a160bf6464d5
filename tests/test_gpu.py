"""
GPU-only behaviour: the stabilised step under AMP fp16 with a GradScaler and under bf16 without one, pinned
MetaTensor batches copied without blocking, the compiled step (with and without CUDA graphs), and sliding-window
outputs stitched on the GPU. Skipped without CUDA (CI has none).
"""

from __future__ import annotations

import math

import pytest
import torch
from bundle_helpers import TINY, make_phantoms, parse, save_tiny_model
from conftest import assert_same_state, finite_weights, make_trainer, poison_gradients, state_of, tiny_sample
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.data.utils import no_collation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_trainer(tmp_path, epochs: int, guard_kwargs: dict | None = None, loader=None):
    """The tiny detector on the GPU under AMP (fp16 autocast + GradScaler), guarded."""
    return make_trainer(tmp_path, epochs, loader=loader, guard_kwargs=guard_kwargs, device="cuda", amp=True)


def test_fp16_overflow_is_absorbed_by_the_scaler(tmp_path):
    trainer, guard = cuda_trainer(tmp_path, epochs=6)
    assert trainer.scaler is not None and trainer.autocast_type == torch.float16
    # a loss scale of 2**28 overflows fp16 activation gradients (max 65504) until the scaler has halved it enough
    trainer.scaler._init_scale = 2.0**28
    records = []

    @trainer.on(Events.ITERATION_STARTED)
    def _before(engine):
        records.append({"before": state_of(engine), "scale": engine.scaler.get_scale()})

    @trainer.on(Events.ITERATION_COMPLETED)
    def _after(engine):
        records[-1].update(event=engine.state.output.event, after=state_of(engine))

    trainer.run()
    overflows = [r for r in records if r["event"] == "grad"]
    assert records[0]["event"] == "grad" and guard.counters["amp_overflows"] == len(overflows)
    for r in overflows:  # each overflow step refused bitwise, as the scaler alone would
        assert_same_state(r["before"], r["after"])
    first = next(i for i, r in enumerate(records) if r["event"] is None)  # the first scale small enough
    assert records[first]["scale"] == 2.0 ** (28 - first)
    # counted, not escalated: no guard event, no rollback, no LR backoff, and training went on
    assert guard.counters["events"] == 0 and guard.counters["rollbacks"] == 0 and guard.lr.scale == 1.0
    assert sum(r["event"] is None for r in records) >= len(records) // 4
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    assert not torch.equal(
        records[0]["before"]["network"]["classification_head.cls_logits.weight"],
        trainer.network.classification_head.cls_logits.weight,
    )


def test_bf16_training_runs_the_heads_in_bf16_without_a_scaler(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=2, device="cuda", amp=True, amp_dtype="bfloat16")
    seen: list[torch.dtype] = []
    trainer.network.classification_head.register_forward_hook(lambda module, args, out: seen.append(out[0].dtype))
    trainer.run()
    assert trainer.scaler is None and trainer.autocast_type == torch.bfloat16 and set(seen) == {torch.bfloat16}
    assert guard.counters["events"] == 0 and math.isfinite(trainer.state.output.loss)
    assert finite_weights(trainer.network)


def test_repeated_fp16_overflow_escalates(tmp_path):
    trainer, guard = cuda_trainer(tmp_path, epochs=3, guard_kwargs={"amp_overflow_patience": 3, "patience": 2})
    poison_gradients(trainer, range(3, 9))
    records = []

    @trainer.on(Events.ITERATION_STARTED)
    def _before(engine):
        records.append({"before": state_of(engine), "rollbacks": guard.counters["rollbacks"]})

    @trainer.on(Events.ITERATION_COMPLETED)
    def _after(engine):
        report = engine.state.output
        records[-1].update(overflow=report.amp_overflow, after=state_of(engine), events=guard.counters["events"])
        records[-1]["rolled_back"] = guard.counters["rollbacks"] > records[-1]["rollbacks"]

    trainer.run()
    # the 6 poisoned steps (iterations 3 to 8) are fp16 overflows, each refused bitwise unless it rolled back; the
    # tiny fp16 network may overflow on its own too (hardware-dependent), which the guard counts the same way
    assert all(records[i - 1]["overflow"] for i in range(3, 9))
    assert guard.counters["amp_overflows"] == sum(r["overflow"] for r in records) >= 6
    for r in records:
        if r["overflow"] and not r["rolled_back"]:
            assert_same_state(r["before"], r["after"])
    # an overflow becomes a guard event only from the 3rd in a row on (the scaler's remedy comes first)
    in_a_row = 0
    for previous, r in zip([{"events": 0}, *records], records, strict=False):
        in_a_row = in_a_row + 1 if r["overflow"] else 0
        if r["events"] > previous["events"]:
            assert in_a_row >= 3
        if r["rolled_back"]:
            in_a_row = 0
    # 2 events in a row roll back once; from the good state the trial steps do not overflow, so the LR is kept
    assert guard.counters["events"] >= 2 and guard.counters["rollbacks"] == 1 and guard.lr.scale == 1.0
    assert trainer.state.output.event is None and guard.status == "completed"


def test_injected_inf_under_amp_is_skipped_bitwise(tmp_path):
    trainer, guard = cuda_trainer(tmp_path, epochs=2)
    bad, seen = 5, {}

    @trainer.on(Events.ITERATION_STARTED(once=bad))
    def _before(engine):
        seen["before"], seen["scale"] = state_of(engine), engine.scaler.get_scale()

    poison_gradients(trainer, [bad])

    @trainer.on(Events.ITERATION_COMPLETED(once=bad))
    def _after(engine):
        assert engine.state.output.event == "grad" and engine.state.output.amp_overflow
        assert_same_state(seen["before"], state_of(engine))
        assert engine.scaler.get_scale() == seen["scale"] / 2  # the scaler's own remedy, nothing more
        assert engine.state.output.amp_scale == seen["scale"]  # the monitor logs the scale the step ran with
        seen["checked"] = True

    trainer.run()
    assert seen.get("checked")  # (the tiny fp16 network may overflow on its own as well: absorbed the same way)
    assert guard.counters["skipped_steps"] == guard.counters["amp_overflows"] >= 1
    assert guard.counters["events"] == 0 and guard.counters["rollbacks"] == 0


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


def test_an_fp16_overflow_burst_is_absorbed_without_touching_the_lr(tmp_path):
    # scripts.tools.faults.LossScaleOverflow, the matrix's fp16 fault: three overflowing backward passes in a row
    from scripts.tools.faults import LossScaleOverflow

    trainer, guard = cuda_trainer(tmp_path, epochs=3)
    LossScaleOverflow(first=5, last=7).attach(trainer)
    seen = {}

    @trainer.on(Events.ITERATION_STARTED(once=5))
    def _before(engine):
        seen["before"], seen["scale"] = state_of(engine), engine.scaler.get_scale()

    reports = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: reports.update({e.state.iteration: e.state.output}))
    trainer.run()
    assert all(reports[i].event == "grad" and reports[i].amp_overflow for i in (5, 6, 7))
    assert reports[5].amp_scale == seen["scale"]  # the scale was put back before the scaler saw the overflow
    assert guard.counters["amp_overflows"] >= 3 and guard.counters["events"] == 0
    assert guard.counters["rollbacks"] == 0 and guard.lr.scale == 1.0


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
