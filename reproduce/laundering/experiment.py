"""The laundering run: ``run`` marks each part's models, launders them (DT/CT chosen,
then fixed), runs Neural Cleanse, the from-scratch model and the baselines, and stages
Table 2 (the paper's values beside), the round curves and the claims' measurements.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

import models
from attacks.finetune import RetrainAllLayers
from attacks.laundering import Laundering
from attacks.neural_cleanse import detect
from attacks.pruning import FinePruning, MagnitudePruning
from models import classifier
from models.training import Hook
from reproduce.laundering.config import (
    ADI,
    CHOICES,
    FIXED,
    OURS,
    PER_CLASS,
    ZHANG,
    LaunderingRunConfig,
    Part,
    _rounds,
)
from watermarks.backdoor import AdiAbstract
from watermarks.backdoor import vanilla as clean_twin
from watermarks.base import EmbeddingFailed

log = logging.getLogger(__name__)


@dataclass
class _Marked:
    """A marked model; ``label`` is unique in the run (``cifar10_content`` for a second part)."""

    label: str
    watermark: str
    part: Part
    model: object
    key: object
    test_acc: float
    wm_acc: float

    @property
    def threshold(self) -> float:
        return float(self.key.metadata["threshold"])


def _embed(scheme, model, data):
    """The owner's embedding; where it did not take, the bare one: a measured outcome (L1)."""
    try:
        return scheme.embed(model, data)
    except EmbeddingFailed as failure:
        log.warning("%s; measured as it is (L1)", failure)
        return scheme.mark(model, data)  # the same trainings, from the cache


def _scores(model, data, key) -> tuple[float, float]:
    test = classifier.accuracy(model, data.x_test, data.y_test)
    return test, classifier.accuracy(model, key.inputs, key.labels)


def _schemes(config, part: Part, twin, architecture) -> list[tuple]:
    """(name, scheme, starting model) of the part's marked models."""
    if part in config.adi:
        return [
            ("adi_fs", AdiAbstract(config.adi_fs), architecture),
            ("adi_pt", AdiAbstract(config.adi_pt), twin),
        ]
    jobs = []
    for name, scheme in ZHANG.items():
        options = {"train": part.train, "seed": config.seed}
        options.update({"n": config.zhang_n} if config.zhang_n else {})
        options.update({"unrelated_data_dir": config.data_dir} if name == "unrelated" else {})
        jobs.append((name, scheme.from_preset(config.preset, **options), architecture))
    return jobs


def _marks(config, part: Part, data, out, fig5: list, first: bool) -> list[_Marked]:
    """The part's vanilla model (the cached clean twin) and its marked models."""
    models.seed_everything(part.train.seed)
    architecture = models.build(part.model, data.input_shape, data.num_classes)
    twin = clean_twin(architecture, data, part.train).model
    vanilla_acc = classifier.accuracy(twin, data.x_test, data.y_test)
    marks = []
    for name, scheme, start in _schemes(config, part, twin, architecture):
        marked = _embed(scheme, start, data)
        mark = _Marked(name if first else f"{part.dataset}_{name}", name, part, marked.model,
                       marked.key, *_scores(marked.model, data, marked.key))  # fmt: skip
        marks.append(mark)
        out.measure(f"{mark.label}.wm_acc", mark.wm_acc)
        out.measure(f"{mark.label}.test_gap", abs(mark.test_acc - vanilla_acc))
        out.measure(f"{mark.label}.threshold", mark.threshold)
        if name != "adi_pt":  # PT's curve is FS's: the same triggers on the same twin
            curve = marked.key.arrays["null_accuracies"].tolist()
            fig5 += [{"model": part.model, "watermark": mark.label, "scheme": name, "epoch": e,
                      "wm_acc": v} for e, v in enumerate(curve, start=1)]  # fmt: skip
        log.info("%s: test %.4f, watermark %.4f", mark.label, mark.test_acc, mark.wm_acc)
    return marks


def _label(size) -> str:
    return size if isinstance(size, str) else f"{100 * float(size):.1f}%"


def _sample(data, size, seed: int):
    """The adversary's labelled set: a stratified share of the training split, or 1/class."""
    if size == PER_CLASS:
        return data.subset(per_class=1, seed=seed)
    return data.subset(fraction=float(size), seed=seed)


def _launder(mark: _Marked, attack_config, adversary, size, data, curves: list | None):
    """Launder ``mark``: (scores after round 1, facts for Table 2, the DT/CT candidates)."""
    hooks = (
        Hook("test_acc", lambda m: classifier.accuracy(m, data.x_test, data.y_test)),
        Hook("wm_acc", lambda m: classifier.accuracy(m, mark.key.inputs, mark.key.labels)),
    )
    info = Laundering(attack_config).remove(mark.model, adversary, hooks=hooks).info
    curve = info["curves"]
    points = [(mark.test_acc, mark.wm_acc), *zip(curve["test_acc"], curve["wm_acc"], strict=True)]
    if curves is not None:  # round 0 is the marked model
        curves += [
            {"model": mark.part.model, "watermark": mark.label, "retraining_size": _label(size),
             "round": r, "test_acc": t, "wm_acc": w, "threshold": mark.threshold}
            for r, (t, w) in enumerate(points)
        ]  # fmt: skip
    chosen = info["thresholds"]
    facts = {"thresholds": chosen["mode"], "dt": chosen["dense"], "ct": chosen["conv"],
             "share": chosen.get("share"), "suspect": info["rounds"][0]["suspect"],
             "rounds_run": len(info["rounds"])}  # fmt: skip
    return points[1], facts, chosen.get("grid", [])


def _row(method: str, mark: _Marked, scores, size: float, **extra) -> dict:
    test_acc, wm_acc = scores
    return {
        "method": method,
        "dataset": mark.part.dataset,
        "model": mark.part.model,
        "watermark": mark.label,
        "scheme": mark.watermark,
        "original_test_acc": round(mark.test_acc, 4),
        "laundered_test_acc": round(test_acc, 4),
        "original_wm_acc": round(mark.wm_acc, 4),
        "laundered_wm_acc": round(wm_acc, 4),
        "vanilla_wm_acc": round(mark.threshold, 4),
        "present": bool(wm_acc > mark.threshold),
        "retraining_size": round(size, 4),
        **extra,
    }


def _laundered(out, mark: _Marked, scores, prefix: str = "") -> None:
    test_acc, wm_acc = scores
    for name, value in (("laundered_wm_acc", wm_acc), ("laundered_test_acc", test_acc),
                        ("laundering_drop", mark.test_acc - test_acc),
                        ("wm_kept", wm_acc / max(mark.wm_acc, 1e-12))):  # fmt: skip
        out.measure(f"{prefix}{mark.label}.{name}", value)


def _attack(config, mark: _Marked, data, out, rows: dict, scratch: dict) -> None:
    """``mark`` laundered (DT/CT chosen, then fixed), its Neural Cleanse, scratch, baselines."""
    is_adi = mark.watermark in ADI
    fraction = config.adi_fraction if is_adi else config.zhang_fraction
    attack = config.adi_laundering if is_adi else config.zhang_laundering
    adversary, (rounds, curve) = (
        _sample(data, fraction, config.seed),
        _rounds(config, mark.watermark),
    )
    first = dataclasses.replace(attack, rounds=rounds)
    scores, facts, grid = _launder(mark, first, adversary, fraction, data, rows["curves"])
    rows["grid"] += [{"watermark": mark.label, **row} for row in grid]
    facts["scratch_test_acc"] = _scratch(config, mark.part, adversary, data, scratch)
    rows["table"].append(_row(OURS, mark, scores, fraction, **facts))
    _laundered(out, mark, scores)
    out.measure(f"{mark.label}.scratch_test_acc", facts["scratch_test_acc"])
    _detection(
        mark, detect(mark.model, adversary, Laundering(attack).detection_config(1)), out, rows
    )
    if is_adi:
        attacked = RetrainAllLayers(config.rtal).remove(mark.model, adversary).model
        scores = _scores(attacked, data, mark.key)
        rows["table"].append(_row("Adi et al. (RTAL)", mark, scores, fraction))
        return
    fixed = dataclasses.replace(attack, thresholds="fixed", rounds=1)
    scores, fixed_facts, _ = _launder(mark, fixed, adversary, fraction, data, None)
    rows["table"].append(_row(FIXED, mark, scores, fraction, **fixed_facts))
    _laundered(out, mark, scores, "fixed.")
    # Fig. 3's other data sizes, with the DT/CT the adversary chose at the Table 2 size
    fig3 = dataclasses.replace(
        fixed, rounds=config.curve_rounds, dense_threshold=facts["dt"], conv_threshold=facts["ct"]
    )
    for size in config.curve_fractions if curve else ():
        _launder(mark, fig3, _sample(data, size, config.seed), size, data, rows["curves"])
    _baselines(config, mark, data, adversary, out, rows)


def _detection(mark: _Marked, found, out, rows: dict) -> None:
    """Neural Cleanse's first round on ``mark`` (cached by the attack): per class, Fig. 8."""
    target, base = mark.key.metadata.get("target"), {"watermark": mark.label}
    rows["nc"] += [{**base, **r, "true_target": r["class"] == target} for r in found.per_class()]
    if target is not None:
        out.measure(f"{mark.label}.target_anomaly_index", found.anomaly_indices[target])
        out.measure(f"{mark.label}.target_flagged", int(target in found.flagged))
    if mark.watermark in ("content", *ADI):
        images = found.trigger_images()
        axes = np.indices(images.shape).reshape(4, -1)
        grid = dict(zip(("class", "row", "col", "channel"), axes, strict=True))
        rows["triggers"].append(pd.DataFrame({**base, **grid, "value": images.reshape(-1)}))


def _scratch(config, part: Part, adversary, data, done: dict) -> float:
    """The architecture trained from scratch on the adversary's data (section 7.4), once."""
    key = (part.model, len(adversary.y_train))
    if key not in done:
        models.seed_everything(config.seed)
        fresh = models.build(part.model, data.input_shape, data.num_classes)
        models.train(fresh, adversary, config.scratch_train, verbose=0)
        done[key] = round(classifier.accuracy(fresh, data.x_test, data.y_test), 4)
    return done[key]


def _baselines(config, mark: _Marked, data, adversary, out, rows: dict) -> None:
    """Zhang et al.'s pruning (fine-tuned on its own share) and Liu et al.'s fine-pruning."""
    share = _sample(data, config.pruning_fraction, config.seed)
    scores = _scores(
        MagnitudePruning(config.pruning).remove(mark.model, share).model, data, mark.key
    )
    method = f"Zhang et al. ({100 * config.pruning.rate:.0f}% pruning)"
    rows["table"].append(_row(method, mark, scores, config.pruning_fraction))
    out.measure(f"{mark.label}.pruning_wm_acc", scores[1])
    attacked = FinePruning(config.fine_pruning).remove(mark.model, adversary).model
    scores = _scores(attacked, data, mark.key)
    rows["table"].append(_row("Liu et al. (fine-pruning)", mark, scores, config.zhang_fraction))


def run(config: LaunderingRunConfig, out) -> None:
    """Mark, launder and compare; stage Table 2, the curves and the claims' measurements."""
    parts, data = (*config.zhang, *config.adi), {}
    for part in parts:
        if part.dataset not in data:
            data[part.dataset] = models.load(
                part.dataset, data_dir=config.data_dir, max_train=config.max_train,
                max_test=config.max_test, seed=config.seed,
            )  # fmt: skip
    fig5: list[dict] = []
    rows: dict[str, list] = {"table": [], "curves": [], "nc": [], "triggers": [], "grid": []}
    marks, scratch = [], {}
    for number, part in enumerate(parts):
        first = number in (0, len(config.zhang))  # the first part of each kind names the metrics
        marks += _marks(config, part, data[part.dataset], out, fig5, first)
    for mark in marks:
        _attack(config, mark, data[mark.part.dataset], out, rows, scratch)
    early, late = _round_gains(pd.DataFrame(rows["curves"]))
    out.measure("rounds.early_gain", early)
    out.measure("rounds.late_gain", late)
    out.table("table2", _with_published(pd.DataFrame(rows["table"]), out.published()))
    out.table("fig3_fig4_rounds", pd.DataFrame(rows["curves"]))
    out.table("fig5_vanilla", pd.DataFrame(fig5))
    out.table("neural_cleanse", pd.DataFrame(rows["nc"]))
    out.table("laundering_thresholds", pd.DataFrame(rows["grid"]))
    out.table("fig8_triggers", pd.concat(rows["triggers"], ignore_index=True))
    out.describe(
        dataset=config.zhang[0].dataset, zhang_model=config.zhang[0].model,
        adi_model=config.adi[0].model, zhang_fraction=_label(config.zhang_fraction),
        adi_fraction=_label(config.adi_fraction), pruning_fraction=_label(config.pruning_fraction),
        pruning_rate=f"{100 * config.pruning.rate:.0f}%", curve_rounds=config.curve_rounds,
    )  # fmt: skip
    out.section("Choices the paper leaves open", CHOICES)


def _with_published(table: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Table 2 with the paper's number beside each measured one (same method family, watermark)."""
    values = published[published["claim"] == "T2"].set_index("metric")["paper_value"]
    cifar = table["scheme"].isin(ADI) | table["model"].eq("zhang_cifar")  # the paper's datasets
    family = table["method"].map(
        {OURS: "laundering", FIXED: "laundering", "Adi et al. (RTAL)": "adi"}
    )
    family = family.fillna(table["method"].str.startswith("Zhang").map({True: "pruning"}))
    for column in ("original_test_acc", "laundered_test_acc", "original_wm_acc",
                   "laundered_wm_acc", "vanilla_wm_acc", "retraining_size"):  # fmt: skip
        names = "table2." + family + "." + np.where(cifar, "cifar10", "mnist") + "."
        table[f"paper_{column}"] = pd.to_numeric(
            (names + table["scheme"] + f".{column}").map(values), errors="coerce"
        )
    return table


def _round_gains(curves: pd.DataFrame) -> tuple[float | None, float | None]:
    """Mean watermark-accuracy reduction per round over rounds 1-3 and after round 3."""
    early, late = [], []
    for _, curve in curves.groupby(["model", "watermark", "retraining_size"]):
        acc = curve.sort_values("round").set_index("round")["wm_acc"]
        if 3 in acc.index and acc.index.max() > 3:
            early.append((acc.loc[0] - acc.loc[3]) / 3)
            late.append((acc.loc[3] - acc.iloc[-1]) / (acc.index.max() - 3))
    return (float(np.mean(early)), float(np.mean(late))) if late else (None, None)
