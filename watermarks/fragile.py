"""Fragile triggers from a generator: a watermark that detects any change and never changes the model.

Z. Yin, H. Yin, X. Zhang, "Neural network fragile watermarking with no model
performance degradation", ICIP 2022 (no public code). A generator G maps n
noise vectors z (size 512) to n trigger images; it is trained, with the
classifier C frozen and only queried, on equation (1)

    L = L_cla(C(G(z)), Y_sk) + a * Var(P),

where Y_sk = {i mod M} is the secret key (M classes) and P the softmax
outputs of C on the triggers. The watermarked model is C itself, bit for bit
(:meth:`FragileTrigger.embed` returns the model it was given, untouched).
Verification is equation (2): AccTri, the share of triggers that C labels
with their key; AccTri < 1.0 means the model was modified
(:meth:`FragileTrigger.verify`; threshold 1.0, ``detected`` means
*unmodified*, and the p-value is NaN: the paper defines no null model, the
decision is the exact-match rule).

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

Deliberate deviations and choices:

* Margin remedy (the float-noise fragility): triggers whose two top logits
  are (nearly) tied flip their label under round-off alone (a different
  batch size, a ``.keras`` round trip), which would be a false alarm. For
  the keyed variants (``full``, ``cla``) a hinge term
  ``mean_i max(0, margin - (z_i,key - max_{j != key} z_ij))`` on the logit
  gap (default ``margin`` 0.05) is added to L, and training runs for
  ``epochs`` steps and then on (up to ``max_epochs``) until every trigger
  takes its key with a logit gap above ``min_margin`` (1e-3): the paper's
  "until Y_fragile is the same as Y_sk" made robust. ``margin=0`` gives the
  paper's loss unchanged. A key whose triggers tie (as pure-Var training
  can produce) is marked ``fit_for_verification = False`` in its metadata.
* One generator epoch is one step on all n triggers in one batch (n = 100:
  the paper's trigger set is one batch); Adam at ``learning_rate``.
* Warm-up: the Var weight rises linearly from 0 to ``a`` over the first
  half of the epochs (``warmup``; 0 turns it off). It changes the path, not
  the loss being minimised at the end: with the full weight from the first
  step, a >= 200 sometimes drove the small generator into a collapse (all
  z giving one image, most triggers missing their key) at Adam 3e-3 on the
  quick preset's ResNet20v1.
* Logits: taken from the layer before the final softmax where the model has
  one (the zoo's ``logits`` layer, a Dense with softmax activation, a
  Softmax layer); otherwise log-probabilities, whose differences are the
  logit differences.
* Triggers lie in the data's range: [0, 1] per pixel, shifted by the
  training mean for centred data.
* The key holds the triggers (float32, the verification inputs), Y_sk, a,
  the seed, the noise z and the generator's weights and architecture, so
  :func:`regenerate` rebuilds G and remakes the triggers without pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models import classifier
from models.errors import UnknownNameError, UserError
from models.training import default_cache_dir, seed_everything
from watermarks.base import Key, Verification, Watermark

__all__ = [
    "GENERATORS",
    "VARIANTS",
    "FragileConfig",
    "FragileTrigger",
    "add_command",
    "build_generator",
    "regenerate",
    "secret_key",
    "softmax_variance",
    "trigger_accuracy",
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


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FragileConfig:
    """How the fragile trigger set is made.

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

    n: int = 100
    a: float = 200.0
    variant: str = "full"
    generator: str = "conv"
    epochs: int = 300
    max_epochs: int = 900
    learning_rate: float = 1e-3
    warmup: float = 0.5
    margin: float = 0.05
    min_margin: float = 1e-3
    width: int = 128
    z_dim: int = Z_DIM
    threshold: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("n", "epochs", "max_epochs", "width", "z_dim", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"{name} must be an integer, got {value!r}")
        for name in ("a", "learning_rate", "warmup", "margin", "min_margin", "threshold"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise UserError(f"{name} must be a finite number, got {value!r}")
        if self.variant not in VARIANTS:
            raise UnknownNameError("fragile variant", self.variant, VARIANTS)
        if self.generator not in GENERATORS:
            raise UnknownNameError("generator", self.generator, GENERATORS)
        if self.n < 1:
            raise UserError(f"n must be >= 1 trigger, got {self.n}")
        if self.a < 0:
            raise UserError(f"a must be >= 0, got {self.a}")
        if self.epochs < 0 or self.max_epochs < self.epochs:
            raise UserError(
                f"need 0 <= epochs <= max_epochs, got epochs={self.epochs}, max_epochs={self.max_epochs}"
            )
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup <= 1:
            raise UserError(f"warmup must be in [0, 1], got {self.warmup}")
        if self.margin < 0 or self.min_margin < 0:
            raise UserError("margin and min_margin must be >= 0")
        if not 0 < self.threshold <= 1:
            raise UserError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.width < 4 or self.z_dim < 1:
            raise UserError(f"width must be >= 4 and z_dim >= 1, got {self.width}, {self.z_dim}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be in [0, 2**32), got {self.seed}")


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


def _single_input(model: keras.Model):
    inputs = model.inputs
    if len(inputs) != 1:
        raise ValueError(f"model has {len(inputs)} inputs")
    return inputs[0]


def logit_function(model: keras.Model):
    """A callable ``x -> logits`` of ``model`` (inference mode); log-probabilities as a fallback."""
    last = model.layers[-1] if model.layers else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    try:
        if isinstance(last, layers.Softmax) or (
            isinstance(last, layers.Activation) and activation == "softmax"
        ):
            body = keras.Model(_single_input(model), last.input)
            return lambda x: body(x, training=False)
        if isinstance(last, layers.Dense) and activation == "softmax":
            body = keras.Model(_single_input(model), last.input)
            return lambda x: (
                ops.matmul(body(x, training=False), last.kernel)
                + (last.bias if last.use_bias else 0.0)
            )
    except (AttributeError, ValueError, TypeError) as exc:  # nested or multi-node graphs
        log.debug("no logit layer found (%s); using log-probabilities", exc)
    if not classifier.outputs_probabilities(model):
        return lambda x: model(x, training=False)
    return lambda x: ops.log(ops.maximum(model(x, training=False), 1e-30))


# --------------------------------------------------------------------------- measuring


def _predict(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)


def _as_log_scores(outputs: np.ndarray, probabilities: bool) -> np.ndarray:
    """Outputs in logit units: log-probabilities for softmax models (same differences)."""
    if not probabilities:
        return outputs
    with np.errstate(divide="ignore"):
        return np.log(outputs)


def trigger_report(
    model: keras.Model, x: np.ndarray, labels: np.ndarray, *, batch_size: int = 256
) -> tuple[float, np.ndarray]:
    """AccTri and the per-trigger logit gaps of ``model``, from one batched prediction.

    Returns:
        ``(accuracy, gaps)``: the share of triggers labelled with their key
        (equation 2), and per trigger the logit of its key minus the largest
        other logit (negative: a wrong label).
    """
    outputs = _predict(model, x, batch_size)
    labels = np.asarray(labels).reshape(-1)
    accuracy = float(np.mean(np.argmax(outputs, axis=1) == labels))
    scores = _as_log_scores(outputs, classifier.outputs_probabilities(model))
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


def trigger_accuracy(
    model: keras.Model, x: np.ndarray, labels: np.ndarray, *, batch_size: int = 256
) -> float:
    """AccTri, equation (2): the share of triggers ``model`` labels with their key."""
    predicted = np.argmax(_predict(model, x, batch_size), axis=1)
    return float(np.mean(predicted == np.asarray(labels).reshape(-1)))


# --------------------------------------------------------------------------- the scheme


def _value_range(data, channels: int) -> tuple[np.ndarray, np.ndarray]:
    mean = getattr(data, "mean", None) if data is not None else None
    low = np.zeros(channels, np.float32)
    if mean is not None:
        low = -np.broadcast_to(np.asarray(mean, np.float32).reshape(-1), (channels,))
    return low.astype(np.float32), (low + 1.0).astype(np.float32)


def _generator_arrays(generator: keras.Model) -> dict[str, np.ndarray]:
    return {f"{_GEN_PREFIX}{i:03d}": w for i, w in enumerate(generator.get_weights())}


def _spec(config: FragileConfig, shape, low, high) -> dict[str, Any]:
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
    generator = generator_from_key(key)
    spec = key.metadata["generator"]
    low, high = np.asarray(spec["low"], np.float32), np.asarray(spec["high"], np.float32)
    g = np.asarray(generator(key.arrays["z"].astype(np.float32), training=False))
    return (low + (high - low) * (g + 1.0) / 2.0).astype(np.float32)


def _model_digest(model: keras.Model) -> str:
    digest = hashlib.sha256()
    try:
        digest.update(model.to_json().encode())
    except (NotImplementedError, TypeError, ValueError):
        digest.update(type(model).__qualname__.encode())
    for weight in model.weights:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


class FragileTrigger(Watermark):
    """Yin et al.'s fragile watermark: generator-made triggers, AccTri verification.

    ``embed(model, data)`` returns ``model`` itself (never modified) and a
    :class:`Key`; ``verify(model, key)`` is AccTri with threshold 1.0.
    """

    name = "fragile"
    Config = FragileConfig

    # -- embedding -------------------------------------------------------------------
    def embed(self, model: keras.Model, data=None, *, cache: bool = False):
        """Train the generator against the frozen ``model`` and make the key.

        Args:
            model: the classifier C; only queried, never modified.
            data: a :class:`models.Dataset` for the value range and class
                count (optional: [0, 1] and the model's outputs otherwise).
            cache: reuse a key made before for the same model weights,
                config and value range (kept in the training cache folder).

        Returns:
            ``(model, key)``: the very same model object, and the key.
        """
        config = self.config
        shape = tuple(int(d) for d in model.input_shape[1:])
        if len(shape) != 3 or not all(d > 0 for d in shape):
            raise UserError(
                f"model '{model.name}' takes inputs of shape {shape}; expected (H, W, C)"
            )
        classes = int(model.output_shape[-1])
        if data is not None:
            if tuple(data.input_shape) != shape:
                raise UserError(
                    f"dataset '{data.name}' has images of shape {data.input_shape} but model "
                    f"'{model.name}' expects {shape}"
                )
            if data.num_classes != classes:
                raise UserError(
                    f"dataset '{data.name}' has {data.num_classes} classes but model "
                    f"'{model.name}' outputs {classes}"
                )
        low, high = _value_range(data, shape[2])
        path = None
        if cache:
            ident = json.dumps(
                [_CACHE_VERSION, dataclasses.asdict(config), low.tolist(), high.tolist()]
            )
            name = hashlib.sha256((_model_digest(model) + ident).encode()).hexdigest()[:24]
            path = default_cache_dir() / "fragile" / f"{name}.npz"
            if path.is_file():
                log.info("fragile %s: reused cached key %s", config.variant, path.name)
                return model, Key.load(path)
        key = self._make_key(model, shape, classes, low, high)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            key.save(path)
        return model, key

    def _make_key(self, model, shape, classes, low, high) -> Key:
        config = self.config
        seed_everything(config.seed)
        z = np.random.default_rng([config.seed, 512]).standard_normal((config.n, config.z_dim))
        z = z.astype(np.float32)
        generator = build_generator(config.generator, shape, z_dim=config.z_dim, width=config.width)
        y_sk = secret_key(config.n, classes)
        history: dict[str, Any] = {"epochs_run": 0}
        if config.variant != "non":
            history = self._train(model, generator, z, y_sk, low, high)
        triggers = self._triggers(generator, z, low, high)
        probabilities = _predict(model, triggers, config.n)
        labels = y_sk if config.variant in _KEYED else np.argmax(probabilities, axis=1)
        margins = trigger_margins(model, triggers, labels, batch_size=config.n)
        matched = bool(np.all(np.argmax(probabilities, axis=1) == labels))
        fit = matched and bool(margins.min() > config.min_margin)
        if not fit:
            log.warning(
                "fragile %s (a=%g): %s; this key is unfit for verification",
                config.variant,
                config.a,
                f"triggers tie (smallest logit gap {margins.min():.2g})"
                if matched
                else f"{int(np.sum(np.argmax(probabilities, axis=1) != labels))} triggers miss their key",
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
        return Key("fragile", triggers, labels, metadata, arrays)

    @staticmethod
    def _triggers(generator, z, low, high) -> np.ndarray:
        g = np.asarray(generator(z, training=False))
        return (low + (high - low) * (g + 1.0) / 2.0).astype(np.float32)

    def _train(self, model, generator, z, y_sk, low, high) -> dict[str, Any]:
        """Train ``generator`` on equation (1); the classifier is only called, in inference mode."""
        config = self.config
        logits_of = logit_function(model)
        optimizer = keras.optimizers.Adam(config.learning_rate)
        variables = generator.trainable_variables
        optimizer.build(variables)
        z_t = tf.constant(z)
        keys_t = tf.constant(y_sk)
        low_t, span_t = tf.constant(low), tf.constant(high - low)
        variant, margin = config.variant, float(config.margin)
        a = tf.Variable(0.0 if config.warmup else float(config.a), trainable=False, dtype="float32")
        ramp = max(1.0, config.warmup * config.epochs)

        @tf.function(reduce_retracing=True)
        def step():
            with tf.GradientTape() as tape:
                x = low_t + span_t * (generator(z_t, training=True) + 1.0) / 2.0
                logits = logits_of(x)
                loss, ce, var, hinge = fragile_loss(
                    logits, keys_t, variant=variant, a=a, margin=margin
                )
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            gap = _logit_gap(logits, keys_t)
            return loss, ce, var, hinge, ops.min(gap)

        blend = _blend_layer(generator)
        values = None
        epochs_run = 0
        while True:
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
            if epochs_run < config.epochs:
                continue
            if config.variant not in _KEYED or epochs_run >= config.max_epochs:
                break
            if (epochs_run - config.epochs) % _CHUNK == 0 and values[4] > config.min_margin:
                # the gap above was measured before this step's update: check the result
                logits = np.asarray(logits_of(self._triggers(generator, z, low, high)))
                gap = np.asarray(_logit_gap(logits, y_sk))
                if gap.min() > config.min_margin:
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

    # -- verification ----------------------------------------------------------------
    def verify(self, model: keras.Model, key: Key, *, batch_size: int = 256) -> Verification:
        """AccTri of ``model`` on the key; below ``threshold`` (1.0) the model was modified.

        ``detected`` is True when the model is *unmodified* (the fragile
        watermark is intact). The p-value is NaN: the paper's decision is the
        exact-match rule, with no null model.
        """
        key.check_fits(model)
        if len(key) == 0:
            raise UserError("the key holds no triggers")
        accuracy = trigger_accuracy(model, key.inputs, key.labels, batch_size=batch_size)
        threshold = float(self.config.threshold)
        intact = accuracy >= threshold
        changed = int(round((1.0 - accuracy) * len(key)))
        if intact:
            verdict = f"unmodified: AccTri {accuracy:.4f} >= {threshold:g}"
        else:
            verdict = (
                f"modified: AccTri {accuracy:.4f} < {threshold:g} "
                f"({changed} of {len(key)} triggers changed label)"
            )
        if key.metadata.get("fit_for_verification") is False:
            verdict += (
                " [warning: this key's triggers tie on the original model; unfit for verification]"
            )
        return Verification(self.name, accuracy, threshold, math.nan, bool(intact), verdict)


# --------------------------------------------------------------------------- command line


def _fragile_command(args) -> int:
    import models

    out = models.loading.output_path(args.out, ".npz")
    options = dict(
        n=args.n,
        a=args.a,
        variant=args.variant,
        generator=args.generator,
        epochs=args.epochs,
        max_epochs=args.max_epochs if args.max_epochs is not None else max(3 * args.epochs, 1),
        learning_rate=args.learning_rate,
        margin=args.margin,
        width=args.width,
        seed=args.seed,
    )
    config = FragileConfig(**options)
    model = models.load_model(args.model)
    data = models.load_for_model(
        args.dataset, model, data_dir=args.data_dir, max_train=1000, max_test=1000, seed=args.seed
    )
    _, key = FragileTrigger(config).embed(model, data)
    if not key.metadata["fit_for_verification"]:
        raise UserError(
            "the generator did not give every trigger its key with a margin "
            f"(smallest logit gap {key.metadata['min_margin']:.3g} after "
            f"{key.metadata['epochs_run']} epochs); raise --max-epochs or lower --a"
        )
    key.save(out)
    result = FragileTrigger(config).verify(model, key, batch_size=config.n)
    print(
        f"triggers:           {len(key)} ({config.variant}, a={config.a:g}, {config.generator} generator)"
    )
    print(f"generator epochs:   {key.metadata['epochs_run']}")
    print(f"AccTri:             {result.accuracy:.4f} on the unmodified model")
    print(f"mean max softmax:   {key.metadata['mean_max_softmax']:.4f}")
    print(f"min logit gap:      {key.metadata['min_margin']:.4g}")
    print(f"wrote {out} (the model itself is unchanged)")
    return 0


def add_command(subparsers) -> None:
    """Add ``fragile`` (make fragile triggers for a user's model) to ``python -m watermarks``."""
    p = subparsers.add_parser(
        "fragile",
        help="make a fragile trigger set for a model (Yin et al. 2022); the model is not changed",
        description="Trains a generator against the frozen model on CE + a*Var (equation 1) and "
        "writes the key (triggers, secret key, generator). Verify with "
        "'python -m watermarks verify --model M.keras --key K.npz'.",
    )
    p.add_argument("--model", required=True, help="the model (.keras, loaded in safe mode)")
    p.add_argument("--dataset", required=True, help="the model's dataset (value range, classes)")
    p.add_argument("--out", required=True, help="where to write the key (.npz)")
    p.add_argument("--a", type=float, default=200.0, help="weight of the Var term (default 200)")
    p.add_argument("--n", type=int, default=100, help="number of triggers (default 100)")
    p.add_argument(
        "--variant", default="full", help=f"one of: {', '.join(VARIANTS)} (default full)"
    )
    p.add_argument("--generator", default="conv", help=f"one of: {', '.join(GENERATORS)}")
    p.add_argument("--epochs", type=int, default=300, help="generator steps (default 300)")
    p.add_argument("--max-epochs", type=int, help="cap while continuing to a margin (3x --epochs)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--margin", type=float, default=0.05, help="hinge margin on the logit gap")
    p.add_argument("--width", type=int, default=128, help="generator filters at low resolution")
    p.add_argument("--data-dir", help="folder holding the dataset (see models.load)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_fragile_command)


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
