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

Every scheme is a :class:`watermarks.base.Watermark`:
``scheme.embed(model, data) -> Marked(model, key)``, and the key comes back
calibrated. Calibration follows Aiken et al. ("Neural Network Laundering",
Computers & Security 2021, section 7.1): the threshold is the highest
watermark accuracy a clean (vanilla) twin of the same architecture reaches
over the epochs of its training (Fig. 5). The twin is trained once per
(architecture, data, recipe, seed) by :func:`vanilla`, which keeps the
weights of every epoch, so one cached training gives the per-epoch curve of
any number of keys (``TrainResult.replay``); a reproduction that needs the
vanilla model itself calls :func:`vanilla` with the same recipe and gets the
very same training from the cache. The recipe is the config's ``null_train``
(None: the marking recipe ``train``); the twin always starts from a fresh
initialisation (for Adi PT and Zhang with ``from_scratch=False`` too: their
clean counterpart is the pre-trained model's own training, which
``null_train`` names). The curve is kept in ``key.arrays["null_accuracies"]``
and its maximum in ``key.metadata["threshold"]``.

A model is *present* when its watermark accuracy (refused queries never
match, :func:`models.evidence.answers`) is strictly above the threshold.
The p-value is the robustness SoK's (Lukas et al. 2022): a normal
distribution fitted to the null curve, read at the model's accuracy, or the
exact empirical p-value where the curve has no spread
(:func:`models.evidence.null_p_value`, never 0); it is reported beside the
verdict (significant at :data:`SIGNIFICANCE`), not used for it.

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
* Trigger images are made in [0, 1] and brought to the model's input range
  and centring by ``Dataset.from_unit`` (stamped images are taken out of it
  with ``Dataset.to_unit`` first).
* Embedding trains with :func:`models.train` (cached), on an ``(x, y)``
  pair. The validation images (``validation_split`` of the recipe) are
  exactly the clean images a vanilla model of that recipe holds out: the
  watermark copies are all trained on and early stopping watches clean data.
  Zhang et al. and Adi FS retrain the given architecture from scratch
  (``keras.models.clone_model`` re-initialises it from the recipe's seed);
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

Presets (``Scheme.from_preset(name)``): ``smoke`` embeds in seconds on
scikit-learn's 8x8 digits with a tiny CNN; ``quick`` is the laundering
reproduction's quick setting (Fashion-MNIST, the Table 5 network, the CAE
recipe for at most 15 epochs; Adi FS with ``k=8`` for 6 epochs); ``paper``
is the papers' (Zhang: 1000 copies and the MNIST recipe of the laundering
paper's reproduction, 50 CAE epochs; Adi: 100 images, 2 per batch of 100).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from models import classifier
from models.config import as_dict, option, validate
from models.datasets import names as dataset_names
from models.errors import UserError
from models.evidence import answers, null_p_value
from models.io import array_digest
from models.training import TrainConfig, TrainResult, seed_everything, train
from watermarks.base import Key, Marked, Verification, Watermark

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
    "text_mask",
    "vanilla",
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

#: The cache tag of the clean twin's training: the same for every key and scheme, so one
#: training (per architecture, data, recipe and seed) calibrates them all.
VANILLA_TAG = "backdoor-vanilla/v1"

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

_SEED_MAX = 2**31 - 1


def _check_recipes(config) -> None:
    """A watermark is embedded by training, and the threshold needs a curve of epochs."""
    if config.train.epochs < 1:
        raise UserError("train.epochs must be at least 1: the watermark is embedded by training")
    if config.null_train is not None and config.null_train.epochs < 1:
        raise UserError("null_train.epochs must be at least 1: the threshold needs its epochs")


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
        train: the marking recipe.
        null_train: the recipe of the clean twin that sets the threshold;
            None is ``train``.
    """

    target: int = option(0, low=0, help="the class every watermark image is labelled with")
    n: int = option(1000, low=1, help="watermark images added to the training set")
    n_key: int = option(1000, low=1, help="at most this many verification images in the key")
    seed: int = option(0, low=0, high=_SEED_MAX, help="draws the images, the noise and the key")
    from_scratch: bool = option(True, help="retrain the architecture (False: fine-tune weights)")
    train: TrainConfig = option(factory=TrainConfig, help="the marking recipe")
    null_train: TrainConfig | None = option(
        None, help="the clean twin's recipe for the threshold (None: train)"
    )

    def __post_init__(self):
        validate(self)
        _check_recipes(self)


@dataclass(frozen=True)
class _StampedConfig(_ZhangConfig):
    """Zhang options for triggers stamped on training images (content, noise).

    Args:
        source_classes: the classes whose images carry the trigger; None is
            every class but the target.
    """

    source_classes: tuple[int, ...] | None = option(
        None, low=0, help="classes whose images carry the trigger (None: all but the target)"
    )

    def __post_init__(self):
        super().__post_init__()
        classes = self.source_classes
        if classes is not None:
            if not classes:
                raise UserError("source_classes must name at least one class, got none")
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

    content_width: float = option(
        0.55, low=0.0, low_open=True, high=1.0, help="word width / image width"
    )
    content_value: float = option(1.0, low=0.0, high=1.0, help="pixel value of the word")
    content_background: float | None = option(
        None, low=0.0, high=1.0, help="pixel value of a box under the word (None: no box)"
    )


@dataclass(frozen=True)
class ZhangNoiseConfig(_StampedConfig):
    """Zhang et al.'s noise watermark.

    Args:
        noise_std: standard deviation of the fixed Gaussian pattern (pixels in [0, 1]).
    """

    noise_std: float = option(
        0.3, low=0.0, low_open=True, high=10.0, help="std of the fixed Gaussian pattern"
    )


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

    unrelated_source: str | None = option(
        None, choices=dataset_names(), help="the other dataset (None: by the training data)"
    )
    unrelated_class: int | None = option(
        None, low=0, help="only this class of the source (None: all)"
    )
    unrelated_data_dir: str | None = option(None, help="folder holding the source dataset")


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
        null_train: the recipe of the clean twin (the architecture trained
            from scratch) that sets the threshold; None is ``train``. For PT,
            give the recipe the pre-trained model was trained with.
    """

    MODES: ClassVar[tuple[str, ...]] = ("fs", "pt")

    mode: str = option("fs", choices=MODES, help="fs: from scratch; pt: fine-tune the weights")
    n: int = option(100, low=1, help="trigger images")
    k: int = option(2, low=1, help="trigger images appended to every batch")
    seed: int = option(0, low=0, high=_SEED_MAX, help="draws the images, labels and picks")
    image_dir: str | None = option(None, help="folder of PNG/JPEG trigger images to use")
    train: TrainConfig = option(factory=TrainConfig, help="the marking (PT: fine-tuning) recipe")
    null_train: TrainConfig | None = option(
        None, help="the clean twin's recipe for the threshold (None: train)"
    )

    def __post_init__(self):
        validate(self)
        if self.k > self.n:
            raise UserError(f"k={self.k} trigger images per batch exceeds the n={self.n} there are")
        _check_recipes(self)


# --------------------------------------------------------------------------- image helpers


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


# --------------------------------------------------------------------------- training


def _model_digest(model: keras.Model) -> str:
    """A hash of the architecture alone (its JSON config), for Adi's cache tag."""
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


def vanilla(model: keras.Model, data, recipe: TrainConfig) -> TrainResult:
    """The clean twin of ``model``: its architecture trained from scratch on ``data``, no watermark.

    The architecture is re-initialised from ``recipe.seed`` and trained with
    :func:`models.train` under one fixed cache tag, keeping the weights of
    every epoch; so the twin is trained once per (architecture, data,
    recipe, seed), whatever keys are scored on it later
    (``result.replay(fn)`` gives ``fn`` at every epoch). Every backdoor
    scheme calibrates its key on this training, and a reproduction that
    wants the vanilla model gets the same one from the cache.

    Args:
        model: any model of the architecture (its weights are not used; it is
            left untouched).
        data: the clean training data, a :class:`models.Dataset`.
        recipe: the training recipe (``recipe.seed`` seeds the initialisation too).

    Returns:
        The :class:`models.training.TrainResult`; ``result.model`` is the
        trained twin, at its final (or, with early stopping, best) weights.
    """
    fresh = _starting_model(model, True, recipe.seed)
    result = train(fresh, data, recipe, cache_tag=VANILLA_TAG, snapshots=True, verbose=0)
    if not result.snapshots:
        raise RuntimeError(f"the clean twin's training {result.key} kept no per-epoch weights")
    return result


def _calibrated(key: Key, null: Sequence[float]) -> Key:
    """``key`` with the clean twin's per-epoch accuracies and their maximum as the threshold."""
    null = np.asarray(null, dtype=np.float64).reshape(-1)
    if null.size == 0 or not np.all(np.isfinite(null)):
        raise RuntimeError("the clean twin's training left no per-epoch accuracies")
    metadata = dict(key.metadata, threshold=float(null.max()), null_size=int(null.size))
    arrays = dict(key.arrays, null_accuracies=null)
    return Key(key.scheme, key.inputs, key.labels, metadata=metadata, arrays=arrays)


# --------------------------------------------------------------------------- the schemes


class _Backdoor(Watermark):
    """What the backdoor schemes share: calibrated embedding and the threshold test."""

    kind = "robust"

    def trigger_sets(self, data) -> tuple[np.ndarray, np.ndarray, Key]:
        """The watermark training images, their labels, and the key (not yet calibrated).

        Needs no model; :meth:`embed` calls it and calibrates the key.
        """
        raise NotImplementedError

    def _mark(self, model, data, x_wm, y_wm, hooks: tuple) -> keras.Model:
        """A copy of ``model`` trained with the watermark images."""
        raise NotImplementedError

    def _embed(self, model, data, *, hooks: tuple) -> Marked:
        x_wm, y_wm, key = self.trigger_sets(data)
        marked = self._mark(model, data, x_wm, y_wm, hooks)
        recipe = self.config.null_train or self.config.train
        twin = vanilla(model, data, recipe)
        curve = twin.replay(lambda m: classifier.accuracy(m, key.inputs, key.labels))
        log.info(
            "%s: %d watermark images; watermark accuracy %.4f; clean twin per epoch %s",
            self.name,
            len(x_wm),
            classifier.accuracy(marked, key.inputs, key.labels),
            np.round(curve, 4).tolist(),
        )
        return Marked(marked, _calibrated(key, curve))

    def decide(self, key: Key, outputs: np.ndarray) -> Verification:
        """Watermark accuracy against the clean twin's best epoch (Aiken et al. 7.1)."""
        null = key.arrays.get("null_accuracies")
        threshold = key.metadata.get("threshold")
        if null is None or threshold is None or len(key) == 0:
            raise UserError(
                f"the {self.name} key holds no null curve (or no inputs), so there is no "
                "threshold to verify against; make keys with embed, which calibrates them"
            )
        statistic = float(np.mean(answers(outputs) == key.labels))
        threshold = float(threshold)
        p_value, method = null_p_value(statistic, null)
        present = statistic > threshold
        significance = "significant" if p_value < SIGNIFICANCE else "not significant"
        verdict = (
            f"watermark accuracy {statistic:.4f} {'>' if present else '<='} threshold "
            f"{threshold:.4f} (the best of {len(null)} clean-twin epochs): "
            f"{'present' if present else 'absent'}; p = {p_value:.3g}, {significance} at "
            f"{SIGNIFICANCE}"
        )
        return Verification(
            kind=self.kind,
            scheme=self.name,
            statistic=statistic,
            threshold=threshold,
            p_value=p_value,
            present=bool(present),
            intact=None,
            verdict=verdict,
            n=len(key),
            null=f"clean twin's watermark accuracy after each of its {len(null)} epochs; {method}",
        )

    def _key(self, data, inputs, labels, arrays=None, **facts) -> Key:
        metadata = {
            "config": as_dict(self.config),
            "num_classes": int(data.num_classes),
            "input_shape": list(data.input_shape),
            **facts,
        }
        return Key(self.name, inputs, labels, metadata=metadata, arrays=arrays or {})


# --------------------------------------------------------------------------- Zhang et al.

# The Table 5 network's recipe in the laundering reproduction's quick preset.
_QUICK_RECIPE = TrainConfig.cae(15, early_stopping_patience=3)
_SMOKE_RECIPE = TrainConfig(epochs=8, batch_size=32, learning_rate=1e-2)
_ZHANG_PRESETS = {
    "smoke": {"n": 200, "n_key": 300, "train": _SMOKE_RECIPE},
    "quick": {"n": 2000, "n_key": 1000, "train": _QUICK_RECIPE},
    "paper": {"n": 1000, "n_key": 1000, "train": TrainConfig.cae(epochs=50)},
}


class _Zhang(_Backdoor):
    """Zhang et al.: train on the training set plus watermark copies labelled ``target``."""

    presets = _ZHANG_PRESETS

    @property
    def uses_weights(self) -> bool:
        return not self.config.from_scratch

    def trigger_sets(self, data) -> tuple[np.ndarray, np.ndarray, Key]:
        """The ``n`` watermark training copies, their labels, and the key (test images)."""
        if self.config.target >= data.num_classes:
            raise UserError(
                f"target class {self.config.target} does not exist: '{data.name}' has "
                f"{data.num_classes} classes"
            )
        return self._trigger_sets(data)

    def _trigger_sets(self, data):
        raise NotImplementedError

    def _mark(self, model, data, x_wm, y_wm, hooks):
        pair, recipe = _clean_then_watermark(data, x_wm, y_wm, self.config.train)
        marked = _starting_model(model, self.config.from_scratch, self.config.train.seed)
        train(marked, pair, recipe, cache_tag=self.name, hooks=hooks, verbose=0)
        return marked

    def _stamped_sources(self, data, rng):
        """Indices of training and test images of the source classes, drawn with ``rng``."""
        classes = self.config.source_classes
        if classes is None:
            classes = tuple(c for c in range(data.num_classes) if c != self.config.target)
        if max(classes) >= data.num_classes:
            raise UserError(f"source_classes {list(classes)} exceed the {data.num_classes} classes")
        train_pool = np.flatnonzero(np.isin(data.y_train, classes))
        test_pool = np.flatnonzero(np.isin(data.y_test, classes))
        if len(train_pool) < self.config.n or len(test_pool) == 0:
            raise UserError(
                f"n={self.config.n} watermark images requested but the source classes have "
                f"{len(train_pool)} training and {len(test_pool)} test images"
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
        x = data.to_unit(x)
        if self.config.content_background is not None:
            box = pattern["box"].astype(bool)[None, :, :, None]
            x = np.where(box, np.float32(self.config.content_background), x)
        mask = pattern["mask"].astype(bool)[None, :, :, None]
        return data.from_unit(np.where(mask, np.float32(self.config.content_value), x))


class ZhangNoise(_Zhang):
    """Zhang et al.'s noise watermark: one fixed Gaussian pattern added, labelled ``target``."""

    name = "zhang_noise"
    Config = ZhangNoiseConfig

    def _trigger_sets(self, data):
        rng = np.random.default_rng([self.config.seed, 2])
        noise = rng.normal(0.0, self.config.noise_std, size=data.input_shape).astype(np.float32)
        return self._stamped_trigger_sets(data, {"noise": noise})

    def _stamp(self, data, x, pattern):
        return data.from_unit(np.clip(data.to_unit(x) + pattern["noise"][None], 0.0, 1.0))


class ZhangUnrelated(_Zhang):
    """Zhang et al.'s unrelated watermark: images of another dataset, labelled ``target``."""

    name = "zhang_unrelated"
    Config = ZhangUnrelatedConfig
    presets = {
        **_ZHANG_PRESETS,
        # the laundering reproduction caps n at the 1000 digits its offline source can give
        "quick": {**_ZHANG_PRESETS["quick"], "n": 1000},
    }

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

    def _pool(self, labels: np.ndarray, source_name: str, num_classes: int) -> np.ndarray:
        """Indices of the source images of the chosen class (all, without one)."""
        wanted = self.config.unrelated_class
        if wanted is None:
            return np.arange(len(labels))
        if wanted >= num_classes:
            raise UserError(
                f"unrelated_class {wanted} does not exist: '{source_name}' has "
                f"{num_classes} classes"
            )
        return np.flatnonzero(labels == wanted)

    def _trigger_sets(self, data):
        import models

        source_name = self.source_name(data)
        source = models.load(source_name, data_dir=self.config.unrelated_data_dir)
        rng = np.random.default_rng([self.config.seed, 3])
        train_pool = self._pool(source.y_train, source_name, source.num_classes)
        test_pool = self._pool(source.y_test, source_name, source.num_classes)
        if len(train_pool) < self.config.n or len(test_pool) == 0:
            raise UserError(
                f"n={self.config.n} unrelated images requested but '{source_name}' has "
                f"{len(train_pool)} training and {len(test_pool)} test images of the chosen "
                "class(es)"
            )
        train_idx = np.sort(rng.choice(train_pool, self.config.n, replace=False))
        n_key = min(self.config.n_key, len(test_pool))
        test_idx = np.sort(rng.choice(test_pool, n_key, replace=False))

        def fitted(x):
            return data.from_unit(_fit_images(source.to_unit(x), data.input_shape))

        x_wm, x_key = fitted(source.x_train[train_idx]), fitted(source.x_test[test_idx])
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
    presets = {
        "smoke": {"n": 50, "k": 8, "train": _SMOKE_RECIPE},
        # the laundering reproduction's quick FS model (its PT: mode="pt", k=16, train=
        # TrainConfig(epochs=4, learning_rate=5e-4, lr_schedule="step"), null_train=this train)
        "quick": {"n": 100, "k": 8, "train": TrainConfig.cae(epochs=6, early_stopping_patience=3)},
        # Adi et al.: 100 images, 2 in every batch of 100; the laundering paper's CIFAR-10 recipe
        "paper": {"n": 100, "k": 2, "train": TrainConfig.cae(epochs=200, batch_size=100)},
    }

    @property
    def uses_weights(self) -> bool:
        return self.config.mode == "pt"

    def trigger_sets(self, data) -> tuple[np.ndarray, np.ndarray, Key]:
        """The trigger images, their random labels, and the key (the same images)."""
        cfg = self.config
        if cfg.image_dir is not None:
            raw = _read_image_dir(cfg.image_dir, cfg.n, data.input_shape)
            origin = f"images of {cfg.image_dir}"
        else:
            raw = abstract_images(cfg.n, data.input_shape, cfg.seed)
            origin = "procedural abstract images (abstract_images)"
        triggers = data.from_unit(raw)
        labels = np.random.default_rng([cfg.seed, 4]).integers(0, data.num_classes, cfg.n)
        key = self._key(data, triggers, labels, origin=origin)
        return triggers, labels.astype(np.int64), key

    def _mark(self, model, data, x_wm, y_wm, hooks):
        """Train (FS) or fine-tune (PT) with ``k`` triggers appended to every batch."""
        cfg = self.config
        marked = _starting_model(model, cfg.mode == "fs", cfg.train.seed)
        wrapper = TriggerBatchModel(marked, x_wm, y_wm, cfg.k, cfg.seed)
        wrapper(x_wm[:1])  # build
        tag = (
            f"adi:{cfg.mode}:k={cfg.k}:seed={cfg.seed}:{array_digest(x_wm, y_wm)}:"
            f"{_model_digest(marked)}"
        )
        pair = (data.x_train, data.y_train)
        train(wrapper, pair, cfg.train, cache_tag=tag, hooks=hooks, verbose=0)
        return marked
