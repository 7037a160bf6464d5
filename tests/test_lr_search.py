"""The LR search on a toy problem, its choice rule, and the LR control it drives."""

from __future__ import annotations

import math

import pytest
import torch
from scripts.detection.schedule import WarmupDecayLR
from scripts.detection.step_report import StepReport
from scripts.guard.lr_control import LRControl
from scripts.guard.lr_search import Trial, TrialRunner, confirm, search_lr
from scripts.guard.snapshot import Snapshot


def toy_problem(seed: int = 0):
    """Least squares with a known curvature: SGD diverges above LR 2 / lambda_max of X^T X / n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g) * torch.linspace(0.5, 3.0, 8)
    y = x @ torch.randn(8, 1, generator=g) + 0.01 * torch.randn(64, 1, generator=g)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    lam_max = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max())
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    def step(batch) -> StepReport:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        value = float(loss.detach())
        finite = math.isfinite(value) and value < 1e6  # a blow-up, as the trainer's spike limit sees it
        if finite:
            optimizer.step()
        event = None if finite else "loss"
        return StepReport(loss=value, loss_cls=value, loss_reg=0.0, grad_norm=0.0, weight_norm=0.0, event=event)

    return model, optimizer, step, batches, 2.0 / lam_max


def test_search_picks_a_working_lr_on_a_toy_problem():
    model, optimizer, step, batches, diverges_above = toy_problem()
    origin = Snapshot(model, optimizer)
    origin.take(0)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    runner = TrialRunner(step, origin, batches, iterations=12)
    result = search_lr(runner, start_lr=100 * diverges_above, patience=2, margin=0.25, max_trials=12)
    runner.finish()
    # the LRs far above the stability limit fail, the chosen one is below it and learns (lower loss than the start)
    assert result.trials[0].failed and result.lr is not None and result.lr < diverges_above
    chosen = next(t for t in result.trials if t.lr == result.lr)
    best = min(t.loss for t in result.trials if not t.failed)
    assert chosen.loss <= 1.25 * best
    assert all(t.loss > best for t in result.trials if not t.failed and t.lr < result.lr / 5)  # too small: slower
    origin.restore()
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), start)  # trials leave no trace


def test_trials_are_paired_and_leave_the_random_state_alone():
    model, optimizer, step, batches, _ = toy_problem()
    origin = Snapshot(model, optimizer)
    origin.take(0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    runner = TrialRunner(step, origin, batches, iterations=6)
    first, again = runner(0.01), runner(0.01)
    runner.finish()
    assert first == again  # same state, same batches, same random numbers: the same trial
    assert torch.equal(torch.get_rng_state(), before)


def fake_trials(losses: dict[float, float | None]):
    """A run_trial answering from a table (None: the trial fails), recording the LRs asked."""
    asked = []

    def run_trial(lr: float) -> Trial:
        key = min(losses, key=lambda k: abs(math.log(k) - math.log(lr)))
        asked.append(key)
        loss = losses[key]
        return Trial(lr, math.nan if loss is None else loss, loss is None)

    return run_trial, asked


def test_search_chooses_the_largest_lr_within_the_margin_of_the_best():
    # a smaller LR always wins a short trial a little (it settles the weights): that must not move a working LR
    run_trial, asked = fake_trials({1.0: 1.10, 0.316: 1.0, 0.1: 1.05, 0.0316: 1.2})
    assert search_lr(run_trial, 1.0, margin=0.25).lr == 1.0
    run_trial, asked = fake_trials({1.0: 1.50, 0.316: 1.0, 0.1: 1.05, 0.0316: 1.2})
    result = search_lr(run_trial, 1.0, margin=0.25, patience=2)
    assert result.lr == pytest.approx(10**-0.5) and result.changed
    assert asked == [1.0, 0.316, 0.1, 0.0316]  # two candidates without improvement end the walk


def test_search_walks_past_failures_and_reports_none_when_everything_fails():
    run_trial, asked = fake_trials({10.0: None, 3.16: None, 1.0: None, 0.316: 2.0, 0.1: 1.0, 0.0316: 1.5, 0.01: 1.6})
    assert search_lr(run_trial, 10.0, patience=2).lr == pytest.approx(0.1)
    run_trial, asked = fake_trials({1.0: None})
    result = search_lr(run_trial, 1.0, max_trials=4)
    assert result.lr is None and not result.changed and len(asked) == 4


def test_search_reports_the_smallest_larger_lr_that_clearly_lost():
    # 0.1 is chosen (within 25% of the best, 0.0316); 0.316 lost by more than twice the margin, 1.0 failed
    run_trial, _ = fake_trials({1.0: None, 0.316: 1.6, 0.1: 1.2, 0.0316: 1.0, 0.01: 1.1, 0.00316: 1.2})
    result = search_lr(run_trial, 1.0, margin=0.25, patience=2)
    assert result.lr == pytest.approx(0.1) and result.lost_at == pytest.approx(10**-0.5)
    # an LR above the choice that lost by less than twice the margin is not a loser: trials cannot tell
    run_trial, _ = fake_trials({0.316: 1.4, 0.1: 1.2, 0.0316: 1.0, 0.01: 1.1, 0.00316: 1.2})
    assert search_lr(run_trial, 10**-0.5, margin=0.25, patience=2).lost_at is None
    run_trial, _ = fake_trials({1.0: None})
    assert search_lr(run_trial, 1.0, max_trials=2).lost_at is None  # nothing chosen, nothing to stay below


def test_longer_trials_settle_a_choice_that_is_not_the_best():
    # the margin chose 0.1 (1.2 against the best 1.0 at 0.0316); trained longer, the smaller ends lower: it wins,
    # and the larger is reported as lost (growth stays below it)
    result = search_lr(fake_trials({1.0: None, 0.316: 1.6, 0.1: 1.2, 0.0316: 1.0, 0.01: 1.1})[0], 1.0, patience=2)
    longer, asked = fake_trials({0.1: 0.9, 0.0316: 0.8})
    settled = confirm(longer, result)
    assert asked == [0.1, 0.0316] and settled.lr == pytest.approx(10**-1.5)
    assert settled.lost_at == pytest.approx(0.1) and settled.trials == result.trials
    assert [t.lr for t in settled.confirmation] == pytest.approx([0.1, 10**-1.5]) and "longer" in settled.summary()
    # ... where the larger ends no worse, it is kept, and so is what it lost to before
    assert confirm(fake_trials({0.1: 0.8, 0.0316: 0.8})[0], result).lr == pytest.approx(0.1)
    assert confirm(fake_trials({0.1: 0.8, 0.0316: None})[0], result).lr == pytest.approx(0.1)
    assert confirm(fake_trials({0.1: None, 0.0316: 0.9})[0], result).lr == pytest.approx(10**-1.5)
    # a choice that is the best already needs no longer trials
    result = search_lr(fake_trials({1.0: 1.0, 0.316: 1.1})[0], 1.0, patience=1)
    longer, asked = fake_trials({1.0: 0.9})
    assert confirm(longer, result) is result and asked == []


def test_a_trial_judged_by_its_tail_averages_its_last_steps():
    model, optimizer, step, batches, _ = toy_problem()
    origin = Snapshot(model, optimizer)
    origin.take(0)
    losses = []
    recording = lambda batch: losses.append(step(batch)) or losses[-1]  # noqa: E731
    trial = TrialRunner(recording, origin, batches, iterations=12, tail=4)(0.01)
    assert trial.loss == pytest.approx(math.fsum(r.loss for r in losses[-4:]) / 4)
    assert losses[-1].loss < losses[0].loss  # it learns: the tail is not the mean after the first step
    assert trial.loss != pytest.approx(math.fsum(r.loss for r in losses[1:]) / 11)


def scheduled(warmup_iters: int = 10, lr: float = 0.5) -> tuple[torch.optim.Optimizer, WarmupDecayLR]:
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=lr)
    return optimizer, WarmupDecayLR(optimizer, warmup_iters=warmup_iters, total_iters=100, step_iters=50)


def advance(optimizer: torch.optim.Optimizer, scheduler: WarmupDecayLR, iterations: int) -> None:
    for _ in range(iterations):
        optimizer.step()  # no gradients: the parameters stay, the schedule moves on
        scheduler.step()


@pytest.mark.parametrize("decay", ["step", "cosine"])
def test_the_schedule_warms_up_linearly_then_decays(decay):
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.5)
    kwargs = {"warmup_iters": 10, "total_iters": 110, "step_iters": 40, "gamma": 0.1, "min_lr_factor": 0.01}
    scheduler = WarmupDecayLR(optimizer, decay=decay, **kwargs)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(130):
        advance(optimizer, scheduler, 1)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.005) and lrs[5] == pytest.approx(0.005 + 0.495 * 5 / 10) and lrs[10] == 0.5
    after = lrs[10:]
    assert all(b <= a for a, b in zip(after, after[1:], strict=False))  # never up again after the warm-up
    if decay == "step":
        assert after[39] == 0.5 and after[40] == pytest.approx(0.05) and after[80] == pytest.approx(0.005)
    else:
        assert after[50] == pytest.approx(0.005 + 0.495 * 0.5)  # half-way down the cosine
        assert after[100] == after[120] == pytest.approx(0.005)  # min_lr_factor from total_iters on
    scheduler.multiplier = 0.1  # the guard's scale multiplies whatever the schedule gives
    advance(optimizer, scheduler, 1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (0.0005 if decay == "step" else 0.005))


def test_the_schedule_names_its_decays():
    with pytest.raises(ValueError, match="lr_decay must be one of"):
        WarmupDecayLR(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), 0, 10, decay="linear")


def test_lr_control_sets_peaks_and_keeps_below_what_failed():
    optimizer, scheduler = scheduled()
    control = LRControl(scheduler)
    advance(optimizer, scheduler, 4)
    warmup_lr = optimizer.param_groups[0]["lr"]
    assert control.peak_lr() == pytest.approx(0.5) and warmup_lr < 0.5 and not control.warmup_done()
    control.failed_at(warmup_lr)  # a failure during the warm-up caps the peak below the LR that failed
    control.set_peak_lr(0.05)
    assert control.peak_lr() == pytest.approx(0.05) and optimizer.param_groups[0]["lr"] == pytest.approx(warmup_lr / 10)
    assert control.can_grow() and control.growth_candidate(10) == pytest.approx(warmup_lr * 10**-0.5)
    state = scheduler.state_dict()
    control.back_off(0.1)
    scheduler.load_state_dict(state)  # a rollback restores the schedule's own multiplier...
    control.reapply()  # ...the control puts its own back
    assert control.peak_lr() == pytest.approx(0.005)
    fresh = LRControl(scheduled()[1])
    fresh.load_state_dict(control.state_dict())
    assert fresh.scale == control.scale and fresh.ceiling == control.ceiling


def test_lr_control_never_goes_above_the_recipe():
    optimizer, scheduler = scheduled(warmup_iters=0)
    control = LRControl(scheduler)
    control.set_peak_lr(5.0)
    assert control.scale == 1.0 and not control.can_grow() and optimizer.param_groups[0]["lr"] == 0.5
    advance(optimizer, scheduler, 60)
    assert control.peak_lr() == pytest.approx(0.05)  # after the step decay the peak is the decayed LR


def test_lr_control_needs_the_schedule_multiplier():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="WarmupDecayLR"):
        LRControl(torch.optim.lr_scheduler.StepLR(optimizer, 10))
