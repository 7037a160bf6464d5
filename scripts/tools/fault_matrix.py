"""
The guard's quality under faults: every fault of the matrix trained with the bundle's own recipe next to the healthy
run of the same optimiser and warm-up, each best model evaluated on the validation set. Prints and writes a table
(fault, healthy AP@0.1, guarded AP@0.1, ratio, sensitivity at 2 false positives per scan, rollbacks, final LR scale,
wall time) to ``--out``.

    python -m scripts.tools.fault_matrix --out runs/matrix --seed 7 --shape 120 120 60 --num-train 16 --num-val 12

A benchmark, not a test: with the demo recipe each run takes minutes on a CPU (``--faults`` picks a subset). The
phantom set is generated with a seed and shape of your choosing (not the bundle's default data), or given with
``--data``. The fp16 overflow fault runs only where CUDA is available; the healthy ``amp`` run there or on a CPU with
bf16 instructions (in bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scripts.data.phantoms import generate_dataset
from scripts.detection.precision import autocast_type
from scripts.json_io import write_json

__all__ = ["FAULTS", "Fault", "Outcome", "main"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AP_KEY = "AP_IoU_0.10_MaxDet_100"


@dataclass(frozen=True)
class Fault:
    """One row of the matrix: the overrides that make the fault, and the healthy run it is compared with."""

    name: str
    baseline: str
    overrides: dict[str, Any] = field(default_factory=dict)
    data: str = "clean"  # "clean" or "nan_voxel" (one training image with a NaN voxel)
    needs: str = "cpu"  # "cuda": fp16 with a GradScaler; "autocast": CUDA, or a CPU with bf16 instructions

    def runs_here(self) -> bool:
        """Whether this machine has what the row needs."""
        if self.needs == "cpu" or torch.cuda.is_available():
            return True
        return self.needs == "autocast" and autocast_type(torch.device("cpu"), amp=True) is not None


@dataclass(frozen=True)
class Outcome:
    """What one run gave."""

    name: str
    exit_code: int
    ap: float
    sensitivity_2fp: float
    rollbacks: int
    lr_scale: float
    status: str
    wall_s: float


def _full_backbone() -> dict[str, Any]:
    """The full recipe's network (ResNet50-FPN) and warm-up, read from ``configs/train.json``, for the demo's patch."""
    with open(os.path.join(REPO, "configs", "train.json")) as f:
        recipe = json.load(f)
    return {k: recipe[k] for k in ("backbone", "feature_extractor", "warmup_epochs")}


def _faults(sgd_lr: float, adamw_lr: float, iterations: int) -> list[Fault]:
    """The matrix; the bursts start a third into the run's ``iterations``."""
    sgd = {"optimizer_name": "sgd"}
    adamw = {"optimizer_name": "adamw"}
    no_warmup = {"warmup_epochs": 0}
    long_warmup = {"warmup_epochs": 10}  # the full recipe's
    unguarded = {"guard#enabled": False}
    burst = max(iterations // 3, 1)
    inf_burst = {"_target_": "scripts.tools.faults.InfGradients", "first": burst, "last": burst + 9}
    fp16_burst = {"_target_": "scripts.tools.faults.LossScaleOverflow", "first": burst, "last": burst + 9}
    faults = [
        Fault("healthy sgd", "healthy sgd", {**sgd, "learning_rate": sgd_lr}),
        Fault("healthy sgd, no warm-up", "healthy sgd, no warm-up", {**sgd, **no_warmup, "learning_rate": sgd_lr}),
        Fault("healthy adamw", "healthy adamw", {**adamw, "learning_rate": adamw_lr}),
        Fault(
            "healthy adamw, no warm-up", "healthy adamw, no warm-up", {**adamw, **no_warmup, "learning_rate": adamw_lr}
        ),
    ]
    for opt, lr, name in ((sgd, sgd_lr, "sgd"), (adamw, adamw_lr, "adamw")):
        for factor in (100, 1000):
            faults.append(Fault(f"{name} lr x{factor}", f"healthy {name}", {**opt, "learning_rate": lr * factor}))
            faults.append(
                Fault(
                    f"{name} lr x{factor}, no warm-up",
                    f"healthy {name}, no warm-up",
                    {**opt, **no_warmup, "learning_rate": lr * factor},
                )
            )
    for factor in (2, 5, 10):  # the gray zone: SGD a few times too fast, under the update-ratio limit
        faults.append(Fault(f"sgd lr x{factor}", "healthy sgd", {**sgd, "learning_rate": sgd_lr * factor}))
        faults.append(
            Fault(
                f"sgd lr x{factor}, no warm-up",
                "healthy sgd, no warm-up",
                {**sgd, **no_warmup, "learning_rate": sgd_lr * factor},
            )
        )
    faults += [
        Fault("sgd lr x10, unguarded", "healthy sgd", {**sgd, **unguarded, "learning_rate": sgd_lr * 10}),
        Fault("adamw lr x10", "healthy adamw", {**adamw, "learning_rate": adamw_lr * 10}),
        # AdamW's first steps move every weight by about the LR: at twice the recipe's, past the update-ratio limit
        Fault(
            "adamw lr x2, no warm-up",
            "healthy adamw, no warm-up",
            {**adamw, **no_warmup, "learning_rate": adamw_lr * 2},
        ),
        Fault(
            "adamw lr x2, no warm-up, unguarded",
            "healthy adamw, no warm-up",
            {**adamw, **no_warmup, **unguarded, "learning_rate": adamw_lr * 2},
        ),
        Fault(
            "nan voxel, data_check off",
            "healthy sgd",
            {**sgd, "learning_rate": sgd_lr, "data_check": "off"},
            "nan_voxel",
        ),
        Fault(
            "inf gradients, 10-iteration burst",
            "healthy sgd",
            {**sgd, "learning_rate": sgd_lr, "train#extra_handlers#fault": inf_burst},
        ),
        Fault(
            "fp16 overflow, 10-iteration burst",
            "healthy sgd, amp",
            {**sgd, "learning_rate": sgd_lr, "amp": True, "train#extra_handlers#fault": fp16_burst},
            needs="cuda",
        ),
        Fault("healthy sgd, amp", "healthy sgd, amp", {**sgd, "learning_rate": sgd_lr, "amp": True}, needs="autocast"),
    ]
    for opt, lr, name in ((sgd, sgd_lr, "sgd"), (adamw, adamw_lr, "adamw")):  # the LR check meets the warm-up
        healthy = f"healthy {name}, 10-epoch warm-up"
        faults.append(Fault(healthy, healthy, {**opt, **long_warmup, "learning_rate": lr}))
        faults.append(Fault(f"{healthy}, unguarded", healthy, {**opt, **long_warmup, **unguarded, "learning_rate": lr}))
        for factor in (100, 1000):
            overload = {**opt, **long_warmup, "learning_rate": lr * factor}
            faults.append(Fault(f"{name} lr x{factor}, 10-epoch warm-up", healthy, overload))
    full = "healthy sgd, full backbone"
    faults.append(Fault(full, full, {**sgd, **_full_backbone(), "learning_rate": sgd_lr}))
    faults.append(Fault(f"{full}, unguarded", full, {**sgd, **_full_backbone(), **unguarded, "learning_rate": sgd_lr}))
    return faults


FAULTS = [f.name for f in _faults(0.01, 1e-3, 300)]


def poisoned_copy(data: str, out: str) -> str:
    """A copy of the phantom set ``data`` whose first training image has one NaN voxel at its centre."""
    if not os.path.exists(os.path.join(out, "datalist.json")):
        shutil.copytree(data, out, dirs_exist_ok=True)
        with open(os.path.join(out, "datalist.json")) as f:
            image = os.path.join(out, json.load(f)["training"][0]["image"])
        nifti = nib.load(image)
        volume = np.asarray(nifti.dataobj, dtype=np.float32)
        volume[tuple(s // 2 for s in volume.shape)] = np.nan
        nib.save(nib.Nifti1Image(volume, nifti.affine), image)
    return out


def _bundle(run_id: str, configs: Sequence[str], overrides: dict[str, Any], log: str) -> int:
    """``python -m monai.bundle run <run_id>`` in a subprocess, output to ``log``; returns the exit code."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr(list(configs))]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def run_fault(fault: Fault, data: str, out: str, configs: Sequence[str], common: dict[str, Any]) -> Outcome:
    """Train with the fault, evaluate the best model, and read the guard's report."""
    root = os.path.join(out, fault.name.replace(" ", "_").replace(",", ""))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    start = time.perf_counter()
    overrides = {**common, "bundle_root": root, "dataset_dir": data, **fault.overrides}
    code = _bundle("training", configs, overrides, os.path.join(root, "training.log"))
    wall = time.perf_counter() - start
    ap = sensitivity = math.nan
    model = os.path.join(root, "models", "model.pt")
    if os.path.exists(model):
        evaluation = {**overrides, "ckpt_path": model, "output_dir": os.path.join(root, "final_eval")}
        evaluation.pop("train#extra_handlers#fault", None)
        _bundle("evaluating", [*configs, "configs/evaluate.json"], evaluation, os.path.join(root, "evaluation.log"))
        metrics_file = os.path.join(root, "final_eval", "metrics.json")
        if os.path.exists(metrics_file):
            with open(metrics_file) as f:
                metrics = json.load(f)
            ap = float(metrics["coco"].get(AP_KEY, math.nan))
            froc = metrics["froc"]
            at_2 = dict(zip(froc["fp_rates"], froc["sensitivity"], strict=True)).get(2)
            sensitivity = float(at_2) if at_2 is not None else math.nan
    report = {}
    report_file = os.path.join(root, "eval", "guard_report.json")
    if os.path.exists(report_file):
        with open(report_file) as f:
            report = json.load(f)
    return Outcome(
        name=fault.name,
        exit_code=code,
        ap=ap,
        sensitivity_2fp=sensitivity,
        rollbacks=int(report.get("counters", {}).get("rollbacks", 0)),
        lr_scale=float(report.get("lr_scale", 1.0)),
        status=str(report.get("status", "guard off")),
        wall_s=wall,
    )


def table(faults: Sequence[Fault], outcomes: dict[str, Outcome]) -> str:
    """The matrix as a Markdown table (a ratio is the fault's AP over its healthy run's)."""
    rows = [
        "| fault | healthy AP@0.1 | guarded AP@0.1 | ratio | sens. at 2 FP/scan (healthy) | rollbacks | final LR "
        "scale | exit | wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fault in faults:
        if fault.name not in outcomes:
            continue
        o, h = outcomes[fault.name], outcomes.get(fault.baseline)
        healthy_ap = h.ap if h is not None else math.nan
        ratio = o.ap / healthy_ap if healthy_ap and healthy_ap > 0 else math.nan
        healthy_sens = h.sensitivity_2fp if h is not None else math.nan
        rows.append(
            f"| {o.name} | {healthy_ap:.3f} | {o.ap:.3f} | {ratio:.2f} | {o.sensitivity_2fp:.2f} ({healthy_sens:.2f}) "
            f"| {o.rollbacks} | {o.lr_scale:.3g} | {o.exit_code} ({o.status}) | {o.wall_s / 60:.1f} min |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.tools.fault_matrix", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", required=True, help="work folder: one bundle root per run, the table and JSON")
    parser.add_argument("--data", help="a phantom or LUNA16-style set (default: generate one into OUT/data)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--shape", type=int, nargs=3, default=[120, 120, 60])
    parser.add_argument("--num-train", type=int, default=16)
    parser.add_argument("--num-val", type=int, default=12)
    parser.add_argument("--configs", nargs="+", default=["configs/train.json", "configs/demo.json"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--val_interval", type=int, default=10)
    parser.add_argument("--sgd-lr", type=float, default=0.01, help="the recipe's SGD learning rate")
    parser.add_argument("--adamw-lr", type=float, default=1e-3, help="the recipe's AdamW learning rate")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, help="a subset (healthy baselines are added)")
    parser.add_argument("--rerun", action="store_true", help="run again the faults OUT/matrix.json already has")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    data = args.data or os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data, "datalist.json")):
        generate_dataset(data, args.num_train, args.num_val, seed=args.seed, shape=args.shape, progress=False)
    with open(os.path.join(data, "datalist.json")) as f:
        num_train = len(json.load(f)["training"])
    every_fault = _faults(args.sgd_lr, args.adamw_lr, args.epochs * num_train)
    chosen = set(args.faults or FAULTS)
    chosen |= {f.baseline for f in every_fault if f.name in chosen}
    faults = [f for f in every_fault if f.name in chosen and f.runs_here()]
    common = {"epochs": args.epochs, "val_interval": args.val_interval}
    outcomes: dict[str, Outcome] = {}
    results = os.path.join(args.out, "matrix.json")
    if os.path.exists(results) and not args.rerun:  # an interrupted or extended matrix goes on where it was
        with open(results) as f:
            outcomes = {k: Outcome(**v) for k, v in json.load(f).items()}
    for fault in faults:
        if fault.name in outcomes:
            continue
        fault_data = (
            poisoned_copy(data, os.path.join(args.out, "data_nan_voxel")) if fault.data == "nan_voxel" else data
        )
        outcomes[fault.name] = run_fault(fault, fault_data, args.out, args.configs, common)
        print(f"{fault.name}: {asdict(outcomes[fault.name])}", flush=True)
        write_json(results, {k: asdict(v) for k, v in outcomes.items()})
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )
    text = table(every_fault, outcomes)  # the whole matrix so far, not only this call's subset
    header = f"data {data}, configs {args.configs}, {args.epochs} epochs, {device}"
    with open(os.path.join(args.out, "matrix.md"), "w") as f:
        f.write(header + "\n\n" + text + "\n")
    print(header)
    print(text)


if __name__ == "__main__":
    main()
