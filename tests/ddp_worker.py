"""A two-process training run for tests/test_distributed.py, started with torchrun (gloo on CPU).

Usage: torchrun --nproc_per_node=2 tests/ddp_worker.py OUT_DIR [--inf-rank R --inf-iterations I [I ...]]
Each rank saves its final parameters, guard counters and LR to OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ignite.engine import Events  # noqa: E402
from monai.engines.utils import IterationEvents  # noqa: E402
from scripts.data.quarantine import Quarantine  # noqa: E402
from scripts.detection.schedule import WarmupDecayLR  # noqa: E402
from scripts.detection.trainer import StabilisedDetectionTrainer  # noqa: E402
from scripts.guard.stability_guard import StabilityGuard  # noqa: E402
from training_helpers import tiny_detector, tiny_loader  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--inf-rank", type=int, default=-1)
    parser.add_argument("--inf-iterations", type=int, nargs="*", default=[])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--patience", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # different initial weights: the trainer must start every rank from rank 0's
    detector = tiny_detector()
    optimizer = torch.optim.SGD(detector.network.parameters(), lr=0.002, momentum=0.9)
    quarantine = Quarantine(os.path.join(args.out, "quarantine.json"))
    scheduler = WarmupDecayLR(optimizer, warmup_iters=0, total_iters=100)
    guard = StabilityGuard(
        detector.network,
        optimizer,
        scheduler,
        patience=args.patience,
        snapshot_every=2,
        search_iters=4,
        quarantine=quarantine,
        report_path=os.path.join(args.out, "guard_report.json") if rank == 0 else None,
    )
    loader = tiny_loader(8, quarantine, shuffle=True)
    trainer = StabilisedDetectionTrainer("cpu", args.epochs, loader, detector, optimizer, train_handlers=[guard])
    events = []

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def _inject(engine):
        if rank == args.inf_rank and engine.state.iteration in args.inf_iterations:
            next(p for p in engine.network.parameters() if p.grad is not None).grad.fill_(float("inf"))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: events.append(e.state.output.event))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: scheduler.step())
    trainer.run()
    torch.save(
        {
            "params": [p.detach().clone() for p in detector.network.parameters()],
            "buffers": [b.detach().clone() for b in detector.network.buffers()],
            "counters": dict(guard.counters),
            "lr": optimizer.param_groups[0]["lr"],
            "events": events,
            "searches": guard.log.searches,
            "iterations": trainer.state.iteration,
        },
        os.path.join(args.out, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
