"""The bi-level figures: ``plot`` draws Figs. 3-8 from a finished run's CSVs, with the
published values of ``published/bilevel.csv`` and the verification threshold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reproduce.report import published, save_figure

_MARKERS, _STYLES = "osD^vP*X", ("-", "--", "-.", ":")


def _panel(ax, frame, x, y, by, xlabel, ylabel, spread=0.0, integer=False):
    """One line per group (distinct marker, style and a small x offset: none hides another)."""
    from matplotlib.ticker import MaxNLocator

    groups = list(frame.groupby(by, sort=False))
    for i, (label, part) in enumerate(groups):
        ax.plot(part[x] + (i - (len(groups) - 1) / 2) * spread, part[y], marker=_MARKERS[i % 8],
                linestyle=_STYLES[i % 4], alpha=0.85, label=" / ".join(map(str, label)))  # fmt: skip
    if y == "R_auth" and "threshold" in frame:
        for model, part in frame.groupby("model", sort=False):
            level = part.groupby(x)["threshold"].first().replace(np.inf, np.nan)  # 5 keys: none
            ax.step(level.index, level.to_numpy(), where="mid", color="black", linewidth=0.9,
                    zorder=3, label=f"verification threshold ({model})")  # fmt: skip
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.05, max(1.05, frame[y].max() + 0.05)))
    ax.grid(alpha=0.3)
    if integer and frame[x].nunique() <= 12:  # the measured counts themselves
        ax.set_xticks(sorted(frame[x].unique()))
    elif integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax) -> None:
    """Below the axes, so that it covers no data."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def _figure(plt, frame, x, by, xlabel, title, paper, spread=0.0, integer=False, at=None):
    """R_auth (threshold, the paper's value) and the function-preserving rate against ``x``.

    A published value is a star at ``at`` (default: right of the last measured point) on a
    faint guide line, so a measured line at the same value never hides it.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    labels = ("R_auth (the owner's watermark)", "function-preserving rate")
    for ax, y, label in zip(axes, ("R_auth", "function_preserving"), labels, strict=True):
        _panel(ax, frame, x, y, by, xlabel, label, spread, integer)
        right = at if at is not None else frame[x].max() + 0.04 * np.ptp(frame[x])
        for value, text in paper.get(y, ()):
            ax.axhline(value, color="grey", linestyle=":", linewidth=0.8, zorder=0)
            ax.plot([right], [value], marker="*", markersize=12, color="dimgrey",
                    linestyle="none", label=f"paper: {text}")  # fmt: skip
        _legend(ax)
    fig.suptitle(title)
    return fig


def _fig3(plt, keys, budgets, refs):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    keys, budgets = keys.assign(changed=100 * keys["changed_fraction"]), budgets.assign(
        budget=100 * budgets["top_fraction"])  # fmt: skip
    _panel(left, keys, "keys", "changed", ["model", "dataset"], "number of keys",
           "changed parameters (%)")  # fmt: skip
    kept = budgets[budgets["R_auth"] >= 1.0]
    left.scatter(kept["keys"], 100 * kept["changed_fraction"], marker="x", color="C3", zorder=3,
                 label="smaller mask budgets that keep R_auth 1.0")  # fmt: skip
    for (name, value), style in zip(refs.items(), ("--", ":"), strict=False):
        left.axhline(100 * value, color="grey", linestyle=style, label=f"paper: {name} (at most)")
    left.set(yscale="log", ylim=(1e-3, 10), xticks=sorted(set(keys["keys"])))
    _panel(right, budgets, "budget", "R_auth", ["model"], "mask budget per layer (%)", "R_auth")
    right.axvline(2.5, color="grey", linestyle="--", label="paper: top 2.5% (all experiments)")
    ticks = sorted(set(budgets["budget"]))
    right.set(xscale="log", xticks=ticks, xticklabels=[f"{b:g}%" for b in ticks])
    right.minorticks_off()
    for ax in (left, right):
        _legend(ax)
    fig.suptitle("Fig. 3: changed parameters, and the mask budget the watermark needs")
    return fig


def plot(folder: Path) -> list[Path]:
    """Draw Figs. 3-8 from the run's CSVs, with the published values of ``published/bilevel.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder, rows = Path(folder), published("bilevel")
    ref = {(r.claim, r.metric): (float(r.paper_value), r.description.split(": ", 1)[1])
           for r in rows[rows["claim"].str.startswith("fig")].itertuples()}  # fmt: skip
    read = lambda name: pd.read_csv(folder / f"{name}.csv")  # noqa: E731
    keys = read("table_keys")
    paper = lambda fig, *metrics: {m: [ref[(fig, m)]] for m in metrics}  # noqa: E731
    figures = {
        "fig3": _fig3(plt, keys, read("table_budgets"), {
            "VGG-16": ref[("fig3", "changed_fraction:vgg16")][0],
            "Inception-V3": ref[("fig3", "changed_fraction:inception_v3")][0]}),
        "fig4": _figure(plt, read("fig4"), "epoch", ["model", "fine_tuning", "watermark"],
                        "fine-tuning epoch", "Fig. 4: fine-tuning on held-out data",
                        paper("fig4", "R_auth"), 0.06, True),
        "fig5": _figure(plt, read("fig5"), "rate", ["model", "watermark"], "pruning rate",
                        "Fig. 5: magnitude pruning", paper("fig5", "R_auth"), 0.006, at=0.5),
        "fig6": _figure(plt, read("fig6"), "step", ["model", "dataset"],
                        "outer phase of the adversary's embedding",
                        "Fig. 6: overwriting with a second watermark of the same size",
                        paper("fig6", "R_auth"), integer=True),
        "fig7": _figure(plt, read("fig7"), "step", ["model", "dataset"],
                        "adversary's keys embedded one by one",
                        "Fig. 7: sequential single-key overwriting", paper("fig7", "R_auth"),
                        integer=True),
        "fig8": _figure(plt, keys, "keys", ["model", "dataset"], "number of keys",
                        "Fig. 8: capacity", paper("fig8", "R_auth", "function_preserving"),
                        integer=True),
    }  # fmt: skip
    return [save_figure(fig, folder / f"{name}.png") for name, fig in figures.items()]
