"""
LUNA16 preparation benchmark: this bundle's `convert_scan` against a tutorial-like pipeline, on one LUNA16-size scan.

    python -m scripts.tools.benchmark_prepare [--out DIR] [--shape 512 512 300] [--spacing 0.7 0.7 0.8]
                                              [--repeats 3] [--threads 1]

Writes one synthetic MetaImage of ``--shape`` at ``--spacing`` (a chest phantom, int16 HU, LUNA16's flipped
direction; kept in ``--out`` and reused), then converts it to the model grid (0.703125 x 0.703125 x 1.25 mm) with
each pipeline, each run in a fresh process with ``--threads`` torch threads (1: what one worker of a parallel run on
every core has), alternating, ``--repeats`` times:

- ``prepared``: `scripts.data.luna16_prepare.convert_scan` (int16 load, float32 bilinear ``Spacingd``,
  ``Orientationd`` RAS, rounded to int16 HU, gzip NIfTI written atomically);
- ``tutorial-like``: the MONAI tutorial's chain, re-implemented here: ``LoadImaged(ITKReader, affine_lps_to_ras)``
  -> ``EnsureChannelFirstd`` -> cast to float16 -> ``Spacingd`` (bilinear, MONAI's default float64 computation) ->
  ``Orientationd`` RAS -> ``SaveImaged`` float32 ``.nii.gz``.

Prints the medians side by side: seconds per scan (the conversion alone, imports excluded), the process's peak RSS
(``ru_maxrss``) and that peak above the process after its imports and a warm-up conversion of a tiny scan, and the
output's bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scripts.data.luna16_phantoms import MetaImageGeometry, write_metaimage
from scripts.data.phantoms import generate_case

__all__ = ["Measurement", "main", "measure"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARMS = ("prepared", "tutorial-like")


@dataclass(frozen=True)
class Measurement:
    """
    One conversion of the scan by one pipeline, in its own process.

    Args:
        arm: the pipeline.
        seconds: the conversion's wall time (imports excluded).
        peak_rss: the process's peak resident memory (bytes, ``ru_maxrss``).
        import_rss: its peak after the imports, before the conversion (bytes).
        output_bytes: the output file's size.
    """

    arm: str
    seconds: float
    peak_rss: int
    import_rss: int
    output_bytes: int


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _tutorial_like(source: str, out_dir: str) -> str:
    import torch
    from monai.data import ITKReader
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        SaveImaged,
        Spacingd,
    )

    Compose(
        [
            LoadImaged("image", reader=ITKReader(affine_lps_to_ras=True), image_only=True),
            EnsureChannelFirstd("image"),
            EnsureTyped("image", dtype=torch.float16),
            Spacingd("image", pixdim=(0.703125, 0.703125, 1.25), mode="bilinear", padding_mode="border"),
            Orientationd("image", axcodes="RAS", labels=None),
            SaveImaged(
                "image",
                output_dir=out_dir,
                output_postfix="",
                output_ext=".nii.gz",
                output_dtype=np.float32,
                resample=False,
                separate_folder=False,
                print_log=False,
            ),
        ]
    )({"image": source})
    return os.path.join(out_dir, os.path.basename(source)[: -len(".mhd")] + ".nii.gz")


def _convert(arm: str, source: str, out_dir: str) -> str:
    from scripts.data.luna16_prepare import convert_scan

    if arm == "tutorial-like":
        return _tutorial_like(source, out_dir)
    output = os.path.join(out_dir, os.path.basename(source)[: -len(".mhd")] + ".nii.gz")
    convert_scan(source, output)
    return output


def measure(arm: str, source: str, out_dir: str, threads: int) -> Measurement:
    """Convert ``source`` into ``out_dir`` with ``arm`` in this process and measure it, after a warm-up."""
    import torch

    torch.set_num_threads(threads)
    warm_up = os.path.join(out_dir, "warm_up", "warm_up.mhd")  # ITK loads its modules lazily, at the first read
    write_metaimage(warm_up, np.zeros((8, 8, 8), np.int16), MetaImageGeometry((0.7,) * 3, (0.0,) * 3, np.eye(3)))
    _convert(arm, warm_up, os.path.dirname(warm_up))
    import_rss = _maxrss()
    start = time.perf_counter()
    output = _convert(arm, source, out_dir)
    seconds = time.perf_counter() - start
    return Measurement(arm, seconds, _maxrss(), import_rss, os.path.getsize(output))


def _scan(out: str, shape: Sequence[int], spacing: Sequence[float]) -> str:
    """The benchmark's MetaImage (made once per shape and spacing)."""
    name = f"scan_{'x'.join(map(str, shape))}_{'x'.join(map(str, spacing))}"
    path = os.path.join(out, f"{name}.mhd")
    if not os.path.isfile(path):
        volume, ras, _ = generate_case(np.random.default_rng(0), shape, spacing)
        offset = (ras[:3, 3] * np.array([-1.0, -1.0, 1.0])).tolist()  # as stored: LUNA16's flipped direction
        write_metaimage(path, volume, MetaImageGeometry(tuple(spacing), tuple(offset), np.diag([-1.0, -1.0, 1.0])))
    return path


def _run_child(arm: str, source: str, out_dir: str, threads: int) -> Measurement:
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    cmd = [sys.executable, "-m", "scripts.tools.benchmark_prepare", "--child", arm, "--source", source]
    cmd += ["--child-out", out_dir, "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{done.stderr[-3000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def _table(runs: dict[str, list[Measurement]], shape: Sequence[int], spacing: Sequence[float], threads: int) -> str:
    mb = 1e6
    fields = [k for k in Measurement.__dataclass_fields__ if k != "arm"]
    median = {arm: {k: statistics.median(getattr(m, k) for m in ms) for k in fields} for arm, ms in runs.items()}
    lines = [
        f"one {'x'.join(map(str, shape))} scan at {' x '.join(map(str, spacing))} mm -> 0.703125 x 0.703125 x 1.25 mm, "
        f"{threads} torch thread(s), median of {len(next(iter(runs.values())))} runs per pipeline",
        "",
        "| pipeline | s per scan | peak RSS (MB) | peak above imports (MB) | output on disk (MB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm, m in median.items():
        lines.append(
            f"| {arm} | {m['seconds']:.2f} | {m['peak_rss'] / mb:.0f} | {(m['peak_rss'] - m['import_rss']) / mb:.0f} "
            f"| {m['output_bytes'] / mb:.1f} |"
        )
    if set(median) == set(ARMS):
        ours, theirs = median["prepared"], median["tutorial-like"]
        lines.append("")
        lines.append(
            f"prepared / tutorial-like: time {ours['seconds'] / theirs['seconds']:.2f}x, peak above imports "
            f"{(ours['peak_rss'] - ours['import_rss']) / (theirs['peak_rss'] - theirs['import_rss']):.2f}x, "
            f"disk {ours['output_bytes'] / theirs['output_bytes']:.2f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "data", "benchmark_prepare"), help="the scan and outputs")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 0.8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asdict(measure(args.child, args.source, args.child_out, args.threads))))
        return
    os.makedirs(args.out, exist_ok=True)
    print("writing the scan ...", flush=True)
    source = _scan(args.out, args.shape, args.spacing)
    runs: dict[str, list[Measurement]] = {arm: [] for arm in args.arms}
    for repeat in range(args.repeats):
        for arm in args.arms:
            print(f"run {repeat + 1}/{args.repeats}: {arm} ...", flush=True)
            runs[arm].append(_run_child(arm, source, os.path.join(args.out, arm), args.threads))
    print()
    print(_table(runs, args.shape, args.spacing, args.threads))


if __name__ == "__main__":
    main()
