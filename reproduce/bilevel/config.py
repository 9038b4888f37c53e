"""What ``reproduce bilevel`` runs: the presets (``TITLE``, ``PRESET_NOTES``, the
deviations the report lists, the variants and attack strengths), the ``Experiment`` and
``BiLevelReproduction`` dataclasses, ``make_config`` and ``plan`` (``--plan``'s table).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import models
from attacks.finetune import FineTuneConfig
from attacks.overwrite import OverwriteConfig
from models.errors import UnknownNameError
from models.training import TrainConfig
from reproduce import zoo
from watermarks.backdoor import AdiConfig
from watermarks.bilevel import BiLevel, BiLevelConfig

TITLE = "Robust Watermarking for Deep Neural Networks via Bi-level Optimization (Yang, Lao, Li, ICCV 2021)"
PRESET_NOTES = {
    "smoke": "LeNet5 trained one epoch on 1200 Fashion-MNIST images (a quarter held out); two outer "
    "phases of 30 masked steps at learning rate 0.02, 10 keys, one fine-tuning epoch. Checks the "
    "pipeline end to end; the claims are not expected to hold.",
    "quick": "Fashion-MNIST (the offline dataset) instead of MNIST, LeNet5 only: the zoo's quick "
    "model (shared with `reproduce models`). Robustness is measured on a 20-key watermark (the "
    "paper: 30 on MNIST). The 6000 validation images the base model never trained on are split "
    "(stratified) into 2000 for the owner's key pool and 4000 for the adversary. Masked steps per "
    "phase, lambda and the optimizer are not in the paper (200, 0.9, Adam).",
    "paper": "The paper's image settings: LeNet5/MNIST with 30 keys (learning rate 0.002), "
    "VGG-9/CIFAR-10 and VGG-16/CIFAR-100 with 60 keys (0.02); ImageNet/Inception-V3 is left out. "
    "Base models by the zoo's paper recipes. Needs the datasets (--data-dir) and a GPU.",
}
DEVIATIONS = """
Each is explained in the docstring of `watermarks/bilevel.py`; table_variants measures the ones that
change results (eq. 6 as printed, first-order inner loop, plain gradient descent, random targets).

- Only the masked parameters move, on the loss of eq. 2 (eq. 7 as printed moves all of them).
- Eq. 6 as printed selects almost nothing (`eq6_intersection`); the default widened ranking grows
  both top-N lists until they share N parameters.
- The parameters ever changed are capped at N = floor(2.5%) of each layer, so at the paper's budget
  the changed fraction is the budget by construction: Fig. 3 also sweeps smaller budgets (B3).
- Adam on the masked parameters instead of plain gradient descent; 200 masked steps per phase and
  lambda 0.9 are not in the paper. Key targets: the runner-up class (the paper does not say).
- Verification (the paper has none): a binomial test against p0 = 0.5, an assumption that the null
  controls check; a robustness claim holds only where the verifier says present.
- The base models, the data (Fashion-MNIST at quick) and the attack strengths are this suite's.
"""
NOISE = """
The same zoo recipe and seed gave base LeNet5 models of 0.9014 (an earlier cache), 0.9018 (the
machine of the issue that reported it) and 0.9022 (a later cold cache); whether the machine or the
code between those runs made the difference is not isolated (op determinism makes a rerun
bit-identical only on the same machine kind with the same code). Between the 0.9014 and 0.9022
models, three quick rows changed verdict: B7 (bi-level R_loss 0.06 pp against Adi et al.'s 0.44,
then 0.17 against 0.14), P4 (R_auth after FTAL 0.90, then 0.95) and P5 (after overwriting 0.85,
then 1.00); on the 0.9018 model P6 held (R_loss 0.02 pp) where it failed on the 0.9014 one
(0.25 pp). Such rows sit inside run-to-run noise: on one seed, read them as undecided (their
margins are in the claims table).
"""

VARIANTS = {
    "random_targets": {"target": "random"},
    "intersection": {"mask_rule": "intersection"},
    "first_order": {"inner": "first_order"},
    "sgd": {"optimizer": "sgd"},
}
OVERWRITTEN_VARIANTS = ("random_targets",)  # the default's overwriting is Fig. 6's
STRENGTHS = ("SGD 1e-3", "SGD 1e-2 m0.9")
_CHOICES = ("target", "mask_rule", "inner", "optimizer")


@dataclass(frozen=True)
class Experiment:
    """One architecture on one dataset; ``keys`` is the watermark the attacks target."""

    model: str
    dataset: str
    keys: int
    learning_rate: float  # alpha1 = alpha2 = beta1 (0.002 MNIST, 0.02 CIFAR)


@dataclass(frozen=True)
class BiLevelReproduction:
    """The resolved configuration of a run (``budgets``: smaller mask budgets swept for Fig. 3)."""

    preset: str
    experiments: tuple[Experiment, ...]
    scheme: BiLevelConfig
    table_keys: tuple[int, ...]
    capacity_keys: tuple[int, ...]
    budgets: tuple[float, ...]
    pool_size: int
    fine_tune: tuple[FineTuneConfig, FineTuneConfig]
    prune_rates: tuple[float, ...]
    overwrite: OverwriteConfig
    sequential_keys: int | None
    adi: AdiConfig
    variants: tuple[str, ...]
    max_train: int | None
    max_test: int | None
    seed: int
    cache: bool
    data_dir: str | None = None
    base_recipe: TrainConfig | None = None  # None: the zoo's recipe


_RATES = tuple(round(0.1 * i, 1) for i in range(10))
_PRESETS = {  # preset -> (experiments, capacity keys, budgets, pool, smoke-only values)
    "smoke": ((("lenet5", "fashion_mnist", 10, 0.02),), (), (0.01,), 150,
              dict(sequential_keys=2, max_train=1200, max_test=400, prune_rates=(0.0, 0.5))),
    "quick": ((("lenet5", "fashion_mnist", 20, 0.002),), (30, 40, 50, 60),
              (0.001, 0.0025, 0.005, 0.01), 2000, {}),
    "paper": ((("lenet5", "mnist", 30, 0.002), ("vgg9", "cifar10", 60, 0.02),
               ("vgg16", "cifar100", 60, 0.02)), (10, 20, 30, 40, 50, 60),
              (0.001, 0.0025, 0.005, 0.01), 2000, {}),
}  # fmt: skip


def make_config(
    preset: str,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    cache: bool = True,
) -> BiLevelReproduction:
    """Resolve a preset (``smoke``, ``quick`` or ``paper``) into the run's configuration."""
    models.check_dataset(dataset)
    if preset not in _PRESETS:
        raise UnknownNameError("preset", preset, _PRESETS)
    experiments, capacity, budgets, pool, extra = _PRESETS[preset]
    smoke = preset == "smoke"
    small = dict(phases=2, inner_steps=1, steps=30, mask_samples=64, batch_size=16)
    weak = FineTuneConfig(epochs=1 if smoke else 5, learning_rate=1e-3, seed=seed)
    adi_train = TrainConfig(epochs={"smoke": 1, "quick": 2, "paper": 5}[preset], batch_size=64,
                            optimizer="adam", learning_rate=1e-4, seed=seed)  # fmt: skip
    return BiLevelReproduction(
        preset=preset,
        experiments=tuple(Experiment(m, dataset or d, k, lr) for m, d, k, lr in experiments),
        scheme=BiLevel.preset_config("quick", seed=seed, **(small if smoke else {})),
        table_keys=(5, 10, 15, 20),
        capacity_keys=capacity,
        budgets=budgets,
        pool_size=pool,
        fine_tune=(weak, dataclasses.replace(weak, learning_rate=1e-2, momentum=0.9)),
        prune_rates=extra.get("prune_rates", _RATES),
        overwrite=OverwriteConfig(seed=seed + 1, max_phases=2 if smoke else 30),
        sequential_keys=extra.get("sequential_keys"),
        adi=AdiConfig(mode="pt", n=20, k=2, seed=seed, train=adi_train),
        variants=tuple(VARIANTS),
        max_train=extra.get("max_train"),
        max_test=extra.get("max_test"),
        seed=seed,
        cache=cache,
        data_dir=str(data_dir) if data_dir is not None else None,
        base_recipe=TrainConfig(epochs=1, batch_size=64, validation_split=0.25, seed=seed)
        if smoke else None,
    )  # fmt: skip


def _recipe(config: BiLevelReproduction, experiment: Experiment) -> TrainConfig:
    if config.base_recipe is not None:
        return config.base_recipe
    recipe = zoo.recipe(config.preset, experiment.model, experiment.dataset)
    return dataclasses.replace(recipe, seed=config.seed)


def plan(config: BiLevelReproduction) -> list[dict]:
    """Every training and optimisation loop of the preset (see :mod:`reproduce.plan`)."""
    from reproduce.plan import train_row

    rows, adi = [], config.adi.train
    for e in config.experiments:
        images, shape, classes = zoo.dataset_size(e.dataset)
        images = min(images, config.max_train or images)
        recipe = _recipe(config, e)
        held = int(round(images * recipe.validation_split))
        d_tr, adversary = images - held, held - min(config.pool_size, held // 3)
        adi_epochs = math.ceil(math.ceil(d_tr / adi.batch_size) * adi.epochs
                               / math.ceil(adversary / adi.batch_size))  # fmt: skip
        trainings = (
            ("base model", images, recipe.epochs, 1),
            ("Adi et al.: clean twin (N1), PT watermark", d_tr, recipe.epochs + adi.epochs, 1),
            ("Adi et al.: adversary's twin and PT", adversary, recipe.epochs + adi_epochs, 1),
            ("FTAL (Fig. 4, variants)", adversary, config.fine_tune[0].epochs,
             4 + len(config.variants)),
        )  # fmt: skip
        rows += [train_row(f"{what} ({e.model})", e.model, shape, classes, n, epochs, count)
                 for what, n, epochs, count in trainings]  # fmt: skip
        embeddings = len({*config.table_keys, *config.capacity_keys, e.keys}) + len(
            config.budgets) + len(config.variants) + len(OVERWRITTEN_VARIANTS) + 1  # fmt: skip
        rows += [
            {"kind": "loop", "what": f"bi-level embeddings ({e.model}): phases x masked steps",
             "steps": config.scheme.phases * config.scheme.steps, "count": embeddings},
            {"kind": "loop", "what": f"sequential overwriting ({e.model}): at most",
             "steps": config.overwrite.max_phases * config.scheme.steps,
             "count": config.sequential_keys or e.keys},
        ]  # fmt: skip
    return rows
