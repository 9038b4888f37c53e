"""The matrix's tables, claims and figures, from the tasks' results (and, for figures, the CSVs).

* ``matrix.csv``: one row per (unit, column, seed): the statistic before and
  after, the scheme's threshold, the verdict by the scheme's own verifier and
  the verdict on the measured null, p-values (the scheme's and the empirical
  one against the null models), test accuracy before and after, seconds;
* ``nulls.csv``: every null model's statistic and verdict per unit;
* ``null_rates.csv``: per unit and seed, the empirical false-positive rate of
  the scheme's own verdict on its null models, the matrix's decision
  threshold (raised to the null maximum where that rate is not 0) and the
  false-positive rate of the matrix's verdict with each null model held out
  of the threshold that judges it, and for a fingerprint the
  ROC-AUC and TPR at 5% FPR of surrogates and attacked copies against
  independent models;
* ``matrix_summary.csv``: per cell, the mean over seeds and its 95% interval;
* ``embeddings.csv``: per unit and seed, its embedding (generation): status, the
  verifier's statistic, threshold and verdict on the marked model, test accuracy,
  seconds; a failed one (``embedding failed``) says why, and its cells are n/a.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from reproduce.cells import NOT_APPLICABLE
from reproduce.report import Run, save_figure

__all__ = ["claims", "plot", "summary", "tables"]

#: kinds of null model that are positives for a fingerprint (derived from its source)
_DERIVED = ("surrogate",)


def tables(plan, results: dict, kinds: list[str]) -> dict[str, pd.DataFrame]:
    """``matrix``, ``nulls`` and ``null_rates`` frames from the tasks' results."""
    embeds = pd.DataFrame(results["embed"])
    nulls = _nulls(results["null"], embeds)
    rates = _null_rates(plan, embeds, nulls)
    matrix = _matrix(results["cell"], embeds, nulls, rates)
    rates = _fingerprint_rates(plan, rates, nulls, matrix)
    return {"matrix": matrix, "nulls": nulls, "null_rates": rates, "embeddings": embeds}


def _nulls(results: list[dict], embeds: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for null in results:
        for row in null["rows"]:
            kind = embeds[(embeds["unit"] == row["unit"]) & (embeds["seed"] == null["seed"])]
            rows.append(
                {
                    "seed": null["seed"],
                    "unit": row["unit"],
                    "kind": kind["kind"].iloc[0],
                    "null": null["index"],
                    "null_kind": null["kind"],
                    "statistic": row["statistic"],
                    "positive": bool(row["positive"]),
                    "null_test_accuracy": null["test_accuracy"],
                }
            )
    return pd.DataFrame(rows)


def _negatives(nulls: pd.DataFrame) -> pd.DataFrame:
    """The null models that never saw the evidence (a fingerprint's surrogates derive from it)."""
    fingerprint = nulls["kind"] == "fingerprint"
    return nulls[~(fingerprint & nulls["null_kind"].isin(_DERIVED))]


def _null_rates(plan, embeds: pd.DataFrame, nulls: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (seed, unit), group in _negatives(nulls).groupby(["seed", "unit"]):
        embed = embeds[(embeds["unit"] == unit) & (embeds["seed"] == seed)].iloc[0]
        statistics = group["statistic"].to_numpy(float)
        positive = group["positive"].to_numpy(bool)
        threshold, kind = float(embed["threshold"]), embed["kind"]
        rows.append(
            {
                "seed": seed,
                "unit": unit,
                "kind": kind,
                "null_models": len(group),
                "threshold": threshold,
                "null_max": float(statistics.max()),
                "null_mean": float(statistics.mean()),
                "false_positive_rate": float(positive.mean()),
                "decision_threshold": _decision_threshold(statistics, positive, threshold, kind),
                "contradicts_assumed_null": bool(positive.any()),
                "held_out_false_positive_rate": _held_out_rate(
                    statistics, positive, threshold, kind
                ),
            }
        )
    columns = ["seed", "unit", "kind", "null_models", "threshold", "null_max", "null_mean",
               "false_positive_rate", "decision_threshold", "contradicts_assumed_null",
               "held_out_false_positive_rate"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _decision_threshold(statistics, positive, threshold: float, kind: str) -> float:
    """The matrix's threshold: the scheme's, raised to the null maximum where the null contradicts it.

    A statistic must then exceed every null model's (:func:`_verdict`); a
    fragile scheme's verdict (intact or modified) is its own.
    """
    if kind == "fragile" or not np.any(positive):
        return threshold
    return max(threshold, float(np.max(statistics)))


def _held_out_rate(statistics, positive, threshold: float, kind: str) -> float:
    """The false-positive rate of the matrix's verdict, each null model judged by the others.

    On the null models it was set with, the raised threshold calls none of
    them positive by construction; judged at the threshold the other n - 1
    set (leave one out), a null model is a false positive when the scheme
    calls it positive and, where that threshold is raised, its statistic
    exceeds every other's: at most 1/n of them for a raised threshold.
    """
    calls = []
    for i in range(len(statistics)):
        others = np.arange(len(statistics)) != i
        decision = _decision_threshold(statistics[others], positive[others], threshold, kind)
        raised = decision > threshold + 1e-12
        calls.append(bool(positive[i]) and (not raised or statistics[i] > decision))
    return float(np.mean(calls)) if calls else math.nan


def _empirical_p(statistic: float, null: np.ndarray) -> float:
    if not math.isfinite(statistic) or len(null) == 0:
        return math.nan
    return float((1 + np.count_nonzero(null >= statistic)) / (1 + len(null)))


def _matrix(cells: list[dict], embeds, nulls, rates) -> pd.DataFrame:
    rows = []
    negatives = _negatives(nulls)
    for cell in cells:
        embed = embeds[(embeds["unit"] == cell["unit"]) & (embeds["seed"] == cell["seed"])].iloc[0]
        rate = rates[(rates["unit"] == cell["unit"]) & (rates["seed"] == cell["seed"])]
        # no null rate: the row's embedding failed and its cells are n/a
        decision = float(rate["decision_threshold"].iloc[0]) if len(rate) else math.nan
        sample = negatives[
            (negatives["unit"] == cell["unit"]) & (negatives["seed"] == cell["seed"])
        ]
        after = float(cell.get("statistic_after", math.nan))
        row = {
            "unit": cell["unit"],
            "kind": embed["kind"],
            "column": cell["column"],
            "seed": cell["seed"],
            "status": cell["status"],
            "reason": cell.get("reason", ""),
            "statistic_before": embed["statistic"],
            "statistic_after": after,
            "threshold": embed["threshold"],
            "decision_threshold": decision,
            "p_value_after": cell.get("p_value_after", math.nan),
            "empirical_p_after": _empirical_p(after, sample["statistic"].to_numpy(float)),
            "verdict_before": embed["label"],
            "verdict_after": _verdict(cell, embed["kind"], decision),
            "scheme_verdict_after": cell.get("label_after", ""),
            # RTLL/RTAL only: Adi et al.'s verification, the owner's output layer put back
            "statistic_owner_head": float(cell.get("statistic_owner_head", math.nan)),
            "verdict_owner_head": _verdict(cell, embed["kind"], decision, "owner_head"),
            "test_accuracy_before": embed["test_accuracy"],
            "test_accuracy_after": cell.get("test_accuracy_after", math.nan),
            "seconds": cell.get("seconds", math.nan),
        }
        row["retention"] = after / row["statistic_before"] if row["statistic_before"] else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _verdict(cell: dict, kind: str, threshold: float, of: str = "after") -> str:
    """The verdict on the verification ``of`` (``after``, or ``owner_head``: "" where none)."""
    if cell["status"] == NOT_APPLICABLE:
        return NOT_APPLICABLE
    if cell["status"] == "broken":
        return "absent (model broken)" if kind != "fragile" else "modified (model broken)"
    if f"label_{of}" not in cell:
        return ""
    if kind == "fragile":
        return cell[f"label_{of}"]
    statistic = float(cell[f"statistic_{of}"])
    raised = threshold > float(cell[f"threshold_{of}"]) + 1e-12  # the measured null decides
    positive = bool(cell[f"positive_{of}"]) and (not raised or statistic > threshold)
    return "present" if positive else "absent"


def _fingerprint_rates(plan, rates, nulls, matrix) -> pd.DataFrame:
    """ROC-AUC and TPR at 5% FPR for fingerprints: derived suspects against independent models."""
    from sklearn.metrics import roc_auc_score, roc_curve

    rates = rates.copy()
    rates["roc_auc"] = math.nan
    rates["tpr_at_5pct_fpr"] = math.nan
    for index, rate in rates[rates["kind"] == "fingerprint"].iterrows():
        mine = nulls[(nulls["unit"] == rate["unit"]) & (nulls["seed"] == rate["seed"])]
        attacked = matrix[
            (matrix["unit"] == rate["unit"])
            & (matrix["seed"] == rate["seed"])
            & (matrix["status"] == "ok")
        ]["statistic_after"]
        positives = [*mine[mine["null_kind"].isin(_DERIVED)]["statistic"], *attacked]
        negatives = list(mine[~mine["null_kind"].isin(_DERIVED)]["statistic"])
        if not positives or not negatives:
            continue
        labels = [1] * len(positives) + [0] * len(negatives)
        scores = np.array([*positives, *negatives], float)
        rates.loc[index, "roc_auc"] = roc_auc_score(labels, scores)
        fpr, tpr, _ = roc_curve(labels, scores)
        rates.loc[index, "tpr_at_5pct_fpr"] = float(tpr[fpr <= 0.05].max())
    return rates


def summary(matrix: pd.DataFrame) -> pd.DataFrame:
    """Per cell: seeds, mean statistic after and its 95% t-interval, verdict shares."""
    rows = []
    for (unit, column), group in matrix.groupby(["unit", "column"], sort=False):
        values = group["statistic_after"].dropna().to_numpy(float)
        mean = float(values.mean()) if len(values) else math.nan
        half = math.nan
        if len(values) > 1:
            half = float(
                stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
            )
        threshold = float(group["decision_threshold"].mean())
        rows.append(
            {
                "unit": unit,
                "kind": group["kind"].iloc[0],
                "column": column,
                "seeds": len(group),
                "status": ",".join(sorted(set(group["status"]))),
                "reason": group["reason"].iloc[0],
                "statistic_before": float(group["statistic_before"].mean()),
                "statistic_after": mean,
                "ci95_low": mean - half if math.isfinite(half) else math.nan,
                "ci95_high": mean + half if math.isfinite(half) else math.nan,
                "decision_threshold": threshold,
                "straddles_threshold": bool(math.isfinite(half) and abs(mean - threshold) < half),
                "verdict": _majority(group["verdict_after"]),
                "test_accuracy_before": float(group["test_accuracy_before"].mean()),
                "test_accuracy_after": float(group["test_accuracy_after"].mean()),
                "retention": float(group["retention"].mean()),
                "seconds": float(group["seconds"].mean()),
            }
        )
    return pd.DataFrame(rows)


def _majority(verdicts: pd.Series) -> str:
    counts = verdicts.value_counts()
    return (
        str(counts.index[0])
        if len(counts) == 1
        else " / ".join(f"{v} {n}" for v, n in counts.items())
    )


# --------------------------------------------------------------------------- claims

#: (claim metric, unit, column, the verdict the papers found, the verdict compared): Adi et
#: al. verify after RTAL with their output layer put back (``verdict_owner_head``, see
#: :func:`reproduce.cells._with_owner_head`); the black-box verdict is a reported row
DIRECTIONS = (
    ("laundering.zhang_content", "zhang_content", "laundering", "absent", "verdict_after"),
    ("laundering.zhang_noise", "zhang_noise", "laundering", "absent", "verdict_after"),
    ("ftal.zhang_content", "zhang_content", "ftal", "present", "verdict_after"),
    ("ftal.bilevel", "bilevel", "ftal", "present", "verdict_after"),
    ("rtal.adi", "adi", "rtal", "present", "verdict_owner_head"),
    ("rtal.adi.black_box", "adi", "rtal", "present", "verdict_after"),
    ("malicious_fine_tune.fragile", "fragile", "malicious_fine_tune", "modified", "verdict_after"),
)


def claims(out: Run, plan, frames: dict, config) -> None:
    """Measure M1-M7 (the rows and thresholds are data in published/matrix.csv)."""
    matrix, rates = frames["matrix"], frames["null_rates"]
    art = [c for c in plan.columns if c.startswith("art:")]
    out.measure("cells_expected", len(plan.units) * len(plan.columns) * len(config.seeds))
    out.measure("cells", len(matrix))
    out.measure(
        "na_without_reason", int(((matrix["status"] != "ok") & (matrix["reason"] == "")).sum())
    )
    out.measure("art_columns", len({c.split(":")[1] for c in art}))
    identity = matrix[matrix["column"] == "identity"]
    wrong = identity[~identity["verdict_after"].isin(["present", "intact"])]
    out.measure("identity_not_positive", len(wrong) if len(identity) else None)
    fingerprint = rates[rates["kind"] == "fingerprint"]
    out.measure(
        "fingerprint_auc", float(fingerprint["roc_auc"].min()) if len(fingerprint) else None
    )
    out.measure("max_false_positive_rate", float(rates["false_positive_rate"].max()))
    out.measure(
        "max_held_out_false_positive_rate", float(rates["held_out_false_positive_rate"].max())
    )
    fragile = matrix[(matrix["kind"] == "fragile") & (matrix["status"] == "ok")]
    changed = fragile[fragile["column"] != "identity"]
    out.measure(
        "fragile_intact_after_change",
        int((changed["verdict_after"] == "intact").sum()) if len(changed) else None,
    )
    for metric, unit, column, expected, verdict in DIRECTIONS:
        cell = matrix[(matrix["unit"] == unit) & (matrix["column"] == column)]
        agree = float((cell[verdict] == expected).mean()) if len(cell) else None
        out.measure(f"direction.{metric}", agree)
    seeds = len(config.seeds)
    out.measure("cells_with_interval", _with_interval(matrix) if seeds > 1 else None)
    out.measure("cells_total", len(matrix.groupby(["unit", "column"])))
    out.describe(
        seeds=seeds, nulls=sum(plan.nulls), units=len(plan.units), columns=len(plan.columns)
    )
    _sections(out, frames)


def _with_interval(matrix: pd.DataFrame) -> int:
    table = summary(matrix)
    return int(table["ci95_low"].notna().sum() + (table["status"] == NOT_APPLICABLE).sum())


_OWNER_HEAD = (
    "Adi et al.'s released fine-tune.py tests the trigger set after re-training the output "
    "layer with the original output layer put back (it is part of the owner's secret there). "
    "The matrix's verdict is the one on the model as the adversary deploys it; this one, at "
    "the same decision threshold, is what M5 compares with their RTAL rows.\n\n"
)

_STRIP = (
    "The query filter is STRIP with Gao et al.'s entropy (over the classes of every blend, "
    "their Eq. 2-3 and released code), not ART 1.20.1's `STRIPMixin`, which takes it along "
    "the blends and so ranks a trigger as less suspicious than a clean image "
    "(`attacks/strip.py`, `bench/strip_vs_art.py`); ART's parameters, defaults, blend and "
    "threshold rule are kept. A refused query counts as a miss, for the trigger statistic and "
    "for the test accuracy alike.\n\n"
)


def _sections(out: Run, frames: dict) -> None:
    rates = frames["null_rates"]
    contradicted = rates[rates["contradicts_assumed_null"]]
    text = "No scheme's own verdict was positive on any null model."
    if len(contradicted):
        text = "\n".join(
            f"- `{r.unit}` (seed {r.seed}): the scheme's verifier called {r.false_positive_rate:.0%} "
            f"of {r.null_models} null models positive (largest null statistic {r.null_max:.3f} "
            f"against its threshold {r.threshold:.3f}); the matrix decides at {r.decision_threshold:.3f}."
            for r in contradicted.itertuples()
        )
    out.section("Where the measured null contradicts the assumed one", text)
    matrix = frames["matrix"]
    heads = matrix[matrix["statistic_owner_head"].notna()]
    if len(heads):
        out.section("RTLL and RTAL verified as Adi et al. verify", _OWNER_HEAD + "\n".join(
            f"- `{r.unit}` x `{r.column}` (seed {r.seed}): {r.verdict_after} as deployed "
            f"({r.statistic_after:.3f}), {r.verdict_owner_head} with the owner's output layer "
            f"({r.statistic_owner_head:.3f})" for r in heads.itertuples()))  # fmt: skip
    strip = matrix[matrix["column"].str.startswith("art:STRIP") & (matrix["status"] == "ok")]
    if len(strip):
        out.section("STRIP as Gao et al. compute it", _STRIP + "\n".join(
            f"- `{r.unit}` (seed {r.seed}): statistic {r.statistic_before:.3f} -> "
            f"{r.statistic_after:.3f} ({r.verdict_after}), test accuracy "
            f"{r.test_accuracy_before:.4f} -> {r.test_accuracy_after:.4f}"
            for r in strip.itertuples()))  # fmt: skip
    failed = frames["embeddings"][frames["embeddings"]["status"] != "ok"]
    if len(failed):
        out.section("Embeddings that failed (their rows are n/a)", "\n".join(
            f"- `{r.unit}` (seed {r.seed}): {r.reason}" for r in failed.itertuples()))  # fmt: skip


# --------------------------------------------------------------------------- figures


def plot(folder: Path) -> list[Path]:
    """``fig_matrix.png`` (retention heatmap with verdicts) and ``fig_tradeoff.png``, from the CSVs."""
    import matplotlib

    matplotlib.use("Agg")
    table = pd.read_csv(Path(folder) / "matrix_summary.csv", keep_default_na=False, na_values=[""])
    return [_heatmap(table, Path(folder)), _tradeoff(table, Path(folder))]


_SHORT = {"present": "P", "absent": "A", "intact": "I", "modified": "M", NOT_APPLICABLE: "n/a"}


def _heatmap(table: pd.DataFrame, folder: Path) -> Path:
    import matplotlib.pyplot as plt

    units = list(dict.fromkeys(table["unit"]))
    columns = list(dict.fromkeys(table["column"]))
    grid = np.full((len(units), len(columns)), np.nan)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(columns), 1.2 + 0.5 * len(units)))
    for row in table.itertuples():
        i, j = units.index(row.unit), columns.index(row.column)
        if row.status != NOT_APPLICABLE:
            grid[i, j] = np.clip(row.retention, 0, 1.2) if np.isfinite(row.retention) else np.nan
        label = _SHORT.get(str(row.verdict), _SHORT.get(str(row.verdict).split(" ")[0], "?"))
        if row.straddles_threshold:
            label += "?"
        dark = np.isfinite(grid[i, j]) and grid[i, j] < 0.6
        ax.text(
            j, i, label, ha="center", va="center", fontsize=8, color="white" if dark else "black"
        )
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#dddddd")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1.2, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(units)), units, fontsize=8)
    fig.colorbar(image, ax=ax, label="retention: statistic after / before")
    ax.set_title(
        "P present, A absent, I intact, M modified, ? interval straddles the threshold; grey n/a",
        fontsize=8,
    )
    return save_figure(fig, folder / "fig_matrix.png")


def _tradeoff(table: pd.DataFrame, folder: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    ok = table[table["status"] != NOT_APPLICABLE]
    markers = "osD^v<>pPhX*"
    for k, (column, group) in enumerate(ok.groupby("column", sort=False)):
        ax.scatter(
            group["retention"], group["test_accuracy_after"], marker=markers[k % len(markers)],
            label=column, alpha=0.8, s=30,
        )  # fmt: skip
    ax.set_xlabel("evidence retention (statistic after / before)")
    ax.set_ylabel("test accuracy after the attack")
    ax.set_xlim(-0.05, 1.25)
    ax.set_ylim(0, 1)
    ax.legend(
        fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
    )  # off the data
    ax.set_title("The removal trade-off: each point is one scheme under one attack")
    return save_figure(fig, folder / "fig_tradeoff.png")
