"""
Overhead of the stabilised step: the guarded iteration (finiteness checks, buffer backup, clipping, the guard's
bookkeeping and snapshots) against the same iteration with the guard off, alternating in one process on the
same batches, so machine noise hits both alike. Prints the medians and their ratio.

    python -m scripts.tools.benchmark_guard --config_file "['configs/train.json','configs/demo.json']" --rounds 100
"""

from __future__ import annotations

import argparse
import ast
import copy
import statistics
import time

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scripts.detection.schedule import WarmupDecayLR
from scripts.detection.trainer import StabilisedDetectionTrainer
from scripts.guard.stability_guard import StabilityGuard


def read_configs(config_file: str, amp: str = "config") -> ConfigParser:
    """The configs of ``--config_file`` (a path, or a Python list of paths), ``--amp`` on, off or as configured."""
    files = ast.literal_eval(config_file) if config_file.startswith("[") else config_file
    parser = ConfigParser()
    parser.read_config(files)
    if amp != "config":
        parser["amp"] = amp == "on"
    return parser


def make_batches(n: int, patch: list[int], batch_size: int, seed: int = 0) -> list[list[list[dict]]]:
    """``n`` loader batches of ``batch_size`` random crops, each with one box, as the training loader yields them."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        crops = []
        for _ in range(batch_size):
            image = torch.rand((1, *patch), generator=g)
            lo = [int(torch.randint(0, s - 10, (1,), generator=g)) for s in patch]
            image[:, lo[0] : lo[0] + 8, lo[1] : lo[1] + 8, lo[2] : lo[2] + 5] += 1.0
            box = torch.tensor([[lo[0], lo[1], lo[2], lo[0] + 8, lo[1] + 8, lo[2] + 5]], dtype=torch.float32)
            crops.append(
                {
                    "image": MetaTensor(image, meta={"filename_or_obj": f"case_{i}.nii.gz"}),
                    "box": box,
                    "label": torch.tensor([0]),
                }
            )
        batches.append([crops])
    return batches


def build(
    parser: ConfigParser, guarded: bool, state: dict | None, sync_free: bool | None = None
) -> tuple[StabilisedDetectionTrainer, StabilityGuard | None]:
    """
    A trainer over a fresh copy of the configured detector (same initial weights for both arms); ``sync_free``
    overrides the config's ``detector#sync_free`` (``False``: MONAI's training path, the model zoo's).
    """
    parser.parse(reset=True)
    detector = parser.get_parsed_content("detector")
    parser.get_parsed_content("detector_ops")  # matcher, sampler, box selector, inferer
    if sync_free is not None:
        detector.set_sync_free(sync_free)
    if state is not None:
        detector.network.load_state_dict(state)
    optimizer = torch.optim.SGD(detector.network.parameters(), lr=parser["learning_rate"], momentum=0.9, nesterov=True)
    device = parser.get_parsed_content("device")
    amp, amp_dtype = parser.get_parsed_content("amp"), parser.get("amp_dtype")
    fp16 = amp and torch.device(device).type == "cuda" and amp_dtype in (None, "float16")
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    trainer = StabilisedDetectionTrainer(
        device,
        1,
        [],
        detector,
        optimizer,
        grad_clip_norm=parser.get_parsed_content("grad_clip_norm") if guarded else None,
        skip_nonfinite=guarded,
        amp=amp,
        amp_dtype=amp_dtype,
        scaler=scaler,
    )
    guard = None
    if guarded:
        # the per-iteration work only: LR searches are one-off costs of a run, measured apart (docs/benchmark.md)
        scheduler = WarmupDecayLR(optimizer, warmup_iters=0, total_iters=1)
        every = parser["guard"]["snapshot_every"]
        guard = StabilityGuard(detector.network, optimizer, scheduler, scaler, lr_search=False, snapshot_every=every)
    return trainer, guard


def step(trainer: StabilisedDetectionTrainer, guard: StabilityGuard | None, batch: list) -> float:
    """Time one iteration, including the guard's handlers where it is on."""
    start = time.perf_counter()
    trainer.state.iteration += 1
    if guard is not None:
        guard.iteration_started(trainer)
    trainer.state.output = trainer._iteration(trainer, batch)
    if guard is not None:
        guard.iteration_completed(trainer)
    if trainer.state.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--config_file", default="['configs/train.json','configs/demo.json']")
    args.add_argument("--rounds", type=int, default=100)
    args.add_argument("--warmup", type=int, default=5)
    args.add_argument("--amp", choices=["config", "on", "off"], default="config", help="override the config's amp")
    opts = args.parse_args()
    parser = read_configs(opts.config_file, opts.amp)
    torch.manual_seed(0)
    on, guard = build(parser, True, None)
    off, _ = build(parser, False, copy.deepcopy(on.network.state_dict()))
    batches = make_batches(opts.rounds + opts.warmup, parser["patch_size"], parser["batch_size"])
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i, batch in enumerate(batches):
        order = [("on", on, guard), ("off", off, None)] if i % 2 == 0 else [("off", off, None), ("on", on, guard)]
        for name, trainer, g in order:
            t = step(trainer, g, batch)
            if i >= opts.warmup:
                times[name].append(t)
    med_on, med_off = statistics.median(times["on"]), statistics.median(times["off"])
    ratios = [a / b for a, b in zip(times["on"], times["off"])]
    cuda = on.state.device.type == "cuda"
    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device}, amp {on.amp}, rounds {opts.rounds}, configs {opts.config_file}")
    print(f"median iteration, guard on : {med_on * 1000:.1f} ms")
    print(f"median iteration, guard off: {med_off * 1000:.1f} ms")
    print(f"ratio of medians: {med_on / med_off:.4f}; median of per-round ratios: {statistics.median(ratios):.4f}")
    # the snapshot refresh (host copy, update ratio) costs every snapshot_every-th iteration: the means include it
    mean_on, mean_off = statistics.fmean(times["on"]), statistics.fmean(times["off"])
    print(f"mean iteration, guard on / off: {mean_on * 1e3:.1f} / {mean_off * 1e3:.1f} ms", end=", ")
    print(f"ratio of means: {mean_on / mean_off:.4f}")


if __name__ == "__main__":
    main()
