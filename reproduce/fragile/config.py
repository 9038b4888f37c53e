"""What ``reproduce fragile`` runs: the presets (``TITLE``, ``PRESET_NOTES``, the
generators and classifiers), the ``Classifier`` and ``FragileRunConfig`` dataclasses,
``make_config`` and ``plan`` (``--plan``'s table).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import models
from attacks.malicious import MaliciousConfig, MaliciousFineTune
from models.config import replace
from models.training import TrainConfig
from reproduce import zoo
from watermarks.fragile import FragileConfig, FragileFineTune, FragileFineTuneConfig, FragileTrigger

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
    "recipe, up to 6 epochs with early stopping, shared with `reproduce models`) instead of "
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
