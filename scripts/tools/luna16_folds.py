"""
LUNA16's 10-fold protocol as one command: for each fold k, train on ``DATA/dataset_fold{k}.json`` (its held-out
subset k never opened), infer that subset with the fold's best model, then score the ten submissions together with
the official scorer (`scripts.evaluation.luna16_froc`) and print the combined CPM with its 95% interval.

    python -m scripts.tools.luna16_folds --data DATA --raw RAW --out RUNS [--folds 0 1 ...] \\
        [--config_file configs/demo.json ...] [-- --epochs 4 ...]

``DATA`` holds the prepared images and fold datalists (``prepare_luna16``), ``RAW`` the LUNA16 tables
(annotations.csv, annotations_excluded.csv, seriesuids.csv). Each fold runs in ``RUNS/fold{k}/`` (``models/``,
``train/``, ``infer/submission.csv``; ``RUNS/cache`` is the training cache all folds share) as its own
``python -m monai.bundle run`` process, from the bundle's folder; extra config files are merged
after train.json and inference.json, and the arguments after ``--`` go to both runs. Resumable: a fold's stage
that finished (recorded in ``RUNS/fold{k}/fold.json`` once its process exits 0) is skipped on the next call. The
score goes to ``RUNS/luna16_froc.json`` and ``.png``: over every scan of seriesuids.csv when every fold of ``DATA``
ran (LUNA16's protocol), over the held-out scans of the folds that ran otherwise (a partial run, said in the log).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scripts.data.luna16_csv import seriesuid_of
from scripts.errors import UserError, exit_on_user_error
from scripts.evaluation.luna16_froc import evaluate_luna16, summary
from scripts.json_io import write_json

__all__ = ["FoldPaths", "find_folds", "fold_commands", "held_out_scans", "main", "run_folds"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("training", "inference")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldPaths:
    """
    Where one fold's inputs and outputs are.

    Args:
        fold: k.
        datalist: ``DATA/dataset_fold{k}.json``.
        root: ``RUNS/fold{k}``.
    """

    fold: int
    datalist: str
    root: str

    @property
    def ckpt_dir(self) -> str:
        """The fold's checkpoints (its ``model.pt``)."""
        return os.path.join(self.root, "models")

    @property
    def submission(self) -> str:
        """The fold's LUNA16 submission, written by inference."""
        return os.path.join(self.root, "infer", "submission.csv")

    @property
    def status(self) -> str:
        """The record of the stages that finished."""
        return os.path.join(self.root, "fold.json")


def find_folds(data: str, folds: Sequence[int] | None, out: str) -> list[FoldPaths]:
    """The folds to run: ``folds``, or every ``dataset_fold{k}.json`` in ``data``; a missing datalist is an error."""
    if folds is None:
        found = [re.fullmatch(r"dataset_fold(\d+)\.json", os.path.basename(p)) for p in glob.glob(f"{data}/*.json")]
        folds = sorted(int(m.group(1)) for m in found if m)
        if not folds:
            raise UserError(f"{os.path.abspath(data)} holds no dataset_fold{{k}}.json: run prepare_luna16 first")
    paths = [FoldPaths(k, os.path.join(data, f"dataset_fold{k}.json"), os.path.join(out, f"fold{k}")) for k in folds]
    for p in paths:
        if not os.path.isfile(p.datalist):
            raise UserError(f"fold datalist {os.path.abspath(p.datalist)} does not exist: run prepare_luna16 first")
    return paths


def held_out_scans(folds: Sequence[FoldPaths]) -> list[str]:
    """The seriesuids of the ``validation`` lists (the held-out subsets) of ``folds``, in order."""
    uids: list[str] = []
    for fold in folds:
        with open(fold.datalist) as f:
            uids += [seriesuid_of(item["image"]) for item in json.load(f).get("validation", [])]
    return uids


def fold_commands(
    fold: FoldPaths, data: str, config_files: Sequence[str] = (), extra_args: Sequence[str] = ()
) -> dict[str, list[str]]:
    """The ``python -m monai.bundle run`` command of each stage of ``fold``, by stage name."""

    def bundle(run_id: str, base: str, args: list[str]) -> list[str]:
        files = [os.path.join(REPO, "configs", base), *config_files]
        return [
            *(sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr(files)),
            *("--meta_file", os.path.join(REPO, "configs", "metadata.json")),
            *("--logging_file", os.path.join(REPO, "configs", "logging.conf")),
            *("--dataset_dir", data, "--data_list_file_path", fold.datalist),
            *args,
            *extra_args,
        ]

    return {
        "training": bundle(
            "training",
            "train.json",
            [
                *("--ckpt_dir", fold.ckpt_dir, "--output_dir", os.path.join(fold.root, "train")),
                *("--cache_dir", os.path.join(os.path.dirname(fold.root), "cache")),  # one cache: the folds share scans
            ],
        ),
        "inference": bundle(
            "inference",
            "inference.json",
            [
                *("--data_list_key", "validation", "--model_path", os.path.join(fold.ckpt_dir, "model.pt")),
                *("--output_dir", os.path.dirname(fold.submission), "--submission_file", "submission.csv"),
            ],
        ),
    }


def _done(fold: FoldPaths) -> list[str]:
    if not os.path.isfile(fold.status):
        return []
    with open(fold.status) as f:
        return list(json.load(f).get("done", []))


def run_folds(
    data: str,
    raw: str,
    out: str,
    folds: Sequence[int] | None = None,
    config_files: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    runner: Callable[[list[str]], int] = lambda cmd: subprocess.call(cmd, cwd=REPO),
    bootstrap_samples: int = 1000,
) -> dict[str, Any]:
    """
    Train and infer every fold whose stages are not done yet, then score all folds' submissions together; returns the
    `evaluate_luna16` result (also written to ``out``). A stage that exits non-zero ends the run with an error naming
    the fold, the stage and its command; what finished stays done.

    Args:
        data: prepared images and fold datalists.
        raw: the LUNA16 tables.
        out: the runs' root.
        folds: which folds (default: every fold datalist in ``data``).
        config_files: merged after train.json and inference.json.
        extra_args: more arguments for both runs (``--epochs 4``).
        runner: runs a command, returns its exit code.
        bootstrap_samples: resamples of the scans for the interval.
    """
    data, out = os.path.abspath(data), os.path.abspath(out)  # the runs start in the bundle's folder
    config_files = [os.path.abspath(f) for f in config_files]
    paths = find_folds(data, folds, out)
    for fold in paths:
        os.makedirs(fold.root, exist_ok=True)
        done = _done(fold)
        for stage, cmd in fold_commands(fold, data, config_files, extra_args).items():
            if stage in done:
                logger.info(f"fold {fold.fold}: {stage} done before, skipped")
                continue
            logger.info(f"fold {fold.fold}: {stage}: {' '.join(cmd)}")
            code = runner(cmd)
            if code != 0:
                raise UserError(f"fold {fold.fold}: {stage} exited {code}; see {fold.root}, or rerun: {' '.join(cmd)}")
            done.append(stage)
            write_json(fold.status, {"fold": fold.fold, "datalist": os.path.abspath(fold.datalist), "done": done})
    every = {p.fold for p in find_folds(data, None, out)}
    scans = None if every <= {p.fold for p in paths} else held_out_scans(paths)
    if scans is not None:
        logger.warning(
            f"folds {[p.fold for p in paths]} of {sorted(every)}: scoring their {len(scans)} held-out scans only, "
            "a partial protocol (LUNA16's CPM is over every fold's scans)"
        )
    submissions = [p.submission for p in paths]
    return evaluate_luna16(raw, submissions, out, seriesuids=scans, bootstrap_samples=bootstrap_samples)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared images and dataset_fold{k}.json files")
    parser.add_argument(
        "--raw", required=True, help="folder of annotations.csv, annotations_excluded.csv, seriesuids.csv"
    )
    parser.add_argument("--out", required=True, help="root of the folds' runs and of the combined score")
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="folds to run (default: every datalist)")
    parser.add_argument("--config_file", action="append", default=[], help="extra config merged in (repeatable)")
    parser.add_argument("--bootstrap_samples", type=int, default=1000)
    args = parser.parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config_files = [os.path.abspath(f) for f in args.config_file]
    result = exit_on_user_error(
        run_folds,
        args.data,
        args.raw,
        args.out,
        args.folds,
        config_files,
        extra,
        bootstrap_samples=args.bootstrap_samples,
    )
    print(summary(result))


if __name__ == "__main__":
    main()
