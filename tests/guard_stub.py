"""
A stub trainer for the stability guard's decision rules, as ignite tests its handlers: a real ignite `Engine` whose
process function applies a scripted change to a tiny network (a real optimiser step, real `WarmupDecayLR`) and
returns a scripted `StepReport`, a scripted LR search (passed to the guard, not patched) and a stub validator.

The guard is driven only through its constructor, `attach` and the engine's events, and read only through its JSON
report, so these tests do not depend on how the guard is built inside.
"""

from __future__ import annotations

import copy
import json
import math
import os
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from ignite.engine import Engine, Events
from scripts.data.quarantine import Quarantine
from scripts.detection.schedule import WarmupDecayLR
from scripts.detection.step_report import StepReport
from scripts.guard.lr_search import SearchResult, Trial, choose
from scripts.guard.stability_guard import StabilityGuard

__all__ = [
    "EPOCH_LENGTH",
    "GROWTH",
    "GuardRun",
    "JUMP",
    "LR",
    "ScriptedSearch",
    "Step",
    "StubTrainer",
    "expand",
    "run_guard",
    "tiny_network",
    "validator_at",
]

EPOCH_LENGTH = 4  # iterations per epoch of the stub's loader
LR = {"sgd": 0.01, "adamw": 1e-3}  # the recipe's peak LR per optimiser
DECAY = 0.01  # a healthy step minimises DECAY * ||w||^2 / 2: with SGD the weights shrink by LR * DECAY per step
GROWTH = 2e-3  # a "grow" step inflates every parameter by this much: norm growth ~2e-3 per step, update ratio too
JUMP = 0.2  # a "jump" step moves the weights by this fraction of their norm at once


@dataclass(frozen=True)
class Step:
    """
    What one iteration of the stub does.

    Attributes:
        event: the kind of the refused step (``input``, ``logits``, ``loss``, ``grad``), ``None`` for an applied step
            (which the stub still refuses as a ``loss`` event when ``loss`` exceeds the guard's loss limit, as the
            trainer does).
        loss: the reported loss.
        positive_score, negative_score: the reported classifier scores (their difference is the score gap).
        weights: what happens to the weights: ``"nan"`` (a parameter filled with NaN before the step), ``"jump"``
            (moved by ``JUMP`` of their norm after the step), ``"grow"`` (inflated by ``GROWTH`` after the step), or
            ``None``.
        amp_overflow: the refused step is an fp16 overflow (with ``event="grad"``).
        files: the batch's files (``None``: ``/data/case_<batch>.nii.gz``).
        bad_files: the files blamed for a refused step (``None``: the batch's).
    """

    event: str | None = None
    loss: float = 1.0
    positive_score: float = 0.5
    negative_score: float = 0.1
    weights: str | None = None
    amp_overflow: bool = False
    files: tuple[str, ...] | None = None
    bad_files: tuple[str, ...] | None = None


HEALTHY = Step()


def expand(script: Mapping[int | Iterable[int], Step]) -> dict[int, Step]:
    """A script keyed by iteration, from one keyed by iterations or ranges of them."""
    out: dict[int, Step] = {}
    for key, step in script.items():
        for iteration in [key] if isinstance(key, int) else key:
            out[iteration] = step
    return out


def tiny_network(seed: int = 0) -> torch.nn.Module:
    """A few hundred parameters with a normalisation, like the detector's blocks."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )


class StubTrainer(Engine):
    """
    A real ignite `Engine` with what the guard calls on the trainer: ``set_loss_limit``/``loss_limit``,
    ``train_step(batch, fire_events=False)`` (the LR search's trial steps: always healthy) and ``state.batch``.

    Its handlers are attached first, then the scheduler is stepped after them at every iteration (as train.json
    orders the guard before the LR schedule).

    Args:
        network, optimizer, scheduler: what is trained.
        script: the `Step` of each iteration (``HEALTHY`` where none is given).
        handlers: objects with ``attach(engine)`` (the guard).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: WarmupDecayLR,
        script: Mapping[int, Step],
        handlers: Sequence[Any] = (),
    ) -> None:
        super().__init__(lambda engine, batch: engine.train_step(batch))
        self.network, self.optimizer, self.scheduler, self.script = network, optimizer, scheduler, dict(script)
        self.loss_limit = math.inf
        self.trial_steps = 0
        for handler in handlers:
            handler.attach(self)
        self.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: engine.scheduler.step())

    def set_loss_limit(self, limit: float) -> None:
        self.loss_limit = float(limit)

    def train_step(self, batch: Any, fire_events: bool = True) -> StepReport:
        """The scripted iteration (a trial step of a search, ``fire_events=False``, is healthy)."""
        step = self.script.get(self.state.iteration, HEALTHY) if fire_events else HEALTHY
        self.trial_steps += not fire_events
        files = step.files if step.files is not None else (f"/data/case_{batch}.nii.gz",)
        params = list(self.network.parameters())
        if step.weights == "nan":
            with torch.no_grad():
                params[0].fill_(math.nan)
        event = step.event
        if event is None and step.loss > self.loss_limit:  # the trainer refuses a loss spike
            event = "loss"
        if event is None:
            self._healthy_step(params)
            with torch.no_grad():
                if step.weights == "grow":
                    for p in params:
                        p.mul_(1 + GROWTH)
                elif step.weights == "jump":
                    noise = [
                        torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)
                    ]
                    scale = (
                        JUMP
                        * float(torch.nn.utils.get_total_norm(params))
                        / float(torch.nn.utils.get_total_norm(noise))
                    )
                    for p, n in zip(params, noise, strict=True):
                        p.add_(scale * n)
        bad_files = () if event is None else (step.bad_files if step.bad_files is not None else files)
        return StepReport(
            loss=step.loss,
            loss_cls=step.loss,
            loss_reg=0.0,
            grad_norm=math.nan if event == "grad" else 1.0,
            weight_norm=float(torch.nn.utils.get_total_norm(params)),
            lr=self.optimizer.param_groups[0]["lr"],
            positive_score=step.positive_score,
            negative_score=step.negative_score,
            event=event,
            amp_overflow=step.amp_overflow,
            files=files,
            bad_files=bad_files,
        )

    def _healthy_step(self, params: list[torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        (0.5 * DECAY * sum(p.square().sum() for p in params)).backward()
        self.optimizer.step()


# a scripted search's answers: (loss, failed) of each trial, walking from the start LR by the search's step
ANSWERS: dict[str, tuple[tuple[float, bool], ...]] = {
    "keep": ((1.0, False),),  # the start LR works and is kept
    "better": ((1.4, False), (1.0, False)),  # the start LR works, the next learns clearly better (margin 0.25)
    "fail": ((math.nan, True), (1.0, False)),  # the start LR fails, the next works
    "fail_near": ((math.nan, True), (1.3, False), (1.0, False)),  # fails; the next is 30% behind the third
    "none": ((math.nan, True), (math.nan, True)),  # every candidate fails
}


class ScriptedSearch:
    """
    An LR search with `search_lr`'s signature that answers from a script (``ANSWERS``' names, in order; ``"keep"``
    once they run out): the chosen LR is the largest working one within the margin of the best, and ``lost_at`` the
    smallest failed one above it, as `search_lr` decides. With ``run_trials`` each trial also trains on the stub
    (`TrialRunner` and ``train_step(batch, fire_events=False)``), its outcome replaced by the script's.
    """

    def __init__(self, *answers: str, run_trials: bool = False) -> None:
        self.answers = list(answers)
        self.run_trials = run_trials
        self.calls: list[tuple[float, float]] = []  # (start_lr, step) of each call

    def __call__(
        self,
        run_trial: Callable[[float], Trial],
        start_lr: float,
        step: float = 10**-0.5,
        limit_lr: float = 0.0,
        max_trials: int = 8,
        patience: int = 2,
        margin: float = 0.25,
    ) -> SearchResult:
        self.calls.append((start_lr, step))
        answer = ANSWERS[self.answers.pop(0) if self.answers else "keep"]
        trials = []
        for i, (loss, failed) in enumerate(answer):
            lr = start_lr * step**i
            if self.run_trials:
                run_trial(lr)
            trials.append(Trial(lr, loss, failed))
        return choose(trials, margin)  # the real search's rule, on the scripted trials


def validator_at(best: float, epoch: int) -> types.SimpleNamespace:
    """What the guard reads of MONAI's evaluator: the best key metric, its epoch and the last validation's epoch."""
    return types.SimpleNamespace(state=types.SimpleNamespace(best_metric=best, best_metric_epoch=epoch, epoch=epoch))


@dataclass
class GuardRun:
    """
    A finished stub run.

    Attributes:
        guard: the guard (to call ``raise_if_failed``).
        engine: the stub trainer.
        report: the guard's final JSON report.
        reports: the report after each iteration (``guard.write_report()`` after the guard's handler).
        weights: the network's state at the end of each iteration, after the guard (0: the initial state).
        search: the scripted search.
    """

    guard: StabilityGuard
    engine: StubTrainer
    report: dict[str, Any]
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    search: ScriptedSearch | None = None


def run_guard(
    tmp_path: Any,
    script: Mapping[int | Iterable[int], Step] | None = None,
    iterations: int = 16,
    optimizer: str = "sgd",
    searches: Sequence[str] = (),
    run_trials: bool = False,
    warmup_iters: int = 0,
    validator: Any = None,
    **guard_kwargs: Any,
) -> GuardRun:
    """
    Run the guard on the stub for ``iterations`` (whole epochs of ``EPOCH_LENGTH``) and return what it reported.

    The guard's arguments default to the test scale: a window of 4 steps and an LR check after 6 (``search_iters``);
    ``guard_kwargs`` (names as in train.json's ``guard``) override them.
    """
    network = tiny_network()
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(network.parameters(), lr=LR["sgd"])
    else:
        opt = torch.optim.AdamW(network.parameters(), lr=LR["adamw"])
    scheduler = WarmupDecayLR(opt, warmup_iters=warmup_iters, total_iters=1000, decay="step", step_iters=1000)
    search = ScriptedSearch(*searches, run_trials=run_trials)
    report_path = os.path.join(str(tmp_path), "guard_report.json")
    kwargs = {
        "snapshot_every": 4,
        "search_iters": 6,
        "quarantine": Quarantine(),
        "report_path": report_path,
        "ckpt_path": os.path.join(str(tmp_path), "last_good.pt"),
        "validator": validator,
        "search": search,
        **guard_kwargs,
    }
    guard = StabilityGuard(network, opt, scheduler, **kwargs)
    engine = StubTrainer(network, opt, scheduler, expand(script or {}), handlers=[guard])
    run = GuardRun(guard, engine, {}, search=search)

    def read() -> dict[str, Any]:
        with open(report_path) as f:
            return json.load(f)

    @engine.on(Events.STARTED)
    def _initial(engine):
        run.weights[0] = copy.deepcopy(network.state_dict())

    @engine.on(Events.ITERATION_COMPLETED)
    def _trace(engine):  # after the guard's handler (and the scheduler's step)
        guard.write_report()
        run.reports[engine.state.iteration] = read()
        run.weights[engine.state.iteration] = copy.deepcopy(network.state_dict())

    engine.run(list(range(EPOCH_LENGTH)), max_epochs=math.ceil(iterations / EPOCH_LENGTH))
    run.report = read()
    return run
