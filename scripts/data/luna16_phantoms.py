"""Tiny synthetic sets in the LUNA16 download's layout, for tests of the preparation step and its geometry.

``OUT/subset0 .. subsetN/<uid>.mhd + .raw`` (MetaImage headers written by hand: int16 HU, x fastest), the bundle's
chest phantoms (`scripts.data.phantoms.generate_case`) at native LUNA16-like spacings (0.6 x 0.6 x 2.5 and
0.8 x 0.8 x 1.0 mm, alternating), stored with the identity direction and with LUNA16's other one, flipped in x and y
(``diag(-1, -1, 1)``), so that a reader or box transform that ignores the direction puts nodules in the wrong place.
The last scan of subset 0 has no nodule. Beside them: ``annotations.csv`` (each nodule's LPS centre and largest
diameter), ``annotations_excluded.csv`` (one irrelevant finding, diameter -1), ``seriesuids.csv``, and
``luna16_truth.json`` (per scan: subset, direction, spacing, shape and each nodule's LPS centre).

CLI: ``python -m scripts.data.luna16_phantoms --out RAW [--subsets 10] [--scans-per-subset 2] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scripts.data.phantoms import generate_case
from scripts.json_io import write_atomically, write_json
from tqdm import tqdm

__all__ = ["SPACINGS", "LUNA16_DIRECTIONS", "MetaImageGeometry", "generate_luna16", "write_metaimage"]

SPACINGS: tuple[tuple[float, float, float], ...] = ((0.6, 0.6, 2.5), (0.8, 0.8, 1.0))
LUNA16_DIRECTIONS = {"identity": (1.0, 1.0, 1.0), "flipped": (-1.0, -1.0, 1.0)}  # the diagonals LUNA16 holds
UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.9999"  # a LUNA16-looking root that no real scan has
TRUTH_NAME = "luna16_truth.json"


@dataclass(frozen=True)
class MetaImageGeometry:
    """
    Where a MetaImage volume sits in the world.

    Args:
        spacing: ``ElementSpacing`` (mm).
        offset: ``Offset``: LPS world mm of voxel ``(0, 0, 0)``.
        direction: 3x3, column j the LPS direction of index axis j.
    """

    spacing: tuple[float, float, float]
    offset: tuple[float, float, float]
    direction: np.ndarray


def write_metaimage(path: str, volume: np.ndarray, geometry: MetaImageGeometry) -> None:
    """
    Write ``volume`` (``(x, y, z)``, int16) as ``path`` (``.mhd``) and the ``.raw`` beside it, in LUNA16's header form.

    Args:
        path: the ``.mhd`` to write; the ``.raw`` takes its name.
        volume: the voxels, indexed ``(x, y, z)``.
        geometry: spacing, offset and direction.
    """
    raw = path[: -len(".mhd")] + ".raw"
    volume = np.asarray(volume, dtype="<i2")
    write_atomically(raw, lambda tmp: _write_raw(tmp, volume), suffix=".raw")
    header = "\n".join(
        [
            "ObjectType = Image",
            "NDims = 3",
            "BinaryData = True",
            "BinaryDataByteOrderMSB = False",
            "CompressedData = False",
            f"TransformMatrix = {_numbers(np.asarray(geometry.direction).T.ravel())}",  # column by column
            f"Offset = {_numbers(geometry.offset)}",
            "CenterOfRotation = 0 0 0",
            f"AnatomicalOrientation = {_orientation(geometry.direction)}",
            f"ElementSpacing = {_numbers(geometry.spacing)}",
            f"DimSize = {' '.join(str(int(s)) for s in volume.shape)}",
            "ElementType = MET_SHORT",
            f"ElementDataFile = {os.path.basename(raw)}",
            "",
        ]
    )

    def write_header(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(header)

    write_atomically(path, write_header, suffix=".mhd")


def _orientation(direction: np.ndarray) -> str:
    """MetaIO's informative orientation code (ITK's convention: the side each index axis comes from; ``RAI`` for the
    identity in LPS). ITK does not read it; written because LUNA16's headers carry it."""
    sides = (("R", "L"), ("A", "P"), ("I", "S"))
    axes = np.argmax(np.abs(direction), axis=0)
    return "".join(sides[a][0 if direction[a, j] > 0 else 1] for j, a in enumerate(axes))


def _numbers(values: Sequence[float]) -> str:
    return " ".join(repr(float(v)) for v in values)  # repr: every digit, so ITK reads back the same double


def _write_raw(tmp: str, volume: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        f.write(volume.tobytes(order="F"))  # x fastest


def _as_metaimage(volume: np.ndarray, ras: np.ndarray, direction: str) -> tuple[np.ndarray, MetaImageGeometry]:
    """A phantom (RAS affine with a positive diagonal) as a MetaImage volume stored with a LUNA16 direction."""
    to_lps = np.array([-1.0, -1.0, 1.0])
    spacing = tuple(float(s) for s in np.diag(ras)[:3])
    if direction == "flipped":  # index x, y run towards R, A: the phantom's own layout
        first = np.zeros(3)
    else:  # identity: index x, y run towards L, P, so the stored array is mirrored in x and y
        volume = volume[::-1, ::-1, :]
        first = np.array([volume.shape[0] - 1, volume.shape[1] - 1, 0], dtype=np.float64)
    offset = (ras[:3, :3] @ first + ras[:3, 3]) * to_lps
    lps_offset = tuple(float(v) for v in offset)
    geometry = MetaImageGeometry(spacing, lps_offset, np.diag(LUNA16_DIRECTIONS[direction]))  # type: ignore[arg-type]
    return np.ascontiguousarray(volume), geometry


def _write_csv(path: str, header: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            if header is not None:
                writer.writerow(header)
            writer.writerows(rows)

    write_atomically(path, write, suffix=".csv")


def generate_luna16(
    out_dir: str,
    subsets: int = 10,
    scans_per_subset: int = 2,
    seed: int = 0,
    fov_mm: Sequence[float] = (48.0, 48.0, 48.0),
    progress: bool = True,
) -> str:
    """
    Write a LUNA16-layout phantom set (see the module docstring) and return the path of its truth JSON.

    Args:
        out_dir: the folder that will hold ``subset*``, the CSVs and the truth.
        subsets: how many ``subsetK`` folders (LUNA16 has 10).
        scans_per_subset: scans in each.
        seed: each scan draws from its own generator seeded by ``(seed, subset, index)``.
        fov_mm: the field of view (x, y, z) in mm; each scan's shape is this over its spacing.
        progress: show a progress bar.
    """
    annotations: list[list[object]] = []
    excluded: list[list[object]] = []
    truth: dict[str, dict[str, object]] = {}
    jobs = [(k, i) for k in range(int(subsets)) for i in range(int(scans_per_subset))]
    for k, i in tqdm(jobs, desc="LUNA16 phantoms", unit="scan", disable=not progress):
        n = len(truth)
        spacing = SPACINGS[n % len(SPACINGS)]
        direction = ("identity", "flipped")[(n // len(SPACINGS)) % 2]
        shape = [int(round(f / s)) for f, s in zip(fov_mm, spacing)]
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(k, i)))
        empty = k == 0 and i == int(scans_per_subset) - 1
        volume, ras, nodules = generate_case(rng, shape, spacing, empty=empty)
        uid = f"{UID_ROOT}.{seed}.{k}.{i}"
        stored, geometry = _as_metaimage(volume, ras, direction)
        write_metaimage(os.path.join(out_dir, f"subset{k}", f"{uid}.mhd"), stored, geometry)
        found = [{"center_lps": n["center_lps"], "diameter_mm": round(max(n["diameter_mm"]), 4)} for n in nodules]
        annotations += [[uid, *f["center_lps"], f["diameter_mm"]] for f in found]
        if found and not excluded:
            excluded.append([uid, *np.round(np.asarray(geometry.offset) + 1.0, 4).tolist(), -1])
        truth[uid] = {
            "subset": k,
            "direction": direction,
            "spacing": list(spacing),
            "shape": list(stored.shape),
            "nodules": found,
        }
    columns = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
    _write_csv(os.path.join(out_dir, "annotations.csv"), columns, annotations)
    _write_csv(os.path.join(out_dir, "annotations_excluded.csv"), columns, excluded)
    _write_csv(os.path.join(out_dir, "seriesuids.csv"), None, [[uid] for uid in truth])
    truth_path = os.path.join(out_dir, TRUTH_NAME)
    write_json(truth_path, truth, indent=2)
    return truth_path


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write a LUNA16-layout phantom set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write subset*/, the CSVs and luna16_truth.json into")
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--scans-per-subset", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fov-mm", type=float, nargs=3, default=(48.0, 48.0, 48.0))
    args = parser.parse_args(argv)
    print(generate_luna16(args.out, args.subsets, args.scans_per_subset, args.seed, args.fov_mm))


if __name__ == "__main__":
    main()
