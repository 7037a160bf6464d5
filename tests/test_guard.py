"""The stability features, tested by making training fail on purpose and checking the exact outcome."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import assert_same_state, finite_weights, make_trainer, poison_gradients, state_of, tiny_sample
from ignite.engine import Events
from monai.data import Dataset, MetaTensor
from monai.data.utils import no_collation

from scripts.guard import GuardStopped, NaNGuard
from scripts.quarantine import Quarantine, QuarantineSampler


def test_clean_run_steps_and_reports(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=2)
    before = state_of(trainer)
    trainer.run()
    assert guard.counters == {
        "events": 0,
        "skipped_steps": 0,
        "rollbacks": 0,
        "amp_overflows": 0,
        "weights_nonfinite": 0,
    }
    assert not torch.equal(
        before["network"]["classification_head.cls_logits.weight"],
        trainer.network.classification_head.cls_logits.weight,
    )
    out = trainer.state.output
    assert out["event"] is None and math.isfinite(out["loss"]) and out["grad_norm"] > 0
    assert out["loss"] == pytest.approx(out["loss_cls"] + out["loss_reg"], rel=1e-5)
    report = json.loads((tmp_path / "guard_report.json").read_text())
    assert report["status"] == "completed" and report["events"] == []


def test_inf_gradient_step_is_skipped_bitwise(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=2)
    bad_iteration, seen = 3, {}

    @trainer.on(Events.ITERATION_STARTED(once=bad_iteration))
    def _save(engine):
        seen["before"] = state_of(engine)

    poison_gradients(trainer, [bad_iteration])

    @trainer.on(Events.ITERATION_COMPLETED(once=bad_iteration))
    def _check(engine):
        assert engine.state.output["event"] == "grad"
        assert_same_state(seen["before"], state_of(engine))
        seen["checked"] = True

    trainer.run()
    assert seen.get("checked")
    assert guard.counters["skipped_steps"] == 1 and guard.counters["rollbacks"] == 0
    assert trainer.state.iteration == 8 and finite_weights(trainer.network)


def test_nan_weights_roll_back_to_the_exact_snapshot(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=3, guard_kwargs={"snapshot_every": 4})
    bad_iteration, seen = 7, {}

    @trainer.on(Events.ITERATION_STARTED(once=bad_iteration))
    def _corrupt(engine):
        seen["snapshot"] = copy.deepcopy(guard.snapshot["network"])
        seen["snapshot_iteration"] = guard.snapshot_iteration
        seen["lr"] = engine.optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            engine.network.feature_extractor.body.conv1.weight.fill_(float("nan"))

    @trainer.on(Events.ITERATION_COMPLETED(once=bad_iteration))
    def _check(engine):
        assert engine.state.output["event"] == "logits"  # the heads' "cls_logits is NaN or Inf", caught
        state = engine.network.state_dict()
        for k, v in seen["snapshot"].items():
            assert torch.equal(state[k], v), k
        assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(seen["lr"] * guard.lr_backoff)
        seen["checked"] = True

    trainer.run()
    assert seen.get("checked") and seen["snapshot_iteration"] == 4  # refreshed after the first healthy window
    assert guard.counters["rollbacks"] == 1 and guard.counters["weights_nonfinite"] == 1
    assert guard.events[0]["kind"] == "weights" and guard.lr_scale == pytest.approx(guard.lr_backoff)
    assert finite_weights(trainer.network) and trainer.state.epoch == 3


def test_nan_voxel_file_is_skipped_and_quarantined(tmp_path):
    quarantine = Quarantine(str(tmp_path / "quarantine.json"))
    samples = [tiny_sample(i) for i in range(4)]
    samples[1]["image"][0, 5, 5, 5] = float("nan")
    bad_file = samples[1]["image"].meta["filename_or_obj"]
    dataset = Dataset(samples)
    sampler = QuarantineSampler(dataset, quarantine, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=no_collation)
    trainer, guard = make_trainer(tmp_path, epochs=4, loader=loader, quarantine=quarantine)
    files_seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: files_seen.append((e.state.epoch, e.state.output)))
    before_run = state_of(trainer)
    trainer.run()
    assert before_run  # the run finished every epoch
    assert trainer.state.epoch == 4 and finite_weights(trainer.network)
    bad_iterations = [(ep, out["event"]) for ep, out in files_seen if bad_file in out["files"]]
    assert [ev for _, ev in bad_iterations] == ["input", "input"]  # every batch with it skipped, then it is gone
    assert {ep for ep, _ in bad_iterations} == {1, 2}
    assert all(out["event"] is None for _, out in files_seen if bad_file not in out["files"])
    assert bad_file in quarantine and len(quarantine) == 1
    report = json.loads((tmp_path / "guard_report.json").read_text())
    assert [q["image"] for q in report["quarantined"]] == [bad_file]
    assert all(e["kind"] == "input" and e["files"] == [bad_file] for e in report["events"])
    saved = json.loads((tmp_path / "quarantine.json").read_text())
    assert saved["quarantined"][0]["image"] == bad_file and saved["quarantined"][0]["source"] == "guard"
    assert guard.counters["rollbacks"] == 0


def test_learning_rate_overload_recovers(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=6, lr=1e4, guard_kwargs={"snapshot_every": 2, "max_rollbacks": 12})
    lr0 = trainer.optimizer.param_groups[0]["lr"]
    trainer.run()
    assert trainer.state.epoch == 6 and guard.status == "completed"
    assert guard.counters["rollbacks"] >= 1
    assert trainer.optimizer.param_groups[0]["lr"] < lr0 and guard.lr_scale < 1
    assert finite_weights(trainer.network)
    assert len(guard.quarantine) == 0  # a blow-up fails every file alike: nobody is blamed


def test_unrecoverable_run_stops_cleanly(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=5, guard_kwargs={"patience": 2, "max_rollbacks": 2})

    poison_gradients(trainer, range(1, 100), every_parameter=True)

    snapshot = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=1), lambda e: snapshot.update(copy.deepcopy(guard.snapshot["network"]))
    )
    trainer.run()
    assert guard.status == "stopped" and trainer.state.iteration == 6  # 2 rollbacks, then the third trigger stops
    report = json.loads((tmp_path / "guard_report.json").read_text())
    assert report["status"] == "stopped" and report["counters"]["rollbacks"] == 2
    assert "stopped by the NaN guard" in report["message"]
    saved = torch.load(tmp_path / "last_good.pt", weights_only=False)
    for k, v in snapshot.items():
        assert torch.equal(saved["network"][k], v), k
    with pytest.raises(GuardStopped) as stop:
        guard.raise_if_stopped()
    assert stop.value.code and "learning_rate" in str(stop.value.code)  # SystemExit with a message: exit status 1


def test_guard_off_behaves_like_the_zoo_trainer(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=2, enabled=False)

    @trainer.on(Events.ITERATION_STARTED(once=2))
    def _corrupt(engine):
        with torch.no_grad():
            engine.network.feature_extractor.body.conv1.weight.fill_(float("nan"))

    with pytest.raises(ValueError, match="NaN or Inf"):
        trainer.run()
    assert not trainer.has_event_handler(guard.iteration_completed)


def test_guard_state_survives_a_restart(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=2, guard_kwargs={"patience": 1})

    poison_gradients(trainer, [3, 6], float("nan"))

    trainer.run()
    state = guard.state_dict()
    assert state["counters"]["rollbacks"] == 2 and state["lr_scale"] == pytest.approx(guard.lr_backoff**2)
    resumed = NaNGuard(trainer.network, trainer.optimizer, None, quarantine=Quarantine())
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.counters == guard.counters and resumed.lr_scale == guard.lr_scale
    assert resumed.events == guard.events


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_input_is_an_event_not_a_crash(tmp_path, kind):
    samples = [tiny_sample(i) for i in range(2)]
    samples[0]["image"] = MetaTensor(torch.full_like(samples[0]["image"], float(kind)), meta=samples[0]["image"].meta)
    loader = torch.utils.data.DataLoader(Dataset(samples), batch_size=1, collate_fn=no_collation)
    trainer, guard = make_trainer(tmp_path, epochs=1, loader=loader)
    trainer.run()
    assert guard.events[0]["kind"] == "input" and guard.counters["skipped_steps"] == 1
    assert finite_weights(trainer.network)


def test_too_large_updates_roll_back_and_back_off(tmp_path):
    # finite, spike-free steps that move the weights more than max_update_ratio per step (an LR far too high)
    trainer, guard = make_trainer(tmp_path, epochs=1, guard_kwargs={"snapshot_every": 2, "max_update_ratio": 1e-4})
    names = [n for n, _ in trainer.network.named_parameters()]
    seen = {"steps": []}
    trainer.optimizer.register_step_post_hook(
        lambda opt, args, kwargs: seen["steps"].append(copy.deepcopy(trainer.network.state_dict()))
    )

    @trainer.on(Events.ITERATION_STARTED(once=1))
    def _start(engine):
        seen["start"] = copy.deepcopy(engine.network.state_dict())
        seen["lr"] = engine.optimizer.param_groups[0]["lr"]

    @trainer.on(Events.ITERATION_COMPLETED(once=2))
    def _check(engine):
        assert engine.state.output["event"] is None  # the step itself was clean
        for k, v in seen["start"].items():  # rolled back to the snapshot of iteration 1, exactly
            assert torch.equal(engine.network.state_dict()[k], v), k
        assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(seen["lr"] * guard.lr_backoff)
        seen["checked"] = True

    trainer.run()
    assert seen.get("checked")
    event = guard.events[0]
    assert event["kind"] == "update" and event["iteration"] == 2 and event["files"] == []  # no file is blamed
    assert guard.counters["skipped_steps"] == 0 and guard.counters["rollbacks"] >= 1 and len(guard.quarantine) == 0
    # the ratio it acted on: how far 2 steps moved the weights from the snapshot, relative to its norm, per step
    start, after_2 = seen["start"], seen["steps"][1]
    moved = torch.nn.utils.get_total_norm([after_2[n] - start[n] for n in names])
    expected = float(moved / torch.nn.utils.get_total_norm([start[n] for n in names])) / 2
    assert event["update_ratio"] == pytest.approx(expected, rel=1e-5) and expected > 1e-4


def test_healthy_updates_do_not_roll_back(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=2, guard_kwargs={"snapshot_every": 2})
    trainer.run()
    assert 0 < guard.update_ratio < guard.max_update_ratio and guard.counters["rollbacks"] == 0
    assert guard.snapshot_iteration == 8  # refreshed at every window
