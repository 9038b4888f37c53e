"""Malicious fine-tuning: BIM-made backdoor data, relabelled, fine-tuned into the model.

The scenario of section 4.2 of Z. Yin, H. Yin, X. Zhang, "Neural network
fragile watermarking with no model performance degradation", ICIP 2022 (and
its section 2.2): the adversary turns training images into backdoor data with
BIM (Kurakin et al. 2017; ART's ``BasicIterativeMethod`` through
:func:`models.art.to_art`), relabels them to a target class, and fine-tunes
the classifier on training data united with the backdoor data, either all
layers or only "the last layer", which the paper defines for ResNets as
conv5_x, the average pool and the fully connected layer. The paper fine-tunes
ResNet18 with SGD at 1e-3 and larger ResNets with Adam at 1e-5: the config's
``optimizer="auto"`` makes that choice from the model it is given, at run
time, and ``learning_rate=None`` takes the paper's rate for the optimizer.

``remove(model, data, hooks=...)`` gives ``Removal(model, info)``; ``info``
holds the trained layers, the optimizer and rate used, the backdoor success
rate (the share of backdoor images the attacked model labels with the
target class), the fine-tuning's loss and accuracy per epoch and
``curves``: each hook's value after every epoch (e.g. a fragile key's
AccTri, Fig. 2 of the paper). The attack never reads a watermark key.

Choices the paper leaves open, made here:

* "The last layer" by name, never by index (:func:`last_layers`): for
  models whose layers are named by stage (``conv5_block2_1_conv``,
  ``block3_conv1``, ``block_16_project``), every layer from the first of the
  highest-numbered stage to the output (the zoo's ResNet18/50/101/152: the
  ``conv5_`` stage, ``avg_pool``, ``logits``; ResNet20v1, whose last stage is
  ``conv4_``: that stage and the head). Other models (LeNet5, a user's
  Sequential): the last weighted layer before the classifier, and the
  classifier (``logits``, else the last weighted layer). ``last_layers``
  names the layers explicitly instead. Frozen BatchNormalization layers run
  in inference mode (Keras' rule), so a last-layer attack leaves every other
  weight and statistic as it was.
* Plain SGD (momentum 0, the frameworks' default): the paper gives "SGD
  with a learning rate of 1e-3" and no momentum, though it cites Qian's
  paper on the momentum term. With momentum 0.9 (ten times the effective
  step) the last-layer attack also flips some of G_cla's confident triggers
  (a few percent of them on the quick preset's classifiers),
  where the paper sees no change for a = 1; ``momentum`` sets it.
  "Larger ResNets" are models with more than 15 million parameters
  (ResNet18 has 11 million).
* BIM: untargeted, eps 8/255, step 2/255, 10 iterations (the paper gives no
  parameters), in the model's input range (:func:`models.classifier.input_range`);
  ``backdoor_images`` training images not of the target class (seeded
  choice) become the backdoor data, all labelled ``target_class``. The BIM
  images are cached (by the model's digest, the chosen images and BIM's
  parameters) while :func:`models.training.caching` is on.
* Training goes through :func:`models.train` (checkpoints, resume, cache);
  hooks are passed to it, so their values land in its history.
* ``--max-steps N`` (:func:`models.training.limit`) caps BIM's iterations
  at N (and :func:`models.train` the fine-tuning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from attacks.base import Removal, RemovalAttack, Requirements, clone
from attacks.finetune import layers_named, train_only
from models import classifier
from models.config import option, validate
from models.errors import UserError
from models.io import array_digest, load_npz, save_npz
from models.training import TrainConfig, caching, default_cache_dir, hook_curves, limit, train

__all__ = [
    "LAYER_MODES",
    "OPTIMIZERS",
    "MaliciousConfig",
    "MaliciousFineTune",
    "backdoor_data",
    "last_layers",
]

log = logging.getLogger(__name__)

LAYER_MODES = ("all", "last")
OPTIMIZERS = ("auto", "sgd", "adam")
LARGE_MODEL_PARAMETERS = 15_000_000
#: the paper's learning rate of each optimizer (SGD for ResNet18, Adam for larger ResNets)
PAPER_LEARNING_RATES = {"sgd": 1e-3, "adam": 1e-5}
_STAGE = re.compile(r"^(conv|block|stage)_?(\d+)_")


@dataclass(frozen=True)
class MaliciousConfig:
    """How the adversary makes backdoor data and fine-tunes.

    Args:
        layers: ``all`` (every layer trainable) or ``last`` (see :func:`last_layers`).
        last_layers: layer names that count as "the last layer" (empty: found by name).
        epochs: fine-tuning epochs (the paper: 60; 0: no fine-tuning).
        batch_size: examples per step.
        optimizer: ``auto`` (the paper's: SGD up to ResNet18's size, Adam
            above 15 million parameters), ``sgd`` or ``adam``.
        learning_rate: the optimizer's rate (None: the paper's, 1e-3 for SGD, 1e-5 for Adam).
        momentum: SGD momentum.
        backdoor_images: training images turned into backdoor data with BIM.
        target_class: the label the backdoor data gets.
        eps: BIM's L-infinity budget.
        eps_step: BIM's step size.
        max_iter: BIM's iterations.
        targeted: run BIM towards ``target_class`` instead of away from the true label.
        bim_batch_size: batch size of BIM's gradient computations.
        seed: seeds the choice of backdoor images, shuffling and everything random.
    """

    layers: str = option("all", choices=LAYER_MODES, help="which layers are fine-tuned")
    last_layers: tuple[str, ...] = option((), help="names of 'the last layer' (empty: found)")
    epochs: int = option(60, low=0, help="fine-tuning epochs (0: none)")
    batch_size: int = option(128, low=1, help="examples per step")
    optimizer: str = option("auto", choices=OPTIMIZERS, help="auto: the paper's by model size")
    learning_rate: float | None = option(
        None, low=0, low_open=True, help="the optimizer's rate (none: the paper's)"
    )
    momentum: float = option(0.0, low=0, high=0.999999, help="SGD momentum")
    backdoor_images: int = option(1000, low=0, help="training images made into BIM backdoor data")
    target_class: int = option(0, low=0, help="the label of the backdoor data")
    eps: float = option(8 / 255, low=0, low_open=True, help="BIM's L-infinity budget")
    eps_step: float = option(2 / 255, low=0, low_open=True, help="BIM's step size")
    max_iter: int = option(10, low=1, help="BIM's iterations")
    targeted: bool = option(False, help="BIM towards target_class")
    bim_batch_size: int = option(128, low=1, help="BIM's batch size")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed of the choice and the fine-tuning")

    def __post_init__(self):
        validate(self)

    def resolved_optimizer(self, model: keras.Model) -> tuple[str, float]:
        """``(optimizer, learning_rate)`` for ``model``: ``auto`` and None resolved as the paper does."""
        name = self.optimizer
        if name == "auto":
            name = "adam" if model.count_params() > LARGE_MODEL_PARAMETERS else "sgd"
        rate = PAPER_LEARNING_RATES[name] if self.learning_rate is None else self.learning_rate
        return name, float(rate)

    def train_config(self, model: keras.Model) -> TrainConfig:
        """The fine-tuning recipe for ``model`` as a :class:`TrainConfig`."""
        name, rate = self.resolved_optimizer(model)
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=name,
            learning_rate=rate,
            momentum=self.momentum,
            seed=self.seed,
        )


def last_layers(model: keras.Model) -> list[str]:
    """Names of the layers a last-layer attack trains (see the module docstring)."""
    names = [layer.name for layer in model.layers]
    stages = [
        (int(match.group(2)), index)
        for index, name in enumerate(names)
        if (match := _STAGE.match(name))
    ]
    if stages:
        top = max(stage for stage, _ in stages)
        first = min(index for stage, index in stages if stage == top)
        return names[first:]
    weighted = [i for i, layer in enumerate(model.layers) if layer.weights]
    if not weighted:
        raise UserError(f"model {model.name!r} has no layer with weights to fine-tune")
    head = names.index("logits") if "logits" in names else weighted[-1]
    before = [i for i in weighted if i < head]
    return names[before[-1] if before else head :]


def _chosen(y: np.ndarray, config: MaliciousConfig) -> np.ndarray:
    """Indices of the seeded choice of ``backdoor_images`` images outside the target class."""
    candidates = np.flatnonzero(y != config.target_class)
    if len(candidates) < config.backdoor_images:
        raise UserError(
            f"backdoor_images={config.backdoor_images} but the adversary's data has only "
            f"{len(candidates)} images outside target_class {config.target_class}"
        )
    rng = np.random.default_rng([config.seed, 4])
    return np.sort(rng.choice(candidates, config.backdoor_images, replace=False))


def backdoor_data(
    model: keras.Model, data, config: MaliciousConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BIM-perturbed copies of ``config.backdoor_images`` training images of ``data``, relabelled.

    Args:
        model: the classifier the adversary attacks (BIM uses its gradients).
        data: the adversary's :class:`models.Dataset` (its training split and input range).
        config: the attack's config (BIM parameters, target class, seed).

    Returns:
        ``(x_backdoor, y_backdoor, source_index)``: the perturbed images, the
        target labels and the indices into ``data.x_train`` they were made from.
    """
    y = np.asarray(data.y_train).reshape(-1)
    classes = int(model.output_shape[-1])
    if not config.target_class < classes:
        raise UserError(
            f"target_class {config.target_class} is not a class of the model (0..{classes - 1})"
        )
    chosen = _chosen(y, config)
    source = np.asarray(data.x_train[chosen], dtype=np.float32)
    target = np.full(len(chosen), config.target_class, dtype=np.int64)
    if len(chosen) == 0:
        return source, target, chosen
    clip_values = classifier.input_range(data)
    path = _cache_path(model, source, config, clip_values) if caching() else None
    if path is not None and path.is_file():
        log.info("reused cached BIM backdoor data %s", path.name)
        return load_npz(path, what="BIM cache file")[0]["x"], target, chosen
    perturbed = _bim(model, source, target, config, clip_values)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, {"x": perturbed}, {"what": "BIM backdoor images"}, what="BIM cache file")
    return perturbed, target, chosen


def _bim(model, source, target, config: MaliciousConfig, clip_values) -> np.ndarray:
    from models.art import evasion_attack, to_art

    bim = evasion_attack(
        "BasicIterativeMethod",
        to_art(model, clip_values=clip_values),
        eps=config.eps,
        eps_step=config.eps_step,
        max_iter=limit(config.max_iter),
        targeted=config.targeted,
        batch_size=config.bim_batch_size,
        verbose=False,
    )
    classes = int(model.output_shape[-1])
    labels = np.eye(classes, dtype=np.float32)[target] if config.targeted else None
    return bim.generate(source, y=labels).astype(np.float32)


def _cache_path(model, source: np.ndarray, config: MaliciousConfig, clip_values) -> Path:
    """Where the BIM images of (model, source images, input range, BIM parameters) are cached."""
    # limit(): under --max-steps the truncated BIM images are cached apart
    bim = [
        config.eps,
        config.eps_step,
        limit(config.max_iter),
        config.targeted,
        config.target_class,
    ]
    ranges = (np.asarray(v, np.float32) for v in clip_values)
    ident = [
        classifier.digest(model, 64),
        array_digest(source, *ranges),
        bim,
        config.bim_batch_size,
    ]
    name = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]
    return default_cache_dir() / "malicious_bim" / f"{name}.npz"


class MaliciousFineTune(RemovalAttack):
    """Section 4.2 of Yin et al.: backdoor the model by fine-tuning on training + BIM data."""

    name = "malicious_fine_tune"
    Config = MaliciousConfig
    #: BIM needs the model's gradients; a labelled training split (enough images
    #: outside the target class for ``backdoor_images`` is checked by :meth:`applicable`)
    requires = Requirements(white_box=True, min_examples=1)
    zero_strength = {"epochs": 0, "backdoor_images": 0}
    presets = {
        # seconds on scikit-learn's 8x8 digits (a fifth of the training split)
        "smoke": {"epochs": 1, "backdoor_images": 40, "batch_size": 32, "max_iter": 3},
        # python -m reproduce fragile --preset quick (5,000 clean images are the caller's data)
        "quick": {"epochs": 5, "backdoor_images": 1000},
        # BIM's batch size does not change what it computes for an image (each image's
        # gradient is its own and BIM takes its sign; floating-point rounding aside) but bounds
        # the memory of its gradient tape: on a CPU host (RSS, CIFAR-style ResNets) ResNet101 at
        # 128 images took 12.4 GB, ResNet152 at 32 images 5.2 GB, and at 128 the fragile paper
        # preset was killed for memory on a 24 GB machine
        "paper": {"epochs": 60, "backdoor_images": 1000, "bim_batch_size": 32},
    }

    def applicable(self, model, data) -> str | None:
        """The base requirements, and enough training images outside the target class for BIM."""
        reason = super().applicable(model, data)
        if reason is not None:
            return reason
        config = self.config
        classes = int(model.output_shape[-1])
        if config.target_class >= classes:
            return (
                f"target_class {config.target_class} is not a class of the model (0..{classes - 1})"
            )
        outside = int(np.count_nonzero(np.asarray(data.y_train) != config.target_class))
        if outside < config.backdoor_images:
            return (
                f"needs {config.backdoor_images} training images outside target_class "
                f"{config.target_class} for BIM (backdoor_images); the adversary has {outside}"
            )
        return None

    def prepare(self, model: keras.Model) -> tuple[keras.Model, list[str]]:
        """The copy of ``model`` to train, frozen as ``config.layers`` says, and the trained names."""
        copy = clone(model)
        if self.config.layers == "all":
            return copy, [layer.name for layer in copy.layers]
        names = list(self.config.last_layers) or last_layers(copy)
        layers_named(copy, names)  # every name must exist
        train_only(copy, names)
        return copy, names

    def _remove(self, model, data, *, hooks: tuple) -> Removal:
        config = self.config
        x_bd, y_bd, _ = backdoor_data(model, data, config)
        copy, names = self.prepare(model)
        recipe = config.train_config(model)
        x_all = np.concatenate([np.asarray(data.x_train, np.float32), x_bd])
        y_all = np.concatenate([np.asarray(data.y_train, np.int64).reshape(-1), y_bd])
        log.info(
            "malicious fine-tuning (%s layers: %d trainable) on %d clean + %d backdoor images",
            config.layers,
            sum(1 for layer in copy.layers if layer.trainable and layer.weights),
            len(data.y_train),
            len(y_bd),
        )
        result = train(
            copy,
            (x_all, y_all),
            recipe,
            cache_tag=f"malicious_fine_tune/{config.layers}/{','.join(names)}",
            hooks=hooks,
            verbose=0,
        )
        for layer in copy.layers:
            layer.trainable = True
        success = classifier.accuracy(copy, x_bd, y_bd) if len(y_bd) else None
        curves = hook_curves(result.history, hooks)
        history = {k: v for k, v in result.history.items() if k not in curves}
        info = {
            "layers": config.layers,
            "trained_layers": names,
            "optimizer": recipe.optimizer,
            "learning_rate": recipe.learning_rate,
            "momentum": recipe.momentum,
            "epochs_run": result.epochs_run,
            "clean_images": len(data.y_train),
            "backdoor_images": len(y_bd),
            "target_class": config.target_class,
            "backdoor_success": success,
            "from_cache": result.from_cache,
            "history": history,
            "curves": curves,
        }
        return Removal(copy, info)
