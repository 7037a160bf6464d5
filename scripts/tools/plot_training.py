"""
A figure of a training run from the monitor's CSV (`output_dir/train_log.csv`): loss parts, gradient norm before
clipping, the guard's update ratio, the detector's score gap (positive minus background anchor score: is it
learning?), learning rate, and the guard's events and rollbacks over iterations.

    python -m scripts.tools.plot_training eval/train_log.csv docs/stress_run.png --title "guarded stress run"
"""

from __future__ import annotations

import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path: str) -> dict[str, list]:
    """The CSV's columns as lists (numbers as floats, the event column as text)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no iterations")
    return {k: [r[k] if k == "event" else float(r[k]) for r in rows] for k in rows[0]}


def plot(log: dict[str, list], out: str, title: str = "") -> None:
    """Write the six-panel figure to ``out`` (PNG)."""
    it = log["iteration"]
    fig, axes = plt.subplots(6, 1, figsize=(9, 13), sharex=True)
    axes[0].semilogy(it, log["loss"], label="loss", lw=0.8)
    axes[0].semilogy(it, log["loss_cls"], label="classification", lw=0.6, alpha=0.7)
    axes[0].semilogy(it, log["loss_reg"], label="box regression", lw=0.6, alpha=0.7)
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].semilogy(it, log["grad_norm"], lw=0.8, color="tab:purple")
    axes[1].set_ylabel("grad norm\n(before clipping)")
    ratios = log.get("update_ratio", [float("nan")] * len(it))  # measured at each snapshot window
    axes[2].semilogy(it, ratios, ".-", ms=2, lw=0.6, color="tab:orange")
    axes[2].set_ylabel("update ratio\n(per step)")
    gaps = log.get("score_gap", [float("nan")] * len(it))
    axes[3].plot(it, gaps, lw=0.4, alpha=0.5, color="tab:brown", label="per iteration")
    axes[3].plot(it, log.get("score_gap_level", gaps), lw=1.0, color="tab:brown", label="guard's smoothed level")
    axes[3].set_ylabel("score gap\n(pos - background)")
    axes[3].legend(loc="upper left", fontsize=8)
    axes[4].semilogy(it, log["lr"], color="tab:green")
    axes[4].set_ylabel("learning rate")
    events = [i for i, e in zip(it, log["event"]) if e]
    rollbacks = [i for i, prev, cur in zip(it[1:], log["rollbacks"], log["rollbacks"][1:]) if cur > prev]
    axes[5].step(it, log["skipped_steps"], where="post", label="skipped steps")
    axes[5].step(it, log["rollbacks"], where="post", label="rollbacks")
    for ax in axes:
        for i in rollbacks:
            ax.axvline(i, color="tab:red", lw=0.6, alpha=0.5)
    axes[5].plot(events, [0] * len(events), "x", color="tab:red", label="events")
    axes[5].set_ylabel("guard")
    axes[5].set_xlabel("iteration")
    axes[5].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv")
    parser.add_argument("out")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    plot(read_log(args.csv), args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
