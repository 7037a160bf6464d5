"""The end-of-run judgement: did the detector learn, and had it a fair chance to?

A detector that never rises above ``min_val_metric`` on validation learned nothing, however stable its training
was; but a run whose last validation came before it could have learned (a smoke test, a run that ends in or just
after its LR warm-up) is too short to tell, and is only warned about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Verdict", "best_validation", "judge_learning"]


@dataclass(frozen=True)
class Verdict:
    """
    Attributes:
        best: the best validation metric (``None``: the run was never validated).
        last_epoch: the epoch of the last validation.
        judged_from_epoch: the first epoch whose validation counts (set when ``best`` is at or below the floor).
        learned: ``False`` for a run that had its chance and learned nothing; ``None`` when there was nothing to judge
            or the run was too short; ``True`` otherwise.
        note: the warning for a run too short to judge (``None``: none).
    """

    best: float | None
    last_epoch: int | None = None
    judged_from_epoch: int | None = None
    learned: bool | None = True
    note: str | None = None


def best_validation(validator: Any) -> float | None:
    """The best key metric of MONAI's evaluator so far (``None``: not validated yet, or no validator)."""
    state = getattr(validator, "state", None)
    if state is None or getattr(state, "best_metric_epoch", -1) in (-1, None):
        return None
    return float(state.best_metric)


def judge_learning(
    validator: Any, min_val_metric: float | None, warmup_epochs: int, judge_after_epochs: int
) -> Verdict:
    """
    Judge a run from its validator (MONAI's evaluator: ``state.best_metric``, ``state.best_metric_epoch`` and
    ``state.epoch``, the trainer's epoch of the last validation).

    Args:
        validator: the evaluator (``None``: nothing to judge).
        min_val_metric: the best validation metric must exceed this (``None``: no judgement).
        warmup_epochs: the run's LR warm-up, in epochs.
        judge_after_epochs: epochs after the warm-up from which a validation counts.
    """
    best = best_validation(validator)
    if best is None:
        return Verdict(best=None, learned=None)
    last = int(validator.state.epoch)
    if min_val_metric is None or best > min_val_metric:
        return Verdict(best=best, last_epoch=last)
    judged_from = warmup_epochs + judge_after_epochs
    if last >= judged_from:
        return Verdict(best=best, last_epoch=last, judged_from_epoch=judged_from, learned=False)
    note = (
        f"The run was too short to judge whether the detector learned: its last validation was at epoch {last}, and "
        f"only one from epoch {judged_from} on counts ({warmup_epochs} warm-up epochs + guard#judge_after_epochs "
        f"{judge_after_epochs}); best validation metric so far {best:.4g}."
    )
    return Verdict(best=best, last_epoch=last, judged_from_epoch=judged_from, learned=None, note=note)
