"""Geometry for the phantom generator (`scripts.data.phantoms`): distances to ellipsoids, boxes and polylines in
millimetres, voxel blocks around a point, and soft (sigmoid-edged) blending of a structure into a volume.

Every function works on a sub-block of the volume given by broadcastable per-axis offsets, so that drawing a
structure costs its own size, not the volume's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "DIRECTIONS",
    "blend",
    "block",
    "block_offsets",
    "box_distance",
    "ellipsoid_rho_and_distance",
    "inside_ellipsoid",
    "polyline_distance",
    "sigmoid",
]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function in float32, clipped where it saturates (no overflow warnings)."""
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))).astype(np.float32)


def ellipsoid_rho_and_distance(offsets: Sequence[np.ndarray], semi: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius and approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid.

    ``offsets`` are broadcastable per-axis offsets from the centre in mm; an infinite semi-axis makes an extrusion.
    The distance is measured along the ray from the centre, exact for a sphere.
    """
    rho2 = sum((o / s) ** 2 for o, s in zip(offsets, semi, strict=True))
    r = np.sqrt(sum(o**2 for o in offsets))
    rho = np.sqrt(rho2)
    finite = [s for s in semi if np.isfinite(s)]
    along = np.where(rho > 1e-6, r / np.maximum(rho, 1e-6), min(finite))
    return rho, (rho - 1.0) * along


def block(center_mm: np.ndarray, half_mm: np.ndarray, spacing: np.ndarray, shape: Sequence[int]) -> tuple:
    """Voxel index sub-block (lo, hi) covering ``center +- half`` (mm), clipped to the volume."""
    lo = np.maximum(np.floor((center_mm - half_mm) / spacing).astype(int) - 1, 0)
    hi = np.minimum(np.ceil((center_mm + half_mm) / spacing).astype(int) + 2, np.asarray(shape))
    return lo, hi


def block_offsets(lo: np.ndarray, hi: np.ndarray, center_mm: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    """Broadcastable per-axis offsets (mm) of voxel centres in the block from ``center_mm``."""
    out = []
    for a in range(3):
        v = (np.arange(lo[a], hi[a], dtype=np.float32) * spacing[a] - center_mm[a]).astype(np.float32)
        view = [1, 1, 1]
        view[a] = -1
        out.append(v.reshape(view))
    return out


def blend(vol: np.ndarray, lo: np.ndarray, hi: np.ndarray, weight: np.ndarray, hu: float) -> None:
    """Move the block ``lo:hi`` of ``vol`` towards ``hu`` by ``weight`` (0: unchanged, 1: ``hu``), in place."""
    sub = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    sub += weight * (np.float32(hu) - sub)


def _fibonacci_directions(n: int = 128) -> np.ndarray:
    """``n`` unit vectors spread evenly over the sphere (a Fibonacci lattice)."""
    k = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * k / n)
    theta = np.pi * (1.0 + 5.0**0.5) * k
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


DIRECTIONS = _fibonacci_directions()  # to test that a whole sphere lies inside an ellipsoid


def inside_ellipsoid(points: np.ndarray, center: np.ndarray, semi: np.ndarray) -> bool:
    """Whether every point (..., 3) lies strictly inside the axis-aligned ellipsoid."""
    return bool(np.all(np.sum(((points - center) / semi) ** 2, axis=-1) < 1.0))


def box_distance(points: np.ndarray, lo_mm: np.ndarray, hi_mm: np.ndarray) -> np.ndarray:
    """Euclidean distance of each point (..., 3) to the axis-aligned box (0 inside)."""
    gap = np.maximum(np.maximum(lo_mm - points, points - hi_mm), 0.0)
    return np.sqrt(np.sum(gap**2, axis=-1))


def polyline_distance(offsets: list[np.ndarray], curve: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel (given as broadcastable absolute mm coordinates) to a polyline."""
    best = None
    for a, b in zip(curve[:-1], curve[1:], strict=True):
        ab = (b - a).astype(np.float32)
        rel = [offsets[k] - np.float32(a[k]) for k in range(3)]
        t = np.clip(sum(rel[k] * ab[k] for k in range(3)) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        d2 = sum((rel[k] - t * ab[k]) ** 2 for k in range(3))
        best = d2 if best is None else np.minimum(best, d2)
    return np.sqrt(best)
