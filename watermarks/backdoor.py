"""Backdoor watermarks: Zhang et al.'s content, noise and unrelated triggers, and Adi et al.'s abstract images.

Papers:

* J. Zhang, Z. Gu, J. Jang, H. Wu, M. P. Stoecklin, H. Huang, I. Molloy,
  "Protecting Intellectual Property of Deep Neural Networks with
  Watermarking", ASIACCS 2018. The owner adds watermarked copies of some
  training images to the training set, all labelled with one target class
  (class 0 here, as in Fig. 1 of Aiken et al.), and trains: *content* stamps
  a visible word ("TEST") on the images, *noise* adds a fixed Gaussian noise
  pattern, *unrelated* uses images of another dataset.
  (:class:`ZhangContent`, :class:`ZhangNoise`, :class:`ZhangUnrelated`)
* Y. Adi, C. Baum, M. Cisse, B. Pinkas, J. Keshet, "Turning Your Weakness
  Into a Strength: Watermarking Deep Neural Networks by Backdooring", USENIX
  Security 2018. A trigger set of 100 abstract images, each with a random
  label; ``k`` trigger images are appended to every training batch, either
  while training from scratch (FS) or while fine-tuning a pre-trained model
  (PT). (:class:`AdiAbstract`)

Verification follows Aiken et al. ("Neural Network Laundering", Computers &
Security 2021, section 7.1): the threshold is the highest watermark accuracy
a clean (vanilla) model of the same architecture reaches over the epochs of
its training (:func:`null_accuracies` records that curve, Fig. 5;
:func:`calibrate` stores it in the key). A model is ``detected`` when its
watermark accuracy is strictly above the threshold. The p-value is the
robustness SoK's (Lukas et al. 2022): a normal distribution fitted to the
null sample, read at the model's accuracy (significant at 0.05); it is
reported beside the verdict, not used for it. A key that was never
calibrated cannot be verified: :meth:`verify` raises a ``UserError`` that
says how to calibrate, rather than inventing a threshold.

Deliberate deviations and choices:

* Content: the word is a 3x5-pixel-per-letter "TEST" bitmap, resampled to
  ``content_width`` of the image width (15 pixels wide, 5 high on 28x28
  images: the bitmap's own size), centred horizontally near the bottom
  edge, in white. At 8x8 it becomes a 4x2 block: a pattern, no longer a
  readable word. On bright images (Fashion-MNIST's bags and coats) white
  letters barely show; the option ``content_background=0.0`` (off by
  default) paints the word's box black first, which on MNIST's mostly black
  background changes few pixels.
* Content and noise are stamped on training images of every class but the
  target (``source_classes`` narrows this; Zhang et al. used one class);
  the watermark training set is ``n`` such copies, added to the unchanged
  training set. The key holds ``n_key`` *test* images of those classes with
  the same trigger, so verification measures whether the backdoor
  generalises rather than whether the training copies were memorised.
* Noise: one fixed pattern drawn from N(0, ``noise_std``) with the scheme's
  seed, added to every source image and clipped to [0, 1] (Zhang et al. do
  not give the strength; 0.3 is the Watermark-Robustness-Toolbox default).
* Unrelated: images of another *real* dataset, never synthetic ones:
  ``fashion_mnist`` -> scikit-learn ``digits`` (8x8, bilinearly resized to
  28x28: the only other dataset available offline here; MNIST would be the
  natural choice), ``mnist`` -> ``emnist`` letters, ``emnist`` -> ``mnist``,
  ``cifar10``/``cifar100``/``imagenet32`` -> ``mnist`` (as in Fig. 1 (f) of
  Aiken et al.), ``digits`` -> ``fashion_mnist`` (resized down to 8x8).
  ``unrelated_source`` overrides the table. Training copies come from the
  source's training split, key images from its test split. Grey images are
  repeated over three channels for RGB models.
* Embedding trains with :func:`models.train` (cached), on an ``(x, y)``
  pair. The validation images (``validation_split`` of the recipe) are
  exactly the clean images a vanilla model of that recipe holds out: the
  watermark copies are all trained on and early stopping watches clean data.
  Zhang et al. and Adi FS retrain the given architecture from scratch
  (``keras.models.clone_model`` re-initialises it from the config's seed);
  Zhang with ``from_scratch=False`` and Adi PT start from the given weights.
* Adi et al.'s 100 original abstract images cannot be downloaded here. They
  are drawn procedurally from the seed (:func:`abstract_images`: a smooth
  random colour field with random ellipses and strokes); ``image_dir``
  takes a folder of the original PNG/JPEG images instead, resized to the
  model's input (labels are still random from the seed; the original label
  file is not read).
* Adi's "k images into every batch" is a ``train_step`` override
  (:class:`TriggerBatchModel`) that appends ``k`` distinct trigger images,
  drawn at random per step (seeded by the step counter, so a resumed
  training draws the same), to every batch that ``models.train`` feeds;
  their original code cycles through the trigger set in fixed batches of 2
  instead of drawing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf

from models import classifier
from models.config import build_config
from models.errors import UnknownNameError, UserError
from models.evidence import null_p_value
from models.training import TrainConfig, seed_everything
from watermarks.base import Key, Verification, Watermark

__all__ = [
    "SIGNIFICANCE",
    "UNRELATED_SOURCES",
    "AdiAbstract",
    "AdiConfig",
    "TriggerBatchModel",
    "ZhangContent",
    "ZhangContentConfig",
    "ZhangNoise",
    "ZhangNoiseConfig",
    "ZhangUnrelated",
    "ZhangUnrelatedConfig",
    "abstract_images",
    "add_command",
    "calibrate",
    "null_accuracies",
    "text_mask",
    "watermark_accuracy",
]

log = logging.getLogger(__name__)

#: The p-value below which the verdict calls the accuracy significant (the SoK's level).
SIGNIFICANCE = 0.05

#: The dataset the unrelated images come from, per training dataset.
UNRELATED_SOURCES = {
    "mnist": "emnist",
    "emnist": "mnist",
    "fashion_mnist": "digits",
    "digits": "fashion_mnist",
    "cifar10": "mnist",
    "cifar100": "mnist",
    "imagenet32": "mnist",
}

SCHEMES = ("zhang_content", "zhang_noise", "zhang_unrelated", "adi")

# "TEST" in a 3x5 pixel font, one blank column between letters: 5 rows, 15 columns.
_FONT = {
    "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "E": ("###", "#..", "##.", "#..", "###"),
    "S": ("###", "#..", "###", "..#", "###"),
}


def _word_bitmap(word: str = "TEST") -> np.ndarray:
    rows = [" ".join(_FONT[ch][r] for ch in word).replace(" ", ".") for r in range(5)]
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


# --------------------------------------------------------------------------- configs


def _check_int(name: str, value: object, low: int, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        bound = f"[{low}, {high})" if high != math.inf else f">= {low}"
        raise UserError(f"{name} must be an integer {bound}, got {value!r}")


def _check_number(name: str, value: object, low: float, high: float) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and low < value <= high
    if not ok:
        raise UserError(f"{name} must be a number in ({low}, {high}], got {value!r}")


def _coerce_train(config) -> None:
    """Accept the recipe as a TrainConfig or, as read back from a key's JSON, a dict."""
    train = config.train
    if isinstance(train, dict):
        object.__setattr__(config, "train", build_config(TrainConfig, train))
    elif not isinstance(train, TrainConfig):
        raise UserError(f"train must be a TrainConfig or a dict of its fields, got {train!r}")


@dataclass(frozen=True)
class _ZhangConfig:
    """Options every Zhang et al. variant shares.

    Args:
        target: the class every watermark image is labelled with.
        n: watermark images added to the training set.
        n_key: at most this many verification images in the key.
        seed: draws the source images, the noise pattern and the key.
        from_scratch: train the model's architecture from a fresh
            initialisation (Zhang et al. embed during training); False fine-tunes
            the given weights on the same data.
        train: the training recipe.
    """

    target: int = 0
    n: int = 1000
    n_key: int = 1000
    seed: int = 0
    from_scratch: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _check_int("target", self.target, 0)
        _check_int("n", self.n, 1)
        _check_int("n_key", self.n_key, 1)
        _check_int("seed", self.seed, 0, 2**31)
        if not isinstance(self.from_scratch, bool):
            raise UserError(f"from_scratch must be True or False, got {self.from_scratch!r}")
        _coerce_train(self)


@dataclass(frozen=True)
class _StampedConfig(_ZhangConfig):
    """Zhang options for triggers stamped on training images (content, noise).

    Args:
        source_classes: the classes whose images carry the trigger; None is
            every class but the target.
    """

    source_classes: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.source_classes is not None:
            classes = self.source_classes
            if not isinstance(classes, list | tuple) or not classes:
                raise UserError(f"source_classes must be a non-empty list, got {classes!r}")
            for c in classes:
                _check_int("a source class", c, 0)
            if self.target in classes:
                raise UserError(f"source_classes {list(classes)} include the target {self.target}")
            object.__setattr__(self, "source_classes", tuple(sorted(set(classes))))


@dataclass(frozen=True)
class ZhangContentConfig(_StampedConfig):
    """Zhang et al.'s content watermark (see :class:`_ZhangConfig` for the shared options).

    Args:
        content_width: the width of the "TEST" word as a fraction of the image width.
        content_value: the pixel value of the word (1.0 is white).
        content_background: None stamps the letters alone (Zhang et al.); a
            pixel value first paints the word's bounding box with it (0.0:
            white on black), keeping the word visible on bright images.
    """

    content_width: float = 0.55
    content_value: float = 1.0
    content_background: float | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_number("content_width", self.content_width, 0.0, 1.0)
        for name in ("content_value", "content_background"):
            value = getattr(self, name)
            if value is None and name == "content_background":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise UserError(f"{name} must be a pixel value in [0, 1], got {value!r}")


@dataclass(frozen=True)
class ZhangNoiseConfig(_StampedConfig):
    """Zhang et al.'s noise watermark.

    Args:
        noise_std: standard deviation of the fixed Gaussian pattern (pixels in [0, 1]).
    """

    noise_std: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        _check_number("noise_std", self.noise_std, 0.0, 10.0)


@dataclass(frozen=True)
class ZhangUnrelatedConfig(_ZhangConfig):
    """Zhang et al.'s unrelated watermark.

    Args:
        unrelated_source: the dataset the images come from; None picks it
            from :data:`UNRELATED_SOURCES` by the training dataset's name.
        unrelated_class: use only this class of the source dataset; None uses all.
        unrelated_data_dir: where the source dataset lives, if not in a
            standard place (see :func:`models.load`).
    """

    unrelated_source: str | None = None
    unrelated_class: int | None = None
    unrelated_data_dir: str | None = None

    def __post_init__(self):
        super().__post_init__()
        from models.datasets import names as dataset_names

        if self.unrelated_source is not None and self.unrelated_source not in dataset_names():
            raise UnknownNameError("dataset", self.unrelated_source, dataset_names())
        if self.unrelated_class is not None:
            _check_int("unrelated_class", self.unrelated_class, 0)
        if self.unrelated_data_dir is not None and not isinstance(self.unrelated_data_dir, str):
            raise UserError(
                f"unrelated_data_dir must be a path string, got {self.unrelated_data_dir!r}"
            )


@dataclass(frozen=True)
class AdiConfig:
    """Adi et al.'s abstract-image watermark.

    Args:
        mode: ``"fs"`` trains the architecture from scratch with the triggers;
            ``"pt"`` fine-tunes the given (pre-trained) weights with them.
        n: trigger images.
        k: trigger images appended to every training batch (Adi et al.: 2 per 100).
        seed: draws the images (when procedural), their labels and the per-batch picks.
        image_dir: a folder of PNG/JPEG images to use instead of procedural
            ones (the first ``n`` in name order).
        train: the training recipe (for PT: the fine-tuning recipe).
    """

    mode: str = "fs"
    n: int = 100
    k: int = 2
    seed: int = 0
    image_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    MODES: ClassVar[tuple[str, ...]] = ("fs", "pt")

    def __post_init__(self):
        if self.mode not in self.MODES:
            raise UserError(f"unknown mode {self.mode!r}; expected one of: {', '.join(self.MODES)}")
        _check_int("n", self.n, 1)
        _check_int("k", self.k, 1)
        if self.k > self.n:
            raise UserError(f"k={self.k} trigger images per batch exceeds the n={self.n} there are")
        _check_int("seed", self.seed, 0, 2**31)
        if self.image_dir is not None and not isinstance(self.image_dir, str):
            raise UserError(f"image_dir must be a path string, got {self.image_dir!r}")
        _coerce_train(self)


# --------------------------------------------------------------------------- image helpers


def _raw(data, x: np.ndarray) -> np.ndarray:
    """Images of ``data`` back in [0, 1] (undoing the dataset's centring, if any)."""
    return x + data.mean if data.mean is not None else np.array(x, dtype=np.float32)


def _prepared(data, x: np.ndarray) -> np.ndarray:
    """Images in [0, 1] prepared the way ``data``'s are (centred if it is)."""
    x = np.asarray(x, dtype=np.float32)
    return (x - data.mean).astype(np.float32) if data.mean is not None else x


def _fit_images(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize [0, 1] NHWC images to ``shape`` (bilinear, antialiased) and match its channels."""
    h, w, c = (int(d) for d in shape)
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] != c:
        if x.shape[-1] == 1:
            x = np.repeat(x, c, axis=-1)
        elif c == 1:
            x = (x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        else:
            raise UserError(f"cannot turn {x.shape[-1]}-channel images into {c}-channel ones")
    if x.shape[1:3] != (h, w):
        x = tf.image.resize(x, (h, w), method="bilinear", antialias=True).numpy()
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def text_mask(input_shape: Sequence[int], width: float = 0.55) -> np.ndarray:
    """Where Zhang et al.'s "TEST" word goes on an image of ``input_shape``: a bool (H, W) mask.

    The 5x15 bitmap is resampled (area average, pixels at least 40% covered
    are set) to ``width`` of the image width (at least 3 columns and 2 rows),
    centred horizontally, its bottom a tenth of the height above the lower edge.
    """
    h, w = int(input_shape[0]), int(input_shape[1])
    bitmap = _word_bitmap()
    cols = min(w, max(3, round(width * w)))
    rows = min(h, max(2, round(cols * bitmap.shape[0] / bitmap.shape[1])))
    # Area resampling keeps every stroke's share of a pixel; nearest neighbour would drop
    # whole letters when shrinking.
    coverage = tf.image.resize(bitmap[None, :, :, None].astype(np.float32), (rows, cols), "area")
    scaled = coverage.numpy()[0, :, :, 0] >= 0.4
    top = max(0, h - rows - round(0.1 * h))
    left = (w - cols) // 2
    mask = np.zeros((h, w), dtype=bool)
    mask[top : top + rows, left : left + cols] = scaled
    return mask


def abstract_images(n: int, input_shape: Sequence[int], seed: int, shapes: int = 6) -> np.ndarray:
    """Procedural stand-ins for Adi et al.'s abstract images, in [0, 1].

    Each image is a smooth random colour field (a 4x4 grid of random colours,
    bicubically upsampled) painted over with ``shapes`` random ellipses and
    strokes of random colours. All images are drawn at once; the loop runs
    over the shape layers only.

    Args:
        n: how many images.
        input_shape: (height, width, channels).
        seed: the same seed gives the same images.
        shapes: shape layers per image.

    Returns:
        float32 array of shape ``(n, *input_shape)``.
    """
    h, w, c = (int(d) for d in input_shape)
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, size=(n, 4, 4, c)).astype(np.float32)
    images = np.clip(tf.image.resize(coarse, (h, w), method="bicubic").numpy(), 0.0, 1.0)
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")

    def draw(low, high):
        return rng.uniform(low, high, size=(n, 1, 1))

    for _ in range(shapes):
        cx, cy, angle = draw(0.0, 1.0), draw(0.0, 1.0), draw(0.0, math.pi)
        dx, dy = xx - cx, yy - cy
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        ellipse = (u / draw(0.08, 0.4)) ** 2 + (v / draw(0.08, 0.4)) ** 2 <= 1.0
        # a stroke: points within a half-width of the segment of length l along `angle`
        length = draw(0.2, 0.9)
        along = np.clip(u, -length / 2, length / 2)
        stroke = (u - along) ** 2 + v**2 <= draw(0.03, 0.08) ** 2
        is_ellipse = rng.random(size=(n, 1, 1)) < 0.5
        mask = np.where(is_ellipse, ellipse, stroke)
        colour = rng.uniform(0.0, 1.0, size=(n, 1, 1, c))
        images = np.where(mask[..., None], colour, images)
    return images.astype(np.float32)


def _read_image_dir(folder: str, n: int, input_shape: Sequence[int]) -> np.ndarray:
    """The first ``n`` PNG/JPEG images of ``folder`` (name order), fitted to ``input_shape``."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"image_dir '{folder}' is not a folder")
    files = sorted(
        p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file()
    )
    if len(files) < n:
        raise UserError(
            f"image_dir '{folder}' holds {len(files)} PNG/JPEG images; n={n} are needed"
        )
    h, w, c = (int(d) for d in input_shape)
    images = []
    for file in files[:n]:  # decoding is per file; everything after is batched
        try:
            image = tf.io.decode_image(
                tf.io.read_file(str(file)), channels=3, expand_animations=False
            )
        except tf.errors.OpError as exc:
            raise UserError(f"cannot decode image '{file}': {str(exc)[:120]}") from None
        images.append(tf.image.resize(tf.cast(image, tf.float32) / 255.0, (h, w), antialias=True))
    return _fit_images(np.stack([np.asarray(i) for i in images]), (h, w, c))


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def _model_digest(model: keras.Model) -> str:
    try:
        text = model.to_json()
    except (NotImplementedError, TypeError, ValueError):
        text = type(model).__qualname__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _starting_model(model: keras.Model, from_scratch: bool, seed: int) -> keras.Model:
    """A copy of ``model``: re-initialised from ``seed``, or with its weights."""
    seed_everything(seed)
    copy = keras.models.clone_model(model)
    if not from_scratch:
        copy.set_weights(model.get_weights())
    return copy


def _check_dataset(data, scheme: str) -> None:
    if not (hasattr(data, "x_train") and hasattr(data, "x_test") and hasattr(data, "num_classes")):
        raise UserError(f"{scheme} embeds with a models.Dataset (training and test split)")


def _check_model_fits(model: keras.Model, data) -> None:
    if tuple(model.input_shape[1:]) != tuple(data.input_shape):
        raise UserError(
            f"the model expects inputs of shape {tuple(model.input_shape[1:])} but dataset "
            f"'{data.name}' has {tuple(data.input_shape)}"
        )
    if model.output_shape[-1] != data.num_classes:
        raise UserError(
            f"the model has {model.output_shape[-1]} outputs but dataset '{data.name}' "
            f"has {data.num_classes} classes"
        )


def _clean_then_watermark(data, x_wm, y_wm, recipe: TrainConfig):
    """Training arrays: clean training part, watermark copies, then the clean validation part.

    ``models.train`` holds out the last ``validation_split`` of its data; the
    split is rescaled so that exactly the clean images a vanilla model of
    ``recipe`` holds out are held out here, and every watermark copy is trained on.
    """
    x, y = data.x_train, data.y_train
    n_val = int(round(len(x) * recipe.validation_split))
    cut = len(x) - n_val
    xs = np.concatenate([x[:cut], x_wm, x[cut:]]).astype(np.float32)
    ys = np.concatenate([y[:cut], y_wm, y[cut:]]).astype(np.int64)
    split = n_val / len(xs)
    if int(round(len(xs) * split)) != n_val:  # float rounding; never seen, cheap to check
        raise RuntimeError("could not keep the vanilla validation images")
    return (xs, ys), dataclasses.replace(recipe, validation_split=split)


# --------------------------------------------------------------------------- verification


def watermark_accuracy(model: keras.Model, key: Key, batch_size: int = 256) -> float:
    """The share of the key's inputs that ``model`` labels with their key label."""
    key.check_fits(model)
    return classifier.accuracy(model, key.inputs, key.labels, batch_size)


def calibrate(key: Key, null_accuracies: np.ndarray) -> Key:
    """A copy of ``key`` whose threshold is the highest watermark accuracy of clean models.

    Aiken et al. (section 7.1): no ownership can be claimed below the highest
    accuracy a legitimately trained model reaches on the watermark set at
    some epoch. The whole sample is kept (``key.arrays['null_accuracies']``)
    for the normal-fit p-value.

    Args:
        key: a key of a backdoor scheme.
        null_accuracies: watermark accuracies of clean models (per epoch of
            one training, per model, or both; any shape).

    Returns:
        The calibrated key.
    """
    null = np.asarray(null_accuracies, dtype=np.float64).reshape(-1)
    if null.size == 0 or not np.all(np.isfinite(null)) or null.min() < 0 or null.max() > 1:
        raise UserError("null accuracies must be a non-empty sample of numbers in [0, 1]")
    metadata = dict(key.metadata, threshold=float(null.max()), null_size=int(null.size))
    return Key(
        key.scheme,
        key.inputs,
        key.labels,
        metadata=metadata,
        arrays=dict(key.arrays, null_accuracies=null),
    )


def null_accuracies(
    model: keras.Model | Callable[[], keras.Model],
    data,
    key: Key | Sequence[Key],
    train_config: TrainConfig,
    *,
    cache: bool = True,
    verbose: int | None = None,
) -> np.ndarray:
    """Train a clean model and record its watermark accuracy after every epoch (Fig. 5).

    The training is :func:`models.train` (cached, resumable); an
    :class:`models.training.Hook` per key scores the model on the key's
    inputs after every epoch, and the values live in the training's history,
    so a rerun neither trains nor scores again.

    Args:
        model: a fresh model of the watermarked model's architecture, which is
            trained in place (as :func:`models.train` does, so the caller keeps
            the vanilla model), or a function that builds one (called after
            seeding with ``train_config.seed``).
        data: the clean training data: a :class:`models.Dataset` or an
            ``(x, y)`` pair. No watermark images.
        key: the key whose inputs are scored, or several keys (one training
            scores them all).
        train_config: the recipe (the watermarked model's, for a fair threshold).
        cache: reuse a finished training and its curves.
        verbose: Keras progress (default as :func:`models.train`).

    Returns:
        One accuracy per epoch run (early stopping may end it early); for a
        sequence of keys, an array of shape ``(len(keys), epochs)``.
    """
    from models.training import Hook, train

    keys = [key] if isinstance(key, Key) else list(key)
    if not keys:
        raise UserError("null_accuracies needs at least one key")
    if not isinstance(model, keras.Model):
        seed_everything(train_config.seed)
        model = model()
    for k in keys:
        k.check_fits(model)
    names = [f"watermark_accuracy_{i}" for i in range(len(keys))]
    metrics = [
        Hook(name, lambda m, k=k: classifier.accuracy(m, k.inputs, k.labels))
        for name, k in zip(names, keys, strict=True)
    ]
    tag = "null-accuracies/v2:" + ",".join(_digest(k.inputs, k.labels) for k in keys)
    pair = data if hasattr(data, "digest") else tuple(data)
    result = train(
        model, pair, train_config, cache=cache, cache_tag=tag, callbacks=metrics, verbose=verbose
    )
    lost = [name for name in names if len(result.history.get(name, ())) != result.epochs_run]
    if lost:
        raise RuntimeError(f"training {result.key} did not record {', '.join(lost)} every epoch")
    curves = np.array([result.history[name] for name in names], dtype=np.float64)
    log.info("null model: watermark accuracy per epoch %s", np.round(curves, 4).tolist())
    return curves[0] if isinstance(key, Key) else curves


class _Backdoor(Watermark):
    """What the backdoor schemes share: verification against a calibrated key."""

    def verify(self, model, key: Key, *, batch_size: int = 256) -> Verification:
        """Score ``model`` on ``key``: accuracy, threshold (Aiken et al. 7.1), p-value, verdict.

        Raises:
            UserError: the key belongs to another scheme, does not fit the
                model, or was never calibrated with a null model.
        """
        if key.scheme != self.name:
            raise UserError(f"key is for scheme {key.scheme!r}, not {self.name!r}")
        null = key.arrays.get("null_accuracies")
        threshold = key.metadata.get("threshold")
        if null is None or threshold is None:
            raise UserError(
                f"the {self.name} key has no null model, so there is no threshold to verify "
                "against; calibrate it (python -m watermarks embed ... --calibrate, or "
                "watermarks.backdoor.calibrate(key, null_accuracies(...)))"
            )
        accuracy = watermark_accuracy(model, key, batch_size)
        p_value, _ = null_p_value(accuracy, null)
        detected = accuracy > float(threshold)
        relation = ">" if detected else "<="
        significance = "significant" if p_value < SIGNIFICANCE else "not significant"
        verdict = (
            f"watermark {'detected' if detected else 'not detected'}: accuracy {accuracy:.4f} "
            f"{relation} threshold {float(threshold):.4f} (the best of {len(null)} clean-model "
            f"values); p = {p_value:.3g}, {significance} at {SIGNIFICANCE}"
        )
        return Verification(
            self.name, float(accuracy), float(threshold), float(p_value), bool(detected), verdict
        )

    def _key(self, data, inputs, labels, arrays=None, **facts) -> Key:
        metadata = {
            "config": dataclasses.asdict(self.config),
            "dataset": data.name,
            "num_classes": int(data.num_classes),
            "input_shape": list(data.input_shape),
            **facts,
        }
        return Key(self.name, inputs, labels, metadata=metadata, arrays=arrays or {})

    def trigger_sets(self, data) -> tuple[np.ndarray, np.ndarray, Key]:
        """The watermark training images, their labels, and the (uncalibrated) key.

        Needs no model: callers may build keys first (e.g. to record a clean
        model's curves on several keys in one training, see :func:`null_accuracies`).
        """
        raise NotImplementedError

    def _train(self, model, data, x_wm, y_wm, verbose) -> tuple[keras.Model, int]:
        """Mark a copy of ``model`` with the watermark images; return it and the epochs run."""
        raise NotImplementedError

    def embed(self, model, data, *, null_accuracies: np.ndarray | None = None, verbose=None):
        """Mark (a copy of) ``model`` by training it with the watermark images.

        Args:
            model: Zhang et al. and Adi FS: the architecture, re-initialised from
                the recipe's seed (Zhang with ``from_scratch=False`` and Adi PT:
                the weights to fine-tune). Left untouched.
            data: a :class:`models.Dataset`.
            null_accuracies: a clean model's curve on this scheme's key, to
                calibrate at once (the key's inputs are known beforehand from
                :meth:`trigger_sets`); without it the key must be calibrated
                with :func:`calibrate` before it can be verified.
            verbose: Keras progress.

        Returns:
            ``(marked_model, key)``.
        """
        _check_dataset(data, self.name)
        _check_model_fits(model, data)
        x_wm, y_wm, key = self.trigger_sets(data)
        marked, epochs = self._train(model, data, x_wm, y_wm, verbose)
        log.info(
            "%s: %d watermark images, %d epochs; watermark accuracy %.4f",
            self.name,
            len(x_wm),
            epochs,
            watermark_accuracy(marked, key),
        )
        return marked, (key if null_accuracies is None else calibrate(key, null_accuracies))


# --------------------------------------------------------------------------- Zhang et al.


class _Zhang(_Backdoor):
    """Zhang et al.: train on the training set plus watermark copies labelled ``target``."""

    def trigger_sets(self, data) -> tuple[np.ndarray, np.ndarray, Key]:
        """The ``n`` watermark training copies, their labels, and the key (test images)."""
        _check_dataset(data, self.name)
        if self.config.target >= data.num_classes:
            raise UserError(
                f"target class {self.config.target} does not exist: '{data.name}' has "
                f"{data.num_classes} classes"
            )
        return self._trigger_sets(data)

    def _trigger_sets(self, data):
        raise NotImplementedError

    def _train(self, model, data, x_wm, y_wm, verbose):
        from models.training import train

        pair, recipe = _clean_then_watermark(data, x_wm, y_wm, self.config.train)
        marked = _starting_model(model, self.config.from_scratch, self.config.train.seed)
        result = train(marked, pair, recipe, cache_tag=self.name, verbose=verbose)
        return marked, result.epochs_run

    def _stamped_sources(self, data, rng):
        """Indices of training and test images of the source classes, drawn with ``rng``."""
        classes = self.config.source_classes
        if classes is None:
            classes = tuple(c for c in range(data.num_classes) if c != self.config.target)
        if max(classes) >= data.num_classes:
            raise UserError(f"source_classes {list(classes)} exceed the {data.num_classes} classes")
        train_pool = np.flatnonzero(np.isin(data.y_train, classes))
        test_pool = np.flatnonzero(np.isin(data.y_test, classes))
        if len(train_pool) < self.config.n:
            raise UserError(
                f"n={self.config.n} watermark images requested but the source classes have "
                f"{len(train_pool)} training images"
            )
        train_idx = rng.choice(train_pool, self.config.n, replace=False)
        n_key = min(self.config.n_key, len(test_pool))
        if n_key < self.config.n_key:
            log.info("%s: the key holds %d test images (all there are)", self.name, n_key)
        test_idx = np.sort(rng.choice(test_pool, n_key, replace=False))
        return np.sort(train_idx), test_idx

    def _stamp(self, data, x: np.ndarray, pattern: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _stamped_trigger_sets(self, data, pattern: dict[str, np.ndarray]):
        rng = np.random.default_rng([self.config.seed, 1])
        train_idx, test_idx = self._stamped_sources(data, rng)
        x_wm = self._stamp(data, data.x_train[train_idx], pattern)
        x_key = self._stamp(data, data.x_test[test_idx], pattern)
        target = self.config.target
        y_wm = np.full(len(x_wm), target, dtype=np.int64)
        key = self._key(
            data,
            x_key,
            np.full(len(x_key), target, dtype=np.int64),
            arrays={**pattern, "source_test_indices": test_idx},
            target=target,
            n_train_watermarks=len(x_wm),
        )
        return x_wm, y_wm, key


class ZhangContent(_Zhang):
    """Zhang et al.'s content watermark: the word "TEST" stamped on images, labelled ``target``."""

    name = "zhang_content"
    Config = ZhangContentConfig

    def _trigger_sets(self, data):
        mask = text_mask(data.input_shape, self.config.content_width)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = np.zeros_like(mask)
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        return self._stamped_trigger_sets(
            data, {"mask": mask.astype(np.uint8), "box": box.astype(np.uint8)}
        )

    def _stamp(self, data, x, pattern):
        x = _raw(data, x)
        if self.config.content_background is not None:
            box = pattern["box"].astype(bool)[None, :, :, None]
            x = np.where(box, np.float32(self.config.content_background), x)
        mask = pattern["mask"].astype(bool)[None, :, :, None]
        return _prepared(data, np.where(mask, np.float32(self.config.content_value), x))


class ZhangNoise(_Zhang):
    """Zhang et al.'s noise watermark: one fixed Gaussian pattern added, labelled ``target``."""

    name = "zhang_noise"
    Config = ZhangNoiseConfig

    def _trigger_sets(self, data):
        rng = np.random.default_rng([self.config.seed, 2])
        noise = rng.normal(0.0, self.config.noise_std, size=data.input_shape).astype(np.float32)
        return self._stamped_trigger_sets(data, {"noise": noise})

    def _stamp(self, data, x, pattern):
        return _prepared(data, np.clip(_raw(data, x) + pattern["noise"][None], 0.0, 1.0))


class ZhangUnrelated(_Zhang):
    """Zhang et al.'s unrelated watermark: images of another dataset, labelled ``target``."""

    name = "zhang_unrelated"
    Config = ZhangUnrelatedConfig

    def source_name(self, data) -> str:
        """The dataset the unrelated images come from, for training data ``data``."""
        source = self.config.unrelated_source or UNRELATED_SOURCES.get(data.name)
        if source is None:
            raise UserError(
                f"no unrelated dataset is known for '{data.name}'; set unrelated_source to one of: "
                + ", ".join(sorted(UNRELATED_SOURCES))
            )
        if source == data.name:
            raise UserError(f"unrelated images must come from another dataset than '{data.name}'")
        return source

    def _trigger_sets(self, data):
        import models

        source_name = self.source_name(data)
        source = models.load(source_name, data_dir=self.config.unrelated_data_dir)
        rng = np.random.default_rng([self.config.seed, 3])

        def pool(y):
            if self.config.unrelated_class is None:
                return np.arange(len(y))
            if self.config.unrelated_class >= source.num_classes:
                raise UserError(
                    f"unrelated_class {self.config.unrelated_class} does not exist: "
                    f"'{source_name}' has {source.num_classes} classes"
                )
            return np.flatnonzero(y == self.config.unrelated_class)

        train_pool, test_pool = pool(source.y_train), pool(source.y_test)
        if len(train_pool) < self.config.n:
            raise UserError(
                f"n={self.config.n} unrelated images requested but '{source_name}' has "
                f"{len(train_pool)} training images of the chosen class(es)"
            )
        train_idx = np.sort(rng.choice(train_pool, self.config.n, replace=False))
        n_key = min(self.config.n_key, len(test_pool))
        test_idx = np.sort(rng.choice(test_pool, n_key, replace=False))
        x_wm = _prepared(
            data, _fit_images(_raw(source, source.x_train[train_idx]), data.input_shape)
        )
        x_key = _prepared(
            data, _fit_images(_raw(source, source.x_test[test_idx]), data.input_shape)
        )
        target = self.config.target
        key = self._key(
            data,
            x_key,
            np.full(len(x_key), target, dtype=np.int64),
            arrays={"source_test_indices": test_idx},
            target=target,
            unrelated_source=source_name,
            n_train_watermarks=len(x_wm),
        )
        return x_wm, np.full(len(x_wm), target, dtype=np.int64), key


# --------------------------------------------------------------------------- Adi et al.


class TriggerBatchModel(keras.Model):
    """Trains ``inner`` on every batch plus ``k`` trigger images drawn at random (Adi et al.).

    A ``train_step`` override: ``models.train`` feeds the clean batches as
    usual, and each step appends ``k`` distinct triggers, drawn with a
    stateless generator seeded by ``(seed, optimizer step)`` so that a
    resumed training draws what the uninterrupted one would have. Inference
    and validation see ``inner`` alone.

    Args:
        inner: the classifier being marked (trained in place).
        triggers: the trigger inputs, shaped like the model's input.
        labels: their labels.
        k: triggers per batch.
        seed: seeds the draws.
    """

    def __init__(self, inner, triggers, labels, k, seed, **kwargs):
        super().__init__(name=f"{inner.name}_with_triggers", **kwargs)
        self.inner = inner
        self._triggers = tf.constant(np.asarray(triggers, dtype=np.float32))
        self._trigger_labels = tf.constant(np.asarray(labels, dtype=np.int64))
        self._k = int(k)
        self._seed = int(seed)

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def draw(self, step) -> tf.Tensor:
        """Indices of the ``k`` distinct triggers appended at optimizer step ``step``."""
        seed = tf.stack([tf.constant(self._seed, tf.int64), tf.cast(step, tf.int64)])
        noise = tf.random.stateless_uniform([tf.shape(self._triggers)[0]], seed=seed)
        return tf.math.top_k(noise, self._k).indices

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        picks = self.draw(self.optimizer.iterations)
        x = tf.concat([tf.cast(x, tf.float32), tf.gather(self._triggers, picks)], axis=0)
        y = tf.concat([tf.cast(y, tf.int64), tf.gather(self._trigger_labels, picks)], axis=0)
        if sample_weight is not None:
            sample_weight = tf.concat(
                [tf.cast(sample_weight, tf.float32), tf.ones([self._k], tf.float32)], axis=0
            )
            return super().train_step((x, y, sample_weight))
        return super().train_step((x, y))


class AdiAbstract(_Backdoor):
    """Adi et al.'s watermark: abstract images with random labels, ``k`` in every batch."""

    name = "adi"
    Config = AdiConfig

    def trigger_sets(self, data) -> tuple[np.ndarray, np.ndarray, Key]:
        """The trigger images, their random labels, and the (uncalibrated) key (the same images)."""
        if not hasattr(data, "input_shape") or not hasattr(data, "num_classes"):
            raise UserError("adi embeds with a models.Dataset")
        cfg = self.config
        if cfg.image_dir is not None:
            raw = _read_image_dir(cfg.image_dir, cfg.n, data.input_shape)
            origin = f"images of {cfg.image_dir}"
        else:
            raw = abstract_images(cfg.n, data.input_shape, cfg.seed)
            origin = "procedural abstract images (abstract_images)"
        triggers = _prepared(data, raw)
        labels = np.random.default_rng([cfg.seed, 4]).integers(0, data.num_classes, cfg.n)
        key = self._key(data, triggers, labels, origin=origin)
        return triggers, labels.astype(np.int64), key

    def _train(self, model, data, x_wm, y_wm, verbose):
        """Train (FS) or fine-tune (PT) with ``k`` triggers appended to every batch."""
        from models.training import train

        cfg = self.config
        marked = _starting_model(model, cfg.mode == "fs", cfg.train.seed)
        wrapper = TriggerBatchModel(marked, x_wm, y_wm, cfg.k, cfg.seed)
        wrapper(x_wm[:1])  # build
        tag = f"adi:{cfg.mode}:k={cfg.k}:seed={cfg.seed}:{_digest(x_wm, y_wm)}:{_model_digest(marked)}"
        pair = (data.x_train, data.y_train)
        result = train(wrapper, pair, cfg.train, cache_tag=tag, verbose=verbose)
        return marked, result.epochs_run


# --------------------------------------------------------------------------- command line


def _scheme_options(args) -> dict[str, Any]:
    """The config values the command line sets, for the chosen scheme."""
    recipe = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        momentum=args.momentum,
        validation_split=args.validation_split,
        early_stopping_patience=args.early_stopping_patience,
        seed=args.seed,
    )
    options: dict[str, Any] = {"seed": args.seed, "train": recipe}
    if args.n is not None:
        options["n"] = args.n
    zhang_only = {"target": args.target, "n_key": args.n_key}
    adi_only = {"mode": args.mode, "k": args.k, "image_dir": args.image_dir}
    if args.scheme == "adi":
        bad = [f"--{k.replace('_', '-')}" for k, v in zhang_only.items() if v is not None]
        bad += ["--fine-tune"] if args.fine_tune else []
        bad += ["--unrelated-source"] if args.unrelated_source else []
        options.update({k: v for k, v in adi_only.items() if v is not None})
    else:
        bad = [f"--{k.replace('_', '-')}" for k, v in adi_only.items() if v is not None]
        options.update({k: v for k, v in zhang_only.items() if v is not None})
        options["from_scratch"] = not args.fine_tune
        if args.unrelated_source:
            if args.scheme != "zhang_unrelated":
                bad.append("--unrelated-source")
            options["unrelated_source"] = args.unrelated_source
    if bad:
        raise UserError(f"{', '.join(bad)} do(es) not apply to scheme {args.scheme!r}")
    return options


def _embed_command(args) -> int:
    import models
    from models.loading import output_path
    from models.registry import build_config
    from watermarks.base import get

    if args.scheme not in SCHEMES:
        raise UnknownNameError("backdoor scheme", args.scheme, SCHEMES)
    cls = get(args.scheme)
    config = build_config(cls.Config, _scheme_options(args))
    out_model = output_path(args.out_model, ".keras", "--out-model")
    out_key = output_path(args.out_key, ".npz", "--out-key")
    if args.dataset not in models.dataset_names():  # before TensorFlow starts on the model
        raise UnknownNameError("dataset", args.dataset, models.dataset_names())
    model = models.load_model(args.model)
    data = models.load_for_model(
        args.dataset,
        model,
        data_dir=args.data_dir,
        max_train=args.max_train,
        max_test=args.max_test,
        seed=args.seed,
    )
    scheme = cls(config)
    marked, key = scheme.embed(model, data, verbose=0 if not args.verbose else None)
    if args.calibrate:
        null_recipe = config.train
        if args.null_epochs is not None:
            null_recipe = dataclasses.replace(null_recipe, epochs=args.null_epochs)
        clean = _starting_model(model, True, null_recipe.seed)
        curve = null_accuracies(clean, data, key, null_recipe, cache=not args.no_cache, verbose=0)
        key = calibrate(key, curve)
    key.save(out_key)
    try:
        models.save_model(marked, out_model)
    except BaseException:
        out_key.unlink(missing_ok=True)  # no key without its model
        raise
    test_acc = classifier.accuracy(marked, data.x_test, data.y_test)
    print(f"scheme:              {args.scheme}")
    print(f"test accuracy:       {test_acc:.4f} on {len(data.y_test)} '{args.dataset}' test images")
    print(f"watermark accuracy:  {watermark_accuracy(marked, key):.4f} on {len(key)} key inputs")
    if "threshold" in key.metadata:
        result = scheme.verify(marked, key)
        print(f"threshold:           {result.threshold:.4f} (clean model, best epoch)")
        print(f"verdict:             {result.verdict}")
    else:
        print("threshold:           none yet (no --calibrate); the key cannot be verified")
    print(f"wrote {out_model} and {out_key}")
    return 0


def add_command(subparsers) -> None:
    """Add ``embed`` (mark a user's model with a backdoor watermark) to ``python -m watermarks``."""
    p = subparsers.add_parser(
        "embed",
        help="mark a model with a backdoor watermark (Zhang et al., Adi et al.)",
        description="Zhang et al. and Adi FS retrain the model's architecture from scratch "
        "(re-initialised); Adi PT (--mode pt) and Zhang with --fine-tune start from its weights.",
    )
    p.add_argument("--scheme", required=True, help=f"one of: {', '.join(SCHEMES)}")
    p.add_argument("--model", required=True, help="the model (.keras, loaded in safe mode)")
    p.add_argument("--dataset", required=True, help="training data (e.g. fashion_mnist, digits)")
    p.add_argument("--out-model", required=True, help="where to write the marked model (.keras)")
    p.add_argument("--out-key", required=True, help="where to write the key (.npz)")
    p.add_argument("--data-dir", help="folder holding the dataset (see models.load)")
    p.add_argument("--max-train", type=int, help="use at most this many training images")
    p.add_argument("--max-test", type=int, help="use at most this many test images")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", default="adam", help="adam or sgd")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--validation-split", type=float, default=0.0)
    p.add_argument("--early-stopping-patience", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, help="watermark images (Zhang: copies added; Adi: triggers)")
    p.add_argument("--target", type=int, help="Zhang: the target class (default 0)")
    p.add_argument("--n-key", type=int, help="Zhang: verification images in the key")
    p.add_argument("--fine-tune", action="store_true", help="Zhang: start from the weights")
    p.add_argument("--unrelated-source", help="zhang_unrelated: the other dataset")
    p.add_argument("--mode", help="adi: fs (from scratch, default) or pt (pre-trained)")
    p.add_argument("--k", type=int, help="adi: trigger images per batch (default 2)")
    p.add_argument("--image-dir", help="adi: folder of the original abstract images")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="train a clean model of the same architecture and store its per-epoch watermark "
        "accuracies in the key (the threshold; needed by verify)",
    )
    p.add_argument("--null-epochs", type=int, help="epochs of the clean model (default --epochs)")
    p.add_argument("--no-cache", action="store_true", help="retrain the clean model")
    p.set_defaults(handler=_embed_command)
