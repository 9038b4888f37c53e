"""The fragile run: ``run`` trains the zoo's classifiers, makes every trigger set, checks
them after a round trip, attacks them with malicious fine-tuning and stages Tables 2-4,
Fig. 2's curves, the CIFAR-100 row and the claims' measurements.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pandas as pd

import models
from attacks.malicious import MaliciousFineTune
from models import classifier
from models.config import replace
from models.io import array_digest
from models.training import Hook
from reproduce.fragile.config import (
    _THRESHOLD,
    GENERATORS,
    PAPER_CLASSIFIERS,
    Classifier,
    FragileRunConfig,
)
from reproduce.report import Run
from watermarks.base import Key
from watermarks.fragile import FragileFineTune, FragileTrigger, fragility_check


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
