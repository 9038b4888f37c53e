"""The laundering figures: ``plot`` draws Figs. 3 and 4 (accuracy per laundering round),
Fig. 5 (the clean twin's watermark accuracy per epoch) and Fig. 8 (Neural Cleanse's
reversed triggers) from a finished run's CSVs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reproduce.laundering.config import ADI, OURS
from reproduce.report import save_figure


def plot(folder: Path) -> list[Path]:
    """Figs. 3, 4, 5 and 8 from the run's CSVs, with the paper's Table 2 values beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    table = pd.read_csv(folder / "table2.csv")
    paper = table[table["method"] == OURS].set_index("watermark")
    curves = pd.read_csv(folder / "fig3_fig4_rounds.csv")
    figures = []
    for name, adi in (("fig3", False), ("fig4", True)):
        chosen = curves[curves["watermark"].isin(ADI) == adi]
        panels = list(chosen.groupby(["model", "watermark"], sort=False))
        if panels:
            cols, rows = min(3, len(panels)), -(-len(panels) // 3)
            fig, axes = plt.subplots(
                rows, cols, figsize=(3.6 * cols + 2.2, 3.2 * rows), squeeze=False
            )
            for ax in axes.flat[len(panels) :]:
                ax.axis("off")
            for ax, ((model, label), panel) in zip(axes.flat, panels, strict=False):
                _rounds_panel(ax, f"{model} / {label}", panel, paper.loc[label])
            handles = {
                t: h
                for ax in fig.axes
                for h, t in zip(*ax.get_legend_handles_labels(), strict=True)
            }
            fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center right")
            fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
            figures.append(save_figure(fig, folder / f"{name}.png"))
    return [*figures, _fig5(plt, folder, paper), _fig8(plt, folder)]


def _rounds_panel(ax, title: str, panel: pd.DataFrame, paper: pd.Series) -> None:
    sizes = list(panel.groupby("retraining_size", sort=False))
    for i, (size, line) in enumerate(sizes):  # sizes apart by a small offset: none hidden
        line, marker = line.sort_values("round"), "osv^D"[i % 5]
        x = line["round"] + 0.06 * (i - (len(sizes) - 1) / 2)
        ax.plot(x, line["test_acc"], f"-{marker}", color="C0", label=f"test, {size}")
        ax.plot(x, line["wm_acc"], f"--{marker}", color="C3", label=f"watermark, {size}")
    ax.axhline(panel["threshold"].iloc[0], color="k", lw=1, label="vanilla threshold")
    ax.axhline(paper["paper_vanilla_wm_acc"], color="grey", ls=":", label="paper's threshold")
    for column, color, what in (("test_acc", "C0", "test"), ("wm_acc", "C3", "watermark")):
        value = paper[f"paper_laundered_{column}"]
        ax.plot([1], [value], "*", ms=12, mfc="none", color=color, label=f"paper, round 1: {what}")
    ax.set(title=title, xlabel="laundering round", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax.set_xlim(-0.4, panel["round"].max() + 0.4)
    _integer_ticks(ax, panel["round"])


def _integer_ticks(ax, values: pd.Series) -> None:
    """Integer ticks on an integer axis (every value where there are few)."""
    from matplotlib.ticker import MaxNLocator

    if values.nunique() <= 12:
        ax.set_xticks(sorted(values.unique()))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _fig5(plt, folder: Path, paper: pd.DataFrame) -> Path:
    vanilla = pd.read_csv(folder / "fig5_vanilla.csv")
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    groups = vanilla.groupby(["model", "watermark"], sort=False)
    for i, ((model, label), line) in enumerate(groups):
        color, published = f"C{i}", paper["paper_vanilla_wm_acc"].get(label, np.nan)
        ax.plot(line["epoch"], line["wm_acc"], "-" + "osv^Dp"[i % 6], ms=4, color=color,
                label=f"{label} ({model}); its threshold: the best epoch")  # fmt: skip
        ax.axhline(line["wm_acc"].max(), color=color, lw=0.8)
        ax.axhline(published, color=color, ls="--", lw=1, label=f"{label}: the paper's threshold")
    top = np.nanmax([vanilla["wm_acc"].max(), paper["paper_vanilla_wm_acc"].max()])
    ax.set(xlabel="training epoch of the clean model", ylabel="watermark accuracy")
    ax.set_ylim(0, max(0.3, 1.15 * top))
    ax.set_xlim(0.5, vanilla["epoch"].max() + 0.5)
    _integer_ticks(ax, vanilla["epoch"])
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, folder / "fig5.png")


def _fig8(plt, folder: Path) -> Path:
    from attacks.neural_cleanse import FLAG_THRESHOLD, draw_triggers

    triggers = pd.read_csv(folder / "fig8_triggers.csv")
    nc = pd.read_csv(folder / "neural_cleanse.csv")
    groups = list(triggers.groupby("watermark", sort=False))
    k = int(triggers["class"].max()) + 1
    fig, axes = plt.subplots(len(groups), k, figsize=(1.5 * k, 2.0 * len(groups)), squeeze=False)
    for row, (label, group) in zip(axes, groups, strict=True):
        shape = [int(group[c].max()) + 1 for c in ("class", "row", "col", "channel")]
        images = np.zeros(shape, np.float32)
        images[group["class"], group["row"], group["col"], group["channel"]] = group["value"]
        scores = nc[nc["watermark"] == label].sort_values("class")
        norms, indices = scores["l1_norm"].to_numpy(), scores["anomaly_index"].to_numpy()
        draw_triggers(row, images, norms, indices, scores.loc[scores["flagged"], "class"])
        target = scores.loc[scores["true_target"], "class"].tolist()
        row[0].set_ylabel(f"{label}\n(target {target[0]})" if target else label, fontsize=8)
    fig.suptitle(
        f"Neural Cleanse's reversed triggers (L1 norm, anomaly index AI); * flagged "
        f"(AI > {FLAG_THRESHOLD:g}, L1 below the median)",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, folder / "fig8.png")
