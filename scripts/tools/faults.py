"""Faults injected on purpose, to see what the stability guard does with them on your own data and recipe.

Each is an ignite handler that a config adds by name to the trainer's handlers, e.g.

    --train#extra_handlers#fault "{'_target_': 'scripts.tools.faults.InfGradients', 'first': 200, 'last': 209}"

They act through MONAI's iteration events (after backward), so the LR searches of the guard, which run the
trainer's step without those events, never see them: like a transient hardware or data fault, they hit the run's
own iterations only.
"""

from __future__ import annotations

from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["Crash", "InfGradients", "LossScaleOverflow"]


class InfGradients:
    """
    Fills every gradient with ``value`` after backward at iterations ``first`` to ``last`` (inclusive).

    Args:
        first: the first iteration hit.
        last: the last iteration hit.
        value: the value written into the gradients.
    """

    def __init__(self, first: int, last: int, value: float = float("inf")) -> None:
        self.first, self.last, self.value = first, last, value

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.first <= engine.state.iteration <= self.last:
            for p in engine.network.parameters():
                if p.grad is not None:
                    p.grad.fill_(self.value)


class LossScaleOverflow:
    """
    Under fp16 AMP, makes the backward pass of iterations ``first`` to ``last`` (inclusive) overflow, as a burst of
    real fp16 overflows would: the GradScaler's loss scale is raised to ``scale`` for that backward pass only and
    put back before the gradients are unscaled, so the scaler then sees the overflow and halves its own scale.
    Nothing happens without a GradScaler.

    Args:
        first: the first iteration hit.
        last: the last iteration hit.
        scale: the loss scale of the overflowing backward passes (fp16 overflows above 65504).
    """

    def __init__(self, first: int, last: int, scale: float = 2.0**40) -> None:
        self.first, self.last, self.scale = first, last, scale
        self.saved: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.raise_scale)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.restore_scale)

    def raise_scale(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and self.first <= engine.state.iteration <= self.last:
            self.saved = scaler.get_scale()
            scaler.update(self.scale)

    def restore_scale(self, engine: Engine) -> None:
        if self.saved is not None:
            engine.scaler.update(self.saved)
            self.saved = None


class Crash:
    """
    Raises ``RuntimeError(message)`` at the end of iteration ``iteration``: a crash (a bug, an out-of-memory error)
    in the middle of training, to check that the final checkpoint and the guard's report are still written.

    Args:
        iteration: the iteration that crashes.
        message: the error's text.
    """

    def __init__(self, iteration: int, message: str = "injected crash") -> None:
        self.iteration, self.message = iteration, message

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.iteration), self)

    def __call__(self, engine: Engine) -> None:
        raise RuntimeError(self.message)
