"""Preview images of detections for a person to look at: axial maximum-intensity projection with the boxes drawn."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from scripts.inference.io import image_name

__all__ = ["PreviewSaver", "save_preview"]


def _stem(name: str) -> str:
    """File name of ``name`` without folders and without ``.nii.gz`` / ``.nii``."""
    base = os.path.basename(name)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def save_preview(
    image: Any, boxes: Any, scores: Any, path: str, title: str = "", score_thresh: float = 0.5, max_boxes: int = 10
) -> None:
    """
    Save a PNG of an axial maximum-intensity projection of ``image`` (C, x, y, z; RAS as loaded) with the boxes
    (``xyzxyz``, image coordinates) scoring at least ``score_thresh`` drawn, at most ``max_boxes``, best first.
    The projection is over the slab of axial slices the drawn boxes span (the whole volume when none is drawn), so
    that the chest wall above and below the lungs does not hide them. Displayed the radiological way: patient
    right on the left of the picture, anterior at the top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    volume = torch.as_tensor(image).detach().cpu().float().numpy()[0]
    boxes = torch.as_tensor(boxes).detach().cpu().reshape(-1, 6).numpy()
    scores = torch.as_tensor(scores).detach().cpu().reshape(-1).numpy()
    keep = [i for i in np.argsort(-scores) if scores[i] >= score_thresh][:max_boxes]
    z0, z1 = 0, volume.shape[2]
    if keep:
        z0 = max(int(np.floor(boxes[keep, 2].min() + 0.5)), 0)
        z1 = min(int(np.ceil(boxes[keep, 5].max() + 0.5)), volume.shape[2])
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.imshow(volume[:, :, z0 : max(z1, z0 + 1)].max(axis=2).T, cmap="gray", origin="lower", interpolation="nearest")
    for i in keep:
        x0, y0, _, x1, y1, _ = boxes[i]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.2))
        ax.text(x0, y1 + 0.5, f"{scores[i]:.2f}", color="red", fontsize=8, va="bottom")
    ax.invert_xaxis()
    ax.set_axis_off()
    ax.set_title(
        f"{title}: {len(keep)} boxes, score >= {score_thresh:g}; MIP of slices {z0}-{max(z1, z0 + 1) - 1}", fontsize=9
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


class PreviewSaver:
    """
    Saves one preview per image of an inference run to ``output_dir/<image file stem>.png`` (see `save_preview`).

    Args:
        output_dir: folder of the PNG files (created if missing).
        score_thresh: lowest score of a drawn box.
        max_boxes: most boxes drawn per image.
    """

    def __init__(self, output_dir: str, score_thresh: float = 0.5, max_boxes: int = 10) -> None:
        self.output_dir = output_dir
        self.score_thresh = float(score_thresh)
        self.max_boxes = int(max_boxes)

    def save(self, item: dict[str, Any], pred: dict[str, Any]) -> str:
        """Save the preview of one loaded ``item`` with its prediction (``box``, ``label_scores``); returns its path."""
        name = image_name(item)
        path = os.path.join(self.output_dir, f"{_stem(name)}.png")
        save_preview(item["image"], pred["box"], pred["label_scores"], path, name, self.score_thresh, self.max_boxes)
        return path
