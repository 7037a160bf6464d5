"""
The training step's costs, ours against the model zoo's, measured side by side in one process:

    python -m scripts.tools.benchmark_gpu --config_file configs/train.json --rounds 100      # the full recipe
    python -m scripts.tools.benchmark_gpu --config_file configs/train.json --patch 64 64 32 --batch 2 --rounds 10

Four arms over the same initial weights and batches, in rotating order every round, so that machine noise hits all
alike (`scripts.tools.benchmark_guard`'s `build`, `make_batches` and `step`):

- ``zoo``: MONAI's detector training path as the model zoo's trainer runs it (its target assignment and the heads'
  NaN checks, no clipping, no guard);
- ``bare``: our step (the sync-free detector, one fused host read), no clipping, no guard;
- ``guarded``: our step with gradient clipping and the guard (snapshots and all);
- ``network``: the network alone, forward, backward of the summed raw head outputs and the optimiser step (no target
  assignment, no losses): the floor the detector's step can approach;
- ``compiled`` (``--compile``, by default on a GPU only): ``bare`` with the network compiled
  (``detector#compile_network``; ``--compile_options``, else the config's options: ``{"mode": "reduce-overhead"}``
  adds CUDA graphs); its first step, the compilation, is timed apart, and where it fails the arm is dropped with
  the error (``--compile on``: the error ends the run). The other arms run eagerly whatever the config says.

It prints per arm the median and mean wall time per iteration and the sync-type ops per iteration (counted at the
dispatcher, `SyncCounter`: a proxy of the host syncs on a GPU); the guard's overhead (guarded over bare, ratio of
medians and of means); the speed-up over the zoo's step. On a GPU it adds the kernel time per iteration, the busy
fraction (kernel time over wall) and the kernels per iteration (``torch.profiler``), the seconds of one
whole-volume validation forward (``--val_shape``, sliding window as the config sets it), and whole-volume inference
end to end, ours against the zoo's settings (`scripts.tools.benchmark_inference`, ``--inference_config``, on
``--inference_volumes`` phantoms of ``--val_shape``). Without a GPU it says so and prints the CPU figures
(``--inference on`` runs the inference part on the CPU too).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from scripts.detection.precision import precision_name
from scripts.tools.benchmark_guard import build, make_batches, read_configs, step
from scripts.tools.benchmark_inference import compare
from scripts.tools.sync_count import SyncCounter

ARMS = ("zoo", "bare", "guarded", "network")
COMPILED = "compiled"


def network_step(trainer, batch: list) -> float:
    """One iteration of the network alone (the ``network`` arm), timed like `step`."""
    start = time.perf_counter()
    prepared = trainer.prepare_batch(batch, trainer.state.device, trainer.non_blocking)
    network, optimizer = trainer.network, trainer.optimizer
    network.train()
    optimizer.zero_grad(set_to_none=True)
    with trainer._autocast():
        outputs = network(torch.stack([torch.as_tensor(x) for x in prepared.images]))
    heads = [o for maps in outputs.values() for o in maps] if isinstance(outputs, dict) else list(outputs)
    sum(h.float().mean() for h in heads).backward()
    optimizer.step()
    if trainer.state.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def profile(run: Callable[[list], float], batches: list[list]) -> dict[str, float]:
    """Kernel time (ms) and kernels per iteration on a GPU, from ``torch.profiler`` over ``batches``."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        wall = sum(run(batch) for batch in batches)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    n = len(batches)
    return {
        "kernel_ms": kernel_us / 1e3 / n,
        "kernels": sum(e.count for e in kernels) / n,
        "busy": kernel_us / 1e6 / wall if wall else float("nan"),
    }


def validation_seconds(trainer, inferer: Callable, shape: list[int], repeats: int = 3) -> float:
    """Median seconds of one whole-volume detection by validation's ``inferer`` (sliding window and precision as
    configured) of a random volume."""
    detector, device = trainer.detector, trainer.state.device
    detector.eval()
    volume = torch.rand((1, *shape), device=device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.no_grad():
            inferer([volume], detector)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--config_file", default="configs/train.json")
    args.add_argument("--patch", type=int, nargs=3, help="training patch (default: the config's patch_size)")
    args.add_argument("--batch", type=int, help="crops per iteration (default: the config's batch_size)")
    args.add_argument("--rounds", type=int, default=100)
    args.add_argument("--warmup", type=int, default=5)
    args.add_argument("--profile_rounds", type=int, default=10)
    args.add_argument("--amp", choices=["config", "on", "off"], default="config")
    args.add_argument("--amp_dtype", choices=["float16", "bfloat16"], help="autocast type (default: the config's)")
    args.add_argument("--val_shape", type=int, nargs=3, default=[512, 512, 256])
    args.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="the compiled arm (auto: GPU)")
    args.add_argument("--compile_options", type=json.loads, default={}, help='e.g. \'{"mode": "reduce-overhead"}\'')
    args.add_argument("--inference", choices=["auto", "on", "off"], default="auto", help="auto: on a GPU only")
    args.add_argument("--inference_config", default="configs/inference.json")
    args.add_argument("--inference_volumes", type=int, default=2)
    args.add_argument("--out", default="data/benchmark_inference", help="the inference part's phantoms and results")
    opts = args.parse_args()
    parser = read_configs(opts.config_file, opts.amp)
    if opts.amp_dtype:
        parser["amp_dtype"] = opts.amp_dtype
    patch, batch_size = opts.patch or parser["patch_size"], opts.batch or parser["batch_size"]
    parser["patch_size"] = patch
    configured = parser.get("detector#compile_network", False)
    parser["detector#compile_network"] = False  # every arm eager; the compiled arm is the only one compiled
    torch.manual_seed(0)
    guarded, guard = build(parser, True, None, sync_free=True)
    state = copy.deepcopy(guarded.network.state_dict())
    trainers = {
        "zoo": build(parser, False, state, sync_free=False)[0],
        "bare": build(parser, False, state, sync_free=True)[0],
        "guarded": guarded,
        "network": build(parser, False, state)[0],
    }
    runs: dict[str, Callable[[list], float]] = {
        "zoo": lambda b: step(trainers["zoo"], None, b),
        "bare": lambda b: step(trainers["bare"], None, b),
        "guarded": lambda b: step(guarded, guard, b),
        "network": lambda b: network_step(trainers["network"], b),
    }
    batches = make_batches(opts.rounds + opts.warmup, patch, batch_size)
    cuda = guarded.state.device.type == "cuda"
    arms = ARMS
    if opts.compile == "on" or (opts.compile == "auto" and cuda):
        trainers[COMPILED] = build(parser, False, state, sync_free=True)[0]
        trainers[COMPILED].detector.set_compiled(opts.compile_options or configured or True)
        runs[COMPILED] = lambda b: step(trainers[COMPILED], None, b)
        try:
            print(f"compiled arm: first step (the compilation) {runs[COMPILED](batches[0]):.1f} s")
            arms = (*ARMS, COMPILED)
        except Exception as e:  # compiling has not met every GPU yet: by default, the other arms still get measured
            if opts.compile == "on":
                raise
            print(f"compiled arm dropped, its first step failed: {type(e).__name__}: {e}")
            del trainers[COMPILED], runs[COMPILED]
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for i, b in enumerate(batches):
        for arm in arms[i % len(arms) :] + arms[: i % len(arms)]:
            t = runs[arm](b)
            if i >= opts.warmup:
                times[arm].append(t)
    syncs = {}
    for arm in arms:
        with SyncCounter() as counter:
            runs[arm](batches[0])
        syncs[arm] = counter
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    precision = precision_name(guarded.autocast_type, guarded.amp, guarded.state.device)
    print(f"{device}; torch {torch.__version__}; {precision}; patch {patch}, batch {batch_size}; {opts.config_file}")
    print(f"rounds {opts.rounds} (+{opts.warmup} warm-up), arms in rotating order")
    kernels = {arm: profile(runs[arm], batches[: opts.profile_rounds]) for arm in arms} if cuda else {}
    print("| arm | median ms | mean ms | sync-type ops / it | kernel ms / it | busy | kernels / it |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arm in arms:
        k = kernels.get(arm)
        gpu = f"{k['kernel_ms']:.1f} | {k['busy']:.2f} | {k['kernels']:.0f}" if k else "- | - | -"
        med, mean = statistics.median(times[arm]) * 1e3, statistics.fmean(times[arm]) * 1e3
        print(f"| {arm} | {med:.1f} | {mean:.1f} | {syncs[arm].total} | {gpu} |")
    med = {arm: statistics.median(times[arm]) for arm in arms}
    mean = {arm: statistics.fmean(times[arm]) for arm in arms}
    print(
        f"guard overhead (guarded / bare): ratio of medians {med['guarded'] / med['bare']:.4f}, "
        f"ratio of means {mean['guarded'] / mean['bare']:.4f}"
    )
    print(f"bare step / network alone: {med['bare'] / med['network']:.3f} (medians)")
    print(
        f"speed-up over the zoo's step (iterations per second): bare {med['zoo'] / med['bare']:.3f}, "
        f"guarded {med['zoo'] / med['guarded']:.3f} (medians)"
    )
    if COMPILED in med:
        print(
            f"compiled: {med['bare'] / med[COMPILED]:.3f}x the bare step, {med['zoo'] / med[COMPILED]:.3f}x the zoo's, "
            f"{med[COMPILED] / med['network']:.3f} of the network alone (medians)"
        )
    print("sync-type ops of the zoo's step:", dict(syncs["zoo"].counts.most_common(8)))
    print("sync-type ops of the guarded step:", dict(syncs["guarded"].counts.most_common(8)))
    if cuda:
        val = validation_seconds(trainers["bare"], parser.get_parsed_content("validate#inferer"), opts.val_shape)
        print(f"whole-volume validation forward {opts.val_shape}: {val:.2f} s per volume")
    else:
        print("no GPU: kernel time, busy fraction, kernels and validation time were skipped")
    if opts.inference == "on" or (opts.inference == "auto" and cuda):
        del trainers, runs, guarded, guard  # the training arms' memory, before whole volumes
        if cuda:
            torch.cuda.empty_cache()
        print(compare(opts.inference_config, opts.val_shape, opts.inference_volumes, 2, opts.out))
    else:
        print("inference end to end skipped (--inference on to run it here)")


if __name__ == "__main__":
    main()
