"""``python -m reproduce fragile``: Yin et al. 2022, fragile watermarking with no performance degradation.

Z. Yin, H. Yin, X. Zhang, "Neural network fragile watermarking with no model
performance degradation", ICIP 2022, as a thin script over the library:
:class:`~watermarks.fragile.FragileTrigger` makes the trigger sets (``trigger_set``
also gives the unfit G_var of Table 3), :class:`~watermarks.fragile.FragileFineTune`
is Table 2's fine-tuning embedding ([14]-style), :func:`~watermarks.fragile.fragility_check`
the no-false-alarm check and :class:`~attacks.malicious.MaliciousFineTune` the section
4.2 adversary, followed by an AccTri :class:`~models.training.Hook` per key. The
classifiers are the zoo's base models (:func:`reproduce.zoo.recipe`, trained once for
every paper). Writes table2-4, table4_curves, fig2 (csv and png), verification,
attacks, cifar100 (paper preset) and claims F1-F8 (thresholds: ``published/fragile.csv``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import models
from attacks.malicious import MaliciousConfig, MaliciousFineTune
from models import classifier
from models.config import replace
from models.io import array_digest
from models.training import Hook, TrainConfig
from reproduce import zoo
from reproduce.report import Run, save_figure
from watermarks.base import Key
from watermarks.fragile import (
    FragileConfig,
    FragileFineTune,
    FragileFineTuneConfig,
    FragileTrigger,
    fragility_check,
)

TITLE = "Neural network fragile watermarking with no model performance degradation (Yin et al., ICIP 2022)"
PRESETS = ("smoke", "quick", "paper")
GENERATORS = {"non": "G_non", "cla": "G_cla", "full": "G_full", "var": "G_var"}
PAPER_CLASSIFIERS = ("resnet18", "resnet50", "resnet101", "resnet152")
_CLASSIFIERS = {"smoke": ("lenet5",), "quick": ("resnet20v1", "lenet5"), "paper": PAPER_CLASSIFIERS}
_DATASET = {"smoke": "fashion_mnist", "quick": "fashion_mnist", "paper": "cifar10"}
_CLEAN_IMAGES = {"smoke": 300, "quick": 5000, "paper": None}
_SWEEP = {"smoke": (1.0, 200.0, 800.0)}
_PAPER_SWEEP = (1.0, 100.0, 200.0, 400.0, 800.0)
_THRESHOLD = 1.0  # AccTri of an intact model (FragileConfig.threshold)

PRESET_NOTES = {
    "smoke": "512 Fashion-MNIST images, the zoo's LeNet5 after one epoch; the units' smoke presets "
    "(30 triggers, 40 generator steps, one fine-tuning epoch on 300 images plus 40 BIM images): "
    "checks the pipeline end to end, not the claims.",
    "quick": "Fashion-MNIST (28x28x1) instead of CIFAR-10; the zoo's quick ResNet20v1 (the CAE "
    "recipe, up to 8 epochs with early stopping, shared with `reproduce models`) instead of "
    "ResNet18, and the zoo's quick LeNet5 as the second classifier of Table 4 instead of "
    "ResNet50/101/152; the small convolutional generator (width 64) instead of PGAN, 60 steps "
    "(Adam 1e-3, the Var weight ramped up over the first 30) instead of 300; malicious fine-tuning "
    "for 5 epochs instead of 60, on 5,000 clean training images (a stratified subset) plus 1,000 "
    "BIM-made backdoor images instead of the whole training set; the fine-tuning embedding of "
    "Table 2 on the same 5,000 images; no CIFAR-100 experiment.",
    "paper": "The paper's setting as far as it is given: CIFAR-10 with ResNet18 (Fig. 2, Tables 2 "
    "and 3) and ResNet18/50/101/152 (Table 4), CIFAR-100 with ResNet18 and a = 4000; the "
    "progressive-growing generator trained for 300 epochs; n = 100; 60 fine-tuning epochs on the "
    "whole training set plus 1,000 BIM-made images. The classifiers are trained with the zoo's "
    "paper recipe (the paper gives none).",
}


@dataclass(frozen=True)
class Classifier:
    """One classifier of the experiments and its training recipe (the zoo's)."""

    model: str
    train: TrainConfig


@dataclass(frozen=True)
class FragileRunConfig:
    """Everything one reproduction does: the first classifier is Fig. 2's and Tables 2-3's.

    ``trigger`` is G_full's config (the other generators and Table 4's sweep
    change ``variant`` and ``a``), ``baseline`` Table 2's fine-tuning
    embedding, ``attack`` the adversary (``layers`` set per experiment),
    ``clean_images`` the adversary's clean images (None: the whole split).
    """

    preset: str
    dataset: str
    classifiers: tuple[Classifier, ...]
    max_train: int | None
    max_test: int | None
    clean_images: int | None
    trigger: FragileConfig
    a_sweep: tuple[float, ...]
    baseline: FragileFineTuneConfig
    attack: MaliciousConfig
    cifar100: Classifier | None
    cifar100_a: float
    seed: int
    data_dir: str | None = None

    @property
    def main(self) -> str:
        return self.classifiers[0].model

    def generator(self, variant: str, a: float | None = None) -> FragileConfig:
        return replace(self.trigger, variant=variant, a=float(self.trigger.a if a is None else a))


def make_config(
    preset: str, *, dataset: str | None = None, data_dir=None, seed: int = 0, cache: bool = True
) -> FragileRunConfig:
    """Resolve a preset (see :data:`PRESET_NOTES`); caching is the runner's switch (``cache``)."""
    models.check_dataset(dataset)
    if preset not in PRESETS:
        raise models.UnknownNameError("preset", preset, PRESETS)
    name = dataset or _DATASET[preset]

    def entry(model: str, data: str) -> Classifier:
        return Classifier(model, dataclasses.replace(zoo.recipe(preset, model, data), seed=seed))

    trigger = FragileTrigger.preset_config(preset, seed=seed)
    # the baseline draws G_non's triggers: the same untrained generator, noise and seed
    baseline = {"n": trigger.n, "generator": trigger.generator, "width": trigger.width}
    smoke = preset == "smoke"
    return FragileRunConfig(
        preset=preset,
        dataset=name,
        classifiers=tuple(entry(m, name) for m in _CLASSIFIERS[preset]),
        max_train=512 if smoke else None,  # the zoo's smoke slice, so the same base model
        max_test=256 if smoke else None,
        clean_images=_CLEAN_IMAGES[preset],
        trigger=trigger,
        a_sweep=_SWEEP.get(preset, _PAPER_SWEEP),
        baseline=FragileFineTune.preset_config(preset, seed=seed, **baseline),
        attack=MaliciousFineTune.preset_config(preset, seed=seed),
        cifar100=entry("resnet18", "cifar100") if preset == "paper" else None,
        cifar100_a=4000.0,
        seed=seed,
        data_dir=str(data_dir) if data_dir else None,
    )


def plan(config: FragileRunConfig) -> list[dict]:
    """The trainings and loops of the preset (:mod:`reproduce.plan`); "up to": may stop early."""
    from reproduce.plan import train_row

    rows, attack = [], config.attack
    runs = [(config.dataset, config.classifiers, len(config.a_sweep) * len(config.classifiers))]
    if config.cifar100 is not None:
        runs.append(("cifar100", (config.cifar100,), 1))
    for dataset, entries, generators in runs:
        images, shape, classes = zoo.dataset_size(dataset)
        images = min(images, config.max_train or images)
        clean = min(images, config.clean_images or images)
        attacked, last = clean + attack.backdoor_images, "malicious fine-tuning, last layer"
        tasks = [("classifier", c.model, images, c.train.epochs) for c in entries]
        tasks += [(last, c.model, attacked, attack.epochs) for c in entries]
        if dataset == config.dataset:  # Table 2's baseline, Fig. 2a; generators G_cla and G_var
            base = config.baseline
            embedded = clean + base.repeats * base.n
            tasks.append(
                ("fine-tuning embedding [14], up to", config.main, embedded, base.max_epochs)
            )
            tasks.append(
                ("malicious fine-tuning, all layers", config.main, attacked, attack.epochs)
            )
            generators += 2
        rows += [train_row(what, m, shape, classes, n, epochs) for what, m, n, epochs in tasks]
        steps = config.trigger.max_epochs
        rows.append(_loop(f"generator steps ({dataset}), up to", steps, generators))
        rows.append(_loop(f"BIM iterations ({dataset})", attack.max_iter, len(entries)))
    return rows


def _loop(what: str, steps: int, count: int) -> dict:
    return {"kind": "loop", "what": what, "steps": steps, "count": count}


# --------------------------------------------------------------------------- the run


def run(config: FragileRunConfig, out: Run) -> None:
    """Run every experiment of the preset; stage the tables, measurements and descriptions."""
    load = {"data_dir": config.data_dir, "max_train": config.max_train, "seed": config.seed}
    data = models.load(config.dataset, max_test=config.max_test, **load)
    data100 = None  # loaded first: a missing dataset stops the run before any training
    if config.cifar100 is not None:
        data100 = models.load("cifar100", max_test=config.max_test, **load)
    trained = {c.model: _classifier(c, data) for c in config.classifiers}
    main = trained[config.main]
    before = classifier.digest(main, 64), classifier.accuracy(main, data.x_test, data.y_test)
    keys = {name: _keys(config, main, data, v) for v, name in GENERATORS.items()}
    sweeps = {name: {} for name in trained}
    for name, model in trained.items():
        for a in config.a_sweep:
            shared = _set_name(config, name, a) == "G_full"
            sweeps[name][a] = keys["G_full"] if shared else _keys(config, model, data, "full", a)
    checks = _checks(config, trained, keys, sweeps)
    out.table("verification", checks)
    adversary = _adversary(data, config.clean_images, config.seed)
    _table2(out, config, main, data, adversary, before, checks)
    _table3(out, config, keys, checks)
    fig2, last = _fig2(out, config, trained, data, adversary, keys, sweeps, checks)
    _table4(out, config, last, checks)
    if data100 is not None:
        _cifar100(out, config, data100)
    _measure(out, config, checks, fig2)


def _classifier(entry: Classifier, data):
    """The zoo's base model, built and trained exactly as ``reproduce models`` does (cached)."""
    models.seed_everything(entry.train.seed)
    model = models.build(entry.model, data.input_shape, data.num_classes)
    models.train(model, data, entry.train, verbose=0)
    return model


def _keys(config, model, data, variant: str, a: float | None = None) -> Key:
    """A trigger set, fit for verification or not (Table 3 and Fig. 2 show the unfit G_var)."""
    return FragileTrigger(config.generator(variant, a)).trigger_set(model, data)


def _set_name(config, name: str, a: float) -> str:
    return "G_full" if name == config.main and a == config.trigger.a else f"G_full a={a:g}"


def _checks(config, trained, keys, sweeps) -> pd.DataFrame:
    """F7: every trigger set after a .keras round trip, at batch sizes 1 and n, repeated."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fragile-roundtrip-") as folder:
        for name, model in trained.items():
            named = dict(keys) if name == config.main else {}
            named.update({_set_name(config, name, a): k for a, k in sweeps[name].items()})
            for set_name, row in fragility_check(model, named, folder).items():
                rows.append({"classifier": name, "trigger_set": set_name, **row})
    return pd.DataFrame(rows)


def _adversary(data, clean_images: int | None, seed: int):
    """The adversary's (and the fine-tuning embedding's) clean images: a stratified subset."""
    if clean_images is None or clean_images >= len(data.y_train):
        return data
    return data.subset(max_train=clean_images, seed=seed)


def _check(checks: pd.DataFrame, name: str, trigger_set: str, column: str = "acctri"):
    row = checks[(checks["classifier"] == name) & (checks["trigger_set"] == trigger_set)]
    return row[column].iloc[0]


def _paper(out: Run, claim: str, metric: str) -> str:
    try:
        return out.paper_value(claim, metric)
    except KeyError:
        return ""


def _table2(out, config, main, data, adversary, before: tuple[str, float], checks) -> None:
    """Table 2: the original (``before``: digest, accuracy), the fine-tuning embedding, ours."""
    digest, original = before
    identical = classifier.digest(main, 64) == digest  # after every trigger set was made
    ours = original if identical else classifier.accuracy(main, data.x_test, data.y_test)
    scheme = FragileFineTune(config.baseline)
    marked = scheme.mark(main, adversary)  # mark, not embed: its AccTri is measured, not assumed
    baseline = classifier.accuracy(marked.model, data.x_test, data.y_test)
    acctri, epochs = scheme.verify(marked.model, marked.key).statistic, marked.key.metadata
    table = pd.DataFrame(
        {
            "model": ["Original Model", "Watermarked Model[14]", "Watermarked Model(ours)"],
            "how": [config.main, "fine-tuning embedding ([14]-style)", "generator (G_full)"],
            "accuracy": [original, baseline, ours],
            "difference": [np.nan, baseline - original, ours - original],
            "weights_identical": [np.nan, classifier.digest(marked.model, 64) == digest, identical],
            "trigger_accuracy": [np.nan, acctri, _check(checks, config.main, "G_full")],
            "epochs": [np.nan, epochs["epochs_run"], 0],
        }
    )
    for column in ("accuracy", "difference"):
        table[f"published_{column}"] = [_paper(out, "table2", f"{m}.{column}") for m in table.model]
    out.table("table2", table)
    out.measure("weights_identical", identical)
    out.measure("ours_accuracy_change", ours - original)
    out.measure("baseline_acctri", acctri)
    out.measure("accuracy_advantage", ours - baseline)
    lr, repeats = f"{config.baseline.learning_rate:g}", config.baseline.repeats
    out.describe(main=config.main, n=config.trigger.n, a=f"{config.trigger.a:g}", baseline_lr=lr)
    out.describe(
        baseline_epochs=epochs["epochs_run"], clean=len(adversary.y_train), repeats=repeats
    )


def _table3(out, config, keys, checks) -> None:
    """Table 3: one trigger (a seeded draw) per generator, its softmax, and each set's summary."""
    rng = np.random.default_rng([config.seed, 3])
    rows = []
    for name, key in keys.items():
        probabilities = key.arrays["probabilities"]
        pick = int(rng.integers(len(probabilities)))
        row = {"generator": name, "trigger": pick}
        row.update({str(c): float(p) for c, p in enumerate(probabilities[pick])})
        row["mean_max_softmax"] = float(probabilities.max(axis=1).mean())
        row["min_logit_gap"] = float(key.metadata["min_margin"])
        row["fit_for_verification"] = _check(checks, config.main, name, "fit_for_verification")
        paper = [(c, _paper(out, "table3", f"{name}.{c}")) for c in range(probabilities.shape[1])]
        row["published"] = " ".join(f"{c}:{v}" for c, v in paper if v)
        rows.append(row)
        out.measure(f"mean_max_softmax.{name}", row["mean_max_softmax"])
    out.table("table3", pd.DataFrame(rows))


def _attack(model, data, adversary, keys: dict[str, Key], config, layers: str):
    """Malicious fine-tuning of a copy of ``model``: AccTri per epoch of every key, what it did."""
    hooks = {}
    for name, k in keys.items():
        acctri = lambda m, k=k: classifier.accuracy(m, k.inputs, k.labels)  # noqa: E731
        hooks[name] = Hook(f"acctri/{name}:{array_digest(k.inputs, k.labels)}", acctri)
    attack = MaliciousFineTune(replace(config.attack, layers=layers))
    removal = attack.remove(model, adversary, hooks=list(hooks.values()))
    info = removal.info
    curves = {name: [float(v) for v in info["curves"][h.name]] for name, h in hooks.items()}
    row = {"classifier": model.name, "layers": layers, "backdoor_success": info["backdoor_success"]}
    row["optimizer"] = f"{info['optimizer']} {info['learning_rate']:g}"
    row["trained_layers"] = " ".join(info["trained_layers"])
    row["test_accuracy"] = classifier.accuracy(removal.model, data.x_test, data.y_test)
    return curves, row


def _fig2(out, config, trained, data, adversary, keys, sweeps, checks):
    """Fig. 2 (all layers, last layer) and the last-layer curves of every Table 4 set."""
    curves_all, row = _attack(trained[config.main], data, adversary, keys, config, "all")
    rows, last = [row], {}
    for name, model in trained.items():
        named = dict(keys) if name == config.main else {}
        named.update({f"a={a:g}": k for a, k in sweeps[name].items()})
        last[name], row = _attack(model, data, adversary, named, config, "last")
        rows.append(row)
    out.table("attacks", pd.DataFrame(rows))
    start = {name: float(_check(checks, config.main, name)) for name in keys}  # as checked (F7)
    fig2 = []
    for layers, curves in (("all", curves_all), ("last", last[config.main])):
        fig2.append({"layers": layers, "epoch": 0, **start})
        for epoch in range(len(curves["G_full"])):
            values = {name: curves[name][epoch] for name in keys}
            fig2.append({"layers": layers, "epoch": epoch + 1, **values})
    fig2 = pd.DataFrame(fig2)
    out.table("fig2", fig2)
    return fig2, last


def _table4(out, config, last, checks) -> None:
    """Table 4: mean AccTri over the last-layer fine-tuning, per a and classifier."""
    rows, curves = [], []
    for a in config.a_sweep:
        row = {"a": a}
        for name, by_key in last.items():
            curve = by_key[f"a={a:g}"]
            drops = [e for e, v in enumerate(curve, start=1) if v < _THRESHOLD]
            row[f"{name}_mean"] = float(np.mean(curve))
            row[f"{name}_first_drop_epoch"] = drops[0] if drops else np.nan
            set_name = _set_name(config, name, a)
            row[f"{name}_fit"] = _check(checks, name, set_name, "fit_for_verification")
            curves += [(name, a, e, v) for e, v in enumerate(curve, start=1)]
        row.update({f"paper_{p}": _paper(out, "table4", f"{p}.a={a:g}") for p in PAPER_CLASSIFIERS})
        rows.append(row)
    table = pd.DataFrame(rows)
    out.table("table4", table)
    out.table("table4_curves", pd.DataFrame(curves, columns=["classifier", "a", "epoch", "acctri"]))
    for name in last:
        means = table[f"{name}_mean"].to_numpy(dtype=float)
        out.measure(f"table4.{name}.mean_a_low", means[0])
        out.measure(f"table4.{name}.max_rise", float(np.max(np.diff(means), initial=0.0)))
        out.measure(f"table4.{name}.mean_a_high", means[-1])
    sweep = ", ".join(f"{a:g}" for a in config.a_sweep)
    out.describe(a_low=f"{config.a_sweep[0]:g}", a_high=f"{config.a_sweep[-1]:g}", a_sweep=sweep)


def _cifar100(out, config, data100) -> None:
    """Section 4.3: ResNet18 on CIFAR-100, a = 4000, last-layer fine-tuning."""
    model = _classifier(config.cifar100, data100)
    key = FragileTrigger(config.generator("full", config.cifar100_a)).trigger_set(model, data100)
    adversary = _adversary(data100, config.clean_images, config.seed)
    curves, after = _attack(model, data100, adversary, {"a": key}, config, "last")
    curve = curves["a"]
    row = {"classifier": config.cifar100.model, "a": config.cifar100_a}
    row["test_accuracy"] = classifier.accuracy(model, data100.x_test, data100.y_test)
    row["acctri_unmodified"] = float(np.mean(key.arrays["probabilities"].argmax(1) == key.labels))
    row.update(
        max_acctri=max(curve), mean_acctri=float(np.mean(curve)), first_epoch_acctri=curve[0]
    )
    for metric in ("max_acctri", "mean_acctri"):
        row[f"published_{metric}"] = _paper(out, "cifar100", f"resnet18.{metric}")
    row.update({f"after_{k}": v for k, v in after.items() if k not in ("classifier", "layers")})
    out.table("cifar100", pd.DataFrame([row]))
    out.measure("cifar100.first_epoch_acctri", curve[0])


def _measure(out, config, checks, fig2) -> None:
    """F1, F4, F5 and F7 from the verification checks and Fig. 2 (all layers)."""
    for name in ("G_cla", "G_full"):
        out.measure(f"acctri_unmodified.{name}", float(_check(checks, config.main, name)))
    curves = fig2[(fig2["layers"] == "all") & (fig2["epoch"] >= 1)]
    out.measure("fig2a.G_full.epoch1", float(curves["G_full"].iloc[0]))
    means = {name: float(curves[name].mean()) for name in GENERATORS.values()}
    for other in ("G_non", "G_cla"):
        out.measure(f"fig2a.mean_gap.{other}", means[other] - means["G_full"])
    # the sets a verdict rests on: F1, F4, F5 (G_non, G_cla, G_full) and F6 (the sweeps)
    needed = {(config.main, g) for g in ("G_non", "G_cla", "G_full")}
    for c in config.classifiers:
        needed |= {(c.model, _set_name(config, c.model, a)) for a in config.a_sweep}
    fit = checks["fit_for_verification"].astype(bool)
    sets = [f"{c} {s}" for c, s in zip(checks.classifier, checks.trigger_set, strict=True)]
    unfit = [f"{c} {s}" for c, s in sorted(needed) if f"{c} {s}" not in set(np.array(sets)[fit])]
    out.measure("unfit_sets_in_verdicts", len(unfit))
    shown = ", ".join(np.array(sets)[~fit]) or "none"
    out.describe(checked=len(checks), fit=int(fit.sum()), unfit=", ".join(unfit) or "none")
    out.describe(shown_unfit=shown, epochs=config.attack.epochs)
    text = ", ".join(f"{g} {v:.4f}" for g, v in means.items())
    out.section("Fig. 2a: mean AccTri over the fine-tuning epochs", text)


# --------------------------------------------------------------------------- figures


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
