"""The stability guard, tested by making training fail on purpose and checking the exact outcome."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import types

import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset, MetaTensor
from monai.data.utils import no_collation
from scripts.data.quarantine import Quarantine, QuarantineSampler
from scripts.guard.lr_search import SearchResult, Trial
from scripts.guard.stability_guard import GuardStopped
from training_helpers import assert_same_state, finite_weights, make_trainer, poison_gradients, state_of, tiny_sample

pytestmark = pytest.mark.slow  # trains a real network or runs a bundle workflow


def test_clean_run_steps_and_reports(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=2)
    before = state_of(trainer)
    trainer.run()
    assert all(v == 0 for k, v in guard.counters.items() if k != "lr_searches"), guard.counters
    assert guard.log.searches[0]["iteration"] == 8 and guard.log.searches[0]["chosen_lr"] == 0.002  # the LR check
    assert not torch.equal(
        before["network"]["classification_head.cls_logits.weight"],
        trainer.network.classification_head.cls_logits.weight,
    )
    out = trainer.state.output
    assert out.event is None and math.isfinite(out.loss) and out.grad_norm > 0
    assert out.loss == pytest.approx(out.loss_cls + out.loss_reg, rel=1e-5)
    assert 0 < out.negative_score < 1 and 0 < out.positive_score < 1
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
        assert engine.state.output.event == "grad"
        assert_same_state(seen["before"], state_of(engine))
        seen["checked"] = True

    trainer.run()
    assert seen.get("checked")
    assert guard.counters["skipped_steps"] == 1 and guard.counters["rollbacks"] == 0
    assert trainer.state.iteration == 8 and finite_weights(trainer.network)
    # the loss was finite: the event names the gradient, not a loss spike
    assert [(e["kind"], e["what"]) for e in guard.log.events] == [("grad", "non-finite grad")]


@pytest.mark.parametrize(
    "bad_iteration, restored_iteration",
    # until the LR check of iteration 8 and the first snapshot after it (12) a rollback goes to the run's first state
    [(7, 0), (11, 0), (15, 12)],
)
def test_nan_weights_roll_back_exactly_and_keep_the_lr(tmp_path, bad_iteration, restored_iteration):
    trainer, guard = make_trainer(tmp_path, epochs=4, guard_kwargs={"snapshot_every": 4})
    seen = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _remember(engine):
        if engine.state.iteration == restored_iteration + 1:  # the state after `restored_iteration` iterations
            seen["restored"] = copy.deepcopy(engine.network.state_dict())

    @trainer.on(Events.ITERATION_STARTED(once=bad_iteration))
    def _corrupt(engine):
        seen["lr"] = engine.optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            engine.network.feature_extractor.body.conv1.weight.fill_(float("nan"))

    @trainer.on(Events.ITERATION_COMPLETED(once=bad_iteration))
    def _check(engine):
        assert engine.state.output.event == "logits"  # the heads' "cls_logits is NaN or Inf", caught
        state = engine.network.state_dict()
        for k, v in seen["restored"].items():
            assert torch.equal(state[k], v), k
        # the corruption does not reproduce from the good state: the search keeps the LR that was running
        assert guard.log.searches[-1]["trials"][0]["failed"] is False
        assert engine.optimizer.param_groups[0]["lr"] == seen["lr"]
        seen["checked"] = True

    trainer.run()
    assert seen.get("checked")
    assert guard.counters["rollbacks"] == 1 and guard.counters["weights_nonfinite"] == 1
    assert guard.log.events[0]["kind"] == "weights" and guard.lr_control.scale == 1.0
    assert finite_weights(trainer.network) and trainer.state.epoch == 4


def test_a_fault_that_comes_back_at_the_kept_lr_lowers_it(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=4, guard_kwargs={"snapshot_every": 4})  # 4 iterations an epoch
    lr = trainer.optimizer.param_groups[0]["lr"]
    bad = (11, 14)

    @trainer.on(Events.ITERATION_STARTED(lambda _, i: i in bad))
    def _corrupt(engine):
        with torch.no_grad():
            engine.network.feature_extractor.body.conv1.weight.fill_(float("nan"))

    trainer.run()
    first, second = guard.log.searches[-2:]
    assert first["trials"][0]["lr"] == pytest.approx(lr) and first["chosen_lr"] == pytest.approx(lr)  # a transient
    assert second["trials"][0]["lr"] < lr  # the same fault at the same LR: the kept LR is not tried again
    assert guard.counters["rollbacks"] == 2 and trainer.optimizer.param_groups[0]["lr"] < lr
    assert finite_weights(trainer.network) and trainer.state.epoch == 4


def test_without_search_a_rollback_backs_the_lr_off(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=2, guard_kwargs={"lr_search": False, "patience": 2})
    lr = trainer.optimizer.param_groups[0]["lr"]
    poison_gradients(trainer, [3, 4])
    trainer.run()
    assert guard.counters["rollbacks"] == 1 and guard.lr_control.scale == pytest.approx(guard.lr_policy.lr_backoff)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * guard.lr_policy.lr_backoff)


def test_nan_voxel_file_is_skipped_and_quarantined(tmp_path):
    quarantine = Quarantine(str(tmp_path / "quarantine.json"))
    samples = [tiny_sample(i) for i in range(4)]
    samples[1]["image"][0, 5, 5, 5] = float("nan")
    bad_file = samples[1]["image"].meta["filename_or_obj"]
    dataset = Dataset(samples)
    sampler = QuarantineSampler(dataset, quarantine, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=no_collation)
    trainer, guard = make_trainer(tmp_path, epochs=4, loader=loader, quarantine=quarantine)
    reports = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: reports.append((e.state.epoch, e.state.output)))
    trainer.run()
    assert trainer.state.epoch == 4 and finite_weights(trainer.network)
    bad_iterations = [(ep, out.event) for ep, out in reports if bad_file in out.files]
    assert [ev for _, ev in bad_iterations] == ["input", "input"]  # every batch with it skipped, then it is gone
    assert {ep for ep, _ in bad_iterations} == {1, 2}
    assert all(out.event is None for _, out in reports if bad_file not in out.files)
    assert bad_file in quarantine and len(quarantine) == 1
    report = json.loads((tmp_path / "guard_report.json").read_text())
    assert [q["image"] for q in report["quarantined"]] == [bad_file]
    assert all(e["kind"] == "input" and e["files"] == [bad_file] for e in report["events"])
    saved = json.loads((tmp_path / "quarantine.json").read_text())
    assert saved["quarantined"][0]["image"] == bad_file and saved["quarantined"][0]["source"] == "guard"
    assert guard.counters["rollbacks"] == 0 and guard.lr_control.scale == 1.0  # bad data is not the LR's fault


def test_learning_rate_overload_is_searched_down(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=6, lr=10.0, guard_kwargs={"snapshot_every": 2})
    trainer.run()
    assert trainer.state.epoch == 6 and guard.status == "completed"
    assert guard.counters["rollbacks"] >= 1 and guard.counters["lr_searches"] >= 1
    first = guard.log.searches[0]
    assert first["trials"][0] == {"lr": 10.0, "loss": first["trials"][0]["loss"], "failed": True}
    chosen = first["chosen_lr"]
    assert chosen is not None and chosen <= 0.1 and guard.lr_control.scale < 0.01
    assert trainer.optimizer.param_groups[0]["lr"] <= chosen  # never back above what the search found
    assert guard.lr_control.ceiling < 1  # the level that failed is out of reach for growth
    # and so is every level the search saw lose from the good state: growth stays a step below the lowest
    failed_above = min(t["lr"] for t in first["trials"] if t["failed"] and t["lr"] > chosen)
    assert first["lost_at"] is not None and first["lost_at"] <= failed_above
    assert guard.lr_control.ceiling * 10.0 <= first["lost_at"] * 10**-0.5 * (1 + 1e-6)
    assert finite_weights(trainer.network)
    assert len(guard.quarantine) == 0  # a blow-up fails every file alike: nobody is blamed
    # the run says plainly that it trained at another LR than it was given, what and why
    report = json.loads((tmp_path / "guard_report.json").read_text())["learning_rate"]
    assert report["asked"] == 10.0 and report["used"] == pytest.approx(10.0 * guard.lr_control.scale)
    assert report["changes"][0]["from"] == 10.0 and report["changes"][0]["to"] == pytest.approx(chosen)
    assert report["changes"][0]["iteration"] == guard.log.searches[0]["iteration"]  # decided when it rolled back
    assert report["changes"][0]["why"].startswith("after 3 consecutive refused steps the run rolled back to iteration")
    assert report["summary"].startswith("This run did not train at the learning rate it was given: learning_rate 10")
    assert f"set learning_rate to {report['used']:.3g}" in report["summary"]


def test_a_fault_that_never_lets_a_step_through_stops_the_run(tmp_path):
    guard_kwargs = {"patience": 2, "max_refused_in_a_row": 5}
    trainer, guard = make_trainer(tmp_path, epochs=5, guard_kwargs=guard_kwargs)
    poison_gradients(trainer, range(3, 100), every_parameter=True)
    snapshot = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=4),
        lambda e: snapshot.update(copy.deepcopy(guard.target.last_good.state["network"])),
    )
    trainer.run()
    # 3 and 4 refused -> one rollback (to the initial state: no window yet); from the good state nothing steps, so
    # rolling back again is pointless: 5 more refusals in a row stop the run
    assert guard.status == "stopped" and guard.counters["rollbacks"] == 1 and trainer.state.iteration == 9
    report = json.loads((tmp_path / "guard_report.json").read_text())
    assert report["status"] == "stopped" and "stopped by the stability guard" in report["message"]
    saved = torch.load(tmp_path / "last_good.pt", weights_only=False)
    for k, v in snapshot.items():
        assert torch.equal(saved["network"][k], v), k
    with pytest.raises(GuardStopped) as stop:
        guard.raise_if_failed()
    assert stop.value.code and "learning_rate" in str(stop.value.code)  # SystemExit with a message: exit status 1


def test_too_many_rollbacks_stop_the_run(tmp_path):
    trainer, guard = make_trainer(tmp_path, epochs=5, guard_kwargs={"patience": 2, "max_rollbacks": 2})
    poison_gradients(trainer, [i for i in range(2, 100) if i % 3], every_parameter=True)  # one step in three applies
    trainer.run()
    assert guard.status == "stopped" and guard.counters["rollbacks"] == 2
    assert "2 consecutive refused steps after 2 rollbacks" in guard.message


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
    state = copy.deepcopy(guard.state_dict())
    assert state["counters"]["rollbacks"] == 2 and len(state["log"]["events"]) == 2
    resumed, resumed_guard = make_trainer(tmp_path / "resumed", epochs=2, guard_kwargs={"patience": 1})
    resumed_guard.load_state_dict(state)
    assert resumed_guard.counters == guard.counters and resumed_guard.log.events == guard.log.events
    assert (
        resumed_guard.lr_control.ceiling == guard.lr_control.ceiling and resumed_guard.blame.stats == guard.blame.stats
    )
    assert resumed_guard.state_dict() == state


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_input_is_an_event_not_a_crash(tmp_path, kind):
    samples = [tiny_sample(i) for i in range(2)]
    samples[0]["image"] = MetaTensor(torch.full_like(samples[0]["image"], float(kind)), meta=samples[0]["image"].meta)
    loader = torch.utils.data.DataLoader(Dataset(samples), batch_size=1, collate_fn=no_collation)
    trainer, guard = make_trainer(tmp_path, epochs=1, loader=loader)
    trainer.run()
    assert guard.log.events[0]["kind"] == "input" and guard.counters["skipped_steps"] == 1
    assert finite_weights(trainer.network)


def test_too_large_updates_roll_back_and_search_an_lr_that_moves_less(tmp_path):
    # finite, spike-free steps that move the weights more than max_update_ratio per step (an LR far too high)
    guard_kwargs = {"snapshot_every": 2, "max_update_ratio": 1e-4}
    trainer, guard = make_trainer(tmp_path, epochs=1, guard_kwargs=guard_kwargs)
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
        assert engine.state.output.event is None  # the step itself was clean
        for k, v in seen["start"].items():  # rolled back to the snapshot of iteration 1, exactly
            assert torch.equal(engine.network.state_dict()[k], v), k
        search = guard.log.searches[0]
        assert search["trials"][0] == {"lr": seen["lr"], "loss": search["trials"][0]["loss"], "failed": True}
        lr = engine.optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(search["chosen_lr"]) and lr < seen["lr"]
        seen["checked"] = True

    trainer.run()
    assert seen.get("checked")
    event = guard.log.events[0]
    assert event["kind"] == "update" and event["iteration"] == 2 and event["files"] == []  # no file is blamed
    assert guard.counters["skipped_steps"] == 0 and len(guard.quarantine) == 0
    # the ratio it acted on: how far 2 steps moved the weights from the snapshot, relative to its norm, per step
    start, after_2 = seen["start"], seen["steps"][1]
    moved = torch.nn.utils.get_total_norm([after_2[n] - start[n] for n in names])
    expected = float(moved / torch.nn.utils.get_total_norm([start[n] for n in names])) / 2
    assert event["update_ratio"] == pytest.approx(expected, rel=1e-5) and expected > 1e-4


def test_healthy_run_is_untouched_by_the_lr_check(tmp_path):
    # the check at the end of the warm-up tries smaller LRs from a copy of the state; a healthy LR is kept and the
    # run goes on bitwise as if nothing had been tried (state, random generators)
    torch.manual_seed(0)
    checked, checked_guard = make_trainer(tmp_path / "a", epochs=3, guard_kwargs={"snapshot_every": 2})
    checked.run()
    torch.manual_seed(0)
    plain, _ = make_trainer(tmp_path / "b", epochs=3, guard_kwargs={"snapshot_every": 2, "lr_search": False})
    plain.run()
    assert checked_guard.counters["lr_searches"] == 1 and checked_guard.log.searches[0]["iteration"] == 8
    assert checked_guard.log.searches[0]["chosen_lr"] == 0.002
    assert all(v == 0 for k, v in checked_guard.counters.items() if k != "lr_searches")
    assert 0 < checked_guard.update_ratio < checked_guard.max_update_ratio
    assert checked_guard.target.last_good.iteration == 12  # refreshed at every window
    assert_same_state(state_of(checked), state_of(plain))


def test_the_lr_check_judges_the_peak_where_the_warm_up_leads(tmp_path, caplog):
    # a 12-iteration warm-up (4 iterations an epoch): the check waits for the schedule's peak instead of judging it
    # from the first state after 8 steps; the healthy recipe keeps its LR and goes on bitwise, and nothing is said
    torch.manual_seed(0)
    kwargs = {"snapshot_every": 2}
    checked, guard = make_trainer(tmp_path / "a", epochs=5, guard_kwargs=kwargs, warmup_iters=12)
    with caplog.at_level(logging.WARNING, logger="scripts.guard"):
        checked.run()
    torch.manual_seed(0)
    plain, _ = make_trainer(tmp_path / "b", epochs=5, guard_kwargs={**kwargs, "lr_search": False}, warmup_iters=12)
    plain.run()
    assert [s["iteration"] for s in guard.log.searches] == [13]  # the first step after the warm-up's last
    assert guard.log.searches[0]["trials"][0]["lr"] == 0.002 and guard.log.searches[0]["chosen_lr"] == 0.002
    assert guard.counters["rollbacks"] == 0 and guard.lr_control.scale == 1.0
    assert_same_state(state_of(checked), state_of(plain))
    report = json.loads((tmp_path / "a" / "guard_report.json").read_text())["learning_rate"]
    assert report == {"asked": 0.002, "used": 0.002, "summary": None, "changes": []}
    assert not [r for r in caplog.records if "did not train at the learning rate" in r.getMessage()]


@pytest.mark.parametrize("peak_loss, restarts", [(1.9, False), (math.nan, True)])
def test_the_lr_check_overrules_the_recipe_only_when_its_peak_fails(tmp_path, caplog, peak_loss, restarts):
    # the check's trials (stubbed): the recipe's peak 90% behind a smaller LR is kept (from a trained state a smaller
    # LR wins short trials by that much without learning better); a peak that fails its trial is overruled
    def trials(run_trial, start, *args, **kwargs):
        peak = Trial(start, peak_loss, math.isnan(peak_loss))
        return SearchResult((peak, Trial(start * 10**-0.5, 1.0, False)), start * 10**-0.5)

    trainer, guard = make_trainer(tmp_path, epochs=3, guard_kwargs={"search": trials})
    with caplog.at_level(logging.WARNING, logger="scripts.guard"):
        trainer.run()
    kept = [r.getMessage() for r in caplog.records if "is kept (it trains: it did not fail)" in r.getMessage()]
    assert len(kept) == int(not restarts)
    assert [s["iteration"] for s in guard.log.searches] == [8]
    assert guard.counters["rollbacks"] == int(restarts)
    assert guard.lr_control.scale == pytest.approx(10**-0.5 if restarts else 1.0)
    assert len(guard.log.lr_changes) == int(restarts)


def test_a_backed_off_lr_grows_back_and_stays_below_what_failed(tmp_path):
    # an earlier back-off (x0.01) that the run does not need: every growth_interval healthy iterations the guard tries
    # one step up (x sqrt(10)) from a copy of the state, and takes it since it learns about as well
    guard_kwargs = {"growth_interval": 8, "snapshot_every": 4}
    trainer, guard = make_trainer(tmp_path, epochs=8, guard_kwargs=guard_kwargs)
    guard.lr_control.failed_at(0.002 * 10**-0.5)  # the level that failed: growth stops below it
    guard.lr_control.back_off(0.01)
    trainer.run()
    scales = [s["chosen_lr"] / 0.002 for s in guard.log.searches if s["iteration"] > 8]
    assert guard.lr_control.scale > 0.01 and max(scales) > 0.01  # grew
    assert guard.lr_control.scale <= guard.lr_control.ceiling < 1.0  # ... and stays under the ceiling
    assert guard.counters["rollbacks"] == 0  # growing needs no rollback


def test_a_growth_step_that_learns_worse_is_not_taken_and_not_tried_again(tmp_path):
    # the growth trials run, and the step up is judged worse (stubbed: 30% behind, outside the margin but not a
    # clear loss): the run goes on from where it was, bitwise, at the reduced LR, and that level becomes the ceiling,
    # so no growth is tried again
    searches = []

    def trials(runner, start, step, *args, **kwargs):
        searches.append({"step": step, "network": copy.deepcopy(runner.origin.state["network"])})
        ran = (runner(start), runner(start * step))  # the trials train from the origin: the state moves
        return SearchResult((dataclasses.replace(ran[0], loss=1.0), dataclasses.replace(ran[1], loss=1.3)), start)

    guard_kwargs = {"growth_interval": 8, "snapshot_every": 4, "search": trials}
    trainer, guard = make_trainer(tmp_path, epochs=8, guard_kwargs=guard_kwargs)
    guard.lr_control.back_off(0.01)
    after_growth = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _after_the_guard(engine):
        growths = [s for s in searches if s["step"] > 1]
        if growths and not after_growth:
            after_growth.update(iteration=engine.state.iteration, network=copy.deepcopy(engine.network.state_dict()))

    trainer.run()
    growths = [s for s in searches if s["step"] > 1]
    assert len(growths) == 1 and growths[0]["step"] == pytest.approx(10**0.5)
    for key, value in growths[0]["network"].items():  # the copy of now the trials started from, put back
        assert torch.equal(value, after_growth["network"][key]), key
    assert (
        guard.lr_control.scale == pytest.approx(0.01)
        and guard.lr_control.ceiling == pytest.approx(0.01)
        and not guard.lr_control.can_grow()
    )
    assert guard.log.lr_changes == [] and guard.counters["rollbacks"] == 0 and guard.status == "completed"


def collapse_after(iterations: int):
    """A guard ``output_transform`` under which the detector stops telling nodules from background after
    ``iterations`` reports: every applied step's background score faked up to its nodule score."""
    calls = 0

    def transform(report):
        nonlocal calls
        calls += 1
        collapsed = report.stepped and calls > iterations + 1
        return dataclasses.replace(report, negative_score=report.positive_score) if collapsed else report

    return transform


def test_a_collapsed_score_gap_is_a_stall_that_the_search_examines(tmp_path):
    # the detector stops telling nodules from background after iteration 12 (a faked report): a stall; the search
    # finds that a smaller LR does not do better, so the run goes on from where it was
    guard_kwargs = {"snapshot_every": 2, "stall_windows": 2, "output_transform": collapse_after(12)}
    trainer, guard = make_trainer(tmp_path, epochs=8, guard_kwargs=guard_kwargs)
    trainer.run()
    stall = next(e for e in guard.log.events if e["kind"] == "stall")
    assert guard.counters["stalls"] >= 1 and stall["iteration"] > 12 and stall["files"] == []
    search = next(s for s in guard.log.searches if s["iteration"] == stall["iteration"])
    assert search["chosen_lr"] == search["trials"][0]["lr"] == 0.002  # the LR is not the cause
    assert guard.counters["rollbacks"] == 0 and guard.lr_control.scale == 1.0
    assert guard.status == "completed" and finite_weights(trainer.network)


def test_a_stall_that_a_smaller_lr_cures_rolls_back_to_the_last_snapshot(tmp_path):
    # the same faked collapse; the stall's search (stubbed) finds a smaller LR better: the run goes back to the
    # snapshot the search started from, bitwise, at that LR, and its collapsed windows are forgotten
    origins = []

    def trials(runner, start, *args, **kwargs):  # the LR check (first call) keeps the recipe; the stall's lowers it
        origins.append((runner.origin.iteration, copy.deepcopy(runner.origin.state["network"])))
        smaller = Trial(start * 10**-0.5, 0.5, False)
        return SearchResult((Trial(start, 1.0, False), smaller), start if len(origins) == 1 else smaller.lr)

    guard_kwargs = {"snapshot_every": 2, "stall_windows": 2, "output_transform": collapse_after(12), "search": trials}
    trainer, guard = make_trainer(tmp_path, epochs=8, guard_kwargs=guard_kwargs)
    restored = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _after_the_guard(engine):
        if guard.counters["stalls"] and not restored:
            restored.update(iteration=engine.state.iteration, network=copy.deepcopy(engine.network.state_dict()))

    trainer.run()
    stall = next(e for e in guard.log.events if e["kind"] == "stall")
    assert stall["iteration"] == restored["iteration"] > 12 and len(origins) >= 2
    origin_iteration, origin_network = origins[1]
    assert 12 <= origin_iteration < stall["iteration"] and guard.counters["rollbacks"] >= 1
    for key, value in origin_network.items():
        assert torch.equal(value, restored["network"][key]), key
    change = guard.log.lr_changes[0]
    assert change["iteration"] == stall["iteration"] and "stopped learning" in change["why"]
    assert change["to"] == pytest.approx(0.002 * 10**-0.5)
    assert guard.lr_control.scale <= 10**-0.5 + 1e-9 and guard.status == "completed" and finite_weights(trainer.network)


def test_a_crash_runs_each_exception_handler_once_and_propagates(tmp_path):
    # ignite hands a crash to the engine twice (the epoch's loop, then the run's): reports and checkpoints once
    from scripts.tools.faults import Crash

    trainer, guard = make_trainer(tmp_path, epochs=2)
    Crash(iteration=3, message="injected").attach(trainer)
    seen = []
    trainer.add_event_handler(Events.EXCEPTION_RAISED, lambda engine, e: seen.append(e))
    with pytest.raises(RuntimeError, match="^injected$"):
        trainer.run()
    assert [str(e) for e in seen] == ["injected"] and guard.status == "crashed: RuntimeError: injected"
    assert json.loads((tmp_path / "guard_report.json").read_text())["status"] == guard.status


def validator_at(best: float, epoch: int) -> types.SimpleNamespace:
    """What the guard reads of MONAI's evaluator: the best key metric, its epoch, and the last validation's epoch."""
    return types.SimpleNamespace(state=types.SimpleNamespace(best_metric=best, best_metric_epoch=epoch, epoch=epoch))


def test_a_run_whose_detector_learned_nothing_ends_non_zero(tmp_path):
    # validated at epoch 12: 2 warm-up epochs (8 iterations of 4) + judge_after_epochs 10, the first that counts
    guard_kwargs = {"validator": validator_at(0.004, 12)}
    trainer, guard = make_trainer(tmp_path, epochs=1, guard_kwargs=guard_kwargs, warmup_iters=8)
    trainer.run()
    assert guard.status == "not_learned"
    report = json.loads((tmp_path / "guard_report.json").read_text())
    assert report["status"] == "not_learned" and report["best_validation"] == 0.004
    assert report["judged_from_epoch"] == 12
    with pytest.raises(GuardStopped, match="did not learn"):
        guard.raise_if_failed()
    guard_kwargs = {"validator": validator_at(0.5, 12)}
    trainer, guard = make_trainer(tmp_path / "learned", epochs=1, guard_kwargs=guard_kwargs, warmup_iters=8)
    trainer.run()
    assert guard.status == "completed"
    guard.raise_if_failed()  # no exit


def test_a_run_too_short_to_judge_ends_with_a_warning_not_a_failure(tmp_path, caplog):
    # the last validation at epoch 11 comes before warm-up (2 epochs) + judge_after_epochs (10): a smoke run
    guard_kwargs = {"validator": validator_at(0.004, 11)}
    trainer, guard = make_trainer(tmp_path, epochs=1, guard_kwargs=guard_kwargs, warmup_iters=8)
    with caplog.at_level(logging.WARNING, logger="scripts.guard.stability_guard"):
        trainer.run()
    assert guard.status == "completed" and guard.message is None
    guard.raise_if_failed()  # no exit
    warnings = [r.getMessage() for r in caplog.records if "too short to judge" in r.getMessage()]
    assert len(warnings) == 1 and "epoch 12" in warnings[0] and "\n" not in warnings[0]
    report = json.loads((tmp_path / "guard_report.json").read_text())
    assert report["status"] == "completed" and "too short to judge" in report["note"]
    # the same run judged sooner by a shorter margin fails
    guard_kwargs = {"validator": validator_at(0.004, 11), "judge_after_epochs": 9}
    trainer, guard = make_trainer(tmp_path / "judged", epochs=1, guard_kwargs=guard_kwargs, warmup_iters=8)
    trainer.run()
    assert guard.status == "not_learned"


def test_sgd_whose_weights_norm_grows_too_fast_rolls_back_and_says_why(tmp_path):
    # the same two iterations twice: without the norm-growth limit to measure the growth of the first window, then
    # with a limit just below it; the second run must act on exactly that figure, roll back to the first state and
    # say why, figure and limit, in the LR change it logs
    def window_growth(limit, root):
        torch.manual_seed(0)  # both runs draw the same weights and samples
        guard_kwargs = {"snapshot_every": 2, "max_norm_growth": limit, "max_update_ratio": 0.0}
        trainer, guard = make_trainer(root, epochs=1, lr=0.02, guard_kwargs=guard_kwargs)
        seen = {}
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: seen.update(guard.telemetry()))
        trainer.run()
        return seen["norm_growth"], guard, json.loads((root / "guard_report.json").read_text())

    growth, _, report = window_growth(0.0, tmp_path / "a")
    assert growth > 0 and report["events"] == []
    limit = growth * 0.9
    _, guard, report = window_growth(limit, tmp_path / "b")
    event = report["events"][0]
    assert (event["kind"], event["iteration"], event["action"]) == ("norm_growth", 2, "rolling back")
    assert event["norm_growth"] == growth and event["files"] == []
    rollback, change = report["rollbacks"][0], report["learning_rate"]["changes"][0]
    assert (rollback["iteration"], rollback["to_iteration"]) == (2, 0)
    said = f"the weights' norm grew {growth:.2g} per step (max {limit:.2g}, SGD)"
    assert said in rollback["why"] and said in change["why"] and change["to"] < change["from"]


def test_the_norm_growth_limit_is_not_applied_to_adamw(tmp_path):
    # AdamW grows the weights' norm at healthy LRs and its steps do not shrink as the norm grows: no limit for it
    guard_kwargs = {"snapshot_every": 2, "max_norm_growth": 1e-12, "max_update_ratio": 0.0}
    trainer, guard = make_trainer(tmp_path, epochs=2, lr=1e-2, adamw=True, guard_kwargs=guard_kwargs)
    grew = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: grew.append(guard.telemetry()["norm_growth"]))
    trainer.run()
    report = json.loads((tmp_path / "guard_report.json").read_text())
    assert (
        max(g for g in grew if math.isfinite(g)) > 1e-12
        and report["events"] == []
        and report["counters"]["rollbacks"] == 0
    )
