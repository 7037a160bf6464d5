"""
Training-loader benchmark at LUNA16 size: the model zoo's uncached pipeline against this bundle's, side by side.

    python -m scripts.tools.benchmark_loader [--out data/benchmark_loader] [--shape 512 512 256] [--num-train 3]
                                       [--batches 12] [--profile]

Generates phantoms of ``--shape`` (kept in ``--out`` and reused), then runs each pipeline in its own process, one
torch thread and ``num_workers`` 0 (what one DataLoader worker does), no network:

- ``zoo``: the model zoo's chain (intensity on the whole volume, MONAI's `RandCropBoxByPosNegLabeld`, the
  box-mask rotation) on a plain `Dataset`: every volume re-read each draw;
- ``zoo_ram``: the same chain on a `CacheDataset` with ``cache_rate`` 1 (this bundle before: the deterministic
  part in RAM, float32);
- ``cached``: ``configs/train.json`` as it is (the deterministic part in a persistent cache of compact int16
  volumes, built during the first epoch).

The zoo chain is rebuilt from train.json's own transforms, so both arms use the same augmentation parameters.
Prints, per pipeline, the median seconds per batch after the first epoch, batches per second per worker, the
speed-up over ``zoo``, the first epoch's time (which builds the caches), the peak RSS above the process after its
imports during the first epoch and during the timed batches, and the cache's size on disk per volume.
``--profile`` adds each random transform's mean cost per batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from monai.apps.detection.transforms.dictionary import BoxToMaskd, MaskToBoxd, RandCropBoxByPosNegLabeld
from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader, Dataset
from monai.data.utils import no_collation
from monai.transforms import Compose, DeleteItemsd, RandGaussianSmoothd, RandomizableTrait, RandRotated, Transform
from monai.utils import set_determinism
from scripts.data.augment import RandRotateBoxd, SeparableRandGaussianSmoothd
from scripts.data.crop import CompactRandCropBoxByPosNegLabeld
from scripts.data.phantoms import generate_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = ("zoo", "zoo_ram", "cached")


class Result(NamedTuple):
    """One pipeline's measurements (seconds, bytes)."""

    variant: str
    batch_s: list[float]
    first_epoch_s: float
    setup_s: float
    rss_start: int
    rss_first_epoch: int
    rss_steady: int
    cache_bytes_per_volume: float
    profile: dict[str, float]


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike getrusage's, not inherited across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    """Start a new peak (Linux: ``5`` in clear_refs resets VmHWM to the present RSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _parser(dataset_dir: str, work_dir: str, cache_dir: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "configs", "train.json"))
    parser.update(
        {
            "bundle_root": work_dir,
            "dataset_dir": dataset_dir,
            "data_check": "off",
            "write_outputs": False,
            "cache_dir": cache_dir,
        }
    )
    return parser


def zoo_transforms(parser: ConfigParser) -> list[Callable]:
    """
    The model zoo's chain from train.json's transforms: intensity on the whole volume before the crop, MONAI's
    `RandCropBoxByPosNegLabeld`, ``BoxToMaskd -> RandRotated -> MaskToBoxd`` for `RandRotateBoxd`, and MONAI's
    `RandGaussianSmoothd`.
    """
    intensity = parser.get_parsed_content("intensity_transforms")[parser["intensity_norm"]]
    chain = [*parser.get_parsed_content("loading_transforms"), parser.get_parsed_content("train#pad"), intensity]
    chain += parser.get_parsed_content("box_transforms")
    for t in parser.get_parsed_content("train#random_transforms"):
        if isinstance(t, CompactRandCropBoxByPosNegLabeld):
            chain.append(
                RandCropBoxByPosNegLabeld(
                    image_keys=t.image_keys,
                    box_keys=t.box_keys,
                    label_keys=t.label_keys,
                    spatial_size=t.spatial_size_,
                    pos=t.pos_ratio,
                    neg=1.0 - t.pos_ratio,
                    num_samples=t.num_samples,
                    whole_box=t.whole_box,
                )
            )
        elif isinstance(t, RandRotateBoxd):
            image, mask = t.keys[0], "box_mask"
            chain += [
                BoxToMaskd(
                    box_keys=t.box_key,
                    label_keys=t.label_key,
                    box_mask_keys=mask,
                    box_ref_image_keys=image,
                    min_fg_label=0,
                    ellipse_mask=t.ellipse_mask,
                ),
                RandRotated(
                    keys=[image, mask],
                    range_x=t.rand_rotate.range_x,
                    range_y=t.rand_rotate.range_y,
                    range_z=t.rand_rotate.range_z,
                    prob=t.prob,
                    keep_size=True,
                    mode=[t.mode[0], "nearest"],
                    padding_mode=t.padding_mode[0],
                ),
                MaskToBoxd(box_keys=t.box_key, box_mask_keys=mask, label_keys=t.label_key, min_fg_label=0),
                DeleteItemsd(mask),
            ]
        elif isinstance(t, SeparableRandGaussianSmoothd):
            smooth = t.rand_smooth
            chain.append(
                RandGaussianSmoothd(t.keys, smooth.sigma_x, smooth.sigma_y, smooth.sigma_z, smooth.approx, t.prob)
            )
        elif t is not intensity:
            chain.append(t)
    return chain + parser.get_parsed_content("train#final_transforms")


def _profile(dataset: Any, transform: Compose, items: Sequence[dict], rounds: int) -> dict[str, float]:
    """Mean seconds per batch of fetching the cached item and of each random transform (all crops of a draw)."""
    first = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    costs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for index in range(len(items)):
            start = time.perf_counter()
            if isinstance(dataset, CacheDataset):
                data = dataset._cache[index]
                data = copy.deepcopy(data) if dataset.copy_cache else data
            else:
                data = dataset._cachecheck(dataset.data[index])
            costs.setdefault("fetch cached item", []).append(time.perf_counter() - start)
            for position, t in enumerate(transform.transforms[first:]):
                start = time.perf_counter()
                data = [t(x) for x in data] if isinstance(data, list) else t(data)
                costs.setdefault(f"{position:02d} {type(t).__name__}", []).append(time.perf_counter() - start)
    return {name: statistics.fmean(v) for name, v in costs.items()}


def measure(variant: str, dataset_dir: str, work_dir: str, batches: int, profile: bool) -> Result:
    """Time ``batches`` loader batches of one pipeline after a first epoch (which builds its caches)."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    rss_start = _peak_rss()
    cache_dir = os.path.join(work_dir, "cache") if variant == "cached" else ""
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)  # the first epoch must build it
    parser = _parser(dataset_dir, work_dir, cache_dir)
    items = parser.get_parsed_content("datalists")["training"]
    set_determinism(0)
    start = time.perf_counter()
    if variant == "cached":
        dataset = parser.get_parsed_content("train#dataset")
        transform = dataset.transform
    else:
        transform = Compose(zoo_transforms(parser))
        dataset = CacheDataset(items, transform, cache_rate=1.0, num_workers=1) if variant == "zoo_ram" else None
        dataset = dataset if dataset is not None else Dataset(items, transform)
    setup_s = time.perf_counter() - start
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0, collate_fn=no_collation)
    start = time.perf_counter()
    for _ in loader:
        pass
    first_epoch_s = time.perf_counter() - start
    rss_first_epoch = _peak_rss()
    _reset_peak_rss()
    times: list[float] = []
    while len(times) < batches:
        iterator = iter(loader)
        while len(times) < batches:
            start = time.perf_counter()
            try:
                next(iterator)
            except StopIteration:
                break
            times.append(time.perf_counter() - start)
    rss_steady = _peak_rss()
    cache_files = [os.path.join(cache_dir, f) for f in os.listdir(cache_dir)] if cache_dir else []
    costs = _profile(dataset, transform, items, 2) if profile and variant != "zoo" else {}
    return Result(
        variant=variant,
        batch_s=times,
        first_epoch_s=first_epoch_s,
        setup_s=setup_s,
        rss_start=rss_start,
        rss_first_epoch=rss_first_epoch,
        rss_steady=rss_steady,
        cache_bytes_per_volume=sum(os.path.getsize(f) for f in cache_files) / max(len(cache_files), 1),
        profile=costs,
    )


def _run_child(variant: str, args: argparse.Namespace) -> Result:
    cmd = [sys.executable, "-m", "scripts.tools.benchmark_loader", "--child", variant, "--out", args.out]
    cmd += ["--batches", str(args.batches)] + (["--profile"] if args.profile else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


def _table(results: list[Result], shape: Sequence[int], num_train: int) -> str:
    zoo = next((r for r in results if r.variant == "zoo"), None)
    mb = 1e6

    def speed_up(median: float) -> str:
        return f"{statistics.median(zoo.batch_s) / median:.1f}x" if zoo else "-"

    lines = [
        f"{num_train} training phantoms of {'x'.join(map(str, shape))}, {len(results[0].batch_s)} timed batches "
        f"each; peak RSS above the process after its imports ({results[0].rss_start / mb:.0f} MB)",
        "",
        "| pipeline | s per batch (median) | batches/s per worker | speed-up vs zoo | first epoch (s) | "
        "peak RSS, first epoch (MB) | peak RSS, later epochs (MB) | cache on disk per volume (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        median = statistics.median(r.batch_s)
        cache = f"{r.cache_bytes_per_volume / mb:.1f}" if r.cache_bytes_per_volume else "-"
        lines.append(
            f"| {r.variant} | {median:.3f} | {1 / median:.2f} | {speed_up(median)} "
            f"| {r.first_epoch_s + r.setup_s:.1f} | {(r.rss_first_epoch - r.rss_start) / mb:.0f} "
            f"| {(r.rss_steady - r.rss_start) / mb:.0f} | {cache} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "data", "benchmark_loader"), help="phantoms and caches")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256])
    parser.add_argument("--num-train", type=int, default=3)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per pipeline, after the first epoch")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--profile", action="store_true", help="also time each random transform")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dataset_dir = os.path.join(args.out, "phantoms")
    if args.child:
        result = measure(args.child, dataset_dir, args.out, args.batches, args.profile)
        print(json.dumps(result._asdict()))
        return
    datalist = os.path.join(dataset_dir, "datalist.json")
    truth = os.path.join(dataset_dir, "phantom_truth.json")
    wanted = {"shape": list(args.shape), "num_train": args.num_train}
    stamp = os.path.join(dataset_dir, "benchmark.json")
    if not (os.path.isfile(datalist) and os.path.isfile(stamp) and json.load(open(stamp)) == wanted):
        shutil.rmtree(dataset_dir, ignore_errors=True)
        generate_dataset(dataset_dir, num_train=args.num_train, num_val=1, shape=args.shape, seed=0)
        with open(stamp, "w") as f:
            json.dump(wanted, f)
    assert os.path.isfile(truth)
    results = []
    for variant in args.variants:
        print(f"measuring {variant} ...", flush=True)
        results.append(_run_child(variant, args))
    print()
    print(_table(results, args.shape, args.num_train))
    for r in results:
        if r.profile:
            print(f"\n{r.variant}: mean seconds per batch of each step after the cached part")
            for name, cost in r.profile.items():
                print(f"  {name:40s} {cost:.3f}")


if __name__ == "__main__":
    main()
