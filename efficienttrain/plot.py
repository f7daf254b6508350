"""Picture of a curriculum: input size and RandAug magnitude against budget progress."""
from __future__ import annotations

from .curriculum import Curriculum


def plot_curriculum(cur: Curriculum, path: str, epochs: float, baseline_epochs: float = 300.0) -> None:
    """Input size and RandAug magnitude against budget progress, with data epochs on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    xs, sizes, mags = [], [], []
    for (b0, b1), st in zip(cur.boundaries(), cur.stages):
        xs += [b0, b1]
        sizes += [st.size, st.size]
        mags += [st.magnitude_at(0.0), st.magnitude_at(1.0)]
    ax.plot(xs, sizes, color="tab:blue", lw=2)
    ax.set_xlabel("budget consumed (" + ("epochs" if cur.budget == "epochs" else "compute") + " fraction)")
    ax.set_ylabel("input size B", color="tab:blue")
    ax.set_ylim(0, cur.final_size * 1.1)
    ax2 = ax.twinx()
    ax2.plot(xs, mags, color="tab:orange", lw=2, ls="--")
    ax2.set_ylabel("RandAug magnitude m", color="tab:orange")
    ax2.set_ylim(0, max(max(mags), 1.0) * 1.1)
    ax.set_title(f"{cur.name}: {cur.compute(epochs):.0f} eq. epochs, "
                 f"{cur.speedup(epochs, baseline_epochs):.2f}x vs baseline {baseline_epochs:g} epochs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
