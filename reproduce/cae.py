"""``python -m reproduce cae``: fingerprinting by conferrable adversarial examples, and ART's attacks.

Reproduces F. A. Uckun's replication report (KTH, 2023) of Lucas, Zhang and
Kerschbaum, "Deep Neural Network Fingerprinting by Conferrable Adversarial
Examples" (ICLR 2021): a source model, surrogate and reference families
(:mod:`fingerprints.families`), conferrable adversarial examples generated
with model dropout and filtered (:mod:`fingerprints.cae`), their CAEAcc on
unseen surrogates and references (Table "CAEAcc", Figures 2 and 4), and the
comparison with ART's FGSM, BIM, PGD and Carlini-Wagner by conferrability on
unseen models (:mod:`fingerprints.compare`, Figure 3). The report's numbers
are data in ``published/cae.csv``.

Outputs: ``table_caeacc.csv`` (measured CAEAcc of the unseen models per
dataset and architecture, the report's beside), ``table_models.csv`` (every
model: role, split, test accuracy, CAEAcc; Figure 4), ``table_fig2.csv``
(fingerprint labels by original label), ``table_fig3.csv`` (conferrability
per method and eps), ``claims.csv`` and ``REPORT.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import models
from fingerprints.cae import CAE, CaeConfig, caeacc
from fingerprints.compare import ATTACKS, compare
from fingerprints.families import (
    FamilyConfig,
    build_families,
    describe,
    input_range,
    pick_candidates,
)
from models.errors import UnknownNameError
from models.training import TrainConfig
from reproduce.report import Run, save_figure

log = logging.getLogger(__name__)

TITLE = (
    "Fingerprinting by conferrable adversarial examples (Lucas et al., ICLR 2021; "
    "replication report by Uckun, 2023), compared with ART's evasion attacks"
)
PUBLISHED = Path(__file__).with_name("published") / "cae.csv"

_QUICK_FAMILIES = (
    "Source: `zhang_mnist` trained on 20,000 training images (12 epochs at most). Families: "
    "6 + 6 generation and 3 + 3 unseen surrogates and references alternating `lenet5` and "
    "`zhang_mnist` (2 architectures; the generation and unseen sets each hold both), each trained "
    "on the thief's 10,000 training images (disjoint from the source's) for 10 epochs at most with "
    "the report's recipe (Adam 1e-3, step schedule, ReduceLROnPlateau, EarlyStopping with "
    "patience 3, 10% held out): surrogates on the source's predicted labels, references on the "
    "true labels."
)
# The quick preset's lever table: measured in a separate calibration, not computed by a run.
_QUICK_CALIBRATION = """

At these settings no candidate reaches the filter's conferrability of 0.95 on the generation
families, so no fingerprint survives and C1, C2, C5 and C6 fail; this run's own highest
conferrability and counts are under "What the run shows". The 0.95 filter and the claims'
thresholds are the report's and stay. More optimisation does not close the gap. Measured in a
separate calibration on 2026-11-25, not by this run: the same source, families (hard-label
surrogates) and 300 candidates at eps 0.15, generation time on the shared 2-core CPU:

| Adam iterations, rate | adversarial to the source | highest conferrability | >= 0.95 / 0.9 / 0.8 | fingerprints kept | generation |
|---|---|---|---|---|---|
| 100, 5e-3 (this preset) | 262 | 0.846 | 0 / 0 / 3 | 0 | 79 s |
| 300, 5e-3 | 275 | 0.930 | 0 / 5 / 12 | 0 | 129 s |
| 300, 2e-2 | 286 | 0.945 | 0 / 5 / 16 | 0 | 230 s |
| 600, 1e-2 | 284 | 0.939 | 0 / 4 / 17 | 0 | 409 s |
| 1000, 5e-3 | 284 | 0.949 | 0 / 6 / 21 | 0 | 820 s |

Surrogates distilled from the source's probabilities (`extraction="soft_labels"`) did worse
(300 iterations at 5e-3: highest 0.885). The generation references block it: conferrability is
S (1 - R), with S and R the generation surrogates' and references' mean probability of the
example's label. After 1000 iterations 91 of the 284 adversarial examples have S >= 0.95 but
only 4 have R <= 0.05 (mean R 0.46): references trained on the true labels of the thief's
Fashion-MNIST images follow the source too closely for the 0.95 filter."""
PRESET_NOTES = {
    "smoke": "A 1,000-image slice of Fashion-MNIST at 32x32, a `_tiny_cnn` source, 2 + 2 "
    "generation and 1 + 1 unseen models of `_tiny_cnn`/`lenet5` trained for one epoch, 40 "
    "candidates, 20 iterations, FGSM/PGD/CW on 12 images at two bounds: checks the pipeline end "
    "to end; the claims are not expected to hold.",
    "quick": "Fashion-MNIST (the offline dataset here) resized to 32x32 and centred, instead of "
    "CIFAR-10, ImageNet32 and MNIST. ResNet20v1 (about 400 images/s on this 2-core CPU) is "
    "replaced by the zoo's small CNNs LeNet5 and the Zhang et al. MNIST network (about 4,000 "
    "images/s), so that 19 models train in minutes. " + _QUICK_FAMILIES + " Fingerprints: eps "
    "0.15, 100 Adam iterations at learning rate 5e-3, 300 candidate test images the source "
    "classifies correctly. Figure 3: the first 100 of them at eps 0.025, 0.05, 0.1, 0.15. "
    "Wall time measured here from an empty cache, on the 2-core CPU shared with other jobs (load "
    "average 10 to 16): 18.5 min to train the 19 models (27 to 90 s each), 5 to 6 min to generate "
    "the fingerprints, 13 min for the comparison (CAE at four bounds 6 min, Carlini-Wagner 4 min): "
    "about 37 min, above the 20 min aimed at; a rerun reuses the models (19 min under that load). "
    "The exclude_original option of CaeConfig is on (see the deviations)." + _QUICK_CALIBRATION,
    "paper": "The report's Table 1: CIFAR-10 with ResNet20v1, ResNet50 (the zoo's CIFAR-style "
    "ResNet-50 instead of keras.applications' ResNet50v1, which does not fit 32x32 inputs), "
    "MobileNetV2 and DenseNet121 with ImageNet weights and top layers; ImageNet32 (100 random "
    "classes) and MNIST at 32x32 with ResNet20v1; 14 + 14 generation and 5 + 5 unseen models "
    "each, trained with the report's recipe for up to 200 epochs (50 on MNIST). Needs a GPU.",
}
DEFAULT_EPS = (0.025, 0.05, 0.1, 0.15)
CLAIM_EPS = 0.15
CLAIM_ATTACKS = ("fgsm", "pgd", "cw")  # C3 compares against these three
DIAGNOSTIC_TOP = 50  # the diagnostic set: this many most conferrable adversarial examples


@dataclass(frozen=True)
class Experiment:
    """One dataset and family setting of the report's Table 1.

    Args:
        dataset: a name of :func:`models.dataset_names`.
        label: the architecture(s) as the tables name them.
        families: the source and families.
        size: images are resized to ``size`` x ``size``.
        channels: 1 or 3, or None for the dataset's own.
        classes: keep this many classes drawn at random (ImageNet32's 100);
            None keeps all.
    """

    dataset: str
    label: str
    families: FamilyConfig
    size: int = 32
    channels: int | None = None
    classes: int | None = None


@dataclass(frozen=True)
class CaeRunConfig:
    """The resolved configuration of a run."""

    preset: str
    experiments: tuple[Experiment, ...]
    cae: CaeConfig
    candidates: int
    compare_candidates: int
    eps_values: tuple[float, ...]
    attacks: tuple[str, ...]
    max_train: int | None
    max_test: int | None
    seed: int
    cache: bool
    data_dir: str | None = None


def _quick_experiment(dataset: str, seed: int) -> Experiment:
    # The step schedule scaled to 10 epochs would cut the rate tenfold after 4 of them.
    recipe = TrainConfig.cae(epochs=10, early_stopping_patience=3, lr_schedule="constant")
    families = FamilyConfig(
        architectures=("lenet5", "zhang_mnist"),
        generation=6,
        unseen=3,
        train=recipe,
        source_architecture="zhang_mnist",
        source_train=TrainConfig.cae(epochs=12, early_stopping_patience=3, lr_schedule="constant"),
        source_examples=20000,
        thief_examples=10000,
        seed=seed,
    )
    return Experiment(dataset, "LeNet5 + Zhang MNIST", families)


def _smoke_experiment(dataset: str, seed: int) -> Experiment:
    recipe = TrainConfig(epochs=1, batch_size=64, seed=seed)
    families = FamilyConfig(
        architectures=("_tiny_cnn", "lenet5"),
        generation=2,
        unseen=1,
        train=recipe,
        source_architecture="_tiny_cnn",
        source_train=TrainConfig(epochs=2, batch_size=64),
        source_examples=500,
        thief_examples=500,
        seed=seed,
    )
    return Experiment(dataset, "tiny CNN + LeNet5", families)


def _paper_experiments(seed: int, dataset: str | None) -> tuple[Experiment, ...]:
    table1 = [
        ("cifar10", "resnet20v1", "ResNet20v1", None),
        ("cifar10", "resnet50", "ResNet50 (CIFAR-style)", None),
        ("cifar10", "mobilenetv2", "MobileNetV2", None),
        ("cifar10", "densenet121", "DenseNet121+TL", None),
        ("imagenet32", "resnet20v1", "ResNet20v1", 100),
        ("mnist", "resnet20v1", "ResNet20v1", None),
    ]
    experiments = []
    for name, arch, label, classes in table1:
        epochs = 50 if name == "mnist" else 200
        families = FamilyConfig(
            architectures=(arch,),
            generation=14,
            unseen=5,
            train=TrainConfig.cae(epochs=epochs),
            source_architecture=arch,
            source_train=TrainConfig.cae(epochs=epochs),
            seed=seed,
        )
        experiments.append(
            Experiment(dataset or name, label, families, classes=None if dataset else classes)
        )
    return tuple(experiments)


def make_config(
    preset: str,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    cache: bool = True,
) -> CaeRunConfig:
    """Resolve a preset into the experiments, families and generation settings."""
    models.check_dataset(dataset)
    if preset not in PRESET_NOTES:
        raise UnknownNameError("preset", preset, PRESET_NOTES)
    name = dataset or "fashion_mnist"
    common = dict(seed=seed, cache=cache, data_dir=None if data_dir is None else str(data_dir))
    if preset == "smoke":
        return CaeRunConfig(
            preset,
            (_smoke_experiment(name, seed),),
            CaeConfig(
                eps=CLAIM_EPS, iterations=20, learning_rate=1e-2, seed=seed, exclude_original=True
            ),
            candidates=40,
            compare_candidates=12,
            eps_values=(0.05, CLAIM_EPS),
            attacks=("fgsm", "pgd", "cw"),
            max_train=1000,
            max_test=300,
            **common,
        )
    if preset == "quick":
        return CaeRunConfig(
            preset,
            (_quick_experiment(name, seed),),
            CaeConfig(
                eps=CLAIM_EPS, iterations=100, learning_rate=5e-3, seed=seed, exclude_original=True
            ),
            candidates=300,
            compare_candidates=100,
            eps_values=DEFAULT_EPS,
            attacks=tuple(ATTACKS),
            max_train=None,
            max_test=None,
            **common,
        )
    return CaeRunConfig(
        preset,
        _paper_experiments(seed, dataset),
        CaeConfig(eps=CLAIM_EPS, iterations=300, learning_rate=1e-3, seed=seed),
        candidates=500,
        compare_candidates=100,
        eps_values=DEFAULT_EPS,
        attacks=tuple(ATTACKS),
        max_train=None,
        max_test=None,
        **common,
    )


# --------------------------------------------------------------------------- run


def _restrict_classes(data: models.Dataset, count: int, seed: int) -> models.Dataset:
    """Keep ``count`` classes drawn with ``seed``, relabelled 0..count-1 (ImageNet32's 100)."""
    if count >= data.num_classes:
        return data
    chosen = np.sort(
        np.random.default_rng([seed, 9]).choice(data.num_classes, count, replace=False)
    )
    relabel = np.full(data.num_classes, -1, np.int64)
    relabel[chosen] = np.arange(count)
    arrays = {}
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        keep = relabel[y] >= 0
        arrays[f"x_{split}"] = np.ascontiguousarray(x[keep])
        arrays[f"y_{split}"] = relabel[y[keep]]
    for value in arrays.values():
        value.flags.writeable = False
    return dataclasses.replace(data, num_classes=count, **arrays)


def _load(experiment: Experiment, config: CaeRunConfig) -> models.Dataset:
    data = models.load(
        experiment.dataset,
        data_dir=config.data_dir,
        size=experiment.size,
        channels=experiment.channels,
        center=True,
        max_train=config.max_train,
        max_test=config.max_test,
        seed=config.seed,
    )
    if experiment.classes:
        data = _restrict_classes(data, experiment.classes, config.seed)
    return data


def _balanced_accuracy(surrogate_accs, reference_accs, threshold: float) -> float:
    s, r = np.asarray(surrogate_accs), np.asarray(reference_accs)
    if not len(s) or not len(r) or math.isnan(threshold):
        return math.nan
    return float((np.mean(s >= threshold) + np.mean(r < threshold)) / 2)


def _fit_slope(eps: np.ndarray, values: np.ndarray) -> float:
    ok = np.isfinite(values)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(eps[ok], values[ok], 1)[0])


def _claims(out: Run, tag: str, models_df, fig3, fingerprints, config, published) -> dict:
    """Stage C1-C6 for one experiment; returns the numbers the report's prose uses."""
    suffix = f" [{tag}]" if len(config.experiments) > 1 else ""
    mean = {
        (role, split): float(frame["caeacc"].mean())
        for (role, split), frame in models_df.groupby(["role", "split"])
    }
    gen_s, gen_r = mean[("surrogate", "generation")], mean[("reference", "generation")]
    out.claim(
        f"C1{suffix}",
        "generation families (section 3): mean CAEAcc at least 0.9 on the surrogates and at most "
        "0.3 on the references used in generation",
        "about 1.0 and 0",
        f"surrogates {gen_s:.3f}, references {gen_r:.3f}",
        gen_s >= 0.9 and gen_r <= 0.3,
    )

    unseen = models_df[models_df["split"] == "unseen"]
    threshold = fingerprints.threshold
    un_s = unseen[unseen["role"] == "surrogate"]["caeacc"].to_numpy()
    un_r = unseen[unseen["role"] == "reference"]["caeacc"].to_numpy()
    diff = float(un_s.mean() - un_r.mean()) if len(un_s) and len(un_r) else math.nan
    balanced = _balanced_accuracy(un_s, un_r, threshold)
    correct = int(np.sum(un_s >= threshold) + np.sum(un_r < threshold))
    paper_rows = published[published["item"] == "caeacc_unseen"].dropna(subset=["surrogate_caeacc"])
    paper_text = "; ".join(
        f"{r.surrogate_caeacc:.2f} vs {r.reference_caeacc:.2f} ({r.architecture}/{r.dataset})"
        for r in paper_rows.itertuples()
    )
    out.claim(
        f"C2{suffix}",
        "unseen models (the method's point): mean CAEAcc of the unseen surrogates exceeds that of "
        "the unseen references by at least 0.10, and a surrogate/reference decision threshold "
        "chosen on the generation families classifies the unseen models better than chance",
        paper_text,
        f"surrogates {un_s.mean():.3f} vs references {un_r.mean():.3f} (difference {diff:.3f}); "
        f"threshold {threshold:.3f} classifies {correct}/{len(un_s) + len(un_r)} "
        f"(balanced accuracy {balanced:.3f})",
        bool(diff >= 0.10 and balanced > 0.5),
    )

    at = fig3[np.isclose(fig3["eps"], CLAIM_EPS)].set_index("method")["conferrability"]
    cae_value = float(at.get("cae", math.nan))
    others = {m: float(at.get(m, math.nan)) for m in CLAIM_ATTACKS}
    out.claim(
        f"C3{suffix}",
        "better than plain adversarial examples (Fig. 3): at eps = 0.15 the fingerprints' mean "
        "conferrability on unseen models is higher than that of the examples from each of ART's "
        "FGSM, PGD and Carlini-Wagner",
        "CAEs more conferrable than every ART attack (Figure 3, no numbers in the text)",
        f"CAE {cae_value:.3f}; " + ", ".join(f"{m.upper()} {v:.3f}" for m, v in others.items()),
        all(
            cae_value > v if math.isfinite(v) else math.isfinite(cae_value) for v in others.values()
        ),
    )

    slopes = {}
    for method in config.attacks:
        rows = fig3[fig3["method"] == method].sort_values("eps")
        slopes[method] = _fit_slope(rows["eps"].to_numpy(), rows["conferrability"].to_numpy())
    finite = [v for v in slopes.values() if math.isfinite(v)]
    out.claim(
        f"C4{suffix}",
        "eps trend (Fig. 3): the mean conferrability of the ART attacks' examples does not rise "
        "with eps",
        "conferrability drops with increasing perturbation",
        "least-squares slope per unit eps: "
        + ", ".join(f"{m.upper()} {v:+.3f}" for m, v in slopes.items()),
        bool(finite) and len(finite) == len(slopes) and max(finite) <= 0,
    )

    covered = int(len(np.unique(fingerprints.labels)))
    out.claim(
        f"C5{suffix}",
        "label coverage (Fig. 2): the fingerprints cover at least 5 of the 10 labels",
        "a wide range of labels, if not all (Figure 2)",
        f"{covered} of {int(models_df.attrs.get('num_classes', 10))} labels",
        covered >= 5,
    )

    linf = (
        float(np.abs(fingerprints.inputs - fingerprints.originals).max())
        if len(fingerprints)
        else 0.0
    )
    adversarial = int(models_df.attrs.get("fingerprints_adversarial", 0))
    n = len(fingerprints)
    out.claim(
        f"C6{suffix}",
        "validity: every fingerprint lies within the eps ball of its original and is adversarial "
        "to the source model; at least 50 fingerprints survive filtering",
        "179 fingerprints (ResNet20v1, CIFAR-10)",
        f"{n} fingerprints; max L-inf {linf:.4f} (eps {fingerprints.eps}); "
        f"adversarial to the source: {adversarial}/{n}",
        n >= 50 and linf <= fingerprints.eps + 1e-6 and adversarial == n,
    )
    return {
        "gen_s": gen_s,
        "gen_r": gen_r,
        "unseen_s": float(un_s.mean()) if len(un_s) else math.nan,
        "unseen_r": float(un_r.mean()) if len(un_r) else math.nan,
        "diff": diff,
        "balanced": balanced,
        "threshold": threshold,
        "correct": correct,
    }


def run(config: CaeRunConfig, out: Run) -> None:
    """Train the families, generate and verify fingerprints, compare with ART, stage everything."""
    published = pd.read_csv(PUBLISHED)
    started = time.perf_counter()
    datasets = [_load(e, config) for e in config.experiments]  # fail before any training
    model_rows, caeacc_rows, fig2_rows, fig3_frames, notes = [], [], [], [], []
    for experiment, data in zip(config.experiments, datasets, strict=True):
        tag = f"{experiment.dataset}/{experiment.label}"
        t0 = time.perf_counter()
        families = build_families(data, experiment.families, cache=config.cache)
        t_families = time.perf_counter() - t0
        source = families.source.model
        chosen = pick_candidates(source, data, config.candidates, config.seed)
        clip = input_range(data)
        t0 = time.perf_counter()
        scheme = CAE(config.cae)
        generation = (
            families.models("surrogate", "generation"),
            families.models("reference", "generation"),
        )
        x = data.x_test[chosen]
        x_adv, original_labels, scores = scheme.optimise(source, *generation, x, clip_values=clip)
        fingerprints = scheme.select(
            x,
            x_adv,
            original_labels,
            scores,
            *generation,
            metadata={"dataset": experiment.dataset, "experiment": tag},
        )
        t_generate = time.perf_counter() - t0
        threshold = fingerprints.threshold
        # A diagnostic, not a claim: the DIAGNOSTIC_TOP most conferrable adversarial examples,
        # whatever their conferrability, scored the same way.
        ranked = np.where(scores.adversarial, scores.conferrability, -1.0)
        top = np.zeros(len(x), bool)
        top[np.argsort(-ranked, kind="stable")[:DIAGNOSTIC_TOP]] = True
        top &= scores.adversarial
        relaxed = scheme.select(x, x_adv, original_labels, scores, *generation, keep=top)

        def called(acc: float, cut: float):
            return bool(acc >= cut) if math.isfinite(cut) else None

        rows = [{**families.source.row(), "caeacc": math.nan, "called_surrogate": None}]
        for member in families.members:
            acc = caeacc(member.model, fingerprints)
            acc_top = caeacc(member.model, relaxed)
            rows.append(
                {
                    **member.row(),
                    "caeacc": round(acc, 4),
                    "called_surrogate": called(acc, threshold),
                    "caeacc_top": round(acc_top, 4),
                    "called_surrogate_top": called(acc_top, relaxed.threshold),
                }
            )
        frame = pd.DataFrame(rows)
        frame.insert(0, "dataset", experiment.dataset)
        frame.insert(1, "experiment", experiment.label)
        model_rows.append(frame)

        if len(fingerprints):
            labels = np.argmax(source.predict(fingerprints.inputs, verbose=0), axis=1)
            adversarial = int(np.sum(labels != fingerprints.original_labels))
        else:
            adversarial = 0
        members = frame[frame["role"] != "source"].copy()
        members.attrs.update(num_classes=data.num_classes, fingerprints_adversarial=adversarial)

        counts = pd.crosstab(
            pd.Categorical(fingerprints.original_labels, categories=range(data.num_classes)),
            pd.Categorical(fingerprints.labels, categories=range(data.num_classes)),
            dropna=False,
        )
        for original in range(data.num_classes):
            for label in range(data.num_classes):
                fig2_rows.append(
                    {
                        "dataset": experiment.dataset,
                        "experiment": experiment.label,
                        "original_label": original,
                        "fingerprint_label": label,
                        "count": int(counts.loc[original, label]) if len(fingerprints) else 0,
                    }
                )

        t0 = time.perf_counter()
        subset = chosen[: config.compare_candidates]
        fig3 = compare(
            source,
            (
                families.models("surrogate", "generation"),
                families.models("reference", "generation"),
            ),
            (families.models("surrogate", "unseen"), families.models("reference", "unseen")),
            data.x_test[subset],
            config.eps_values,
            methods=config.attacks,
            cae=config.cae,
            clip_values=clip,
        )
        t_compare = time.perf_counter() - t0
        fig3.insert(0, "dataset", experiment.dataset)
        fig3.insert(1, "experiment", experiment.label)
        fig3_frames.append(fig3)

        for arch, group in [("all", members), *members.groupby("architecture")]:
            unseen = group[group["split"] == "unseen"]
            caeacc_rows.append(
                {
                    "source": "measured",
                    "dataset": experiment.dataset,
                    "architecture": arch,
                    "unseen_surrogates": int((unseen["role"] == "surrogate").sum()),
                    "unseen_references": int((unseen["role"] == "reference").sum()),
                    "surrogate_caeacc": round(
                        unseen[unseen["role"] == "surrogate"]["caeacc"].mean(), 4
                    ),
                    "reference_caeacc": round(
                        unseen[unseen["role"] == "reference"]["caeacc"].mean(), 4
                    ),
                    "fingerprints": len(fingerprints),
                    "note": f"eps {config.cae.eps}; {len(chosen)} candidates; threshold {threshold:.3f}",
                }
            )
        numbers = _claims(out, tag, members, fig3, fingerprints, config, published)
        numbers["relaxed"] = _relaxed_summary(members, relaxed, scores)
        notes.append(
            (tag, data, families, fingerprints, numbers, t_families, t_generate, t_compare, fig3)
        )

    for row in published[published["item"] == "caeacc_unseen"].itertuples():
        caeacc_rows.append(
            {
                "source": "report",
                "dataset": row.dataset,
                "architecture": row.architecture,
                "unseen_surrogates": 5 if row.dataset == "cifar10" else math.nan,
                "unseen_references": 5 if row.dataset == "cifar10" else math.nan,
                "surrogate_caeacc": row.surrogate_caeacc,
                "reference_caeacc": row.reference_caeacc,
                "fingerprints": 179
                if row.architecture == "ResNet20v1" and row.dataset == "cifar10"
                else math.nan,
                "note": row.source,
            }
        )
    out.table("table_caeacc", pd.DataFrame(caeacc_rows))
    out.table("table_models", pd.concat(model_rows, ignore_index=True))
    out.table("table_fig2", pd.DataFrame(fig2_rows))
    out.table("table_fig3", pd.concat(fig3_frames, ignore_index=True))
    _sections(out, config, notes, time.perf_counter() - started)


def _relaxed_summary(members: pd.DataFrame, relaxed, scores) -> str:
    """Markdown lines on the diagnostic set (the most conferrable adversarial examples)."""
    confer = scores.conferrability[scores.adversarial]
    median = float(np.median(confer)) if len(confer) else math.nan
    lines = [
        f"- Conferrability to the generation families of the {len(confer)} adversarial "
        f"examples: highest {confer.max(initial=0):.3f}, median {median:.3f}; at least 0.95 / "
        f"0.9 / 0.8: {int(np.sum(confer >= 0.95))} / {int(np.sum(confer >= 0.9))} / "
        f"{int(np.sum(confer >= 0.8))} (the filter asks for "
        f"{relaxed.metadata['config']['min_conferrability']}).",
        f"- Diagnostic, not a claim: the {len(relaxed)} most conferrable adversarial examples "
        f"(conferrability >= {relaxed.arrays['conferrability'].min(initial=1.0):.3f}) scored like "
        f"fingerprints, with the threshold {relaxed.threshold:.3f} chosen on the generation "
        "families the same way (`caeacc_top` in `table_models.csv`):",
    ]
    for split in ("generation", "unseen"):
        for role in ("surrogate", "reference"):
            chosen = members[(members["split"] == split) & (members["role"] == role)]
            called = int(chosen["called_surrogate_top"].eq(True).sum())
            values = ", ".join(f"{v:.2f}" for v in chosen["caeacc_top"])
            lines.append(
                f"  - {split} {role}s: CAEAcc {chosen['caeacc_top'].mean():.3f} ({values}); "
                f"called surrogates: {called}/{len(chosen)}"
            )
    return "\n".join(lines)


def _sections(out: Run, config: CaeRunConfig, notes, seconds: float) -> None:
    for tag, data, families, fingerprints, n, t_fam, t_gen, t_cmp, fig3 in notes:
        trained = [m for m in [families.source, *families.members] if not m.from_cache]
        out.section(
            f"Families and timing ({tag})",
            "\n".join(
                [
                    "```",
                    describe(families),
                    "```",
                    "",
                    f"- data: {data!r}",
                    f"- models trained in this run: {len(trained)} of {len(families.members) + 1} "
                    f"({sum(m.train_seconds for m in trained):.0f} s of training; the others came "
                    "from the cache)",
                    f"- wall time: families {t_fam:.0f} s, fingerprint generation {t_gen:.0f} s "
                    f"({config.cae.iterations} iterations, {fingerprints.metadata['candidates']} "
                    f"candidates), comparison with ART {t_cmp:.0f} s; whole run {seconds:.0f} s",
                ]
            ),
        )
        verdict = "holds" if n["diff"] >= 0.10 and n["balanced"] > 0.5 else "does NOT hold"
        cae_row = fig3[np.isclose(fig3["eps"], CLAIM_EPS) & (fig3["method"] == "cae")]
        out.section(
            f"What the run shows ({tag})",
            "\n".join(
                [
                    f"- {len(fingerprints)} fingerprints of {fingerprints.metadata['candidates']} "
                    f"candidates ({fingerprints.metadata['adversarial']} adversarial to the source "
                    "before the conferrability filter).",
                    f"- Generation families: CAEAcc {n['gen_s']:.3f} (surrogates) vs "
                    f"{n['gen_r']:.3f} (references); the report: about 1.0 vs 0.",
                    f"- Unseen models: CAEAcc {n['unseen_s']:.3f} vs {n['unseen_r']:.3f} "
                    f"(difference {n['diff']:.3f}); threshold {n['threshold']:.3f} from the "
                    f"generation families classifies {n['correct']} of the unseen models correctly "
                    f"(balanced accuracy {n['balanced']:.3f}). C2 {verdict}.",
                    "- The report (section 3.3) found that on an easy dataset the fingerprints "
                    "overfit the generation models, and (Figure 4) that CAEAcc depends on the "
                    "families' test accuracy; `table_models.csv` and fig4 give both per model.",
                    f"- At eps {CLAIM_EPS} the CAE examples' conferrability on unseen models is "
                    + (
                        f"{float(cae_row['conferrability'].iloc[0]):.3f} over "
                        f"{int(cae_row['adversarial'].iloc[0])} adversarial examples"
                        if len(cae_row)
                        else "not measured"
                    )
                    + "; `table_fig3.csv` has every method and bound, with the numbers of "
                    "examples that also pass the fingerprint filter.",
                    n["relaxed"],
                ]
            ),
        )
    out.section(
        "Deviations from the report",
        "\n".join(
            [
                "- Families: the thief's images are a disjoint part of the training set, "
                "labelled by the source; references train on the same images with their true "
                "labels (see `fingerprints/families.py`).",
                "- Loss: at the quick and smoke presets eq. 5's maximum runs over the labels "
                "other than the original one (`exclude_original`): with the report's maximum over "
                "all labels, a trial on 60 candidates (families trained with the step schedule) "
                "settled for 65% of them on fooling the references on the original label (the "
                "failure the report describes in section 2.3) and only 40% became adversarial; "
                "with it, 88% in that trial and 262 of 300 in the quick run.",
                "- Training at the quick preset: constant learning rate (ReduceLROnPlateau and "
                "EarlyStopping kept) instead of the step schedule, which scaled to 10 epochs "
                "cuts the rate tenfold after 4.",
                "- Dropout: one draw per model per iteration, shared by the batch; a family whose "
                "models were all dropped keeps one drawn at random.",
                "- Loss: probabilities are clipped to [1e-7, 1] in the logarithms; the loss is "
                "summed over candidates so batched and one-at-a-time generation agree.",
                "- Decision threshold: the midpoint of the gap between the generation "
                "surrogates' and references' CAEAcc (the report gives no rule).",
                "- ART attacks' parameters (not listed in the report): FGSM one step of eps; BIM "
                "10 steps of eps/4; PGD 20 steps of eps/8 from a random start; Carlini-Wagner "
                "L-inf on the logits with a coarse search (10 Adam steps of rate 0.1, constants 0.1 "
                "to 10), run once and projected onto "
                "each eps ball. Figure 3 keeps, for every method, the examples adversarial to "
                "the source (the report's filter for this comparison).",
            ]
        ),
    )


# --------------------------------------------------------------------------- figures


def plot(folder: Path) -> list[Path]:
    """Draw fig2 (fingerprint labels), fig3 (conferrability vs eps), fig4 (accuracy vs CAEAcc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    figures = []

    fig2 = pd.read_csv(folder / "table_fig2.csv")
    groups = list(fig2.groupby(["dataset", "experiment"], sort=False))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 4 * len(groups)), squeeze=False)
    for (name, group), (bar_ax, heat_ax) in zip(groups, axes, strict=True):
        matrix = group.pivot(index="original_label", columns="fingerprint_label", values="count")
        per_label = matrix.sum(axis=0)
        total = max(int(per_label.sum()), 1)
        bar_ax.bar(per_label.index.astype(str), per_label / total, color="#4c72b0")
        bar_ax.set_xlabel("fingerprint label (source model)")
        bar_ax.set_ylabel("share of fingerprints")
        bar_ax.set_title(f"{name[0]}, {name[1]}: {total} fingerprints")
        rows = matrix.sum(axis=1).replace(0, 1)
        image = heat_ax.imshow((matrix.T / rows).T, cmap="Blues", vmin=0, vmax=1)
        heat_ax.set_xlabel("fingerprint label")
        heat_ax.set_ylabel("original label")
        heat_ax.set_xticks(range(len(matrix.columns)), matrix.columns)
        heat_ax.set_yticks(range(len(matrix.index)), matrix.index)
        heat_ax.set_title("normalised per original label")
        fig.colorbar(image, ax=heat_ax, fraction=0.046)
    figures.append(save_figure(fig, folder / "fig2.png"))

    fig3 = pd.read_csv(folder / "table_fig3.csv")
    groups = list(fig3.groupby(["dataset", "experiment"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for (name, group), ax in zip(groups, axes[0], strict=True):
        for method, rows in group.groupby("method", sort=False):
            rows = rows.sort_values("eps")
            ax.plot(
                rows["eps"],
                rows["conferrability"],
                marker="o",
                linewidth=2.5 if method == "cae" else 1.5,
                label=method.upper() if method in ATTACKS or method == "cae" else method,
            )
        ax.set_xlabel("eps (L-infinity)")
        ax.set_ylabel("mean conferrability on unseen models")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name[0]}, {name[1]}")
        ax.legend()
    figures.append(save_figure(fig, folder / "fig3.png"))

    table = pd.read_csv(folder / "table_models.csv")
    table = table[table["role"] != "source"]
    groups = list(table.groupby(["dataset", "experiment"], sort=False))
    panels = [("caeacc", "fingerprints (the filter)")]
    if "caeacc_top" in table.columns:
        panels.append(("caeacc_top", f"diagnostic: {DIAGNOSTIC_TOP} most conferrable"))
    fig, axes = plt.subplots(
        len(groups), len(panels), figsize=(6 * len(panels), 4.2 * len(groups)), squeeze=False
    )
    styles = {"surrogate": ("#c44e52", "o"), "reference": ("#4c72b0", "s")}
    for (name, group), row_axes in zip(groups, axes, strict=True):
        for (column, what), ax in zip(panels, row_axes, strict=True):
            for (role, split), rows in group.groupby(["role", "split"]):
                color, marker = styles[role]
                unseen = split == "unseen"
                ax.scatter(
                    rows["test_accuracy"],
                    rows[column],
                    color=color,
                    marker=marker,
                    alpha=1.0 if unseen else 0.3,
                    s=60 if unseen else 30,
                    label=f"{split} {role}s",
                )
            if group[column].isna().all():
                ax.text(
                    0.5,
                    0.5,
                    "no fingerprint passed the filter",
                    ha="center",
                    transform=ax.transAxes,
                )
            ax.set_xlabel("test accuracy")
            ax.set_ylabel("CAEAcc")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{name[0]}, {name[1]}\n{what}", fontsize=10)
            ax.legend(fontsize=8)
    figures.append(save_figure(fig, folder / "fig4.png"))
    return figures
