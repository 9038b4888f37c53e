"""``python -m reproduce laundering``: Aiken et al.'s Table 2 and Figures 3, 4, 5 and 8.

Paper: Aiken, Kim, Woo, "Neural Network Laundering: Removing Black-Box
Backdoor Watermarks from Deep Neural Networks", Computers & Security 2021.
The run marks models with the library's Zhang et al. (content, noise,
unrelated) and Adi et al. (FS; PT into the vanilla model) schemes, whose
keys come back calibrated on the clean twin (its per-epoch curve is Fig. 5),
launders them (one round for Table 2, several for Figs. 3 and 4; DT and CT
chosen by the adversary from its own data, the preset's earlier fixed
values as a variant row) and compares with Zhang et al.'s 90% pruning,
fine-pruning and Adi et al.'s RTAL. Table 2's published values and the
claims are data in ``published/laundering.csv``. The attacker never reads a
key: keys only score the models (hooks).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import models
from attacks.finetune import FineTuneConfig, RetrainAllLayers
from attacks.laundering import Laundering, LaunderingConfig
from attacks.neural_cleanse import NeuralCleanseConfig, detect
from attacks.pruning import FinePruning, FinePruningConfig, MagnitudePruning, PruningConfig
from models import classifier
from models.training import Hook, TrainConfig
from reproduce.report import save_figure
from reproduce.zoo import dataset_size, recipe
from watermarks.backdoor import AdiAbstract, AdiConfig, ZhangContent, ZhangNoise, ZhangUnrelated
from watermarks.backdoor import vanilla as clean_twin
from watermarks.base import EmbeddingFailed

log = logging.getLogger(__name__)

TITLE = "Aiken et al. 2021, Neural Network Laundering (Table 2, Figs. 3, 4, 5, 8)"
ZHANG = {"content": ZhangContent, "noise": ZhangNoise, "unrelated": ZhangUnrelated}
ADI = ("adi_fs", "adi_pt")
PER_CLASS = "1/class"
OURS, FIXED = "Ours (laundering)", "Ours (laundering, fixed DT/CT)"
PRESET_NOTES = {
    "smoke": "600 Fashion-MNIST images, two epochs, 3 Neural Cleanse epochs, Adi et al. on the "
    "zoo's tiny CNN: checks the pipeline end to end; the claims are not expected to hold.",
    "quick": "Fashion-MNIST instead of MNIST and CIFAR-10. Zhang et al. on the Table 5 network "
    "(the zoo's quick recipe); Adi et al. on a ResNet20v1 trained 6 epochs (FS, k = 8 trigger "
    "images per batch of 128: k = 2 left them unlearned in 6 epochs) and fine-tuned 4 from the "
    "vanilla model (PT, Adam 5e-4, step schedule, k = 16). Neural Cleanse capped at 60 epochs of "
    "11 x 32 images (Table 5 network) and 10 of 10 x 16 (ResNet; the original: 1000). Fig. 3: 4 "
    "rounds (paper: 10) of the content watermark at 0.6% only; Fig. 4: one round at 10.8%. The "
    "unrelated watermark uses scikit-learn digits (offline) instead of MNIST/EMNIST.",
    "paper": "MNIST with the Table 5 network and CIFAR-10 with the Table 7 network for Zhang et "
    "al., ResNet20v1 on CIFAR-10 for Adi et al. (the zoo's paper recipes), Neural Cleanse's 1000 "
    "epochs, 10 rounds at 10.8%, 6%, 0.6% and 1 image per class (Fig. 3) and at 10.8% (Fig. 4).",
}
CHOICES = """\
- DT and CT (Algorithm 1; the paper gives none) are the adversary's (`thresholds="auto"`): it holds
  out 25% of its set, launders the rest once per candidate reset (the top 30/20/10/5/2% of units by
  activation difference) and keeps the largest whose held-out accuracy drops by at most 3 points
  (laundering_thresholds.csv). The fixed rows use the preset's earlier values (quick: 0.4/0.25,
  chosen with the owner's key; else the attack's 0.5/0.1). The quick ResNet keeps 0.5/0.1 on its
  second half (no key chose them; a grid costs five ResNet retrainings). Fig. 3's other sizes
  reuse the Table 2 choice (one image per class leaves nothing to hold out).
- Activations are read after a unit's batch normalisation and ReLU; reset units stay at zero
  through retraining (Adam 1e-4 on the clean images, the suspect's reversed trigger on them with
  true labels, and the masks labelled as the least-likely class).
- The suspect class is Neural Cleanse's most anomalous below the median, flagged or not.
- Zhang et al.'s pruning fine-tunes on 16.6% of the training set (Table 2); fine-pruning and
  RTAL use the laundering adversary's data.
"""


@dataclass(frozen=True)
class Part:
    """One architecture on one dataset; ``train`` is its vanilla (and marking) recipe."""

    dataset: str
    model: str
    train: TrainConfig


@dataclass(frozen=True)
class LaunderingRunConfig:
    """One run: parts, the units' configs, and the paper's data sizes (Table 2, section 6)."""

    preset: str
    seed: int
    cache: bool
    data_dir: str | None
    zhang: tuple[Part, ...]
    adi: tuple[Part, ...]
    adi_fs: AdiConfig
    adi_pt: AdiConfig
    zhang_laundering: LaunderingConfig
    adi_laundering: LaunderingConfig
    pruning: PruningConfig
    fine_pruning: FinePruningConfig
    rtal: FineTuneConfig
    scratch_train: TrainConfig
    curve_rounds: int
    adi_curve_rounds: int = 1
    zhang_n: int | None = None  # watermark images (None: the scheme's preset)
    curve_watermarks: tuple[str, ...] = ("content",)
    curve_fractions: tuple[float | str, ...] = ()  # Fig. 3's sizes beside the Table 2 one
    max_train: int | None = None
    max_test: int | None = None
    zhang_fraction: float = 0.006
    adi_fraction: float = 0.108
    pruning_fraction: float = 0.166


def make_config(preset, *, dataset=None, data_dir=None, seed=0, cache=True) -> LaunderingRunConfig:
    """Resolve a preset into the run's configuration; the run's seed seeds every unit."""
    models.check_dataset(dataset)
    builders = {"smoke": _smoke, "quick": _quick, "paper": _paper}
    if preset not in builders:
        raise models.UnknownNameError("preset", preset, tuple(builders))
    config = builders[preset](dataset)
    data_dir = None if data_dir is None else str(data_dir)
    return _seeded(dataclasses.replace(config, cache=cache, data_dir=data_dir), seed)


def _units(preset: str) -> dict:
    """The library units the run shares with their own presets."""
    return dict(
        preset=preset,
        seed=0,
        cache=True,
        data_dir=None,
        zhang_laundering=Laundering.preset_config(preset, thresholds="auto"),
        pruning=MagnitudePruning.preset_config(preset),
        fine_pruning=FinePruning.preset_config(preset),
        rtal=RetrainAllLayers.preset_config(preset),
    )


def _quick(dataset: str | None) -> LaunderingRunConfig:
    name = dataset or "fashion_mnist"
    # the zoo's quick ResNet20v1 trains 8 epochs; L1 and L5 were measured at these 6
    adi_train = TrainConfig.cae(epochs=6, early_stopping_patience=3)
    fs = AdiAbstract.preset_config("quick", train=adi_train)
    pt_train = TrainConfig(epochs=4, learning_rate=5e-4, lr_schedule="step")
    return LaunderingRunConfig(
        **_units("quick"),
        zhang=(Part(name, "zhang_mnist", recipe("quick", "zhang_mnist", name)),),
        adi=(Part(name, "resnet20v1", adi_train),),
        adi_fs=fs,
        adi_pt=dataclasses.replace(fs, mode="pt", k=16, train=pt_train, null_train=adi_train),
        adi_laundering=LaunderingConfig(
            retrain_epochs=5,
            retrain_batch_size=64,
            reset_scope="second_half",
            neural_cleanse=NeuralCleanseConfig(steps=10, mini_batches=10, batch_size=16),
        ),
        scratch_train=TrainConfig.cae(epochs=60, early_stopping_patience=10),
        curve_rounds=4,
    )


def _smoke(dataset: str | None) -> LaunderingRunConfig:
    name, train = dataset or "fashion_mnist", TrainConfig(epochs=2, batch_size=64)
    fs = AdiConfig(k=2, train=train)
    short = dataclasses.replace(train, epochs=1)
    auto = Laundering.preset_config("smoke", thresholds="auto", reset_scope="second_half")
    return LaunderingRunConfig(
        **_units("smoke"),
        zhang=(Part(name, "zhang_mnist", train),),
        adi=(Part(name, "_tiny_cnn", train),),
        adi_fs=fs,
        adi_pt=dataclasses.replace(fs, mode="pt", train=short, null_train=train),
        adi_laundering=auto,
        scratch_train=train,
        curve_rounds=2,
        zhang_n=60,
        curve_fractions=(PER_CLASS,),
        max_train=600,
        max_test=200,
        zhang_fraction=0.1,  # 60 images, 15 held out: at least one per class
        adi_fraction=0.1,
        pruning_fraction=0.1,
    )


def _paper(dataset: str | None) -> LaunderingRunConfig:
    mnist, cifar = dataset or "mnist", dataset or "cifar10"
    adi_train = recipe("paper", "resnet20v1", cifar)
    fs = AdiAbstract.preset_config("paper", train=adi_train)
    pt_train = TrainConfig(epochs=20, batch_size=64, learning_rate=1e-4)
    auto = Laundering.preset_config("paper", thresholds="auto", reset_scope="second_half")
    return LaunderingRunConfig(
        **_units("paper"),
        zhang=(
            Part(mnist, "zhang_mnist", recipe("paper", "zhang_mnist", mnist)),
            Part(cifar, "zhang_cifar", recipe("paper", "zhang_cifar", cifar)),
        ),
        adi=(Part(cifar, "resnet20v1", adi_train),),
        adi_fs=fs,
        adi_pt=dataclasses.replace(fs, mode="pt", train=pt_train, null_train=adi_train),
        adi_laundering=auto,
        scratch_train=TrainConfig.cae(epochs=100),
        curve_rounds=10,
        adi_curve_rounds=10,
        curve_watermarks=tuple(ZHANG),
        curve_fractions=(0.108, 0.06, PER_CLASS),
    )


def _seeded(value, seed: int):
    """``value`` with the ``seed`` of it and of every config inside it set to ``seed``."""
    if isinstance(value, tuple):
        return tuple(_seeded(item, seed) for item in value)
    if not dataclasses.is_dataclass(value):
        return value
    changes = {f.name: _seeded(getattr(value, f.name), seed) for f in dataclasses.fields(value)}
    if "seed" in changes:
        changes["seed"] = seed
    return dataclasses.replace(value, **changes)


def plan(config: LaunderingRunConfig) -> list[dict]:
    """Every training and loop of the preset (see :mod:`reproduce.plan`)."""
    from reproduce.plan import train_row

    rows = []
    for part in (*config.zhang, *config.adi):
        is_adi = part in config.adi
        images, shape, classes = dataset_size(part.dataset)
        images = min(images, config.max_train or images)
        adversary = round(images * (config.adi_fraction if is_adi else config.zhang_fraction))
        attack = config.adi_laundering if is_adi else config.zhang_laundering
        grid = len(attack.reset_shares) if attack.thresholds == "auto" else 0
        names = ADI if is_adi else tuple(ZHANG)
        rounds = [_rounds(config, name)[0] + _rounds(config, name)[1] for name in names]
        marks, epochs, arch = len(names), part.train.epochs, (part.model, shape, classes)
        retrain = sum(rounds) + marks * grid + (0 if is_adi else marks)  # the fixed variant
        rows += [
            train_row("clean twin (vanilla, Fig. 5)", *arch, images, epochs),
            train_row("marked models", *arch, images, epochs, count=marks),
            train_row("laundering retraining", *arch, 2 * adversary, attack.retrain_epochs,
                      count=retrain),
            {"kind": "loop", "what": f"Neural Cleanse ({part.model})",
             "steps": attack.neural_cleanse.steps, "count": sum(rounds) + marks * (grid > 0)},
            train_row("from scratch on the adversary's data", *arch, adversary,
                      config.scratch_train.epochs),
        ]  # fmt: skip
        if is_adi:
            rows.append(train_row("RTAL", *arch, adversary, config.rtal.epochs, count=marks))
            rows.append(train_row("PT fine-tuning", *arch, images, config.adi_pt.train.epochs))
            continue
        pruned, fine = round(images * config.pruning_fraction), config.pruning.fine_tune.epochs
        rows.append(train_row("90% pruning", *arch, pruned, fine, count=marks))
        fine = config.fine_pruning.fine_tune.epochs
        rows.append(train_row("fine-pruning", *arch, adversary, fine, count=marks))
    return rows


def _rounds(config: LaunderingRunConfig, watermark: str) -> tuple[int, int]:
    """Laundering rounds of ``watermark`` at the Table 2 size, and at Fig. 3's other sizes."""
    if watermark in ADI:
        return config.adi_curve_rounds, 0
    if watermark in config.curve_watermarks:
        return config.curve_rounds, config.curve_rounds * len(config.curve_fractions)
    return 1, 0


# --------------------------------------------------------------------------- the run


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


# --------------------------------------------------------------------------- figures


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
