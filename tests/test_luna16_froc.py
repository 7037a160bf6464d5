"""The official LUNA16 FROC scorer: each rule on hand-made cases, a brute-force second implementation on random
submissions, the bootstrap, `evaluate_luna16` through the bundle, and evaluate.json's official FROC."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time

import numpy as np
import pytest
from monai.bundle import ConfigParser, run
from scripts.data.luna16_csv import Candidate, Finding, read_submission, seriesuid_of, write_submission
from scripts.evaluation.luna16_froc import (
    FP_RATES,
    Luna16Truth,
    bootstrap_sensitivities,
    evaluate_luna16,
    froc_curve,
    match_scan,
    score,
)
from scripts.evaluation.report import world_boxes
from tests.bundle_helpers import TINY, bundle_paths, config, tiny_bundle

EVAL_CONFIGS = [config("train.json"), config("evaluate.json")]


def cand(uid: str, xyz: tuple[float, float, float], p: float) -> Candidate:
    return Candidate(uid, xyz, p)


def nodule(uid: str, xyz: tuple[float, float, float], d: float) -> Finding:
    return Finding(uid, xyz, d)


def truth(nodules: list[Finding], uids: list[str], excluded: list[Finding] = ()) -> Luna16Truth:
    by_uid: dict[str, list[Finding]] = {}
    for n in nodules:
        by_uid.setdefault(n.seriesuid, []).append(n)
    ex: dict[str, list[Finding]] = {}
    for n in excluded:
        ex.setdefault(n.seriesuid, []).append(n)
    return Luna16Truth(by_uid, ex, uids)


def scored(cands: list[Candidate], t: Luna16Truth) -> dict:
    return score(cands, t, bootstrap_samples=0)


# ---- a second implementation: plain Python, a brute-force sweep over every threshold ----


def reference(cands: list[Candidate], t: Luna16Truth, rates=FP_RATES) -> dict:
    """The rules of the package, written as loops: per-scan cut, hits by distance, then one point per threshold."""
    tp, fp, total, ignored, doubles = [], [], 0, 0, 0
    for uid in t.seriesuids:
        mine = [c for c in cands if c.seriesuid == uid]
        if len(mine) > 100:
            cut = sorted((c.probability for c in mine), reverse=True)[100]
            mine = [c for c in mine if c.probability > cut]

        def inside(c: Candidate, f: Finding) -> bool:
            r = (10.0 if f.diameter_mm == -1 else f.diameter_mm) / 2.0
            return sum((a - b) ** 2 for a, b in zip(c.center, f.center)) < r * r

        on_nodule = set()
        for f in t.nodules.get(uid, []):
            total += 1
            hits = [i for i, c in enumerate(mine) if inside(c, f)]
            on_nodule.update(hits)
            if hits:
                tp.append(max(mine[i].probability for i in hits))
                doubles += len(hits) - 1
        for i, c in enumerate(mine):
            if i in on_nodule:
                continue
            if any(inside(c, f) for f in t.excluded.get(uid, [])):
                ignored += 1
            else:
                fp.append(c.probability)
    points = [(0.0, 0.0)]
    for threshold in sorted(set(tp + fp), reverse=True):
        points.append(
            (sum(p >= threshold for p in fp) / len(t.seriesuids), sum(p >= threshold for p in tp) / max(total, 1))
        )
    sens = []
    for r in rates:
        exact = [s for f, s in points if f == r]
        if exact:
            sens.append(max(exact))
        elif r > points[-1][0]:
            sens.append(points[-1][1])
        else:
            (f0, s0), (f1, s1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] < r < b[0])
            sens.append(s0 + (s1 - s0) * (r - f0) / (f1 - f0))
    return {
        "sensitivity": sens,
        "cpm": sum(sens) / len(sens),
        "num_detected": len(tp),
        "num_false_positives": len(fp),
        "num_ignored_on_excluded": ignored,
        "num_double_hits": doubles,
        "num_nodules": total,
    }


# ---- the rules, one at a time ----


def test_hit_is_strictly_inside_the_radius() -> None:
    t = truth([nodule("a", (0.0, 0.0, 0.0), 10.0)], ["a"])
    inside = [cand("a", (4.999, 0.0, 0.0), 0.9), cand("a", (3.0, 3.99, 0.0), 0.8)]
    on_sphere = [cand("a", (5.0, 0.0, 0.0), 0.7), cand("a", (3.0, 4.0, 0.0), 0.6), cand("a", (0.0, 0.0, -5.0), 0.5)]
    result = scored(inside + on_sphere, t)
    assert result["num_detected"] == 1 and result["num_double_hits"] == 1
    assert result["num_false_positives"] == 3  # squared distance exactly 25 == (10 / 2) ** 2 is a miss
    assert scored(on_sphere, t)["num_detected"] == 0


def test_unmeasured_excluded_finding_has_a_10_mm_diameter() -> None:
    excluded = [nodule("a", (50.0, 0.0, 0.0), -1.0), nodule("a", (-50.0, 0.0, 0.0), 8.0)]
    t = truth([nodule("a", (0.0, 0.0, 0.0), 6.0)], ["a"], excluded)
    cands = [
        cand("a", (54.9, 0.0, 0.0), 0.9),  # inside the -1 finding's 5 mm radius: ignored
        cand("a", (55.0, 0.0, 0.0), 0.8),  # on its sphere: a false positive
        cand("a", (-53.9, 0.0, 0.0), 0.7),  # inside the 8 mm finding's 4 mm radius: ignored
        cand("a", (-54.5, 0.0, 0.0), 0.6),  # 4.5 mm away: a false positive (the 10 mm rule is for -1 only)
    ]
    result = scored(cands, t)
    assert result["num_ignored_on_excluded"] == 2 and result["num_false_positives"] == 2


def test_candidate_on_a_nodule_and_an_excluded_finding_counts_for_the_nodule() -> None:
    t = truth([nodule("a", (0.0, 0.0, 0.0), 10.0)], ["a"], [nodule("a", (1.0, 0.0, 0.0), -1.0)])
    result = scored([cand("a", (0.5, 0.0, 0.0), 0.9)], t)
    assert result["num_detected"] == 1 and result["num_ignored_on_excluded"] == 0
    assert result["sensitivity"] == [1.0] * 7


def test_double_hits_count_once_at_the_highest_probability() -> None:
    t = truth([nodule("a", (0.0, 0.0, 0.0), 10.0), nodule("b", (0.0, 0.0, 0.0), 10.0)], ["a", "b"])
    hits = [cand("a", (1.0, 0.0, 0.0), 0.2), cand("a", (0.0, 1.0, 0.0), 0.9), cand("a", (0.0, 0.0, 1.0), 0.5)]
    fps = [cand("b", (30.0, 0.0, 0.0), 0.7), cand("b", (0.0, 0.0, 0.0), 0.3)]  # b's nodule found at 0.3
    outcome = match_scan(hits, t.nodules["a"])
    assert outcome.detected.tolist() == [0.9] and outcome.double_hits == 2 and len(outcome.false_positives) == 0
    result = scored(hits + fps, t)
    assert result["num_double_hits"] == 2 and result["num_false_positives"] == 1
    # thresholds 0.9 -> (0, 1/2); 0.7 -> (1/2, 1/2); 0.3 -> (1/2, 1): the duplicates at 0.5 and 0.2 add no point
    assert result["sensitivity"] == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_candidate_inside_two_nodules_counts_for_each() -> None:
    t = truth([nodule("a", (0.0, 0.0, 0.0), 10.0), nodule("a", (4.0, 0.0, 0.0), 10.0)], ["a"])
    result = scored([cand("a", (2.0, 0.0, 0.0), 0.4)], t)
    assert result["num_detected"] == 2 and result["num_double_hits"] == 0 and result["cpm"] == 1.0


def test_top_100_cut_with_ties() -> None:
    cands = [cand("a", (100.0 + i, 0.0, 0.0), 0.9 - i * 0.001) for i in range(99)]  # 99 above the cut
    cands += [cand("a", (0.0, 0.0, 0.0), 0.5)] + [cand("a", (200.0, float(i), 0.0), 0.5) for i in range(2)]
    cands += [cand("a", (300.0, float(i), 0.0), 0.1) for i in range(3)]
    t = truth([nodule("a", (0.0, 0.0, 0.0), 5.0)], ["a"])
    result = scored(cands, t)
    # 105 candidates, the 101st highest is 0.5: every 0.5 (the one on the nodule too) is cut with the 0.1s
    assert result["num_candidates_beyond_top"] == 6 and result["num_false_positives"] == 99
    assert result["num_detected"] == 0 and result["cpm"] == 0.0
    assert scored(cands[:100], t)["num_detected"] == 1  # exactly 100: no cut
    distinct = [cand("a", (0.0, 0.0, 0.0), 0.05)] + [cand("a", (500.0, 0.0, 0.0), 1.0 - i / 200) for i in range(100)]
    assert scored(distinct, t)["num_candidates_beyond_top"] == 1  # 101 distinct: the lowest goes


def test_scans_without_nodules_divide_the_false_positives() -> None:
    nodules = [nodule("a", (0.0, 0.0, 0.0), 10.0)]
    cands = [cand("a", (40.0, 0.0, 0.0), 0.95), cand("a", (0.0, 0.0, 0.0), 0.9)]
    one = scored(cands, truth(nodules, ["a"]))  # (0, 0) -> (1, 0) -> (1, 1)
    assert one["sensitivity"] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0] and one["cpm"] == pytest.approx(4 / 7)
    two = scored(cands, truth(nodules, ["a", "empty"]))  # (0, 0) -> (1/2, 0) -> (1/2, 1)
    assert two["sensitivity"] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0] and two["cpm"] == pytest.approx(5 / 7)
    assert two["num_scans"] == 2


def test_linear_reading_between_points() -> None:
    # one scan, two nodules; a true and a false positive tied at 0.9 make the diagonal (0, 0) -> (1, 1/2)
    t = truth([nodule("a", (0.0, 0.0, 0.0), 10.0), nodule("a", (50.0, 0.0, 0.0), 10.0)], ["a"])
    cands = [
        cand("a", (0.0, 0.0, 0.0), 0.9),
        cand("a", (-40.0, 0.0, 0.0), 0.9),
        cand("a", (-60.0, 0.0, 0.0), 0.8),  # -> (2, 1/2)
        cand("a", (50.0, 0.0, 0.0), 0.7),  # -> (2, 1)
    ]
    result = scored(cands, t)
    assert result["sensitivity"] == pytest.approx([1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 1.0, 1.0], abs=1e-15)
    assert result["curve"] == {"fps_per_scan": [0.0, 1.0, 2.0, 2.0], "sensitivity": [0.0, 0.5, 0.5, 1.0]}


def test_perfect_empty_and_no_nodules() -> None:
    nodules = [nodule(u, (float(i), 0.0, 0.0), 8.0) for i, u in enumerate("abc")]
    t = truth(nodules, ["a", "b", "c", "d"])
    perfect = scored([cand(n.seriesuid, n.center, 0.5) for n in nodules], t)
    assert perfect["sensitivity"] == [1.0] * 7 and perfect["cpm"] == 1.0 and perfect["num_false_positives"] == 0
    empty = scored([], t)
    assert empty["sensitivity"] == [0.0] * 7 and empty["cpm"] == 0.0 and empty["num_nodules"] == 3
    none = scored([cand("a", (0.0, 0.0, 0.0), 0.5)], truth([], ["a"]))
    assert none["cpm"] is None and none["sensitivity"] == [None] * 7 and none["num_false_positives"] == 1


def test_unlisted_scans_are_ignored_and_counted() -> None:
    t = truth([nodule("a", (0.0, 0.0, 0.0), 10.0), nodule("x", (0.0, 0.0, 0.0), 10.0)], ["a"])
    result = scored([cand("a", (0.0, 0.0, 0.0), 0.9), cand("x", (9.0, 9.0, 9.0), 0.99)], t)
    assert result["num_candidates_unlisted_scans"] == 1 and result["num_nodules_unlisted_scans"] == 1
    assert result["num_nodules"] == 1 and result["num_false_positives"] == 0 and result["cpm"] == 1.0


# ---- against the second implementation, and the reading against the package's interpolation ----


def random_case(seed: int) -> tuple[list[Candidate], Luna16Truth]:
    rng = np.random.default_rng(seed)
    uids = [f"s{i}" for i in range(12)]
    nodules, excluded, cands = [], [], []
    for uid in uids:
        for _ in range(rng.integers(0, 4)):
            centre = tuple(rng.uniform(-40, 40, 3).tolist())
            nodules.append(nodule(uid, centre, float(rng.uniform(4, 20))))
            for _ in range(rng.integers(0, 3)):  # hits, misses and double hits near the nodule
                cands.append(cand(uid, tuple((np.array(centre) + rng.normal(0, 3, 3)).tolist()), 0))
        for _ in range(rng.integers(0, 3)):
            excluded.append(nodule(uid, tuple(rng.uniform(-40, 40, 3).tolist()), float(rng.choice([-1.0, 6.0]))))
        for _ in range(rng.integers(0, 12) if rng.random() < 0.75 else rng.integers(95, 130)):  # some above the cut
            cands.append(cand(uid, tuple(rng.uniform(-45, 45, 3).tolist()), 0))
    # probabilities on a coarse grid: ties at the cut and between true and false positives
    probs = np.round(rng.uniform(0, 1, len(cands)), 2)
    cands = [Candidate(c.seriesuid, c.center, float(p)) for c, p in zip(cands, probs)]
    return cands, truth(nodules, uids, excluded)


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_brute_force_reference(seed: int) -> None:
    cands, t = random_case(seed)
    result, expected = scored(cands, t), reference(cands, t)
    for key in ("num_detected", "num_false_positives", "num_ignored_on_excluded", "num_double_hits", "num_nodules"):
        assert result[key] == expected[key], key
    assert result["sensitivity"] == pytest.approx(expected["sensitivity"], abs=1e-12)
    assert result["cpm"] == pytest.approx(expected["cpm"], abs=1e-12)
    assert 0.0 < result["cpm"] < 1.0 and result["num_candidates_beyond_top"] > 0


def test_reading_is_numpy_interpolation_at_the_rates_and_the_rates_are_off_the_official_grid() -> None:
    grid = np.linspace(0.125, 8, 10001)
    off = [r for r in FP_RATES if np.abs(grid - r).min() > 1e-6]
    assert off == [0.25, 0.5, 1.0, 2.0, 4.0]  # so a grid reading is not the reading at the rates
    assert np.abs(grid - 4.0).min() == pytest.approx(2.875e-4)
    for seed in range(3):
        cands, t = random_case(seed)
        outcomes = [match_scan(*_scan_args(cands, t, uid)) for uid in t.seriesuids]
        curve = froc_curve(outcomes)
        assert curve.at(FP_RATES) == pytest.approx(np.interp(FP_RATES, curve.fps, curve.sensitivity), abs=1e-15)
        thin = curve.corners()
        dense = np.geomspace(0.01, 20, 500)
        assert len(thin.fps) < len(curve.fps) and np.array_equal(thin.at(dense), curve.at(dense))


def _scan_args(cands: list[Candidate], t: Luna16Truth, uid: str) -> tuple:
    return [c for c in cands if c.seriesuid == uid], t.nodules.get(uid, []), t.excluded.get(uid, [])


# ---- the bootstrap ----


def test_bootstrap_resample_equals_the_froc_of_the_drawn_scans() -> None:
    cands, t = random_case(7)
    outcomes = [match_scan(*_scan_args(cands, t, uid)) for uid in t.seriesuids]
    boot = bootstrap_sensitivities(outcomes, FP_RATES, samples=3, seed=11)
    rng = np.random.default_rng(11)
    for row in boot:
        drawn = [outcomes[i] for i in rng.integers(0, len(outcomes), size=len(outcomes))]
        assert row == pytest.approx(froc_curve(drawn).at(FP_RATES), abs=1e-12)
    assert np.array_equal(boot, bootstrap_sensitivities(outcomes, FP_RATES, samples=3, seed=11))


def test_bootstrap_of_identical_scans_has_no_spread() -> None:
    uids = [f"s{i}" for i in range(20)]
    t = truth([nodule(u, (0.0, 0.0, 0.0), 10.0) for u in uids], uids)
    cands = [cand(u, (0.0, 0.0, 0.0), 0.6) for u in uids] + [cand(u, (30.0, 0.0, 0.0), 0.8) for u in uids]
    result = score(cands, t, bootstrap_samples=200, bootstrap_seed=3)
    boot = result["bootstrap"]
    # every resample is the same curve: (0, 0) -> (1, 0) -> (1, 1)
    assert boot["sensitivity_low"] == boot["sensitivity_high"] == result["sensitivity"] == [0, 0, 0, 1, 1, 1, 1]
    assert boot["cpm_low"] == boot["cpm_high"] == pytest.approx(result["cpm"])


def test_bootstrap_is_fast_at_luna16_size() -> None:
    rng = np.random.default_rng(0)
    uids = [f"s{i}" for i in range(888)]
    centres = rng.uniform(-150, 150, (888, 3))
    t = truth([nodule(u, tuple(centres[i].tolist()), 10.0) for i, u in enumerate(uids)], uids)
    cands = [
        cand(u, tuple(c.tolist()), float(p))
        for i, u in enumerate(uids)
        for c, p in zip(np.vstack([centres[i], rng.uniform(-150, 150, (99, 3))]), rng.uniform(0, 1, 100))
    ]
    start = time.perf_counter()
    result = score(cands, t, bootstrap_samples=1000)
    elapsed = time.perf_counter() - start
    boot = result["bootstrap"]
    assert boot["cpm_low"] < result["cpm"] < boot["cpm_high"] and result["num_false_positives"] > 80000
    assert elapsed < 6.0, f"{elapsed:.1f} s"


# ---- evaluate_luna16: files in, luna16_froc.json and .png out ----


def write_findings(path: str, findings: list[Finding]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        w.writerows([n.seriesuid, *n.center, n.diameter_mm] for n in findings)


def write_raw(raw: str, t: Luna16Truth, seriesuids: bool = True, excluded: bool = True) -> None:
    os.makedirs(raw, exist_ok=True)
    write_findings(os.path.join(raw, "annotations.csv"), [n for v in t.nodules.values() for n in v])
    if excluded:
        write_findings(os.path.join(raw, "annotations_excluded.csv"), [n for v in t.excluded.values() for n in v])
    if seriesuids:
        with open(os.path.join(raw, "seriesuids.csv"), "w") as f:
            f.writelines(u + "\n" for u in t.seriesuids)


@pytest.mark.slow
def test_evaluate_luna16_through_the_bundle(tmp_path) -> None:
    cands, t = random_case(3)
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    write_raw(raw, t)
    half = len(cands) // 2  # two fold files read together
    write_submission(str(tmp_path / "f0.csv"), cands[:half])
    write_submission(str(tmp_path / "f1.csv"), cands[half:] + [cand("unlisted", (0.0, 0.0, 0.0), 0.5)])
    files = [str(tmp_path / "f0.csv"), str(tmp_path / "f1.csv")]
    run(
        "evaluate_luna16",
        config_file=EVAL_CONFIGS,
        luna16_dir=raw,
        submission_file=files,
        output_dir=out,
        bootstrap_samples=50,
        **bundle_paths(),
    )
    with open(os.path.join(out, "luna16_froc.json")) as f:
        result = json.load(f)
    expected = reference(cands, t)
    assert result["sensitivity"] == pytest.approx(expected["sensitivity"], abs=1e-12)
    assert result["num_false_positives"] == expected["num_false_positives"]
    assert result["num_candidates_unlisted_scans"] == 1 and result["bootstrap"]["samples"] == 50
    assert result["fp_rates"] == list(FP_RATES) and len(result["bootstrap"]["sensitivity_low"]) == 7
    assert os.path.getsize(os.path.join(out, "luna16_froc.png")) > 0


@pytest.mark.slow
def test_missing_tables(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    cands, t = random_case(4)
    raw = str(tmp_path / "raw")
    write_raw(raw, t, seriesuids=False, excluded=False)
    write_submission(str(tmp_path / "s.csv"), cands)
    with pytest.raises(SystemExit, match=r"seriesuids .*seriesuids\.csv does not exist"):
        run(
            "evaluate_luna16",
            config_file=EVAL_CONFIGS,
            luna16_dir=raw,
            submission_file=str(tmp_path / "s.csv"),
            output_dir=str(tmp_path / "out"),
            **bundle_paths(),
        )
    logger = logging.getLogger("scripts.evaluation.luna16_froc")  # the bundle's logging.conf may stop propagation
    logger.addHandler(caplog.handler)
    try:
        result = evaluate_luna16(raw, str(tmp_path / "s.csv"), str(tmp_path / "out"), t.seriesuids, bootstrap_samples=0)
    finally:
        logger.removeHandler(caplog.handler)
    assert "annotations_excluded.csv does not exist" in caplog.text
    no_excluded = Luna16Truth(t.nodules, {}, t.seriesuids)
    assert result["num_ignored_on_excluded"] == 0
    assert result["num_false_positives"] == reference(cands, no_excluded)["num_false_positives"]


# ---- evaluate.json: the official FROC beside the COCO figures ----


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """evaluate.json with a tiny untrained model on a tiny phantom: truth from the datalist."""
    root = str(tmp_path_factory.mktemp("bundle"))
    common = tiny_bundle(root)
    run("evaluating", config_file=EVAL_CONFIGS, cache_rate=0.0, bootstrap_samples=20, **common)
    data, datalist = common["dataset_dir"], common["data_list_file_path"]
    return {"root": root, "data": data, "datalist": datalist, "out": os.path.join(root, "eval")}


def datalist_truth(datalist: str) -> Luna16Truth:
    """The validation boxes as LUNA16 tables: centre and largest side."""
    with open(datalist) as f:
        items = json.load(f)["validation"]
    nodules = [nodule(seriesuid_of(i["image"]), tuple(b[:3]), max(b[3:])) for i in items for b in i["box"]]
    return truth(nodules, [seriesuid_of(i["image"]) for i in items])


@pytest.mark.slow
def test_world_centres_of_the_loaded_boxes_are_the_datalist_centres(evaluated: dict[str, str]) -> None:
    parser = ConfigParser()
    parser.read_config(EVAL_CONFIGS)
    parser.update({"bundle_root": evaluated["root"], "dataset_dir": evaluated["data"], **TINY})
    parser.update({"data_list_file_path": evaluated["datalist"]})
    with open(evaluated["datalist"]) as f:
        item = json.load(f)["validation"][0]
    data = parser.get_parsed_content("validate#preprocessing")(
        {**item, "image": os.path.join(evaluated["data"], item["image"])}
    )
    world = world_boxes(data["box"], data["image"])
    assert len(world) == len(item["box"]) >= 1
    assert (world[:, :3] + world[:, 3:]) / 2 == pytest.approx(np.asarray(item["box"])[:, :3], abs=1e-3)
    assert world[:, 3:] - world[:, :3] == pytest.approx(np.asarray(item["box"])[:, 3:], abs=1e-3)


@pytest.mark.slow
def test_evaluate_reports_the_official_froc_and_its_submission(evaluated: dict[str, str], tmp_path) -> None:
    out = evaluated["out"]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    official = metrics["luna16_froc"]
    assert official["num_scans"] == 1 and official["num_nodules"] == 2 and "curve" not in official
    assert official["bootstrap"]["samples"] == 20 and official["truth"].startswith("datalist")
    submission = read_submission(os.path.join(out, "submission.csv"))
    assert 0 < len(submission) <= 100 and {c.seriesuid for c in submission} == {"val_000"}
    assert official["num_false_positives"] + official["num_ignored_on_excluded"] <= len(submission)
    with open(os.path.join(out, "metrics.csv")) as fh:
        rows = dict(csv.reader(fh))
    assert float(rows["luna16_cpm"]) == pytest.approx(official["cpm"]) and "luna16_sensitivity_fp_0.125" in rows
    # the submission scored by evaluate_luna16 against the datalist as LUNA16 tables: the same figures
    t = datalist_truth(evaluated["datalist"])
    raw = str(tmp_path / "raw")
    write_raw(raw, t)
    again = evaluate_luna16(raw, os.path.join(out, "submission.csv"), str(tmp_path / "again"), bootstrap_samples=0)
    for key in ("sensitivity", "num_detected", "num_false_positives", "num_double_hits", "num_nodules"):
        assert again[key] == official[key], key
    assert again["sensitivity"] == pytest.approx(reference(submission, t)["sensitivity"], abs=1e-12)


@pytest.mark.slow
def test_evaluate_with_luna16_tables(evaluated: dict[str, str], tmp_path) -> None:
    """With luna16_dir, annotations.csv and annotations_excluded.csv are the truth: an excluded finding on a false
    positive ignores it."""
    submission = read_submission(os.path.join(evaluated["out"], "submission.csv"))
    t = datalist_truth(evaluated["datalist"])
    nodules = t.nodules["val_000"]
    far = next(c for c in submission if all(math.dist(c.center, n.center) > n.diameter_mm for n in nodules))
    t = Luna16Truth(t.nodules, {"val_000": [nodule("val_000", far.center, -1.0)]}, t.seriesuids)
    raw = str(tmp_path / "raw")
    write_raw(raw, t, seriesuids=False)
    out = str(tmp_path / "eval")
    common = {"bundle_root": evaluated["root"], "dataset_dir": evaluated["data"], **TINY, **bundle_paths()}
    run(
        "evaluating",
        config_file=EVAL_CONFIGS,
        data_list_file_path=evaluated["datalist"],
        cache_rate=0.0,
        bootstrap_samples=0,
        luna16_dir=raw,
        output_dir=out,
        **common,
    )
    with open(os.path.join(out, "luna16_froc.json")) as f:
        official = json.load(f)
    expected = reference(submission, t)
    common |= {"data_list_file_path": evaluated["datalist"], "output_dir": out}
    with pytest.raises(SystemExit, match=r"annotations .*nowhere/annotations\.csv does not exist"):
        run("evaluating", config_file=EVAL_CONFIGS, luna16_dir=str(tmp_path / "nowhere"), **common)
    assert official["num_ignored_on_excluded"] == expected["num_ignored_on_excluded"] >= 1
    assert official["num_false_positives"] == expected["num_false_positives"]
    assert official["truth"] == os.path.join(os.path.abspath(raw), "annotations.csv")
