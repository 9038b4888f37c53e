"""The fragile figures: ``plot`` draws Fig. 2 (AccTri per fine-tuning epoch, all layers and
last layer, with the threshold and the paper's Table 4 mean) from a finished run's CSVs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reproduce.fragile.config import _THRESHOLD
from reproduce.report import save_figure


def plot(folder: Path) -> list[Path]:
    """Draw ``fig2.png`` from the run's CSVs."""
    import matplotlib

    matplotlib.use("Agg")
    return [_plot_fig2(Path(folder))]


_STYLE = {
    "G_non": ("o", "#4c72b0"),
    "G_cla": ("s", "#dd8452"),
    "G_full": ("^", "#c44e52"),
    "G_var": ("D", "#55a868"),
}


def _plot_fig2(folder: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig2 = pd.read_csv(folder / "fig2.csv")
    fit = pd.read_csv(folder / "table3.csv").set_index("generator")["fit_for_verification"]
    paper = pd.read_csv(folder / "table4.csv", dtype={"paper_resnet18": str}).set_index("a")
    paper = pd.to_numeric(paper["paper_resnet18"], errors="coerce").get(200.0, np.nan)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, layers in zip(axes, ("all", "last"), strict=True):
        part = fig2[fig2["layers"] == layers]
        for i, (name, (marker, colour)) in enumerate(_STYLE.items()):  # offsets: none hidden
            ok = bool(fit.get(name, True))
            label = f"{'abcd'[i]}: {name}" + ("" if ok else " (unfit: ties)")
            x, style = part["epoch"] + (i - 1.5) * 0.06, "-" if ok else ":"
            ax.plot(x, part[name], marker=marker, color=colour, linestyle=style, label=label)
        ax.axhline(_THRESHOLD, color="black", ls=(0, (2, 3)), lw=1, zorder=3, label="threshold")
        title = "(a) all layers" if layers == "all" else "(b) last layer only"
        ax.set(title=title, xlabel="fine-tuning epoch (0: unmodified)", ylim=(-0.03, 1.08))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # (b): the mean of c beside the paper's Table 4 mean, right of the curves (hiding none)
    last, end = fig2[(fig2["layers"] == "last") & (fig2["epoch"] >= 1)], fig2["epoch"].max()
    axes[1].hlines(
        last["G_full"].mean(),
        end + 0.3,
        end + 0.9,
        color="#c44e52",
        lw=3,
        label="mean of c (measured)",
    )
    if np.isfinite(paper):
        label = "paper: mean AccTri, G_full a = 200, ResNet-18 (Table 4)"
        axes[1].hlines(paper, end + 0.3, end + 0.9, color="grey", lw=3, label=label)
    ticks = list(range(0, int(end) + 1, max(1, int(end) // 6)))
    axes[1].set_xticks([*ticks, end + 0.6], [*map(str, ticks), "mean"])
    axes[0].set_ylabel("AccTri")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0))
    return save_figure(fig, folder / "fig2.png")
