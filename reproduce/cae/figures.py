"""The CAE figures: ``plot`` draws Fig. 2 (fingerprint labels), Fig. 3 (conferrability
against eps) and Fig. 4 (CAEAcc against test accuracy) from a finished run's CSVs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fingerprints.compare import ATTACKS
from reproduce.cae.config import _SETS, CLAIM_EPS, CODE_THRESHOLD
from reproduce.report import save_figure


def plot(folder: Path) -> list[Path]:
    """Draw fig2 (fingerprint labels), fig3 (conferrability vs eps), fig4 (accuracy vs CAEAcc)."""
    import matplotlib

    matplotlib.use("Agg")
    folder = Path(folder)
    return [_plot_fig2(folder), _plot_fig3(folder), _plot_fig4(folder)]


def _plot_fig2(folder: Path) -> Path:
    import matplotlib.pyplot as plt

    fig2 = pd.read_csv(folder / "table_fig2.csv")
    groups = list(fig2.groupby(["dataset", "experiment"], sort=False))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 4 * len(groups)), squeeze=False)
    for (name, group), (bar_ax, heat_ax) in zip(groups, axes, strict=True):
        matrix = group.pivot(index="original_label", columns="fingerprint_label", values="count")
        per_label = matrix.sum(axis=0)
        bar_ax.bar(per_label.index.astype(str), per_label, color="#4c72b0")
        bar_ax.yaxis.get_major_locator().set_params(integer=True)
        bar_ax.set(
            xlabel="fingerprint label (source model)",
            ylabel="fingerprints",
            title=f"{name[0]}, {name[1]}: {int(per_label.sum())} fingerprints",
        )
        if per_label.sum() == 0:  # nothing to draw: say so instead of empty axes
            for ax in (bar_ax, heat_ax):
                ax.set_axis_off()
            bar_ax.text(0.5, 0.5, f"{name[0]}, {name[1]}:\nno candidate passed the filter,\n"
                        "so there are no fingerprints", ha="center", va="center",
                        transform=bar_ax.transAxes)  # fmt: skip
            continue
        bar_ax.set_ylim(0, max(1, per_label.max()) * 1.1)
        rows = matrix.sum(axis=1).replace(0, 1)
        image = heat_ax.imshow((matrix.T / rows).T, cmap="Blues", vmin=0, vmax=1)
        heat_ax.set_xticks(range(len(matrix.columns)), matrix.columns)
        heat_ax.set_yticks(range(len(matrix.index)), matrix.index)
        heat_ax.set(
            xlabel="fingerprint label", ylabel="original label", title="share per original label"
        )
        fig.colorbar(image, ax=heat_ax, fraction=0.046)
    return save_figure(fig, folder / "fig2.png")


def _plot_fig3(folder: Path) -> Path:
    import matplotlib.pyplot as plt

    fig3 = pd.read_csv(folder / "table_fig3.csv")
    groups = list(fig3.groupby(["dataset", "experiment"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    markers = dict(zip(["cae", *ATTACKS], "o^sDv", strict=True))
    for (name, group), ax in zip(groups, axes[0], strict=True):
        for method, rows in group.groupby("method", sort=False):
            rows = rows.sort_values("eps")
            style = dict(marker=markers.get(method, "x"), linewidth=2.5 if method == "cae" else 1.2)
            ax.plot(rows["eps"], rows["conferrability"], label=method.upper(), **style)
        ax.axvline(CLAIM_EPS, color="grey", linestyle=":", linewidth=1, label=f"C3 at {CLAIM_EPS}")
        ax.set(
            xlabel="eps (L-infinity)",
            ylabel="mean conferrability on unseen models",
            ylim=(0, 1),
            title=f"{name[0]}, {name[1]}",
        )
        ax.legend(fontsize=8)
    return save_figure(fig, folder / "fig3.png")


def _plot_fig4(folder: Path) -> Path:
    import matplotlib.pyplot as plt

    table = pd.read_csv(folder / "table_models.csv")
    table = table[table["role"] != "source"]
    sets = pd.read_csv(folder / "table_caeacc.csv").query("source == 'measured'")
    groups = list(table.groupby(["dataset", "experiment"], sort=False))
    fig, axes = plt.subplots(len(groups), 3, figsize=(18, 4.2 * len(groups)), squeeze=False)
    styles = {"surrogate": ("#c44e52", "o"), "reference": ("#4c72b0", "s")}
    for (name, group), row_axes in zip(groups, axes, strict=True):
        found = sets[(sets["dataset"] == name[0]) & (sets["architecture"] == name[1])]
        for suffix, ax in zip(_SETS, row_axes, strict=True):
            column, level = f"caeacc{suffix}", found[found["set"] == _SETS[suffix]].iloc[0]
            for (role, split), rows in group.groupby(["role", "split"]):
                color, marker = styles[role]
                unseen = split == "unseen"
                style = dict(alpha=1.0 if unseen else 0.35, s=60 if unseen else 30)
                ax.scatter(rows["test_accuracy"], rows[column], color=color, marker=marker,
                           label=f"{split} {role}s", **style)  # fmt: skip
            ax.axhline(CODE_THRESHOLD, color="grey", linestyle=":", label="the code's 0.75")
            if pd.notna(level["chosen_threshold"]):
                ax.axhline(level["chosen_threshold"], color="black", linestyle="--", linewidth=1,
                           label=f"chosen on the generation families ({level['chosen_threshold']:.2f})")  # fmt: skip
            if group[column].isna().all():
                ax.text(0.5, 0.5, "no fingerprint passed the filter", ha="center",
                        transform=ax.transAxes)  # fmt: skip
            ax.set(xlabel="test accuracy", ylabel="CAEAcc", ylim=(-0.05, 1.05),
                   xlim=(group["test_accuracy"].min() - 0.02, group["test_accuracy"].max() + 0.02),
                   title=f"{name[1]}: {_SETS[suffix]}\n{int(level['fingerprints'])} fingerprints, "
                   f"conferrability >= {level['filter']:.2f}")  # fmt: skip
            ax.legend(fontsize=7)
    return save_figure(fig, folder / "fig4.png")
