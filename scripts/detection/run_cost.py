"""What a training run will cost on this machine, said once at its start.

The full recipe (ResNet50-FPN, 192 x 192 x 80 patches, 300 epochs) is days of work on a CPU; a first-time user who
starts it on a laptop should learn that in the first minute, with the command that runs the demo instead. Ignite's
`ProgressBar` shows a per-epoch ETA only, hence this handler.
"""

from __future__ import annotations

import logging
import time

from ignite.engine import Engine, Events

__all__ = ["RunCostEstimate"]

logger = logging.getLogger(__name__)

DEMO_HINT = (
    "for a CPU run of minutes, merge the demo config: python -m monai.bundle run training --config_file "
    "\"['configs/train.json','configs/demo.json']\""
)


class RunCostEstimate:
    """
    At the start of training, says how many iterations the run has; after ``after`` timed iterations, how long the
    rest will take at that pace (training iterations only), with the command of the demo when that is more than
    ``hint_hours`` on a CPU.

    Args:
        after: iterations timed before the estimate (the first one, with its warm-up costs, is not timed).
        hint_hours: on a CPU, estimates above this many hours repeat the demo hint as a warning.
    """

    def __init__(self, after: int = 2, hint_hours: float = 1.0) -> None:
        self.after = after
        self.hint_hours = hint_hours
        self._first: int | None = None
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def started(self, engine: Engine) -> None:
        total = engine.state.epoch_length * engine.state.max_epochs
        logger.info(
            f"training: {engine.state.max_epochs} epochs x {engine.state.epoch_length} iterations "
            f"({total - engine.state.iteration} to go) on {engine.state.device}; the pace follows in a few iterations"
        )

    def iteration_completed(self, engine: Engine) -> None:
        if self._first is None:
            self._first, self._start = engine.state.iteration, time.perf_counter()
            return
        timed = engine.state.iteration - self._first
        if timed != self.after:
            return
        per_iteration = (time.perf_counter() - self._start) / timed
        left = engine.state.epoch_length * engine.state.max_epochs - engine.state.iteration
        hours = per_iteration * left / 3600
        line = f"training pace {per_iteration:.2f} s per iteration: about {_duration(hours)} of training left"
        if engine.state.device.type == "cpu" and hours > self.hint_hours:
            logger.warning(f"{line} on this CPU; {DEMO_HINT}")
        else:
            logger.info(line)


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    if hours >= 1:
        return f"{hours:.1f} hours"
    return f"{hours * 60:.0f} minutes"
