"""Fragile triggers from a generator: a watermark that detects any change and never changes the model.

Z. Yin, H. Yin, X. Zhang, "Neural network fragile watermarking with no model
performance degradation", ICIP 2022 (no public code). A generator G maps n
noise vectors z (size 512) to n trigger images; it is trained, with the
classifier C frozen and only queried, on equation (1)

    L = L_cla(C(G(z)), Y_sk) + a * Var(P),

where Y_sk = {i mod M} is the secret key (M classes) and P the softmax
outputs of C on the triggers. The watermarked model is C itself, bit for
bit: :meth:`FragileTrigger.embed` returns ``Marked(model, key)`` whose
``model`` *is* the object it was given (not a copy: the paper's point is
that the marked model is the original; nothing in the suite trains a
marked model in place, attacks work on copies). Verification is equation
(2): AccTri, the share of triggers that C labels with their key; AccTri <
1.0 means the model was modified (``Verification.intact`` False; threshold
1.0, p-value NaN: the paper defines no null model, the decision is the
exact-match rule).

The Var term, exactly as implemented here (:func:`softmax_variance`)::

    Var(P) = 1/n * sum_i  1/M * sum_k (p_ik - 1/M)^2

the variance of each trigger's softmax vector over its M classes (its mean
is always 1/M), averaged over the n triggers. Why this and not the variance
over the batch: Table 3 shows that the Var term *spreads each trigger's
probability over several classes* (G_var: five classes near 0.2; G_full:
five near 0.15 and the key class at 0.245), which is what minimising the
per-trigger variance does (it equals ||p_i||^2 / M - 1/M^2, minimal for a
flat vector); a variance across triggers would instead pull all triggers to
the same output vector, flat or not. It also gives Table 3's numbers: with
the key class at q and the other M-1 classes sharing the rest evenly, Var =
(q - 1/M)^2 / (M - 1), and minimising -log q + a * Var for a = 200, M = 10
gives q = 0.21; the paper's 0.245 with half the classes near 0.15 is the
same trade-off when only some classes can be raised. For a = 1 the term is
at most 0.09, negligible beside the cross-entropy, so G_full behaves like
G_cla (Table 4's unchanged AccTri); since the per-trigger variance scales
as 1/M, a CIFAR-100 classifier needs a about ten times larger (the paper's
a = 4000 for M = 100). Triggers that sit that close to a boundary between
several classes flip their label when the weights move: that is the fragility.

The four generators of Table 3 are ``variant``s of one config: ``full``
(L_cla + a Var), ``cla`` (L_cla only), ``var`` (a Var only) and ``non``
(the initial, untrained generator). As in section 4.2, the key of ``var``
and ``non`` is the label C gives each trigger after training, not Y_sk.

Generators (``generator``): ``conv``, a small DCGAN-style convolutional
generator (dense to a quarter-resolution map, two nearest-neighbour
upsampling + 3x3 conv stages, tanh), used at the quick preset; and
``progressive``, a progressive-growing generator in the manner of PGAN
(Karras et al. 2018), the paper's choice: pixel-normalised blocks from 4x4
up to the input size, a 1x1 toRGB per resolution, and new resolutions faded
in during training (the first half of each growth phase blends the upsampled
previous output with the new one). Only the generator of PGAN is used (the
paper trains G against C, not against a discriminator), and it is smaller
(``width`` filters at 4x4, halved per doubling) than PGAN's 512.

The comparison of Table 2, embedding a trigger set *into the weights* by
fine-tuning (the paper's reference [14], Zhu et al., KSEM 2021, whose
two-stage method has no public code), is a scheme of its own,
:class:`FragileFineTune` (``fragile_finetune``): the untrained generator's
images (G_non's) labelled with Y_sk, repeated, are added to the owner's
training images and the model is fine-tuned until it labels every trigger
with its key. It changes the weights, which is what Table 2 measures.
:func:`fragility_check` is the no-false-alarm check of a key (AccTri after a
``.keras`` round trip, at batch sizes 1 and n, repeated; the logit gaps).

Deliberate deviations and choices:

* Margin remedy (the float-noise fragility): triggers whose two top logits
  are (nearly) tied flip their label under round-off alone (a different
  batch size, a ``.keras`` round trip), which would be a false alarm. For
  the keyed variants (``full``, ``cla``) a hinge term
  ``mean_i max(0, margin - (z_i,key - max_{j != key} z_ij))`` on the logit
  gap (default ``margin`` 0.05, also at the paper preset) is added to L, and
  training runs for ``epochs`` steps and then on (up to ``max_epochs``)
  until every trigger takes its key with a logit gap above ``min_margin``
  (1e-3): the paper's "until Y_fragile is the same as Y_sk" made robust.
  ``margin=0`` gives the paper's loss unchanged. A key whose triggers tie or
  miss their key (as pure-Var training can produce) is
  ``fit_for_verification = False``: :meth:`FragileTrigger.embed` refuses it
  (:class:`~watermarks.base.EmbeddingFailed`); :meth:`FragileTrigger.trigger_set`
  gives it anyway, for studies such as Table 3 that show such generators.
* One generator epoch is one step on all n triggers in one batch (n = 100:
  the paper's trigger set is one batch); Adam (``keras.optimizers.Adam``) at
  ``learning_rate``. The loop is written out (a ``tf.function`` step) rather
  than ``keras.Model.fit`` because the classifier is only queried, the batch
  is the whole trigger set, and the Var weight, the growth blend and the
  stopping rule change per step.
* Warm-up: the Var weight rises linearly from 0 to ``a`` over the first
  half of the epochs (``warmup``; 0 turns it off). It changes the path, not
  the loss being minimised at the end: with the full weight from the first
  step, a >= 200 sometimes drove the small generator into a collapse (all
  z giving one image, most triggers missing their key) at Adam 3e-3 on the
  quick preset's ResNet20v1.
* Logits: :func:`models.classifier.logit_function` (the layer before the
  final softmax where the model has one; otherwise log-probabilities, whose
  differences are the logit differences).
* Triggers lie in the model's input range (:func:`models.classifier.input_range`:
  the dataset's pixel range, shifted by the training mean for centred data).
* The key holds the triggers (float32, the verification inputs), Y_sk, a,
  the seed, the noise z and the generator's weights and architecture, so
  :func:`regenerate` rebuilds G and remakes the triggers without pickle.
* Keys are cached (by the model's digest, the config and the input range,
  in the training cache folder) while :func:`models.training.caching` is on.
* ``--max-steps N`` (:func:`models.training.limit`) caps the generator's
  steps (``epochs`` and ``max_epochs``) at N; such a key is cached apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models import classifier
from models.config import option, validate
from models.errors import UnknownNameError, UserError
from models.evidence import Verification, answers
from models.sanity import check_fits
from models.training import (
    TrainConfig,
    caching,
    default_cache_dir,
    hook_curves,
    limit,
    max_steps,
    seed_everything,
    train,
)
from models.zoo import copy_model
from watermarks.base import EmbeddingFailed, Key, Marked, Watermark

__all__ = [
    "GENERATORS",
    "VARIANTS",
    "FragileConfig",
    "FragileFineTune",
    "FragileFineTuneConfig",
    "FragileTrigger",
    "build_generator",
    "fragile_loss",
    "fragility_check",
    "generator_from_key",
    "key_summary",
    "regenerate",
    "secret_key",
    "softmax_variance",
    "trigger_margins",
    "trigger_report",
]

log = logging.getLogger(__name__)

VARIANTS = ("full", "cla", "var", "non")
GENERATORS = ("conv", "progressive")
Z_DIM = 512  # the paper's noise size
_KEYED = ("full", "cla")  # variants trained towards Y_sk
_GEN_PREFIX = "generator_"
_CHUNK = 25  # extra steps between checks once the set epochs are done
_CACHE_VERSION = 3  # bump when a change to this module changes the keys it makes
_NULL = "exact match (the paper's rule; no null model)"


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class FragileConfig:
    """How the fragile trigger set is made (:class:`FragileTrigger`).

    Args:
        n: number of triggers (the paper: 100).
        a: weight of the Var term in equation (1) (the paper: 200; 4000 on CIFAR-100).
        variant: ``full`` (L_cla + a Var), ``cla``, ``var`` or ``non`` (Table 3).
        generator: ``conv`` (small DCGAN-style) or ``progressive`` (PGAN-style).
        epochs: generator training steps, each on all n triggers (the paper: 300).
        max_epochs: cap on the steps when training continues until every
            trigger takes its key with a margin (keyed variants only).
        learning_rate: Adam learning rate of the generator.
        warmup: share of ``epochs`` over which the Var weight rises linearly
            from 0 to ``a`` (0: the full weight from the first step).
        margin: hinge margin on the logit gap for the keyed variants; 0 is
            the paper's loss without the remedy.
        min_margin: smallest logit gap (top key logit minus the runner-up)
            for a trigger set to be fit for verification.
        width: filters of the generator's first (lowest-resolution) stage.
        z_dim: size of the noise vectors.
        threshold: AccTri at or above which the model counts as unmodified.
        seed: seeds the noise, the generator's initial weights and training.
    """

    n: int = option(100, low=1, help="number of triggers")
    a: float = option(200.0, low=0, help="weight of the Var term of equation (1)")
    variant: str = option("full", choices=VARIANTS, help="generator loss (Table 3)")
    generator: str = option("conv", choices=GENERATORS, help="generator architecture")
    epochs: int = option(300, low=0, help="generator training steps (each on all n triggers)")
    max_epochs: int = option(900, low=0, help="cap while training on to the margin")
    learning_rate: float = option(1e-3, low=0, low_open=True, help="Adam learning rate of G")
    warmup: float = option(0.5, low=0, high=1, help="share of epochs ramping the Var weight up")
    margin: float = option(0.05, low=0, help="hinge margin on the logit gap (0: paper's loss)")
    min_margin: float = option(1e-3, low=0, help="smallest logit gap of a key fit to verify")
    width: int = option(128, low=4, help="generator filters at the lowest resolution")
    z_dim: int = option(Z_DIM, low=1, help="size of the noise vectors")
    threshold: float = option(1.0, low=0, low_open=True, high=1, help="AccTri of an intact model")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed of the noise, G and its training")

    def __post_init__(self):
        validate(self)
        if self.max_epochs < self.epochs:
            raise UserError(
                f"max_epochs must be >= epochs, got epochs={self.epochs}, "
                f"max_epochs={self.max_epochs}"
            )


@dataclass(frozen=True)
class FragileFineTuneConfig:
    """How :class:`FragileFineTune` embeds a trigger set by fine-tuning (Table 2's [14]).

    Args:
        n: number of triggers: the untrained generator's images, labelled Y_sk.
        generator: ``conv`` or ``progressive`` (the untrained G that draws them).
        width: filters of that generator's first stage.
        z_dim: size of its noise vectors.
        repeats: copies of the trigger set in the fine-tuning data.
        epochs: fine-tuning epochs at least.
        max_epochs: cap while fine-tuning on until every trigger takes its key.
        batch_size: examples per step.
        optimizer: ``adam`` or ``sgd``.
        learning_rate: the optimizer's learning rate.
        threshold: AccTri at or above which the model counts as unmodified.
        seed: seeds the triggers and the fine-tuning.
    """

    n: int = option(100, low=1, help="number of triggers")
    generator: str = option("conv", choices=GENERATORS, help="the untrained generator")
    width: int = option(128, low=4, help="generator filters at the lowest resolution")
    z_dim: int = option(Z_DIM, low=1, help="size of the noise vectors")
    repeats: int = option(10, low=1, help="copies of the trigger set in the fine-tuning data")
    epochs: int = option(3, low=1, help="fine-tuning epochs at least")
    max_epochs: int = option(
        30, low=1, help="cap while fine-tuning on until the triggers are learnt"
    )
    batch_size: int = option(64, low=1, help="examples per step")
    optimizer: str = option("adam", choices=("adam", "sgd"), help="the optimizer")
    learning_rate: float = option(1e-3, low=0, low_open=True, help="its learning rate")
    threshold: float = option(1.0, low=0, low_open=True, high=1, help="AccTri of an intact model")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed of the triggers and the fine-tuning")

    def __post_init__(self):
        validate(self)
        if self.max_epochs < self.epochs:
            raise UserError(
                f"max_epochs must be >= epochs, got epochs={self.epochs}, "
                f"max_epochs={self.max_epochs}"
            )

    def train_config(self) -> TrainConfig:
        """The fine-tuning recipe (``max_epochs``; it stops once the triggers are learnt)."""
        return TrainConfig(
            epochs=self.max_epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            seed=self.seed,
        )


# --------------------------------------------------------------------------- generators


@keras.saving.register_keras_serializable(package="wmsuite_fragile")
class PixelNorm(layers.Layer):
    """PGAN's pixelwise feature normalisation: each pixel's feature vector to unit RMS."""

    def call(self, x):
        return x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + 1e-8)


@keras.saving.register_keras_serializable(package="wmsuite_fragile")
class StageBlend(layers.Layer):
    """Mixes the generator's per-resolution outputs with weights held in a non-trainable variable.

    During growth the weights fade the new resolution in; when training is
    done they are one-hot on the last stage (``mix`` is saved with the weights).
    """

    def __init__(self, stages: int, **kwargs):
        super().__init__(**kwargs)
        self.stages = int(stages)

    def build(self, input_shape):
        last = np.zeros(self.stages, np.float32)
        last[-1] = 1.0
        self.mix = self.add_weight(
            shape=(self.stages,),
            initializer=keras.initializers.Constant(last),
            trainable=False,
            name="mix",
        )

    def call(self, inputs):
        stacked = ops.stack(inputs, axis=0)
        return ops.tensordot(self.mix, stacked, axes=1)

    def get_config(self):
        return {**super().get_config(), "stages": self.stages}


def _crop_to(x, height: int, width: int):
    extra_h, extra_w = x.shape[1] - height, x.shape[2] - width
    if extra_h or extra_w:
        x = layers.Cropping2D(
            ((extra_h // 2, extra_h - extra_h // 2), (extra_w // 2, extra_w - extra_w // 2)),
            name="crop",
        )(x)
    return x


def _conv_generator(z_dim: int, shape: tuple[int, int, int], width: int) -> keras.Model:
    height, wide, channels = shape
    h0, w0 = -(-height // 4), -(-wide // 4)
    z = keras.Input((z_dim,), name="z")
    x = layers.Dense(h0 * w0 * width, name="project")(z)
    x = layers.LeakyReLU(0.2, name="project_lrelu")(x)
    x = layers.Reshape((h0, w0, width), name="reshape")(x)
    filters = width
    for stage in (1, 2):
        filters = max(filters // 2, 8)
        x = layers.UpSampling2D(2, name=f"up{stage}")(x)
        x = layers.Conv2D(filters, 3, padding="same", name=f"conv{stage}")(x)
        x = layers.LeakyReLU(0.2, name=f"conv{stage}_lrelu")(x)
    x = layers.Conv2D(channels, 3, padding="same", activation="tanh", name="to_image")(x)
    return keras.Model(z, _crop_to(x, height, wide), name="fragile_conv_generator")


def _progressive_generator(z_dim: int, shape: tuple[int, int, int], width: int) -> keras.Model:
    height, wide, channels = shape
    stages = max(1, math.ceil(math.log2(max(height, wide, 4) / 4)) + 1)
    final = 4 * 2 ** (stages - 1)
    z = keras.Input((z_dim,), name="z")
    x = PixelNorm(name="z_norm")(z)
    x = layers.Dense(16 * width, name="stage0_dense")(x)
    x = layers.LeakyReLU(0.2, name="stage0_dense_lrelu")(x)
    x = layers.Reshape((4, 4, width), name="stage0_reshape")(x)
    x = PixelNorm(name="stage0_dense_norm")(x)
    x = layers.Conv2D(width, 3, padding="same", name="stage0_conv")(x)
    x = layers.LeakyReLU(0.2, name="stage0_conv_lrelu")(x)
    x = PixelNorm(name="stage0_conv_norm")(x)
    outputs = []
    filters = width
    for stage in range(stages):
        if stage:
            filters = max(filters // 2, 16)
            x = layers.UpSampling2D(2, name=f"stage{stage}_up")(x)
            for i in (1, 2):
                x = layers.Conv2D(filters, 3, padding="same", name=f"stage{stage}_conv{i}")(x)
                x = layers.LeakyReLU(0.2, name=f"stage{stage}_conv{i}_lrelu")(x)
                x = PixelNorm(name=f"stage{stage}_conv{i}_norm")(x)
        rgb = layers.Conv2D(channels, 1, name=f"stage{stage}_to_image")(x)
        scale = final // (4 * 2**stage)
        if scale > 1:
            rgb = layers.UpSampling2D(scale, name=f"stage{stage}_to_final")(rgb)
        outputs.append(rgb)
    x = StageBlend(stages, name="blend")(outputs)
    x = layers.Activation("tanh", name="tanh")(x)
    return keras.Model(z, _crop_to(x, height, wide), name="fragile_progressive_generator")


def build_generator(
    kind: str, shape: tuple[int, int, int], *, z_dim: int = Z_DIM, width: int = 128
) -> keras.Model:
    """A generator from noise ``(N, z_dim)`` to images ``(N, *shape)`` in [-1, 1].

    Args:
        kind: ``conv`` or ``progressive`` (see the module docstring).
        shape: ``(height, width, channels)`` of the classifier's input.
        z_dim: size of the noise vectors.
        width: filters of the lowest-resolution stage.

    Returns:
        The Keras generator, freshly initialised (seed it with ``keras.utils.set_random_seed``).
    """
    if kind not in GENERATORS:
        raise UnknownNameError("generator", kind, GENERATORS)
    shape = tuple(int(d) for d in shape)
    if kind == "conv":
        return _conv_generator(z_dim, shape, width)
    return _progressive_generator(z_dim, shape, width)


def _blend_layer(generator: keras.Model) -> StageBlend | None:
    """The progressive generator's :class:`StageBlend` layer (None for other generators)."""
    found = [layer for layer in generator.layers if isinstance(layer, StageBlend)]
    return found[0] if found else None


def _growth_mix(generator: keras.Model, step: int, epochs: int) -> np.ndarray | None:
    """Stage weights for the progressive generator at ``step`` of ``epochs`` (None: not progressive)."""
    blend = _blend_layer(generator)
    if blend is None:
        return None
    stages = blend.stages
    mix = np.zeros(stages, np.float32)
    if step >= epochs or stages == 1:
        mix[-1] = 1.0
        return mix
    phase_len = epochs / stages
    phase = min(int(step // phase_len), stages - 1)
    within = (step - phase * phase_len) / phase_len
    alpha = 1.0 if phase == 0 else min(1.0, 2.0 * within)  # fade in over the first half
    mix[phase] = alpha
    if phase:
        mix[phase - 1] = 1.0 - alpha
    return mix


# --------------------------------------------------------------------------- the loss


def secret_key(n: int, num_classes: int) -> np.ndarray:
    """Y_sk = {i mod M : i = 0..n-1}, the paper's secret key."""
    return np.arange(n, dtype=np.int64) % int(num_classes)


def softmax_variance(probabilities):
    """Var(P): each row's variance over its classes, averaged over the rows (see the module doc)."""
    classes = ops.shape(probabilities)[-1]
    return ops.mean(ops.square(probabilities - 1.0 / ops.cast(classes, probabilities.dtype)))


def _logit_gap(logits, keys):
    """Key logit minus the largest other logit, per row."""
    onehot = ops.one_hot(keys, ops.shape(logits)[-1], dtype=logits.dtype)
    key_logit = ops.sum(logits * onehot, axis=-1)
    others = ops.max(logits - onehot * 1e9, axis=-1)
    return key_logit - others


def fragile_loss(logits, keys, *, variant: str, a: float, margin: float):
    """Equation (1) for ``variant``, plus the margin hinge for the keyed variants.

    Returns:
        ``(loss, cross_entropy, variance, hinge)`` as scalars.
    """
    probabilities = ops.softmax(logits, axis=-1)
    ce = ops.mean(keras.losses.sparse_categorical_crossentropy(keys, logits, from_logits=True))
    var = softmax_variance(probabilities)
    hinge = ops.mean(ops.relu(margin - _logit_gap(logits, keys))) if margin > 0 else 0.0 * ce
    if variant == "full":
        loss = ce + a * var + hinge
    elif variant == "cla":
        loss = ce + hinge
    elif variant == "var":
        loss = a * var
    else:
        raise ValueError(f"variant {variant!r} is not trained")
    return loss, ce, var, hinge


def _logit_scores(model: keras.Model):
    """``x -> scores in logit units`` of ``model`` (log-probabilities where no logit layer is found)."""
    logits_of, from_logits = classifier.logit_function(model)
    if from_logits:
        return logits_of
    return lambda x: ops.log(ops.maximum(logits_of(x), 1e-30))


# --------------------------------------------------------------------------- measuring


def trigger_report(
    model: keras.Model, x: np.ndarray, labels: np.ndarray, *, batch_size: int = 256
) -> tuple[float, np.ndarray]:
    """AccTri and the per-trigger logit gaps of ``model``, from one batched prediction.

    Returns:
        ``(accuracy, gaps)``: the share of triggers labelled with their key
        (equation 2), and per trigger the logit of its key minus the largest
        other logit (negative: a wrong label).
    """
    scores = classifier.log_scores(model, x, batch_size)
    labels = np.asarray(labels).reshape(-1)
    accuracy = float(np.mean(np.argmax(scores, axis=1) == labels))
    rows = np.arange(len(labels))
    key = scores[rows, labels]
    others = scores.copy()
    others[rows, labels] = -np.inf
    return accuracy, key - others.max(axis=1)


def trigger_margins(
    model: keras.Model, x: np.ndarray, labels: np.ndarray, *, batch_size: int = 256
) -> np.ndarray:
    """Per trigger: the logit of its key minus the largest other logit (negative: wrong label)."""
    return trigger_report(model, x, labels, batch_size=batch_size)[1]


def fragility_check(
    model: keras.Model, keys: Mapping[str, Key], folder: str | Path, *, min_gap: float = 1e-3
) -> dict[str, dict[str, Any]]:
    """Whether each key verifies ``model`` without a false alarm, whatever the float path.

    The model is saved to ``folder`` as ``.keras`` and loaded back (safe
    mode); each key's AccTri is measured on the original at batch size n,
    on the reloaded model at batch sizes 1 and n, and once more at n; a key
    is fit when all four are 1.0 and every trigger's gap between its top two
    logits exceeds ``min_gap``.

    Args:
        model: the unmodified classifier.
        keys: name -> key of ``model``.
        folder: an existing folder for the round-trip file.
        min_gap: the smallest logit gap a fit key may have.

    Returns:
        name -> ``{variant, a, acctri, acctri_roundtrip_batch1,
        acctri_roundtrip_batch<n>, acctri_repeat, min_logit_gap,
        fit_for_verification}``.
    """
    from models.loading import load_model, save_model

    path = save_model(model, Path(folder) / f"{model.name}.keras")
    loaded = load_model(path)
    rows = {}
    for name, key in keys.items():
        n = len(key)
        original = classifier.accuracy(model, key.inputs, key.labels, batch_size=n)
        batch1, gaps1 = trigger_report(loaded, key.inputs, key.labels, batch_size=1)
        batchn, gapsn = trigger_report(loaded, key.inputs, key.labels, batch_size=n)
        again = classifier.accuracy(loaded, key.inputs, key.labels, batch_size=n)
        gap = float(np.concatenate([gaps1, gapsn]).min())
        rows[name] = {
            "variant": key.metadata.get("variant", key.scheme),
            "a": key.metadata.get("a", math.nan),
            "acctri": original,
            "acctri_roundtrip_batch1": batch1,
            f"acctri_roundtrip_batch{n}": batchn,
            "acctri_repeat": again,
            "min_logit_gap": gap,
            "fit_for_verification": min(original, batch1, batchn, again) == 1.0 and gap > min_gap,
        }
    return rows


# --------------------------------------------------------------------------- keys


def _trigger_range(data, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's input range per channel (:func:`models.classifier.input_range`)."""
    low, high = classifier.input_range(data)
    low = np.broadcast_to(np.asarray(low, np.float32).reshape(-1), (channels,))
    high = np.broadcast_to(np.asarray(high, np.float32).reshape(-1), (channels,))
    return low.astype(np.float32), high.astype(np.float32)


def _noise_and_generator(config, shape: tuple[int, ...]) -> tuple[np.ndarray, keras.Model]:
    """The seeded noise z and the freshly initialised generator of ``config``."""
    seed_everything(config.seed)
    z = np.random.default_rng([config.seed, 512]).standard_normal((config.n, config.z_dim))
    generator = build_generator(config.generator, shape, z_dim=config.z_dim, width=config.width)
    return z.astype(np.float32), generator


def _images(generator: keras.Model, z: np.ndarray, low, high) -> np.ndarray:
    """G(z) mapped from tanh's [-1, 1] into the input range."""
    g = np.asarray(generator(z, training=False))
    return (low + (high - low) * (g + 1.0) / 2.0).astype(np.float32)


def _generator_arrays(generator: keras.Model) -> dict[str, np.ndarray]:
    return {f"{_GEN_PREFIX}{i:03d}": w for i, w in enumerate(generator.get_weights())}


def _spec(config, shape, low, high) -> dict[str, Any]:
    return {
        "kind": config.generator,
        "z_dim": config.z_dim,
        "width": config.width,
        "shape": [int(d) for d in shape],
        "low": [float(v) for v in low],
        "high": [float(v) for v in high],
    }


def generator_from_key(key: Key) -> keras.Model:
    """Rebuild the key's generator G with its trained weights."""
    spec = key.metadata.get("generator")
    if not isinstance(spec, dict):
        raise UserError("this key holds no generator (it was not made by the fragile scheme)")
    generator = build_generator(
        spec["kind"], tuple(spec["shape"]), z_dim=int(spec["z_dim"]), width=int(spec["width"])
    )
    names = sorted(k for k in key.arrays if k.startswith(_GEN_PREFIX))
    try:
        generator.set_weights([key.arrays[k] for k in names])
    except ValueError as exc:
        raise UserError(f"the key's generator weights do not fit its architecture: {exc}") from None
    return generator


def regenerate(key: Key) -> np.ndarray:
    """Remake the key's triggers from its generator and noise: G(z), in the data's range."""
    if "z" not in key.arrays:
        raise UserError("this key holds no noise vectors z; it was not made by the fragile scheme")
    spec = key.metadata["generator"]
    low, high = np.asarray(spec["low"], np.float32), np.asarray(spec["high"], np.float32)
    return _images(generator_from_key(key), key.arrays["z"].astype(np.float32), low, high)


def key_summary(key: Key) -> dict[str, Any]:
    """The key's scalar facts (variant, a, margins, fitness) as a flat dict."""
    keep = (
        "variant",
        "a",
        "seed",
        "fit_for_verification",
        "all_match",
        "min_margin",
        "mean_max_softmax",
        "epochs_run",
    )
    return {name: key.metadata.get(name) for name in keep}


# --------------------------------------------------------------------------- verification


class _ExactMatch(Watermark):
    """Fragile verification shared by both schemes: AccTri against ``config.threshold``."""

    kind = "fragile"

    def decide(self, key: Key, outputs: np.ndarray) -> Verification:
        """AccTri (equation 2) of the suspect's outputs; below the threshold (1.0): modified.

        A refused query (a row that is not finite) counts as a changed label.
        """
        if len(key) == 0:
            raise UserError("the key holds no triggers")
        matched = answers(outputs) == key.labels
        accuracy = float(np.mean(matched))
        threshold = float(self.config.threshold)
        intact = accuracy >= threshold
        if intact:
            verdict = f"AccTri {accuracy:.4f} >= {threshold:g} (every trigger keeps its key)"
        else:
            verdict = (
                f"AccTri {accuracy:.4f} < {threshold:g} "
                f"({int(np.sum(~matched))} of {len(key)} triggers changed label)"
            )
        if key.metadata.get("fit_for_verification") is False:
            verdict += (
                " [warning: this key's triggers tie on the original model; unfit for verification]"
            )
        return Verification(
            kind="fragile",
            scheme=self.name,
            statistic=accuracy,
            threshold=threshold,
            p_value=math.nan,
            present=None,
            intact=bool(intact),
            verdict=verdict,
            n=len(key),
            null=_NULL,
        )


# --------------------------------------------------------------------------- the scheme


class FragileTrigger(_ExactMatch):
    """Yin et al.'s fragile watermark: generator-made triggers, AccTri verification.

    ``embed(model, data)`` returns ``Marked(model, key)`` with ``model`` the
    very object given (never modified); ``verify(model, key)`` is AccTri
    with threshold 1.0 (``intact`` means unmodified).
    """

    name = "fragile"
    Config = FragileConfig
    changes_model = False
    presets = {
        # seconds on scikit-learn's 8x8 digits with the zoo's _tiny_cnn
        "smoke": {"n": 30, "epochs": 40, "max_epochs": 120, "width": 16, "learning_rate": 3e-3},
        # python -m reproduce fragile --preset quick
        "quick": {"generator": "conv", "epochs": 60, "max_epochs": 180, "width": 64},
        # the paper's PGAN-style generator, 300 epochs, n = 100, a = 200 (and the margin remedy)
        "paper": {"generator": "progressive", "epochs": 300, "max_epochs": 900, "width": 128},
    }

    def _embed(self, model, data, *, hooks: tuple) -> Marked:
        """Train the generator against the frozen ``model``; refuse a key unfit for verification.

        ``hooks`` take no measurements: the model does not change while the
        generator trains, so there is no curve to follow.
        """
        key = self.trigger_set(model, data)
        if not key.metadata["fit_for_verification"]:
            meta = key.metadata
            missed = "" if meta["all_match"] else "not every trigger takes its key; "
            raise EmbeddingFailed(
                f"fragile {meta['variant']} (a={meta['a']:g}): {missed}smallest logit gap "
                f"{meta['min_margin']:.3g} after {meta['epochs_run']} generator epochs, not above "
                f"min_margin {self.config.min_margin:g}; raise max_epochs or lower a"
            )
        return Marked(model, key)

    def trigger_set(self, model: keras.Model, data) -> Key:
        """The generator's key for ``model``, fit for verification or not.

        :meth:`embed` is the checked path (gate, fitness, verification);
        this gives the key of any variant as the generator made it, for
        studies that show unfit generators too (Table 3's G_var). While
        :func:`models.training.caching` is on, a key made before for the
        same model weights, config and input range is reused.

        Args:
            model: the classifier C; only queried, never modified.
            data: a :class:`models.Dataset` prepared for the model (its
                input range and classes).
        """
        check_fits(model, data)
        shape = tuple(int(d) for d in model.input_shape[1:])
        low, high = _trigger_range(data, shape[2])
        path = self._cache_path(model, low, high) if caching() else None
        if path is not None and path.is_file():
            log.info("fragile %s: reused cached key %s", self.config.variant, path.name)
            return Key.load(path)
        key = self._make_key(model, shape, data.num_classes, low, high)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            key.save(path)
        return key

    def _cache_path(self, model, low, high) -> Path:
        parts = [_CACHE_VERSION, dataclasses.asdict(self.config), low.tolist(), high.tolist()]
        if max_steps() is not None:  # a truncated generator never stands in for a full one
            parts.append(f"max_steps={max_steps()}")
        ident = json.dumps(parts)
        name = hashlib.sha256((classifier.digest(model, 64) + ident).encode()).hexdigest()[:24]
        return default_cache_dir() / "fragile" / f"{name}.npz"

    def _make_key(self, model, shape, classes: int, low, high) -> Key:
        config = self.config
        z, generator = _noise_and_generator(config, shape)
        y_sk = secret_key(config.n, classes)
        history: dict[str, Any] = {"epochs_run": 0}
        if config.variant != "non":
            history = self._train(model, generator, z, y_sk, low, high)
        triggers = _images(generator, z, low, high)
        probabilities = classifier.probabilities(model, triggers, config.n)
        predicted = np.argmax(probabilities, axis=1)
        labels = y_sk if config.variant in _KEYED else predicted
        margins = trigger_margins(model, triggers, labels, batch_size=config.n)
        matched = bool(np.all(predicted == labels))
        fit = matched and bool(margins.min() > config.min_margin)
        if not fit:
            log.warning(
                "fragile %s (a=%g): %s; this key is unfit for verification",
                config.variant,
                config.a,
                f"triggers tie (smallest logit gap {margins.min():.2g})"
                if matched
                else f"{int(np.sum(predicted != labels))} triggers miss their key",
            )
        metadata = {
            "config": dataclasses.asdict(config),
            "a": config.a,
            "seed": config.seed,
            "variant": config.variant,
            "num_classes": classes,
            "threshold": config.threshold,
            "generator": _spec(config, shape, low, high),
            "keys_are_secret_key": config.variant in _KEYED,
            "fit_for_verification": fit,
            "all_match": matched,
            "min_margin": float(margins.min()),
            "mean_max_softmax": float(probabilities.max(axis=1).mean()),
            "model": model.name,
            **history,
        }
        arrays = {
            "z": z,
            "secret_key": y_sk,
            "probabilities": probabilities.astype(np.float32),
            "margins": margins.astype(np.float32),
            **_generator_arrays(generator),
        }
        return Key(self.name, triggers, labels, metadata, arrays)

    def _step(self, model, generator, z, y_sk, low, high, a: tf.Variable):
        """One Adam step of the generator on equation (1) (a ``tf.function``)."""
        config = self.config
        scores_of = _logit_scores(model)
        optimizer = keras.optimizers.Adam(config.learning_rate)
        variables = generator.trainable_variables
        optimizer.build(variables)
        z_t, keys_t = tf.constant(z), tf.constant(y_sk)
        low_t, span_t = tf.constant(low), tf.constant(high - low)
        variant, margin = config.variant, float(config.margin)

        @tf.function(reduce_retracing=True)
        def step():
            with tf.GradientTape() as tape:
                x = low_t + span_t * (generator(z_t, training=True) + 1.0) / 2.0
                logits = scores_of(x)
                loss, ce, var, hinge = fragile_loss(
                    logits, keys_t, variant=variant, a=a, margin=margin
                )
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            return loss, ce, var, hinge, ops.min(_logit_gap(logits, keys_t))

        return step, scores_of

    def _train(self, model, generator, z, y_sk, low, high) -> dict[str, Any]:
        """Train ``generator`` on equation (1); the classifier is only called, in inference mode."""
        config = self.config
        a = tf.Variable(0.0 if config.warmup else float(config.a), trainable=False, dtype="float32")
        ramp = max(1.0, config.warmup * config.epochs)
        step, scores_of = self._step(model, generator, z, y_sk, low, high, a)
        blend = _blend_layer(generator)
        # --max-steps caps both (models.training.limit); the ramp and growth keep the config's pace
        epochs, cap = limit(config.epochs), limit(config.max_epochs)
        values, epochs_run = [float("nan")] * 5, 0
        while epochs_run < cap:  # epochs = max_epochs = 0 trains nothing (and reports it)
            if blend is not None:
                blend.mix.assign(_growth_mix(generator, epochs_run, config.epochs))
            if config.warmup:
                a.assign(float(config.a) * min(1.0, (epochs_run + 1) / ramp))
            values = [float(v) for v in step()]
            epochs_run += 1
            if epochs_run % 50 == 0:
                log.info(
                    "fragile %s (a=%g): epoch %d, loss %.4f",
                    config.variant,
                    config.a,
                    epochs_run,
                    values[0],
                )
            if epochs_run < epochs:
                continue
            if config.variant not in _KEYED or epochs_run >= cap:
                break
            if (epochs_run - epochs) % _CHUNK == 0 and values[4] > config.min_margin:
                # the gap above was measured before this step's update: check the result
                logits = np.asarray(scores_of(_images(generator, z, low, high)))
                if np.asarray(_logit_gap(logits, y_sk)).min() > config.min_margin:
                    break
        if blend is not None:
            blend.mix.assign(_growth_mix(generator, config.epochs, config.epochs))
        log.info(
            "fragile %s (a=%g): %d epochs, loss %.4f (ce %.4f, var %.5f, hinge %.4f)",
            config.variant,
            config.a,
            epochs_run,
            *values[:4],
        )
        return {
            "epochs_run": epochs_run,
            "final_loss": values[0],
            "final_cross_entropy": values[1],
            "final_variance": values[2],
            "final_hinge": values[3],
        }


# --------------------------------------------------------------------------- the baseline


class _UntilLearnt(keras.callbacks.Callback):
    """Stops fine-tuning once ``min_epochs`` are done and every trigger takes its key."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, min_epochs: int):
        super().__init__()
        self.x, self.labels, self.min_epochs = x, labels, min_epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.min_epochs:
            learnt = classifier.accuracy(self.model, self.x, self.labels) == 1.0
            self.model.stop_training = bool(learnt)


class FragileFineTune(_ExactMatch):
    """Table 2's comparison ([14], Zhu et al. 2021): a trigger set fine-tuned into the weights.

    The untrained generator's images (G_non's: the same noise, generator and
    seed as :class:`FragileTrigger` with ``variant="non"``), labelled with
    Y_sk, repeated ``repeats`` times, are added to the owner's training
    images (``data``'s training split: the caller chooses its size) and a
    copy of the model is fine-tuned (Adam 1e-3 by default) for ``epochs``
    epochs and on, up to ``max_epochs``, until it labels every trigger with
    its key: a trigger set the model has not learnt is no watermark. (The
    reproduction's earlier baseline stopped after 3 epochs at 1e-4, before
    the triggers were learnt.) Verification
    is AccTri against 1.0, as for :class:`FragileTrigger`; unlike it, the
    marked model is a new model with other weights (and other accuracy).
    The hooks' values per epoch are kept in the key's metadata (``curves``).
    """

    name = "fragile_finetune"
    Config = FragileFineTuneConfig
    presets = {
        # seconds on scikit-learn's 8x8 digits with the zoo's _tiny_cnn (about 7 epochs)
        "smoke": {
            "n": 10,
            "width": 16,
            "repeats": 30,
            "epochs": 3,
            "max_epochs": 40,
            "batch_size": 32,
            "learning_rate": 1e-2,
        },
        # python -m reproduce fragile --preset quick (baseline_epochs 3, baseline_repeats 10);
        # Adam 1e-3, not the old baseline's 1e-4: at 1e-4 a LeNet5 (0.78 on 5,000 Fashion-MNIST
        # images) knew 77 of the 100 triggers after 30 epochs; at 1e-3 all of them after 12
        "quick": {"generator": "conv", "width": 64, "epochs": 3, "max_epochs": 30},
        "paper": {"generator": "progressive", "width": 128, "epochs": 10, "max_epochs": 60},
    }

    def _embed(self, model, data, *, hooks: tuple) -> Marked:
        config = self.config
        shape = tuple(int(d) for d in model.input_shape[1:])
        low, high = _trigger_range(data, shape[2])
        z, generator = _noise_and_generator(config, shape)
        triggers = _images(generator, z, low, high)
        y_sk = secret_key(config.n, data.num_classes)
        x = np.concatenate([data.x_train, *[triggers] * config.repeats])
        y = np.concatenate([data.y_train, *[y_sk] * config.repeats])
        copy = copy_model(model)
        result = train(
            copy,
            (x, y),
            config.train_config(),
            cache_tag=f"fragile/baseline14/until-learnt:{config.epochs}",
            callbacks=[_UntilLearnt(triggers, y_sk, config.epochs)],
            hooks=hooks,
            verbose=0,
        )
        metadata = {
            "config": dataclasses.asdict(config),
            "seed": config.seed,
            "variant": "non",
            "num_classes": data.num_classes,
            "threshold": config.threshold,
            "generator": _spec(config, shape, low, high),
            "epochs_run": result.epochs_run,
            "train_examples": len(data.y_train),
            "model": model.name,
            "curves": hook_curves(result.history, hooks),
        }
        arrays = {"z": z, "secret_key": y_sk, **_generator_arrays(generator)}
        return Marked(copy, Key(self.name, triggers, y_sk, metadata, arrays))
