"""
The step under fp16 AMP with a GradScaler: overflow steps refused bitwise, the scale backed off by the scaler alone,
an overflow counted as a guard event only from ``amp_overflow_patience`` in a row on, the unguarded step skipping
an overflow as `GradScaler.step` would, and a refused non-finite input leaving the scale as it was.

Each test runs twice: on CUDA where there is one (the bundle's fp16 AMP), and on the CPU with fp16 autocast and a
CPU GradScaler (``make_trainer(fp16_on_cpu=True)``), which the bundle never trains in but which runs the same
trainer and guard code (scale, unscale, the skipped `GradScaler.step`, the scale's back-off, the snapshot of the
scaler) in CI, which has no GPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ignite.engine import Events
from training_helpers import assert_same_state, make_trainer, poison_gradients, state_of, tiny_loader

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow

DEVICES = [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
    "cpu",
]


def fp16_trainer(tmp_path, device: str, epochs: int, guard_kwargs: dict | None = None, enabled: bool = True):
    """The tiny detector under fp16 autocast with a GradScaler on ``device``, guarded (``enabled``: else the zoo's
    step, no checks, no clipping, no guard)."""
    on_cpu = device == "cpu"
    trainer, guard = make_trainer(
        tmp_path, epochs, guard_kwargs=guard_kwargs, enabled=enabled, device=device, amp=True, fp16_on_cpu=on_cpu
    )
    assert trainer.scaler is not None and trainer.autocast_type == torch.float16
    return trainer, guard


def record_steps(trainer) -> list[dict]:
    """Per iteration: the state and loss scale before it, then its event, whether it overflowed and the state after."""
    records: list[dict] = []

    @trainer.on(Events.ITERATION_STARTED)
    def _before(engine):
        records.append({"before": state_of(engine), "scale": engine.scaler.get_scale()})

    @trainer.on(Events.ITERATION_COMPLETED)
    def _after(engine):
        report = engine.state.output
        records[-1].update(event=report.event, overflow=not math.isfinite(report.grad_norm), after=state_of(engine))

    return records


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_overflow_is_absorbed_by_the_scaler(tmp_path, device):
    trainer, guard = fp16_trainer(tmp_path, device, epochs=6)
    # a loss scale of 2**28 overflows fp16 activation gradients (max 65504) until the scaler has halved it enough
    trainer.scaler._init_scale = 2.0**28
    records = record_steps(trainer)
    trainer.run()
    overflows = [r for r in records if r["event"] == "grad"]
    assert records[0]["event"] == "grad" and guard.counters["amp_overflows"] == len(overflows)
    for r in overflows:  # each overflow step refused bitwise, as the scaler alone would
        assert_same_state(r["before"], r["after"])
    first = next(i for i, r in enumerate(records) if r["event"] is None)  # the first scale small enough
    assert records[first]["scale"] == 2.0 ** (28 - first)
    # counted, not escalated: no guard event, no rollback, no LR backoff, and training went on
    assert guard.counters["events"] == 0 and guard.counters["rollbacks"] == 0 and guard.lr_control.scale == 1.0
    assert sum(r["event"] is None for r in records) >= len(records) // 4
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    assert not torch.equal(
        records[0]["before"]["network"]["classification_head.cls_logits.weight"],
        trainer.network.classification_head.cls_logits.weight,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_fp16_overflow_escalates(tmp_path, device):
    trainer, guard = fp16_trainer(tmp_path, device, epochs=3, guard_kwargs={"amp_overflow_patience": 3, "patience": 2})
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
    assert guard.counters["events"] >= 2 and guard.counters["rollbacks"] == 1 and guard.lr_control.scale == 1.0
    assert trainer.state.output.event is None and guard.status == "completed"


@pytest.mark.parametrize("device", DEVICES)
def test_injected_inf_under_amp_is_skipped_bitwise(tmp_path, device):
    trainer, guard = fp16_trainer(tmp_path, device, epochs=2)
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


@pytest.mark.parametrize("device", DEVICES)
def test_an_fp16_overflow_burst_is_absorbed_without_touching_the_lr(tmp_path, device):
    # scripts.tools.faults.LossScaleOverflow, the matrix's fp16 fault: three overflowing backward passes in a row
    from scripts.tools.faults import LossScaleOverflow

    trainer, guard = fp16_trainer(tmp_path, device, epochs=3)
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
    assert guard.counters["rollbacks"] == 0 and guard.lr_control.scale == 1.0


def weights_of(trainer, state: dict) -> dict:
    """A `state_of` record without the network's buffers."""
    parameters = {name for name, _ in trainer.network.named_parameters()}
    return {**state, "network": {k: v for k, v in state["network"].items() if k in parameters}}


@pytest.mark.parametrize("device", DEVICES)
def test_unguarded_fp16_skips_overflow_steps_as_the_scaler_would(tmp_path, device):
    # the trainer skips `GradScaler.step` (its host read) and steps the optimiser itself: without the guard an
    # overflow must still leave weights and optimiser alone and halve the scale, as the zoo's trainer does (its
    # forward has updated the BatchNorm statistics: only the guarded step puts those back)
    trainer, guard = fp16_trainer(tmp_path, device, epochs=6, enabled=False)
    trainer.scaler._init_scale = 2.0**28
    records = record_steps(trainer)
    trainer.run()
    assert all(r["event"] is None for r in records) and records[0]["overflow"]
    for r, following in zip(records, records[1:], strict=False):
        if r["overflow"]:
            assert_same_state(*(weights_of(trainer, r[when]) for when in ("before", "after")))
            assert following["scale"] == r["scale"] / 2
        else:
            assert following["scale"] == r["scale"]  # 2000 steps of growth interval: not reached here
    assert sum(not r["overflow"] for r in records) >= len(records) // 4  # it trained once the scale was small enough
    assert not torch.equal(
        records[0]["before"]["network"]["classification_head.cls_logits.weight"],
        trainer.network.classification_head.cls_logits.weight,
    )
    assert guard.counters["skipped_steps"] == 0 and guard.counters["events"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_voxel_under_fp16_keeps_the_scale_and_the_next_step_trains(tmp_path, device):
    # the refused step has unscaled its gradients: the scaler must forget that (or the next unscale raises) without
    # backing its scale off, since the fault was the data's, not the scale's
    trainer, _ = fp16_trainer(tmp_path, device, epochs=1)
    trainer.scaler._init_scale = 2.0**8  # the tiny network overflows fp16 at the default 2**16 now and then
    good, other = list(tiny_loader(2))
    bad = copy.deepcopy(other)
    bad[0]["image"][0, 5, 5, 5] = math.nan
    assert trainer.train_step(good, fire_events=False).event is None
    scale, before = trainer.scaler.get_scale(), state_of(trainer)
    assert trainer.train_step(bad, fire_events=False).event == "input"
    assert_same_state(before, state_of(trainer))
    assert trainer.scaler.get_scale() == scale
    report = trainer.train_step(other, fire_events=False)
    assert report.event is None and math.isfinite(report.loss)
    weight = "classification_head.cls_logits.weight"
    assert not torch.equal(before["network"][weight], trainer.network.state_dict()[weight])
