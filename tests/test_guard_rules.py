"""
The stability guard's decision rules, one table of scenarios on a stub trainer (tests/guard_stub.py): each row
scripts the trainer's step reports and the LR search's answers, and states the guard's JSON report it must end with.
Milliseconds a row; the tests that train a real network (test_guard.py) prove the wiring.

The stub's geometry (the guard's test-scale arguments in `run_guard`): 4 iterations an epoch, a window of 4 applied
steps (snapshots at 4, 8, ...), the LR check after 6 applied steps (iteration 6), so a rollback goes to the run's first
state until the first window at the checked LR is snapshotted (iteration 8), and to the last snapshot after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from guard_stub import LR, Step, run_guard, validator_at
from scripts.guard.stability_guard import GuardStopped

NAN = Step(event="logits", weights="nan")  # the weights became non-finite: the heads raise "NaN or Inf"
BAD = "/data/bad_voxels.nii.gz"
S = 10**-0.5  # one step of the LR search
ZERO = dict.fromkeys(
    ("events", "skipped_steps", "rollbacks", "amp_overflows", "weights_nonfinite", "lr_searches", "stalls"), 0
)
APPLIED_KINDS = ("update", "norm_growth", "stall")  # events of applied steps: no file is blamed


@dataclass(frozen=True)
class Scenario:
    """
    One row: what the stub does and the report the guard must write.

    Attributes:
        name: the rule.
        script: `Step` per iteration (an int, a range or a tuple of iterations), healthy elsewhere.
        run: `run_guard`'s other arguments (iterations, optimizer, searches, warmup_iters, validator) and the
            guard's (train.json's names).
        status: the report's status.
        counters: the counters that are not 0.
        events: (iteration, kind, action) of every event, in order.
        rolled_back: iteration of each rollback -> the iteration whose state it restored (``snapshot_iteration``
            right after it, and the weights equal to those at the end of that iteration).
        searched_at: the iterations of the LR searches (``None``: not checked).
        lr_scale, lr_changes, lr_ceiling: the LR the run ends at (a multiple of the recipe's), how many changes were
            logged, the ceiling growth may not pass (``None``: not checked).
        last_iteration: where the run ended (``None``: it ran all its iterations).
        quarantined: the quarantined files.
        best_validation, judged_from_epoch: the honest end's fields.
    """

    name: str
    script: dict[Any, Step] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"
    counters: dict[str, int] = field(default_factory=dict)
    events: tuple[tuple[int, str, str], ...] = ()
    rolled_back: dict[int, int] = field(default_factory=dict)
    searched_at: tuple[int, ...] | None = None
    lr_scale: float = 1.0
    lr_changes: int = 0
    lr_ceiling: float | None = None
    last_iteration: int | None = None
    quarantined: tuple[str, ...] = ()
    best_validation: float | None = None
    judged_from_epoch: int | None = None


SKIP, BACK, SEARCH = "step skipped", "rolling back", "searching the LR"
ROWS = [
    Scenario("a clean run: the LR check keeps the recipe", searched_at=(6,), counters={"lr_searches": 1}),
    Scenario(
        "non-finite input: skipped, never a rollback, the file quarantined at its quarantine_after-th event",
        script={range(5, 8): Step(event="input", files=(BAD,))},
        run={"patience": 2, "quarantine_after": 2},
        events=((5, "input", SKIP), (6, "input", SKIP), (7, "input", SKIP)),
        counters={"events": 3, "skipped_steps": 3, "lr_searches": 1},
        quarantined=(BAD,),
    ),
    *[
        Scenario(
            f"a refused {kind} step is skipped; the batch is named, not quarantined",
            script={10: Step(event=kind, loss=math.nan)},
            events=((10, kind, SKIP),),
            counters={"events": 1, "skipped_steps": 1, "lr_searches": 1},
        )
        for kind in ("logits", "loss", "grad")
    ],
    Scenario(
        "a loss spike above the guard's limit (10 x the recent median) is refused; one below it is not",
        script={10: Step(loss=50.0), 11: Step(loss=9.0)},
        events=((10, "loss", SKIP),),
        counters={"events": 1, "skipped_steps": 1, "lr_searches": 1},
    ),
    Scenario(
        "patience refused steps in a row roll back to the last snapshot",
        script={range(10, 13): Step(event="grad")},
        events=((10, "grad", SKIP), (11, "grad", SKIP), (12, "grad", SKIP)),
        rolled_back={12: 8},
        searched_at=(6, 12),
        counters={"events": 3, "skipped_steps": 3, "rollbacks": 1, "lr_searches": 2},
    ),
    Scenario(
        "non-finite weights roll back at once; before the LR check to the first state (and no check after)",
        script={3: NAN},
        events=((3, "weights", BACK),),
        rolled_back={3: 0},
        searched_at=(3,),
        counters={"events": 1, "skipped_steps": 1, "rollbacks": 1, "weights_nonfinite": 1, "lr_searches": 1},
    ),
    Scenario(
        "after the LR check, until a window at the checked LR is kept, a rollback still goes to the first state",
        script={7: NAN},
        events=((7, "weights", BACK),),
        rolled_back={7: 0},
        searched_at=(6, 7),
        counters={"events": 1, "skipped_steps": 1, "rollbacks": 1, "weights_nonfinite": 1, "lr_searches": 2},
    ),
    Scenario(
        "once a window at the checked LR is kept, a rollback goes to the last snapshot",
        script={10: NAN},
        events=((10, "weights", BACK),),
        rolled_back={10: 8},
        searched_at=(6, 10),
        counters={"events": 1, "skipped_steps": 1, "rollbacks": 1, "weights_nonfinite": 1, "lr_searches": 2},
    ),
    Scenario(
        "an update ratio above max_update_ratio at a window's end rolls back (an applied step: no file, no skip)",
        script={10: Step(weights="jump")},
        events=((12, "update", BACK),),
        rolled_back={12: 8},
        searched_at=(6, 12),
        counters={"events": 1, "rollbacks": 1, "lr_searches": 2},
    ),
    Scenario(
        "SGD: norm growth above max_norm_growth at a window's end rolls back",
        script={range(9, 13): Step(weights="grow")},
        events=((12, "norm_growth", BACK),),
        rolled_back={12: 8},
        searched_at=(6, 12),
        counters={"events": 1, "rollbacks": 1, "lr_searches": 2},
    ),
    Scenario(
        "AdamW: the same norm growth is not checked",
        script={range(9, 13): Step(weights="grow")},
        run={"optimizer": "adamw"},
        searched_at=(6,),
        counters={"lr_searches": 1},
    ),
    Scenario(
        "SGD with max_norm_growth 0: not checked",
        script={range(9, 13): Step(weights="grow")},
        run={"max_norm_growth": 0.0},
        counters={"lr_searches": 1},
    ),
    Scenario(
        "after max_rollbacks rollbacks the next fault stops the run at the last good state (the kept LR that "
        "failed again is lowered on the way)",
        script={(3, 7, 11): NAN},
        run={"max_rollbacks": 2},
        status="stopped",
        events=((3, "weights", BACK), (7, "weights", BACK), (11, "weights", BACK)),
        rolled_back={3: 0, 7: 0},
        searched_at=(3, 7),
        counters={"events": 3, "skipped_steps": 3, "rollbacks": 2, "weights_nonfinite": 3, "lr_searches": 2},
        lr_scale=S,
        lr_changes=1,
        last_iteration=11,
    ),
    Scenario(
        "max_refused_in_a_row refused steps from the last good state stop the run (rolling back cannot help)",
        script={range(3, 100): Step(event="grad")},
        run={"patience": 2, "max_refused_in_a_row": 5},
        status="stopped",
        events=tuple((i, "grad", SKIP) for i in range(3, 10)),
        rolled_back={4: 0},
        searched_at=(4,),
        counters={"events": 7, "skipped_steps": 7, "rollbacks": 1, "lr_searches": 1},
        last_iteration=9,
    ),
    Scenario(
        "the LR check keeps a peak that trains, though a smaller LR wins its trial",
        run={"searches": ("better",)},
        searched_at=(6,),
        counters={"lr_searches": 1},
    ),
    Scenario(
        "the LR check overrules a peak that fails: the run restarts from its first state at the smaller LR",
        run={"searches": ("fail",)},
        rolled_back={6: 0},
        searched_at=(6,),
        counters={"rollbacks": 1, "lr_searches": 1},
        lr_scale=S,
        lr_changes=1,
        lr_ceiling=S,
    ),
    Scenario(
        "the LR check waits for the end of the warm-up",
        run={"warmup_iters": 10},
        searched_at=(11,),
        counters={"lr_searches": 1},
    ),
    Scenario(
        "a search in which no LR works backs the LR off by lr_backoff",
        script={10: NAN},
        run={"searches": ("keep", "none"), "lr_backoff": 0.1},
        events=((10, "weights", BACK),),
        rolled_back={10: 8},
        searched_at=(6, 10),
        counters={"events": 1, "skipped_steps": 1, "rollbacks": 1, "weights_nonfinite": 1, "lr_searches": 2},
        lr_scale=0.1,
        lr_changes=1,
    ),
    Scenario(
        "a reduced LR grows one step after growth_interval healthy iterations, up to the ceiling",
        script={3: NAN},
        run={"searches": ("fail_near", "better"), "growth_interval": 8, "iterations": 24},
        events=((3, "weights", BACK),),
        rolled_back={3: 0},
        searched_at=(3, 11),
        counters={"events": 1, "skipped_steps": 1, "rollbacks": 1, "weights_nonfinite": 1, "lr_searches": 2},
        lr_scale=S,
        lr_changes=2,
        lr_ceiling=S,
    ),
    Scenario(
        "a growth step that learns worse is not taken, and its level becomes the ceiling: not tried again",
        script={3: NAN},
        run={"searches": ("fail_near", "keep"), "growth_interval": 8, "iterations": 24},
        events=((3, "weights", BACK),),
        rolled_back={3: 0},
        searched_at=(3, 11),
        counters={"events": 1, "skipped_steps": 1, "rollbacks": 1, "weights_nonfinite": 1, "lr_searches": 2},
        lr_scale=0.1,
        lr_changes=1,
        lr_ceiling=0.1,
    ),
    Scenario(
        "a score gap collapsed for stall_windows windows is a stall; a smaller LR does not help: the run goes on",
        script={range(21, 37): Step(positive_score=0.1)},
        run={"stall_windows": 2, "iterations": 36},
        events=((36, "stall", SEARCH),),
        searched_at=(6, 36),
        counters={"events": 1, "stalls": 1, "lr_searches": 2},
    ),
    Scenario(
        "a stall that a smaller LR cures rolls back to the last snapshot at that LR",
        script={range(21, 37): Step(positive_score=0.1)},
        run={"stall_windows": 2, "iterations": 36, "searches": ("keep", "better")},
        events=((36, "stall", SEARCH),),
        rolled_back={36: 28},
        searched_at=(6, 36),
        counters={"events": 1, "stalls": 1, "rollbacks": 1, "lr_searches": 2},
        lr_scale=S,
        lr_changes=1,
    ),
    Scenario(
        "fp16 overflows are the GradScaler's until amp_overflow_patience in a row, then events",
        script={range(9, 13): Step(event="grad", amp_overflow=True)},
        run={"amp_overflow_patience": 3},
        events=((11, "grad", SKIP), (12, "grad", SKIP)),
        counters={"events": 2, "skipped_steps": 4, "amp_overflows": 4, "lr_searches": 1},
    ),
    Scenario(
        "the honest end: a validation best above min_val_metric completes",
        run={"validator": validator_at(0.5, 4), "min_val_metric": 0.01},
        counters={"lr_searches": 1},
        best_validation=0.5,
    ),
    Scenario(
        "the honest end: at or below min_val_metric from warm-up + judge_after_epochs on: not learned",
        run={"validator": validator_at(0.004, 4), "min_val_metric": 0.01, "warmup_iters": 8, "judge_after_epochs": 2},
        status="not_learned",
        counters={"lr_searches": 1},
        best_validation=0.004,
        judged_from_epoch=4,
    ),
    Scenario(
        "the honest end: a run validated before warm-up + judge_after_epochs is too short to judge: completes",
        run={"validator": validator_at(0.004, 4), "min_val_metric": 0.01, "warmup_iters": 8, "judge_after_epochs": 3},
        counters={"lr_searches": 1},
        best_validation=0.004,
        judged_from_epoch=5,
    ),
    Scenario(
        "without the LR search a rollback backs the LR off and goes to the last snapshot",
        script={22: NAN},
        run={"lr_search": False, "iterations": 24},
        events=((22, "weights", BACK),),
        rolled_back={22: 20},
        searched_at=(),
        counters={"events": 1, "skipped_steps": 1, "rollbacks": 1, "weights_nonfinite": 1},
        lr_scale=0.1,
        lr_changes=1,
    ),
]


def name(row: Scenario) -> str:
    return row.name


@pytest.mark.parametrize("case", ROWS, ids=name)
def test_guard_rule(tmp_path, case):
    run = run_guard(tmp_path, case.script, **case.run)
    report, reports = run.report, run.reports

    assert report["status"] == case.status
    assert report["counters"] == {**ZERO, **case.counters}
    assert [(e["iteration"], e["kind"], e["action"]) for e in report["events"]] == list(case.events)
    assert report["counters"]["events"] == len(report["events"])  # every kind counts, refused step or not
    iterations = case.run.get("iterations", 16)
    assert max(reports) == report["iteration"] == (case.last_iteration or iterations)

    # the events' own fields
    guard = {"max_update_ratio": 0.01, "max_norm_growth": 2e-4, **case.run}
    for event in report["events"]:
        if event["kind"] in APPLIED_KINDS:
            assert event["files"] == []
        elif event["kind"] == "input":
            assert event["files"] == [BAD]
        else:
            assert len(event["files"]) == 1  # the batch
        assert (event["update_ratio"] is not None) == (event["kind"] == "update")
        assert (event["norm_growth"] is not None) == (event["kind"] == "norm_growth")
        if event["kind"] == "update":
            assert event["update_ratio"] > guard["max_update_ratio"]
        if event["kind"] == "norm_growth":
            assert guard["max_norm_growth"] < event["norm_growth"] < guard["max_update_ratio"]

    # each rollback: when, to which state (the report's snapshot, and the weights, exactly)
    count = {i: r["counters"]["rollbacks"] for i, r in reports.items()}
    rollbacks = [i for i in sorted(count) if count[i] > count.get(i - 1, 0)]
    assert rollbacks == sorted(case.rolled_back)
    assert {r["iteration"]: r["to_iteration"] for r in report["rollbacks"]} == case.rolled_back
    for at, target in case.rolled_back.items():
        assert reports[at]["snapshot_iteration"] == target
        assert_same(run.weights[at], run.weights[target])

    # the learning rate
    asked = LR[case.run.get("optimizer", "sgd")]
    if case.searched_at is not None:
        assert [s["iteration"] for s in report["lr_searches"]] == list(case.searched_at)
    assert report["lr_scale"] == pytest.approx(case.lr_scale)
    assert report["learning_rate"]["asked"] == pytest.approx(asked)
    assert report["learning_rate"]["used"] == pytest.approx(asked * case.lr_scale)
    assert len(report["learning_rate"]["changes"]) == case.lr_changes
    assert (report["learning_rate"]["summary"] is None) == (case.lr_changes == 0 or case.lr_scale == 1.0)
    if case.lr_ceiling is not None:
        assert report["lr_ceiling"] == pytest.approx(case.lr_ceiling)

    assert [q["image"] for q in report["quarantined"]] == list(case.quarantined)
    assert report["best_validation"] == case.best_validation
    assert report["judged_from_epoch"] == case.judged_from_epoch

    # the exit: non-zero when stopped or not learned; a stopped run is put back to its last good state and saves it
    checkpoint = tmp_path / "last_good.pt"
    if case.status == "completed":
        run.guard.raise_if_failed()
        assert report["message"] is None
    else:
        with pytest.raises(GuardStopped) as stop:
            run.guard.raise_if_failed()
        assert stop.value.code == report["message"]
    assert checkpoint.exists() == (case.status == "stopped")
    if case.status == "stopped":
        good = run.weights[report["snapshot_iteration"]]
        assert_same(run.weights[max(reports)], good)
        assert_same(torch.load(checkpoint, weights_only=False)["network"], good)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_the_lr_checks_trials_train_on_the_stub_and_leave_the_run_as_it_was(tmp_path):
    # the search's trials (TrialRunner, the stub's train_step without events) move the weights; a kept LR puts the
    # run back where it was: the same weights, iteration by iteration, as a run without the search
    searched = run_guard(tmp_path / "a", run_trials=True, searches=("better",))
    plain = run_guard(tmp_path / "b", lr_search=False)
    assert searched.engine.trial_steps == 2 * 6  # two trials of search_iters steps
    assert searched.report["counters"]["lr_searches"] == 1 and plain.report["counters"]["lr_searches"] == 0
    for iteration in plain.weights:
        assert_same(searched.weights[iteration], plain.weights[iteration])
