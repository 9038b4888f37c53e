"""Malicious fine-tuning: BIM-made backdoor data, relabelled, fine-tuned into the model.

The scenario of section 4.2 of Z. Yin, H. Yin, X. Zhang, "Neural network
fragile watermarking with no model performance degradation", ICIP 2022 (and
its section 2.2): the adversary turns training images into backdoor data with
BIM (Kurakin et al. 2017; ART's ``BasicIterativeMethod`` through
:func:`models.art.to_art`), relabels them to a target class, and fine-tunes
the classifier on training data united with the backdoor data, either all
layers or only "the last layer", which the paper defines for ResNets as
conv5_x, the average pool and the fully connected layer. The paper fine-tunes
ResNet18 with SGD at 1e-3 and larger ResNets with Adam at 1e-5
(:meth:`MaliciousConfig.paper`).

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
  parameters); ``backdoor_images`` training images not of the target class
  (seeded choice) become the backdoor data, all labelled ``target_class``.
* Training goes through :func:`models.train` (checkpoints, resume, cache);
  per-epoch measurements such as a trigger set's AccTri are Keras callbacks
  (:class:`models.training.Hook`) that land in the history.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from attacks.base import RemovalAttack, clone
from attacks.finetune import layers_named, train_only
from models import classifier
from models.errors import UserError
from models.training import TrainConfig, TrainResult, default_cache_dir, train

__all__ = [
    "LAYER_MODES",
    "MaliciousConfig",
    "MaliciousFineTune",
    "MaliciousRun",
    "add_command",
    "backdoor_data",
    "last_layers",
]

log = logging.getLogger(__name__)

LAYER_MODES = ("all", "last")
LARGE_MODEL_PARAMETERS = 15_000_000
_STAGE = re.compile(r"^(conv|block|stage)_?(\d+)_")


@dataclass(frozen=True)
class MaliciousConfig:
    """How the adversary makes backdoor data and fine-tunes.

    Args:
        layers: ``all`` (every layer trainable) or ``last`` (see :func:`last_layers`).
        epochs: fine-tuning epochs (the paper: 60).
        batch_size: examples per step.
        optimizer: ``sgd`` or ``adam``.
        learning_rate: the optimizer's learning rate.
        momentum: SGD momentum.
        backdoor_images: training images turned into backdoor data with BIM.
        target_class: the label the backdoor data gets.
        eps: BIM's L-infinity budget.
        eps_step: BIM's step size.
        max_iter: BIM's iterations.
        targeted: run BIM towards ``target_class`` instead of away from the true label.
        bim_batch_size: batch size of BIM's gradient computations.
        last_layers: layer names that count as "the last layer" (empty: automatic).
        seed: seeds the choice of backdoor images, shuffling and everything random.
    """

    layers: str = "all"
    epochs: int = 60
    batch_size: int = 128
    optimizer: str = "sgd"
    learning_rate: float = 1e-3
    momentum: float = 0.0
    backdoor_images: int = 1000
    target_class: int = 0
    eps: float = 8 / 255
    eps_step: float = 2 / 255
    max_iter: int = 10
    targeted: bool = False
    bim_batch_size: int = 128
    last_layers: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.layers not in LAYER_MODES:
            raise UserError(
                f"unknown layers {self.layers!r}; expected one of: {', '.join(LAYER_MODES)}"
            )
        object.__setattr__(self, "last_layers", tuple(self.last_layers))
        for name in ("backdoor_images", "target_class", "max_iter", "bim_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"{name} must be an integer >= 0, got {value!r}")
        if self.max_iter < 1 or self.bim_batch_size < 1:
            raise UserError("max_iter and bim_batch_size must be >= 1")
        for name in ("eps", "eps_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise UserError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.targeted, bool):
            raise UserError(f"targeted must be true or false, got {self.targeted!r}")
        self.train_config()  # validates epochs, batch size, optimizer, rates and seed

    def train_config(self) -> TrainConfig:
        """The fine-tuning recipe as a :class:`TrainConfig`."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
            seed=self.seed,
        )

    @classmethod
    def paper(cls, model: keras.Model, **overrides) -> MaliciousConfig:
        """The paper's optimiser for ``model``: SGD 1e-3 up to ResNet18's size, else Adam 1e-5."""
        if model.count_params() > LARGE_MODEL_PARAMETERS:
            values = dict(optimizer="adam", learning_rate=1e-5, momentum=0.0)
        else:
            values = dict(optimizer="sgd", learning_rate=1e-3, momentum=0.0)
        values.update(overrides)
        return cls(**values)


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
    classifier = names.index("logits") if "logits" in names else weighted[-1]
    before = [i for i in weighted if i < classifier]
    return names[before[-1] if before else classifier :]


def _clip_values(data, shape: tuple[int, ...]):
    mean = getattr(data, "mean", None)
    if mean is None:
        return (0.0, 1.0)
    low = np.broadcast_to(-np.asarray(mean, np.float32), shape).astype(np.float32)
    return (low, low + 1.0)


def backdoor_data(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    config: MaliciousConfig,
    *,
    clip_values=(0.0, 1.0),
    cache: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BIM-perturbed copies of ``config.backdoor_images`` images of ``x``, relabelled.

    Args:
        model: the classifier the adversary attacks (BIM uses its gradients).
        x: the adversary's training images.
        y: their labels.
        config: the attack's config (BIM parameters, target class, seed).
        clip_values: the valid input range for ART.
        cache: reuse (and store) the result in the training cache folder,
            keyed by the model's weights, the chosen images and BIM's parameters.

    Returns:
        ``(x_backdoor, y_backdoor, source_index)``: the perturbed images, the
        target labels and the indices into ``x`` they were made from.
    """
    from models.art import evasion_attack, to_art

    y = np.asarray(y).reshape(-1)
    classes = int(model.output_shape[-1])
    if not 0 <= config.target_class < classes:
        raise UserError(
            f"target_class {config.target_class} is not a class of the model (0..{classes - 1})"
        )
    candidates = np.flatnonzero(y != config.target_class)
    if len(candidates) < config.backdoor_images:
        raise UserError(
            f"backdoor_images={config.backdoor_images} but the adversary's data has only "
            f"{len(candidates)} images outside the target class"
        )
    rng = np.random.default_rng([config.seed, 4])
    chosen = np.sort(rng.choice(candidates, config.backdoor_images, replace=False))
    if config.backdoor_images == 0:
        return x[:0].copy(), y[:0].copy(), chosen
    source = np.asarray(x[chosen], dtype=np.float32)
    target = np.full(len(chosen), config.target_class, dtype=np.int64)
    path = _backdoor_cache_path(model, source, config, clip_values) if cache else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as saved:
            log.info("reused cached BIM backdoor data %s", path.name)
            return saved["x"], target, chosen
    classifier = to_art(model, clip_values=clip_values)
    bim = evasion_attack(
        "BasicIterativeMethod",
        classifier,
        eps=config.eps,
        eps_step=config.eps_step,
        max_iter=config.max_iter,
        targeted=config.targeted,
        batch_size=config.bim_batch_size,
        verbose=False,
    )
    labels = np.eye(classes, dtype=np.float32)[target] if config.targeted else None
    perturbed = bim.generate(source, y=labels).astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, x=perturbed)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return perturbed, target, chosen


def _backdoor_cache_path(
    model: keras.Model, source: np.ndarray, config: MaliciousConfig, clip_values
):
    """Where the BIM data of (model weights, source images, BIM parameters) is cached."""
    digest = hashlib.sha256()
    try:
        digest.update(model.to_json().encode())
    except (NotImplementedError, TypeError, ValueError):
        digest.update(type(model).__qualname__.encode())
    for array in [*model.get_weights(), source, *np.broadcast_arrays(*clip_values)]:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    bim = (config.eps, config.eps_step, config.max_iter, config.targeted, config.target_class)
    digest.update(json.dumps([bim, config.bim_batch_size]).encode())
    return default_cache_dir() / "malicious_bim" / f"{digest.hexdigest()[:24]}.npz"


@dataclass
class MaliciousRun:
    """What :meth:`MaliciousFineTune.run` did.

    Attributes:
        result: the fine-tuning's :class:`TrainResult` (``result.model`` is the attacked copy).
        x_backdoor: the backdoor images.
        y_backdoor: their (target) labels.
        trained_layers: names of the layers that were trainable.
    """

    result: TrainResult
    x_backdoor: np.ndarray
    y_backdoor: np.ndarray
    trained_layers: list[str]

    @property
    def model(self) -> keras.Model:
        return self.result.model

    def backdoor_success(self, batch_size: int = 256) -> float:
        """Share of the backdoor images the attacked model labels with the target class."""
        if len(self.y_backdoor) == 0:
            return float("nan")
        predicted = np.argmax(
            self.model.predict(self.x_backdoor, batch_size=batch_size, verbose=0), 1
        )
        return float(np.mean(predicted == self.y_backdoor))


class MaliciousFineTune(RemovalAttack):
    """Section 4.2 of Yin et al.: backdoor the model by fine-tuning on training + BIM data."""

    name = "malicious_fine_tune"
    Config = MaliciousConfig

    def prepare(self, model: keras.Model) -> tuple[keras.Model, list[str]]:
        """The copy of ``model`` to train, frozen as ``config.layers`` says, and the trained names."""
        copy = clone(model)
        if self.config.layers == "all":
            return copy, [layer.name for layer in copy.layers]
        names = list(self.config.last_layers) or last_layers(copy)
        layers_named(copy, names)  # every name must exist
        train_only(copy, names)
        return copy, names

    def run(
        self,
        model: keras.Model,
        data,
        *,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        cache: bool = False,
        cache_tag: str = "",
    ) -> MaliciousRun:
        """Make the backdoor data with BIM and fine-tune a copy of ``model``.

        Args:
            model: the model to attack (left untouched).
            data: a :class:`models.Dataset` whose training split is the
                adversary's data, or an ``(x, y)`` pair.
            callbacks: Keras callbacks run after every epoch, e.g.
                :class:`models.training.Hook` measuring AccTri.
            cache: reuse (and store) the BIM data and the fine-tuning in the training cache.
            cache_tag: names what ``callbacks`` measure, for the cache key.

        Returns:
            A :class:`MaliciousRun`.
        """
        config = self.config
        if hasattr(data, "x_train"):
            x, y = data.x_train, data.y_train
        elif isinstance(data, tuple | list) and len(data) == 2:
            x, y = data
        else:
            raise UserError("the adversary's data must be a Dataset or an (x, y) pair")
        x, y = np.asarray(x, np.float32), np.asarray(y, np.int64).reshape(-1)
        if len(x) == 0 or len(x) != len(y):
            raise UserError(f"the adversary's data has {len(x)} images and {len(y)} labels")
        if tuple(x.shape[1:]) != tuple(model.input_shape[1:]):
            raise UserError(
                f"the adversary's images have shape {x.shape[1:]} but the model expects "
                f"{tuple(model.input_shape[1:])}"
            )
        x_bd, y_bd, _ = backdoor_data(
            model, x, y, config, clip_values=_clip_values(data, tuple(x.shape[1:])), cache=cache
        )
        copy, names = self.prepare(model)
        x_all = np.concatenate([x, x_bd])
        y_all = np.concatenate([y, y_bd])
        log.info(
            "malicious fine-tuning (%s layers: %d trainable) on %d clean + %d backdoor images",
            config.layers,
            sum(1 for layer in copy.layers if layer.trainable and layer.weights),
            len(x),
            len(x_bd),
        )
        tag = f"malicious_fine_tune/{config.layers}/{','.join(names)}/{cache_tag}"
        result = train(
            copy,
            (x_all, y_all),
            config.train_config(),
            cache=cache,
            cache_tag=tag,
            callbacks=callbacks,
            verbose=0,
        )
        for layer in copy.layers:
            layer.trainable = True
        return MaliciousRun(result, x_bd, y_bd, names)

    def remove(self, model: keras.Model, data, **options) -> keras.Model:
        """A maliciously fine-tuned copy of ``model`` (see :meth:`run` for ``options``)."""
        return self.run(model, data, **options).model


# --------------------------------------------------------------------------- command line


def _command(args) -> int:
    import models
    from models.training import Hook

    out = models.loading.output_path(args.out, ".keras")
    model = models.load_model(args.model)
    data = models.load_for_model(
        args.dataset, model, data_dir=args.data_dir, max_train=args.max_train, seed=args.seed
    )
    overrides = dict(
        layers=args.layers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        backdoor_images=args.backdoor_images,
        target_class=args.target,
        seed=args.seed,
    )
    if args.optimizer is not None:
        overrides["optimizer"] = args.optimizer
    if args.learning_rate is not None:
        overrides["learning_rate"] = args.learning_rate
    if args.momentum is not None:
        overrides["momentum"] = args.momentum
    config = MaliciousConfig.paper(model, **overrides)
    callbacks = []
    if args.key:  # the defender's measurement beside the attack; the attack never reads it
        from watermarks.base import Key
        from watermarks.base import verify as verify_key

        key = Key.load(args.key)
        key.check_fits(model)
        callbacks.append(Hook("key_accuracy", lambda m: verify_key(m, key).accuracy))
    run = MaliciousFineTune(config).run(model, data, callbacks=callbacks)
    models.save_model(run.model, out)
    print(f"layers trained:     {config.layers} ({len(run.trained_layers)} layers)")
    print(
        f"optimizer:          {config.optimizer} {config.learning_rate:g}, {config.epochs} epochs"
    )
    print(f"backdoor images:    {len(run.y_backdoor)} (BIM), relabelled {config.target_class}")
    print(f"backdoor success:   {run.backdoor_success():.4f}")
    print(f"test accuracy:      {classifier.accuracy(run.model, data.x_test, data.y_test):.4f}")
    for epoch, value in enumerate(run.result.history.get("key_accuracy", []), start=1):
        print(f"epoch {epoch:3d} key accuracy: {value:.4f}")
    print(f"wrote {out}")
    return 0


def add_command(subparsers) -> None:
    """Add ``malicious`` (Yin et al.'s BIM backdoor fine-tuning) to ``python -m attacks``."""
    p = subparsers.add_parser(
        "malicious",
        help="backdoor a model by fine-tuning on training + BIM-made data (Yin et al. 2022, 4.2)",
    )
    p.add_argument("--model", required=True, help="the model (.keras, loaded in safe mode)")
    p.add_argument("--dataset", required=True, help="the adversary's training data")
    p.add_argument("--out", required=True, help="where to write the attacked model (.keras)")
    p.add_argument("--layers", default="all", help="all (default) or last")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", help="sgd or adam (default: the paper's choice by model size)")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0)")
    p.add_argument("--backdoor-images", type=int, default=1000)
    p.add_argument("--target", type=int, default=0, help="the backdoor's target class")
    p.add_argument("--max-train", type=int, help="use at most this many training images")
    p.add_argument("--data-dir", help="folder holding the dataset (see models.load)")
    p.add_argument(
        "--key", help="a watermark key to measure after every epoch (not used by the attack)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_command)
