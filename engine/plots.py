"""Pictures of a run read back from its ``metrics.jsonl`` (so a resumed run draws its whole history)."""
from __future__ import annotations

import json
import os
from typing import List, Tuple


def eval_points(metrics_path: str, key: str) -> List[Tuple[float, float, float]]:
    """(budget fraction, wall seconds, value) of every logged ``key``; a resumed run's repeated
    steps keep their last record."""
    by_step = {}
    with open(metrics_path, "r", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if key in rec:
                by_step[rec["step"]] = (rec.get("budget", float("nan")), rec.get("wall_s", float("nan")), rec[key])
    return [by_step[s] for s in sorted(by_step)]


def plot_eval_curve(metrics_path: str, key: str, path: str) -> None:
    """``key`` (e.g. knn_top1) against the budget consumed and against wall time, side by side."""
    if not os.path.isfile(metrics_path):
        return
    pts = eval_points(metrics_path, key)
    if not pts:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget, wall, value = zip(*pts)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110, sharey=True)
    for ax, x, label in ((axes[0], [100 * b for b in budget], "budget consumed (%)"),
                         (axes[1], [w / 60 for w in wall], "wall time (min, steps + overhead)")):
        ax.plot(x, value, marker="o", lw=1.5)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(key)
    fig.suptitle(f"{key}: last {value[-1]:.2f}")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
