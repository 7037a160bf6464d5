"""
Whole-volume inference end to end, ours against the model zoo's settings, side by side in one process:

    python -m scripts.tools.benchmark_inference                                   # GPU: the full network, 512x512x256
    python -m scripts.tools.benchmark_inference --config_file "['configs/inference.json','configs/demo.json']" \
        --shape 160 160 80 --volumes 2                                            # CPU: the demo network

Generates phantom volumes of ``--shape`` (kept in ``--out`` and reused) and a network with random weights (the
classification bias at 0, so that every anchor passes the score threshold and box selection does its most work;
``--model`` for a trained one), then runs inference.json's runner (load, preprocess, sliding window, box selection,
postprocessing, ``result.json``) over all volumes, arms alternating for ``--rounds``:

- ``zoo``: the model zoo's settings (the windows' outputs stitched on the host, ``stitch_device`` ``"cpu"``, its 4
  loader workers, and autocast on CUDA only);
- ``ours``: inference.json as it is (``stitch_device`` ``"auto"``: stitched on the windows' device; loader workers
  sized to the machine; ``amp`` also autocasts on a CPU with bf16 instructions).

Prints, per arm, the median seconds per volume end to end (the runner's ``run()``: load to ``result.json``) and of
the detector alone (sliding window, stitching and box selection, to a CUDA synchronise), and the speed-up. Both arms
run with ``data_check`` ``"off"``: the check reads each file's header before the loop and is not what is compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from scripts.data.phantoms import generate_dataset
from scripts.tools.benchmark_guard import read_configs

# the zoo's evaluator autocasts with MONAI's amp, on CUDA only; ours also in bf16 on a CPU with bf16 instructions
ZOO_AMP = "$@amp and torch.cuda.is_available()"
ARMS: dict[str, dict[str, Any]] = {
    "zoo": {"stitch_device": "cpu", "num_workers": 4, "inferer#amp": ZOO_AMP},
    "ours": {},
}


def phantoms(out: str, shape: list[int], volumes: int) -> str:
    """The datalist of ``volumes`` validation phantoms of ``shape`` in ``out/<shape>_<volumes>``, generated once."""
    folder = os.path.join(out, "x".join(map(str, shape)) + f"_{volumes}")
    datalist = os.path.join(folder, "datalist.json")
    if not os.path.exists(datalist):
        generate_dataset(folder, num_train=1, num_val=volumes, shape=tuple(shape), seed=0)
    return datalist


def save_untrained(network: torch.nn.Module, path: str) -> str:
    """
    Save the state dict of an untrained RetinaNet with its classification bias at 0 (every anchor scores 0.5, not the
    prior 0.01), so that it returns boxes and box selection does its most work.
    """
    with torch.no_grad():
        network.classification_head.cls_logits.bias.zero_()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


def random_model(config_file: str, path: str) -> str:
    """Save a randomly initialised ``network_def`` of ``config_file`` as `save_untrained` does."""
    torch.manual_seed(0)
    return save_untrained(read_configs(config_file).get_parsed_content("network_def"), path)


def timed(predict: Callable[[torch.Tensor], dict], seconds: list[float]) -> Callable[[torch.Tensor], dict]:
    """``predict`` that appends its own duration, to a CUDA synchronise, to ``seconds``."""

    def run(image: torch.Tensor) -> dict:
        start = time.perf_counter()
        out = predict(image)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        return out

    return run


def run_arm(config_file: str, overrides: dict[str, Any], volumes: int) -> tuple[float, float]:
    """Seconds per volume end to end and of the detector alone, for one pass of inference.json's runner."""
    parser = read_configs(config_file)
    parser.update(overrides)
    runner = parser.get_parsed_content("evaluator")
    runner.progress = False
    detector_seconds: list[float] = []
    runner.predict = timed(runner.predict, detector_seconds)
    start = time.perf_counter()
    runner.run()
    return (time.perf_counter() - start) / volumes, sum(detector_seconds) / volumes


def compare(config_file: str, shape: list[int], volumes: int, rounds: int, out: str, model: str | None = None) -> str:
    """Run the arms alternating for ``rounds`` over ``volumes`` phantoms of ``shape``; returns the printed table."""
    datalist = phantoms(out, shape, volumes)
    model_path = model or random_model(config_file, os.path.join(out, "random_model.pt"))
    torch.backends.cudnn.benchmark = True
    common = {
        "dataset_dir": os.path.dirname(datalist),
        "data_list_file_path": datalist,
        "data_list_key": "validation",
        "data_check": "off",
        "model_path": model_path,
    }
    results: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        for arm in list(ARMS)[r % 2 :] + list(ARMS)[: r % 2]:
            overrides = {**common, **ARMS[arm], "output_dir": os.path.join(out, f"result_{arm}")}
            results[arm].append(run_arm(config_file, overrides, volumes))
    median = {arm: [statistics.median(x[i] for x in results[arm]) for i in (0, 1)] for arm in ARMS}
    lines = [
        f"inference, {config_file}: {volumes} volumes of {shape}, {rounds} rounds, arms alternating; model "
        + (model or "random weights"),
        "| arm | end to end, s per volume (median) | detector alone, s per volume | stitched on |",
        "| --- | --- | --- | --- |",
    ]
    for arm in ARMS:
        where = ARMS[arm].get("stitch_device", "the windows' device (auto)")
        lines.append(f"| {arm} | {median[arm][0]:.2f} | {median[arm][1]:.2f} | {where} |")
    lines.append(
        f"inference speed-up over the zoo's settings: end to end {median['zoo'][0] / median['ours'][0]:.2f}x, "
        f"detector {median['zoo'][1] / median['ours'][1]:.2f}x"
    )
    if not torch.cuda.is_available():
        lines.append(
            "no GPU: both arms stitch on the host here; they differ in loader workers and, where amp is on and this "
            "CPU has bf16 instructions, in precision (ours bf16, the zoo's fp32)"
        )
    return "\n".join(lines)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--config_file", default="configs/inference.json")
    args.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256])
    args.add_argument("--volumes", type=int, default=3)
    args.add_argument("--rounds", type=int, default=2)
    args.add_argument("--out", default="data/benchmark_inference")
    args.add_argument("--model", help="a trained model.pt (default: random weights, see above)")
    opts = args.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device}; torch {torch.__version__}")
    print(compare(opts.config_file, opts.shape, opts.volumes, opts.rounds, opts.out, opts.model))


if __name__ == "__main__":
    main()
