"""The official LUNA16 FROC and CPM of a submission (``seriesuid,coordX,coordY,coordZ,probability``, LPS mm).

The rules, as the LUNA16 evaluation package applies them:

- only the scans of ``seriesuids.csv`` count, and all of them divide the false positives, those without nodules or
  without candidates too; candidates and nodules of other scans are ignored (and counted);
- per scan, a submission with more than 100 candidates keeps those whose probability is strictly above the 101st
  highest (ties at the cut drop out together, so fewer than 100 may stay);
- a candidate hits a finding when its squared distance to the centre is strictly below ``(diameter / 2) ** 2``; an
  excluded finding without a diameter (-1) has a 10 mm one;
- a nodule hit by several candidates is detected once, at their highest probability; its other hits are double hits,
  neither true nor false positives; a candidate inside two nodules counts for each (the package marks a hit for every
  nodule it is inside); a candidate inside a nodule and an excluded finding counts for the nodule; a candidate that
  hits only excluded findings is ignored; every other candidate is a false positive;
- the FROC is the ROC of (the detected nodules' probabilities, the false positives' probabilities), scaled:
  ``fps = false positives above the threshold / scans`` and ``sensitivity = detected nodules above it / all nodules``
  (missed nodules count in the denominator), one point per distinct probability, from ``(0, 0)``.

Reading the curve: the sensitivity at a rate is the piecewise-linear curve through those points, read at the exact
rate; where the curve rises vertically at that very rate, its top (the most sensitive point with that many false
positives); beyond the last point, the last sensitivity. That is the curve the package interpolates on
``np.linspace(0.125, 8, 10001)``; that grid does not hold 1/4, 1/2, 1, 2 or 4 (its nearest points are up to
2.9e-4 FP/scan away), so readings of the grid differ from ours by at most the curve's slope times that distance. The
CPM is the mean of the seven sensitivities.

The 95% interval: 1000 resamples of the scans with replacement (the divisor stays the number of scans), each
resample's FROC read the same way, reported as the mean and the order statistics ``sorted[floor(0.025 n)]`` and
``sorted[floor(0.975 n)]`` of each sensitivity and of the CPM, as the package does for its curves. All entries are
sorted by probability once; a resample is a weighting of the scans, so its curve is two cumulative sums.

CLI through the bundle: ``python -m monai.bundle run evaluate_luna16 --config_file
"['configs/train.json','configs/evaluate.json']" --luna16_dir RAW --submission_file SUB.csv --output_dir OUT``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scripts.data.luna16_csv import (
    Candidate,
    Finding,
    Luna16TableError,
    read_findings,
    read_seriesuids,
    read_submission,
)
from scripts.errors import UserError
from scripts.json_io import write_json
from tqdm import tqdm

__all__ = [
    "FP_RATES",
    "FrocCurve",
    "Interval",
    "Luna16Truth",
    "ScanDetections",
    "ScanOutcome",
    "bootstrap_sensitivities",
    "evaluate_luna16",
    "froc_curve",
    "interval",
    "match_scan",
    "read_luna16_truth",
    "save_froc_plot",
    "save_luna16_froc_figure",
    "score",
    "score_detections",
    "summary",
    "top_candidates",
    "write_luna16_report",
]

logger = logging.getLogger(__name__)

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_CANDIDATES = 100
UNMEASURED_DIAMETER_MM = 10.0
BAND_RATES = np.geomspace(FP_RATES[0], FP_RATES[-1], 49)  # where the plot's interval band is drawn


@dataclass(frozen=True)
class Luna16Truth:
    """
    The ground truth of a LUNA16 download.

    Args:
        nodules: annotations.csv's findings by seriesuid.
        excluded: annotations_excluded.csv's findings by seriesuid (empty when the file is missing).
        seriesuids: the scans that count (seriesuids.csv), in file order.
    """

    nodules: Mapping[str, Sequence[Finding]]
    excluded: Mapping[str, Sequence[Finding]]
    seriesuids: Sequence[str]


@dataclass(frozen=True)
class ScanOutcome:
    """
    What one scan contributes to the FROC.

    Args:
        detected: the probability each detected nodule is detected with.
        num_nodules: its nodules, detected or not.
        false_positives: the probabilities of its false positives.
        ignored_on_excluded: candidates that hit only excluded findings.
        double_hits: hits of a nodule beyond its first (summed over its nodules).
        kept: candidates within the top 100.
        cut: candidates beyond the top 100.
    """

    detected: np.ndarray
    num_nodules: int
    false_positives: np.ndarray
    ignored_on_excluded: int = 0
    double_hits: int = 0
    kept: int = 0
    cut: int = 0


@dataclass(frozen=True)
class FrocCurve:
    """
    A FROC curve: ``fps`` (false positives per scan, non-decreasing, from 0) and ``sensitivity`` at each point.
    """

    fps: np.ndarray
    sensitivity: np.ndarray

    def at(self, rates: Sequence[float] | np.ndarray) -> np.ndarray:
        """The sensitivity at each rate (> 0), read as the module docstring says."""
        return _read(self.fps, self.sensitivity, np.asarray(rates, dtype=float))

    def corners(self) -> FrocCurve:
        """The same curve without the points inside straight horizontal or vertical runs (the reading is unchanged)."""
        x, y = self.fps, self.sensitivity
        if len(x) < 3:
            return self
        inner = ((x[1:-1] == x[:-2]) & (x[1:-1] == x[2:])) | ((y[1:-1] == y[:-2]) & (y[1:-1] == y[2:]))
        keep = np.concatenate([[True], ~inner, [True]])
        return FrocCurve(x[keep], y[keep])


@dataclass(frozen=True)
class Interval:
    """
    Bootstrap statistics of one figure.

    Args:
        mean: the mean over the resamples.
        low: the lower bound (``sorted[floor(alpha / 2 * n)]``).
        high: the upper bound (``sorted[floor((1 - alpha / 2) * n)]``).
    """

    mean: float
    low: float
    high: float


def _read(fps: np.ndarray, sens: np.ndarray, rates: np.ndarray) -> np.ndarray:
    after = np.searchsorted(fps, rates, side="right")  # points at or below each rate (>= 1: fps[0] is 0)
    at_rate = after > np.searchsorted(fps, rates, side="left")
    beyond = after >= len(fps)
    i1 = np.minimum(after, len(fps) - 1)
    i0 = after - 1
    width = fps[i1] - fps[i0]
    t = np.divide(rates - fps[i0], width, out=np.zeros_like(rates), where=width > 0)
    linear = sens[i0] + t * (sens[i1] - sens[i0])
    return np.where(at_rate | beyond, sens[i0], linear)


def top_candidates(probabilities: np.ndarray, max_candidates: int = MAX_CANDIDATES) -> np.ndarray:
    """Mask of the candidates of one scan that the cut keeps: all when at most ``max_candidates``, else those strictly
    above the ``max_candidates + 1``-th highest probability."""
    p = np.asarray(probabilities, dtype=float)
    if len(p) <= max_candidates:
        return np.ones(len(p), dtype=bool)
    return p > np.sort(p)[::-1][max_candidates]


def _hits(centres: np.ndarray, findings: Sequence[Finding]) -> np.ndarray:
    """``(candidates, findings)``: whether each candidate lies strictly inside each finding's sphere."""
    if not findings:
        return np.zeros((len(centres), 0), dtype=bool)
    f = np.asarray([x.center for x in findings], dtype=float)
    d = np.asarray([x.diameter_mm for x in findings], dtype=float)
    radius2 = (np.where(d < 0, UNMEASURED_DIAMETER_MM, d) / 2.0) ** 2
    delta = centres[:, None, :] - f[None, :, :]
    # summed x, y, z in that order, as the package does, so that a candidate on the sphere rounds the same way
    dist2 = delta[..., 0] * delta[..., 0] + delta[..., 1] * delta[..., 1] + delta[..., 2] * delta[..., 2]
    return dist2 < radius2[None, :]


def match_scan(
    candidates: Sequence[Candidate],
    nodules: Sequence[Finding],
    excluded: Sequence[Finding] = (),
    max_candidates: int = MAX_CANDIDATES,
) -> ScanOutcome:
    """
    Match one scan's candidates with its nodules and excluded findings by the rules of the module docstring.

    Args:
        candidates: the scan's candidates (any order).
        nodules: its annotations.csv findings.
        excluded: its annotations_excluded.csv findings.
        max_candidates: the per-scan cut (100 in LUNA16).
    """
    p = np.asarray([c.probability for c in candidates], dtype=float)
    keep = top_candidates(p, max_candidates)
    centres = np.asarray([c.center for c in candidates], dtype=float).reshape(-1, 3)[keep]
    p = p[keep]
    on_nodule = _hits(centres, nodules)
    on_excluded = _hits(centres, excluded).any(axis=1)
    hits_per_nodule = on_nodule.sum(axis=0)
    found = hits_per_nodule > 0
    detected = np.where(on_nodule, p[:, None], -np.inf).max(axis=0, initial=-np.inf)[found]
    hit_any = on_nodule.any(axis=1)
    return ScanOutcome(
        detected=detected,
        num_nodules=len(nodules),
        false_positives=p[~hit_any & ~on_excluded],
        ignored_on_excluded=int(np.count_nonzero(~hit_any & on_excluded)),
        double_hits=int(np.maximum(hits_per_nodule - 1, 0).sum()),
        kept=int(keep.sum()),
        cut=int(len(keep) - keep.sum()),
    )


class _SortedEntries:
    """The detected nodules and false positives of all scans, sorted by probability once: a curve for any weighting of
    the scans (1 each: the FROC; resample counts: a bootstrap resample) is two cumulative sums."""

    def __init__(self, outcomes: Sequence[ScanOutcome]) -> None:
        probs = [o.detected for o in outcomes] + [o.false_positives for o in outcomes]
        scans = [np.full(len(o.detected), i) for i, o in enumerate(outcomes)]
        scans += [np.full(len(o.false_positives), i) for i, o in enumerate(outcomes)]
        is_tp = [np.ones(len(o.detected), dtype=bool) for o in outcomes]
        is_tp += [np.zeros(len(o.false_positives), dtype=bool) for o in outcomes]
        p = np.concatenate([np.zeros(0), *probs])
        order = np.argsort(-p, kind="stable")
        self.scan = np.concatenate([np.zeros(0, dtype=int), *scans])[order]
        self.is_tp = np.concatenate([np.zeros(0, dtype=bool), *is_tp])[order]
        p = p[order]
        self.ends = np.flatnonzero(np.append(p[1:] != p[:-1], True)) if len(p) else np.zeros(0, dtype=int)
        self.nodules = np.asarray([o.num_nodules for o in outcomes], dtype=np.int64)
        self.num_scans = len(outcomes)

    def curve(self, weights: np.ndarray) -> FrocCurve | None:
        """The FROC with each scan counted ``weights[scan]`` times; ``None`` when no nodule is counted."""
        total = int(weights @ self.nodules)
        if total == 0:
            return None
        w = weights[self.scan]
        tp = np.cumsum(np.where(self.is_tp, w, 0))[self.ends]
        fp = np.cumsum(np.where(self.is_tp, 0, w))[self.ends]
        return FrocCurve(np.append(0.0, fp / self.num_scans), np.append(0.0, tp / total))


def froc_curve(outcomes: Sequence[ScanOutcome]) -> FrocCurve | None:
    """The FROC of the scans' outcomes (every scan in the divisor); ``None`` when they hold no nodule."""
    return _SortedEntries(outcomes).curve(np.ones(len(outcomes), dtype=np.int64))


def bootstrap_sensitivities(
    outcomes: Sequence[ScanOutcome], rates: Sequence[float] | np.ndarray, samples: int = 1000, seed: int = 0
) -> np.ndarray:
    """
    ``(samples, rates)``: the sensitivities of FROCs of the scans resampled with replacement; a resample that drew
    no nodule is a row of NaN.

    Args:
        outcomes: one per scan.
        rates: false positives per scan to read each resample's curve at.
        samples: the number of resamples.
        seed: seed of the numpy ``Generator`` that draws them.
    """
    entries = _SortedEntries(outcomes)
    rng = np.random.default_rng(seed)
    rates = np.asarray(rates, dtype=float)
    out = np.full((samples, len(rates)), np.nan)
    n = len(outcomes)
    for i in tqdm(range(samples), desc="bootstrap", leave=False, disable=samples < 200):
        weights = np.bincount(rng.integers(0, n, size=n), minlength=n)
        curve = entries.curve(weights)
        if curve is not None:
            out[i] = curve.at(rates)
    return out


def interval(values: np.ndarray, confidence: float = 0.95) -> Interval:
    """The mean and the bounds (order statistics, as the package takes them) of the finite ``values``."""
    v = np.sort(values[np.isfinite(values)])
    if len(v) == 0:
        return Interval(math.nan, math.nan, math.nan)
    alpha = (1.0 - confidence) / 2.0
    return Interval(
        float(v.mean()), float(v[int(alpha * len(v))]), float(v[min(int((1 - alpha) * len(v)), len(v) - 1)])
    )


def score(
    candidates: Sequence[Candidate],
    truth: Luna16Truth,
    fp_rates: Sequence[float] = FP_RATES,
    max_candidates: int = MAX_CANDIDATES,
    bootstrap_samples: int = 1000,
    bootstrap_seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """
    The official FROC of ``candidates`` against ``truth``, JSON-ready: ``cpm``, ``sensitivity`` (one per rate),
    ``fp_rates``, the counts, ``curve`` (its corner points) and ``bootstrap`` (the interval of each sensitivity, of
    the CPM, and a band for the plot; absent when ``bootstrap_samples`` is 0). Sensitivities and CPM are ``None``
    when the scans hold no nodule.

    Args:
        candidates: the submission's rows, any scans, any order.
        truth: nodules, excluded findings and the scans that count.
        fp_rates: where the sensitivity is read (LUNA16's seven).
        max_candidates: the per-scan cut.
        bootstrap_samples: resamples of the scans for the interval.
        bootstrap_seed: their seed.
        confidence: the interval's coverage.
    """
    listed = set(truth.seriesuids)
    by_scan: dict[str, list[Candidate]] = {uid: [] for uid in truth.seriesuids}
    for c in candidates:
        if c.seriesuid in listed:
            by_scan[c.seriesuid].append(c)
    outcomes = [
        match_scan(by_scan[uid], truth.nodules.get(uid, ()), truth.excluded.get(uid, ()), max_candidates)
        for uid in truth.seriesuids
    ]
    num_nodules = sum(o.num_nodules for o in outcomes)
    rates = np.asarray(fp_rates, dtype=float)
    result: dict[str, Any] = {
        "fp_rates": rates.tolist(),
        "reading": "linear interpolation of the FROC points at the exact rates (top of a vertical step at a rate)",
        "num_scans": len(outcomes),
        "num_nodules": num_nodules,
        "num_detected": sum(len(o.detected) for o in outcomes),
        "num_false_positives": sum(len(o.false_positives) for o in outcomes),
        "num_ignored_on_excluded": sum(o.ignored_on_excluded for o in outcomes),
        "num_double_hits": sum(o.double_hits for o in outcomes),
        "num_candidates": len(candidates),
        "num_candidates_beyond_top": sum(o.cut for o in outcomes),
        "num_candidates_unlisted_scans": sum(1 for c in candidates if c.seriesuid not in listed),
        "num_nodules_unlisted_scans": sum(len(v) for k, v in truth.nodules.items() if k not in listed),
        "max_candidates_per_scan": max_candidates,
    }
    curve = froc_curve(outcomes)
    if curve is None:
        return {**result, "sensitivity": [None] * len(rates), "cpm": None, "curve": {}}
    sensitivity = curve.at(rates)
    corners = curve.corners()
    result |= {
        "sensitivity": sensitivity.tolist(),
        "cpm": float(sensitivity.mean()),
        "curve": {"fps_per_scan": corners.fps.tolist(), "sensitivity": corners.sensitivity.tolist()},
    }
    if bootstrap_samples > 0:
        boot = bootstrap_sensitivities(outcomes, np.concatenate([rates, BAND_RATES]), bootstrap_samples, bootstrap_seed)
        points = [interval(boot[:, i], confidence) for i in range(len(rates))]
        band = [interval(boot[:, len(rates) + i], confidence) for i in range(len(BAND_RATES))]
        cpm = interval(boot[:, : len(rates)].mean(axis=1), confidence)
        result["bootstrap"] = {
            "samples": bootstrap_samples,
            "seed": bootstrap_seed,
            "confidence": confidence,
            "sensitivity_mean": [b.mean for b in points],
            "sensitivity_low": [b.low for b in points],
            "sensitivity_high": [b.high for b in points],
            "cpm_mean": cpm.mean,
            "cpm_low": cpm.low,
            "cpm_high": cpm.high,
            "band": {"fps_per_scan": BAND_RATES.tolist(), "low": [b.low for b in band], "high": [b.high for b in band]},
        }
    return result


def read_luna16_truth(luna16_dir: str, seriesuids: Sequence[str] | None = None) -> Luna16Truth:
    """
    annotations.csv, annotations_excluded.csv and seriesuids.csv of a LUNA16 download. A missing
    annotations_excluded.csv is a warning (nothing excluded); a missing seriesuids.csv an error, as the false
    positives' divisor would be wrong, unless ``seriesuids`` lists the scans that count.
    """
    nodules = read_findings(os.path.join(luna16_dir, "annotations.csv"), "annotations")
    excluded_path = os.path.join(luna16_dir, "annotations_excluded.csv")
    if os.path.isfile(excluded_path):
        excluded = read_findings(excluded_path, "annotations_excluded")
    else:
        logger.warning(f"{os.path.abspath(excluded_path)} does not exist: no finding is excluded")
        excluded = {}
    if seriesuids is None:
        path = os.path.join(luna16_dir, "seriesuids.csv")
        if not os.path.isfile(path):
            raise Luna16TableError(
                f"seriesuids {os.path.abspath(path)} does not exist: it lists the scans that divide the false "
                "positives; copy it from the LUNA16 download (evaluationScript/annotations) or pass --luna16_series"
            )
        seriesuids = read_seriesuids(path)
    return Luna16Truth(nodules, excluded, list(seriesuids))


@dataclass(frozen=True)
class ScanDetections:
    """
    One evaluated scan in world millimetres (LPS), as the evaluation report collects it.

    Args:
        seriesuid: the scan (`scripts.data.luna16_csv.seriesuid_of` its image).
        centres: ``(n, 3)`` the predicted boxes' centres.
        probabilities: ``(n,)`` their scores.
        box_centres: ``(m, 3)`` the centres of the datalist's boxes.
        box_sizes: ``(m,)`` each box's largest side (its diameter when no annotations.csv is given).
    """

    seriesuid: str
    centres: np.ndarray
    probabilities: np.ndarray
    box_centres: np.ndarray
    box_sizes: np.ndarray


def _xyz(v: np.ndarray) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])


def score_detections(
    scans: Sequence[ScanDetections], luna16_dir: str | None = None, max_candidates: int = MAX_CANDIDATES, **kwargs: Any
) -> tuple[dict[str, Any], list[Candidate]]:
    """
    The official FROC of evaluated scans, and their submission (each scan's candidates within the cut).

    The evaluated scans are the ones that count and divide the false positives. Ground truth: ``luna16_dir``'s
    annotations.csv and annotations_excluded.csv restricted to those scans when given, else the datalist's boxes
    (centre, largest side as the diameter, nothing excluded).

    Args:
        scans: one per evaluated image.
        luna16_dir: a LUNA16 download's folder of tables, or ``None``.
        max_candidates: the per-scan cut.
        kwargs: more arguments of `score` (``fp_rates``, ``bootstrap_samples``, ``bootstrap_seed``).
    """
    uids = list(dict.fromkeys(s.seriesuid for s in scans))
    candidates: list[Candidate] = []
    for s in scans:
        keep = top_candidates(s.probabilities, max_candidates)
        for centre, p in zip(s.centres[keep], s.probabilities[keep], strict=True):
            candidates.append(Candidate(s.seriesuid, _xyz(centre), float(p)))
    if luna16_dir is not None:
        truth = read_luna16_truth(luna16_dir, uids)
        source = os.path.abspath(os.path.join(luna16_dir, "annotations.csv"))
    else:
        nodules: dict[str, list[Finding]] = {}
        for s in scans:
            for centre, size in zip(s.box_centres, s.box_sizes, strict=True):
                nodules.setdefault(s.seriesuid, []).append(Finding(s.seriesuid, _xyz(centre), float(size)))
        truth = Luna16Truth(nodules, {}, uids)
        source = "datalist boxes (centre, largest side as the diameter)"
    result = score(candidates, truth, max_candidates=max_candidates, **kwargs)
    return {**result, "truth": source}, candidates


def save_froc_plot(
    fig: Any, ax: Any, title: str, path: str, legend: str = "best", ticks: Sequence[float] | None = None
) -> None:
    """Finish a FROC plot as LUNA16 draws it (log2 false-positive axis, labelled at ``ticks``; sensitivity 0 to 1),
    save it to ``path`` and close it; both FROC figures (`scripts.evaluation.report`, this module's) end here."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    if ticks is not None:
        ax.set_xticks(list(ticks), [f"{t:g}" for t in ticks])
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc=legend)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_luna16_froc_figure(result: dict[str, Any], path: str) -> None:
    """Plot a `score` result (curve, interval band, the seven points and the CPM) to ``path`` (PNG), log-x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    rates = np.asarray(result["fp_rates"])
    if result.get("curve"):
        curve = FrocCurve(np.asarray(result["curve"]["fps_per_scan"]), np.asarray(result["curve"]["sensitivity"]))
        grid = np.geomspace(rates.min(), rates.max(), 400)
        ax.plot(grid, curve.at(grid), "-", color="tab:blue", label="FROC")
    boot = result.get("bootstrap")
    if boot:
        band = boot["band"]
        ax.fill_between(band["fps_per_scan"], band["low"], band["high"], color="tab:blue", alpha=0.2, linewidth=0)
    if result.get("cpm") is not None:
        label = f"CPM {result['cpm']:.3f}"
        if boot:
            label += f" ({boot['confidence']:.0%} CI {boot['cpm_low']:.3f}-{boot['cpm_high']:.3f})"
        ax.plot(rates, result["sensitivity"], "o", color="tab:red", label=label)
    ax.set_xlim(rates.min(), rates.max())
    title = f"LUNA16 FROC, {result['num_scans']} scans, {result['num_nodules']} nodules"
    save_froc_plot(fig, ax, title, path, ticks=rates)


def write_luna16_report(result: dict[str, Any], output_dir: str) -> str:
    """Write ``luna16_froc.json`` and ``luna16_froc.png`` to ``output_dir``; returns the JSON's path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "luna16_froc.json")
    write_json(path, result)
    save_luna16_froc_figure(result, os.path.join(output_dir, "luna16_froc.png"))
    return path


def summary(result: dict[str, Any]) -> str:
    """One line: the CPM with its interval, the seven sensitivities and the counts."""
    if result["cpm"] is None:
        return f"LUNA16 FROC: {result['num_scans']} scans hold no nodule, no sensitivity"
    boot = result.get("bootstrap")
    ci = f" ({boot['confidence']:.0%} CI {boot['cpm_low']:.4f}-{boot['cpm_high']:.4f})" if boot else ""
    points = ", ".join(f"{r:g}: {s:.3f}" for r, s in zip(result["fp_rates"], result["sensitivity"], strict=True))
    return (
        f"LUNA16 CPM {result['cpm']:.4f}{ci}; sensitivity at FP/scan {{{points}}}; {result['num_detected']}/"
        f"{result['num_nodules']} nodules detected, {result['num_false_positives']} false positives on "
        f"{result['num_scans']} scans"
    )


def evaluate_luna16(
    luna16_dir: str,
    submission_file: str | Sequence[str],
    output_dir: str,
    seriesuids: Sequence[str] | None = None,
    fp_rates: Sequence[float] = FP_RATES,
    bootstrap_samples: int = 1000,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """
    Score a LUNA16 submission (one file, or several read one after another) against a LUNA16 download's tables;
    write ``luna16_froc.json`` and ``luna16_froc.png`` to ``output_dir`` and return the result (see `score`).

    Args:
        luna16_dir: folder of annotations.csv, annotations_excluded.csv and seriesuids.csv.
        submission_file: the submission CSV(s).
        output_dir: where the report goes.
        seriesuids: the scans that count instead of seriesuids.csv (``None``: read it).
        fp_rates: where the sensitivity is read.
        bootstrap_samples: resamples of the scans for the 95% interval.
        bootstrap_seed: their seed.
    """
    if not luna16_dir:
        raise UserError("evaluate_luna16 needs --luna16_dir: the LUNA16 folder of annotations.csv and seriesuids.csv")
    truth = read_luna16_truth(luna16_dir, seriesuids)
    files = [submission_file] if isinstance(submission_file, str) else list(submission_file)
    result = score(
        read_submission(files), truth, fp_rates, bootstrap_samples=bootstrap_samples, bootstrap_seed=bootstrap_seed
    )
    result["files"] = {"luna16_dir": os.path.abspath(luna16_dir), "submission": [os.path.abspath(f) for f in files]}
    if result["num_candidates_unlisted_scans"]:
        logger.warning(
            f"{result['num_candidates_unlisted_scans']} candidates of scans not in seriesuids.csv are ignored "
            "(num_candidates_unlisted_scans in luna16_froc.json)"
        )
    write_luna16_report(result, output_dir)
    logger.info(summary(result) + f"; report in {os.path.abspath(output_dir)}")
    return result
