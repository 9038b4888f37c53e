"""Image-classification datasets: where they come from, how they are scaled, and seeded subsets.

Serves all four papers of the suite. Images are scaled to [0, 1] as every paper
does; the conferrable-adversarial-examples (CAE) report also centres by the
per-channel training mean and resizes 28x28 images to 32x32, hence `center`,
`size` and `channels`. The papers' few-shot and low-data settings (e.g. the
"0.6% of the training data" of Neural Network Laundering) are `fraction` and
`per_class`.

Where a dataset comes from, first hit wins (DESIGN.md, "Data contract"):

1. a directory the user names (`data_dir`, the CLI's `--data-dir`), holding the
   dataset in its official distribution format;
2. for `fashion_mnist` only, the Debian package `dataset-fashion-mnist`;
3. tensorflow-datasets, which downloads when online.

A dataset that cannot be had is a :class:`DatasetUnavailable` naming the three
ways; it is never replaced by another dataset or by synthetic data.

Deliberate choices:

- `emnist` is the EMNIST *letters* split with 26 classes, labels 0..25 for
  a..z. The official files (and tfds, which keeps them as they are) store the
  images transposed and the labels 1..26 (tfds even declares 37 classes); both
  sources are turned upright and shifted by one here, so they agree.
- `digits` is scikit-learn's 8x8 digits (pixel values 0..16, divided by 16).
  It has no official split: the test set is a fixed 20% stratified by class and
  drawn with seed 0, whatever `seed` says, so every run tests on the same images.
- The arrays of a :class:`Dataset` are read-only, so the digest that caches
  models trained on it cannot go stale; copy before editing in place.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import pickle
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import UnknownNameError, UserError

logger = logging.getLogger(__name__)

__all__ = ["DEBIAN_FASHION_DIR", "Dataset", "DatasetUnavailable", "load", "load_for_model", "names"]

#: Where the Debian package `dataset-fashion-mnist` installs its IDX files.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Seconds to wait for a download host before concluding we are offline.
#: tensorflow-datasets itself retries a failed connection ten times with
#: back-off, which takes about 3.5 minutes offline; this probe fails in seconds.
NETWORK_PROBE_TIMEOUT_S = 5.0

# Images resized per call to tf.image.resize, to bound the peak memory.
_RESIZE_CHUNK = 2048  # measured: smaller chunks stay in cache and run faster


class DatasetUnavailable(UserError):
    """A dataset that none of the three sources could provide."""


@dataclass(frozen=True)
class _Spec:
    """What is known about a dataset before loading it."""

    image_shape: tuple[int, int, int]  # H, W, C of the raw images
    num_classes: int
    local_hint: str  # what `--data-dir` must hold, for the error message
    tfds_name: str | None = None
    tfds_test_split: str = "test"
    tfds_host: str | None = None  # "host:port" tfds downloads from, probed first


_MNIST_HINT = "the IDX files (train-images-idx3-ubyte[.gz] and the three others)"
_SPECS: dict[str, _Spec] = {
    "mnist": _Spec((28, 28, 1), 10, _MNIST_HINT, "mnist", tfds_host="storage.googleapis.com:443"),
    "fashion_mnist": _Spec(
        (28, 28, 1),
        10,
        _MNIST_HINT,
        "fashion_mnist",
        tfds_host="fashion-mnist.s3-website.eu-central-1.amazonaws.com:80",
    ),
    "cifar10": _Spec(
        (32, 32, 3), 10, "cifar-10-batches-py", "cifar10", tfds_host="www.cs.toronto.edu:443"
    ),
    "cifar100": _Spec(
        (32, 32, 3), 100, "cifar-100-python", "cifar100", tfds_host="www.cs.toronto.edu:443"
    ),
    "imagenet32": _Spec(
        (32, 32, 3),
        1000,
        "Imagenet32_train_npz and Imagenet32_val_npz",
        "imagenet_resized/32x32",
        tfds_test_split="validation",
        tfds_host="www.image-net.org:80",
    ),
    "emnist": _Spec(
        (28, 28, 1),
        26,
        "the IDX files (emnist-letters-train-images-idx3-ubyte[.gz] and the three others)",
        "emnist/letters",
        tfds_host="biometrics.nist.gov:443",
    ),
    "digits": _Spec((8, 8, 1), 10, "nothing (always available)"),
}


def names() -> list[str]:
    """Returns the names :func:`load` accepts, in the order the papers use them."""
    return list(_SPECS)


@dataclass(frozen=True)
class Dataset:
    """A train/test split of images, ready for a Keras model.

    Attributes:
        name: the name it was loaded by (one of :func:`names`).
        x_train: float32 NHWC images, C-contiguous and read-only; in [0, 1], or
            centred if `mean` is set.
        y_train: int64 labels in 0..num_classes-1.
        x_test: like `x_train`.
        y_test: like `y_train`.
        num_classes: the number of classes of the full dataset (a subset may
            lack some).
        mean: the per-channel training mean subtracted from both splits, or None.
        input_range: the pixel range the model expects, ``(low, high)``: black
            is ``low`` and white ``high`` (before centring). [0, 1] unless the
            model was made for another, e.g. (0, 255) for a model with a
            ``Rescaling(1/255)`` inside (:meth:`with_input_range`).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: np.ndarray | None = None
    input_range: tuple[float, float] = (0.0, 1.0)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The (height, width, channels) of one image."""
        h, w, c = self.x_train.shape[1:]
        return (int(h), int(w), int(c))

    def digest(self) -> str:
        """A sha256 hex digest of the name and every array, stable across runs.

        Used as the cache key of models trained on this data; computed once.
        """
        cached = self.__dict__.get("_digest")
        if cached is None:
            h = hashlib.sha256(b"models.datasets.Dataset/v1\0")
            h.update(f"{self.name}\0{self.num_classes}\0".encode())
            if tuple(self.input_range) != (0.0, 1.0):  # digests of [0, 1] data stay as they were
                h.update(f"range{tuple(self.input_range)}\0".encode())
            arrays = (self.x_train, self.y_train, self.x_test, self.y_test, self.mean)
            for arr in arrays:
                if arr is None:
                    h.update(b"none\0")
                    continue
                arr = np.ascontiguousarray(arr)
                h.update(f"{arr.dtype.str}{arr.shape}\0".encode())
                h.update(arr.data)
            cached = h.hexdigest()
            object.__setattr__(self, "_digest", cached)  # a cache, not state: arrays are read-only
        return cached

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        """Images of this dataset back in [0, 1] (undoing centring and the input range)."""
        low, high = self.input_range
        x = np.asarray(x, dtype=np.float32)
        if self.mean is not None:
            x = x + self.mean
        if (low, high) != (0.0, 1.0):
            x = (x - low) / (high - low)
        return x.astype(np.float32)

    def from_unit(self, x: np.ndarray) -> np.ndarray:
        """[0, 1] images prepared as this dataset's are (input range, then centring)."""
        low, high = self.input_range
        x = np.asarray(x, dtype=np.float32)
        if (low, high) != (0.0, 1.0):
            x = x * (high - low) + low
        if self.mean is not None:
            x = x - self.mean
        return x.astype(np.float32)

    def with_input_range(self, low: float, high: float) -> Dataset:
        """This dataset for a model that expects pixels in ``[low, high]`` instead of [0, 1]."""
        low, high = float(low), float(high)
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise UserError(f"bad input range {low:g},{high:g}; expected LOW,HIGH with LOW < HIGH")
        if (low, high) == tuple(self.input_range):
            return self
        old_low, old_high = self.input_range
        mean = None
        if self.mean is not None:
            unit_mean = (np.asarray(self.mean) - old_low) / (old_high - old_low)
            mean = (unit_mean * (high - low) + low).astype(np.float32)
        target = dataclasses.replace(self, mean=mean, input_range=(low, high))
        x_train = np.ascontiguousarray(target.from_unit(self.to_unit(self.x_train)))
        x_test = np.ascontiguousarray(target.from_unit(self.to_unit(self.x_test)))
        for arr in (x_train, x_test, mean):
            if arr is not None:
                arr.flags.writeable = False
        return dataclasses.replace(target, x_train=x_train, x_test=x_test)

    def subset(
        self,
        *,
        fraction: float | None = None,
        per_class: int | None = None,
        max_train: int | None = None,
        seed: int = 0,
    ) -> Dataset:
        """This dataset with a seeded, class-stratified part of its training split.

        The same selection :func:`load` makes with these options (on the full
        training set, the same images for the same seed); the test split is kept.
        """
        if self.name in _SPECS:
            _check_options(self.name, _SPECS[self.name], None, None, fraction, per_class,
                           max_train, None, seed)  # fmt: skip
        idx = _train_subset(self.y_train, self.num_classes, fraction, per_class, max_train, seed)
        return self if idx is None else self._with_train(idx)

    def split(self, share: float | int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Two disjoint parts of the training split, stratified by class (scikit-learn).

        The one split helper of the suite: owner / adversary, source / thief,
        training / held-out. Both parts keep the test split.

        Args:
            share: the second part's size, as a share in (0, 1) or a count.
            seed: the ``random_state`` of ``train_test_split``.

        Returns:
            ``(rest, part)``: ``part`` has ``share`` of the training images.
        """
        from sklearn.model_selection import train_test_split

        n = len(self.y_train)
        indices = np.arange(n)
        try:
            rest, part = train_test_split(
                indices, test_size=share, stratify=self.y_train, random_state=seed
            )
        except ValueError as exc:
            raise UserError(f"cannot split {n} '{self.name}' images by {share!r}: {exc}") from None
        return self._with_train(np.sort(rest)), self._with_train(np.sort(part))

    def _with_train(self, idx: np.ndarray) -> Dataset:
        x, y = _take(self.x_train, self.y_train, idx)
        x = np.ascontiguousarray(x)
        x.flags.writeable = y.flags.writeable = False
        return dataclasses.replace(self, x_train=x, y_train=y)

    # Field-wise equality would compare arrays element-wise and fail; two
    # datasets are equal when their content is.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Dataset):
            return NotImplemented
        return self is other or self.digest() == other.digest()

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"num_classes={self.num_classes}, centred={self.mean is not None}, "
            f"input_range={tuple(self.input_range)})"
        )


@dataclass
class _Raw:
    """A dataset as its source holds it: uint8 NHWC images (maybe views), int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    scale: float = 255.0


def check_name(name: str | None) -> None:
    """Raise :class:`UnknownNameError` unless ``name`` is None (no choice made) or a dataset."""
    if name is not None and name not in _SPECS:
        raise UnknownNameError("dataset", name, names())


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
    """Raise :class:`UserError` unless ``data_dir`` is None (not given) or an existing folder."""
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        root = str(Path(data_dir).expanduser())
        raise UserError(f"data directory {root!r} does not exist or is not a directory")


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    size: int | None = None,
    channels: int | None = None,
    center: bool = False,
    fraction: float | None = None,
    per_class: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Loads a dataset, scales it to [0, 1] and optionally subsets, resizes and centres it.

    Subsets are drawn from the raw data before any resizing, and only ever
    from the training set, except for the `max_test` cap.

    Args:
        name: one of :func:`names`.
        data_dir: a directory holding the dataset in its official format
            (IDX files, `cifar-10-batches-py`, `cifar-100-python`,
            `Imagenet32_train_npz`/`Imagenet32_val_npz`, or their parent);
            tried before the other sources.
        size: resize the images to `size` x `size` (bilinear); may not be
            smaller than the images are.
        channels: 3 repeats grey images over three channels; 1 keeps grey
            images grey (RGB to grey is not supported).
        center: subtract the per-channel training mean from both splits.
        fraction: keep round(fraction * N) training images, stratified by class.
        per_class: keep exactly this many training images of each class (the
            first ones of each class under a seeded permutation).
        max_train: cap the training set with a seeded stratified subset.
        max_test: cap the test set with a seeded stratified subset.
        seed: picks the subsets; the same seed gives the same images.
        download: let tensorflow-datasets download the dataset if needed.

    Returns:
        The :class:`Dataset`.

    Raises:
        UnknownNameError: `name` is not a dataset.
        DatasetUnavailable: no source has the dataset.
        UserError: a bad argument, or unreadable or corrupt files.
    """
    check_name(name)
    spec = _SPECS[name]
    _check_options(name, spec, size, channels, fraction, per_class, max_train, max_test, seed)
    started = time.perf_counter()

    raw = _resolve(name, spec, data_dir, download)
    _check_raw(name, spec, raw)

    train_idx = _train_subset(raw.y_train, spec.num_classes, fraction, per_class, max_train, seed)
    test_idx = _cap(raw.y_test, spec.num_classes, max_test, np.random.default_rng([seed, 2]))
    x_train, y_train = _take(raw.x_train, raw.y_train, train_idx)
    x_test, y_test = _take(raw.x_test, raw.y_test, test_idx)

    scale = raw.scale
    del raw  # let a large source go before the float copies are made
    x_train, x_test, mean = _prepare(x_train, x_test, scale, size, center, channels)
    for arr in (x_train, y_train, x_test, y_test, mean):
        if arr is not None:
            arr.flags.writeable = False
    dataset = Dataset(name, x_train, y_train, x_test, y_test, spec.num_classes, mean)
    logger.info(
        "loaded %s: train %s, test %s in %.1f s",
        name,
        x_train.shape,
        x_test.shape,
        time.perf_counter() - started,
    )
    return dataset


def _prepare(x_train, x_test, scale: float, size, center: bool, channels):
    """Scale to [0, 1], resize, centre and repeat grey channels: ``(x_train, x_test, mean)``."""
    x_train = _scale_and_resize(x_train, scale, size)
    x_test = _scale_and_resize(x_test, scale, size)
    mean = None
    if center:
        # Before the grey channel is repeated: a third of the work, same mean.
        mean = _channel_mean(x_train)
        x_train -= mean
        x_test -= mean
    if channels == 3 and x_train.shape[-1] == 1:
        # concatenate copies whole rows: about four times faster than np.repeat here.
        x_train = np.concatenate([x_train] * 3, axis=-1)
        x_test = np.concatenate([x_test] * 3, axis=-1)
        mean = None if mean is None else np.repeat(mean, 3)
    return np.ascontiguousarray(x_train), np.ascontiguousarray(x_test), mean


# --- argument checks -------------------------------------------------------------


def load_for_model(name: str, model, *, resize: bool = False, **options: Any) -> Dataset:
    """Dataset ``name`` shaped for ``model``'s input and checked against its outputs.

    With ``resize``, images are resized and grey ones repeated over three
    channels to fit the model (as the CAE report feeds Fashion-MNIST to
    32x32x3 models); without it a different shape is an error. Either way
    the dataset is read once.

    Args:
        name: one of :func:`names`.
        model: a Keras classifier with (H, W, C) image inputs.
        resize: fit the images to the model's input.
        **options: further :func:`load` options (``data_dir``, subsets, ``seed``, ...).

    Raises:
        UnknownNameError: ``name`` is not a dataset.
        UserError: the images cannot be shaped for the model, or the model's
            number of outputs differs from the dataset's classes.
    """
    if name not in _SPECS:
        raise UnknownNameError("dataset", name, names())
    shape = tuple(model.input_shape[1:]) if isinstance(model.input_shape, tuple) else ()
    if len(shape) != 3 or not all(isinstance(d, int) for d in shape):
        raise UserError(f"the model takes inputs of shape {shape}; expected images (H, W, C)")
    native = _SPECS[name].image_shape
    size = channels = None
    if resize and shape != native:
        if shape[0] != shape[1]:
            raise UserError(f"the model takes inputs of shape {shape}; only square images resize")
        size = shape[0] if shape[:2] != native[:2] else None
        channels = shape[2] if shape[2] != native[2] else None
    if not resize and shape != native:
        raise UserError(
            f"the model takes inputs of shape {shape} but {name} images are {native}; "
            "pass --resize to fit the images to the model"
        )
    data = load(name, size=size, channels=channels, **options)
    outputs = int(model.output_shape[-1])
    if outputs != data.num_classes:
        raise UserError(
            f"the model has {outputs} outputs but {name} has {data.num_classes} classes"
        )
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_options(
    name: str,
    spec: _Spec,
    size: object,
    channels: object,
    fraction: object,
    per_class: object,
    max_train: object,
    max_test: object,
    seed: object,
) -> None:
    side = spec.image_shape[0]
    if size is not None and (not _is_int(size) or size < side):
        raise UserError(
            f"bad size {size!r} for {name}: expected an integer >= {side}, the image size"
        )
    if channels is not None:
        if not _is_int(channels) or channels not in (1, 3):
            raise UserError(f"bad channels {channels!r}; expected one of: 1, 3")
        if channels == 1 and spec.image_shape[2] == 3:
            raise UserError(f"channels=1 is not supported for {name}, whose images are RGB")
    if fraction is not None and per_class is not None:
        raise UserError("give fraction or per_class, not both")
    if fraction is not None and (
        not isinstance(fraction, int | float | np.number)
        or isinstance(fraction, bool)
        or not 0 < fraction <= 1
    ):
        raise UserError(f"bad fraction {fraction!r}; expected a number in (0, 1]")
    if per_class is not None and (not _is_int(per_class) or per_class < 1):
        raise UserError(f"bad per_class {per_class!r}; expected an integer >= 1")
    for label, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and (not _is_int(cap) or cap < 1):
            raise UserError(f"bad {label} {cap!r}; expected an integer >= 1")
    if not _is_int(seed) or seed < 0:
        raise UserError(f"bad seed {seed!r}; expected an integer >= 0")


def _check_raw(name: str, spec: _Spec, raw: _Raw) -> None:
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if x.ndim != 4 or x.shape[1:] != spec.image_shape:
            raise UserError(
                f"{name} {split} images from {raw.source} have shape {x.shape[1:]}; "
                f"expected {spec.image_shape}"
            )
        if len(x) != len(y) or len(x) == 0:
            raise UserError(
                f"{name} {split} split from {raw.source} has {len(x)} images and {len(y)} labels"
            )
        if y.min() < 0 or y.max() >= spec.num_classes:
            raise UserError(
                f"{name} {split} labels from {raw.source} are outside 0..{spec.num_classes - 1}"
            )


# --- subsets -----------------------------------------------------------------------


def _take_quota(labels: np.ndarray, quota: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the first `quota[c]` images of each class c under a permutation."""
    perm = rng.permutation(len(labels))
    order = np.argsort(labels[perm], kind="stable")  # by class; permuted within a class
    grouped = perm[order]
    grouped_labels = labels[grouped]
    starts = np.concatenate(([0], np.cumsum(np.bincount(labels, minlength=len(quota)))))
    rank = np.arange(len(labels)) - starts[grouped_labels]
    return np.sort(grouped[rank < quota[grouped_labels]])


def _stratified(
    labels: np.ndarray, n: int, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted indices of `n` images, each class represented in proportion (largest remainder).

    Why not scikit-learn's ``train_test_split(stratify=...)`` (which
    :meth:`Dataset.split` uses): it refuses samples smaller than the number
    of classes and classes with a single image, both of which the papers'
    settings need (Aiken et al.'s 0.6% of a split, one image per class), and
    it has no exact per-class quota (``per_class``). This sampler is exact
    and shared by :func:`load` and :meth:`Dataset.subset`.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
    total = int(counts.sum())
    quota, remainder = np.divmod(counts * n, total)  # exact integer arithmetic
    short = n - int(quota.sum())
    if short:
        quota[np.argsort(-remainder, kind="stable")[:short]] += 1
    return _take_quota(labels, quota, rng)


def _cap(
    labels: np.ndarray, num_classes: int, cap: int | None, rng: np.random.Generator
) -> np.ndarray | None:
    if cap is None or cap >= len(labels):
        return None
    return _stratified(labels, cap, num_classes, rng)


def _train_subset(
    labels: np.ndarray,
    num_classes: int,
    fraction: float | None,
    per_class: int | None,
    max_train: int | None,
    seed: int,
) -> np.ndarray | None:
    """Indices into the training set to keep, or None for all of it."""
    rng = np.random.default_rng([seed, 0])
    idx: np.ndarray | None = None
    if per_class is not None:
        counts = np.bincount(labels, minlength=num_classes)
        if counts.min() < per_class:
            poorest = int(counts.argmin())
            raise UserError(
                f"per_class={per_class} is too many: class {poorest} has only "
                f"{counts[poorest]} training images"
            )
        idx = _take_quota(labels, np.full(num_classes, per_class, np.int64), rng)
    elif fraction is not None:
        n = round(fraction * len(labels))
        if n < 1:
            raise UserError(
                f"fraction {fraction!r} of {len(labels)} training images keeps none; "
                "use a larger fraction"
            )
        if n < len(labels):
            idx = _stratified(labels, n, num_classes, rng)
    if max_train is not None:
        current = labels if idx is None else labels[idx]
        sub = _cap(current, num_classes, max_train, np.random.default_rng([seed, 1]))
        if sub is not None:
            idx = sub if idx is None else idx[sub]
    return idx


def _take(x: np.ndarray, y: np.ndarray, idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if idx is None:
        return x, np.array(y, dtype=np.int64)
    return x[idx], np.asarray(y[idx], dtype=np.int64)


# --- preprocessing -----------------------------------------------------------------------


def _scale_and_resize(raw: np.ndarray, scale: float, size: int | None) -> np.ndarray:
    """A fresh C-contiguous float32 copy of `raw` / `scale`, resized to `size` if given."""
    x = raw.astype(np.float32, order="C")  # order: sources hand over transposed views
    x /= np.float32(scale)
    if size is not None and size != x.shape[1]:
        x = _resize(x, size)
    return x


def _channel_mean(x: np.ndarray) -> np.ndarray:
    # Summing over the images first runs along contiguous rows, several times
    # faster than one reduction over axes (0, 1, 2); float64 keeps it exact enough.
    per_pixel = x.sum(axis=0, dtype=np.float64)
    return (per_pixel.sum(axis=(0, 1)) / (x.size // x.shape[-1])).astype(np.float32)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    import tensorflow as tf  # deferred: most callers already pay for it, digits need not

    out = np.empty((len(x), size, size, x.shape[-1]), np.float32)
    for start in range(0, len(x), _RESIZE_CHUNK):
        chunk = tf.convert_to_tensor(x[start : start + _RESIZE_CHUNK])
        out[start : start + _RESIZE_CHUNK] = tf.image.resize(
            chunk, (size, size), method="bilinear"
        ).numpy()
    # Bilinear weights sum to one, but float rounding can step a hair outside.
    np.clip(out, 0.0, 1.0, out=out)
    return out


# --- sources -----------------------------------------------------------------------------


def _resolve(name: str, spec: _Spec, data_dir: str | os.PathLike | None, download: bool) -> _Raw:
    if name == "digits":
        if data_dir is not None:
            logger.debug("digits ship with scikit-learn; data_dir %s is not used", data_dir)
        return _load_digits()
    if data_dir is not None:
        check_data_dir(data_dir)
        root = Path(data_dir).expanduser()
        raw = _LOCAL_READERS[name](root)
        if raw is not None:
            logger.info("reading %s from %s", name, raw.source)
            return raw
        logger.info("%s is not in %s; trying the next source", name, root)
    if name == "fashion_mnist" and DEBIAN_FASHION_DIR.is_dir():
        raw = _read_idx_dataset(DEBIAN_FASHION_DIR, name, ("",))
        if raw is not None:
            logger.info("reading %s from the Debian package (%s)", name, DEBIAN_FASHION_DIR)
            return raw
    return _from_tfds(name, spec, download)


def _unavailable(name: str, spec: _Spec, reason: str) -> DatasetUnavailable:
    tfds_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    reason = " ".join(reason.split())  # one line, whatever the cause printed
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return DatasetUnavailable(
        f"dataset {name!r} is not available: pass --data-dir DIR with {spec.local_hint}, "
        "install the Debian package dataset-fashion-mnist (fashion_mnist only), "
        f"or let tensorflow-datasets download it (needs internet; TFDS_DATA_DIR={tfds_dir})"
        f" [{reason}]"
    )


# --- IDX files (MNIST, Fashion-MNIST, EMNIST) ---------------------------------------------

# Published MD5 sums of the official MNIST files, gzipped and decompressed. MNIST and
# Fashion-MNIST share file names, so each is checked not to be the other: files a user
# trimmed or rebuilt still load, but the wrong dataset under the right name does not.
_MNIST_MD5 = {
    "train-images-idx3-ubyte": (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "6bbc9ace898e44ae57da46a324031adb",
    ),
    "train-labels-idx1-ubyte": (
        "d53e105ee54ea40749a09fcbcd1e9432",
        "a25bea736e30d166cdddb491f175f624",
    ),
    "t10k-images-idx3-ubyte": (
        "9fb629c4189551a2d022fa330f9573f3",
        "2646ac647ad5339dbf082846283269ea",
    ),
    "t10k-labels-idx1-ubyte": (
        "ec29112dd5afa0611ce80d1b7f02629c",
        "27ae3e4e09519cfbb04c329615203637",
    ),
}

# Published MD5 sums of the official Fashion-MNIST files, gzipped and decompressed
# (the Debian package recompressed them, so only the decompressed sums match it).
_FASHION_MD5 = {
    "train-images-idx3-ubyte": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ),
    "train-labels-idx1-ubyte": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "9018921c3c673c538a1fc5bad174d6f9",
    ),
    "t10k-images-idx3-ubyte": (
        "bef4ecab320f06d8554ea6380940ec79",
        "8181f5470baa50b63fa0f6fddb340f0a",
    ),
    "t10k-labels-idx1-ubyte": (
        "bb300cfdad3c16e7a12a480ee83cd310",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
}

_IDX_UBYTE = 0x08


def _idx_names(name: str) -> dict[str, str]:
    if name == "emnist":
        return {
            part: f"emnist-letters-{split}-{kind}"
            for part, split, kind in (
                ("x_train", "train", "images-idx3-ubyte"),
                ("y_train", "train", "labels-idx1-ubyte"),
                ("x_test", "test", "images-idx3-ubyte"),
                ("y_test", "test", "labels-idx1-ubyte"),
            )
        }
    return {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }


# Sub-folders of a data dir where the IDX files are also looked for: the
# dataset's own name and the layouts of common downloaders (EMNIST's zip
# unpacks to gzip/, torchvision keeps FashionMNIST/raw/).
_IDX_SUBDIRS = {
    "mnist": ("", "mnist", "MNIST/raw"),
    "fashion_mnist": ("", "fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
    "emnist": ("", "emnist", "gzip", "EMNIST/raw"),
}


def _find_file(root: Path, subdirs: Sequence[str], filename: str) -> Path | None:
    for sub in subdirs:
        for candidate in (filename, filename + ".gz"):
            path = root / sub / candidate
            if path.is_file():
                return path
    return None


def _read_idx_dataset(root: Path, name: str, subdirs: Sequence[str] | None = None) -> _Raw | None:
    files = {
        part: _find_file(root, subdirs or _IDX_SUBDIRS[name], filename)
        for part, filename in _idx_names(name).items()
    }
    if all(path is None for path in files.values()):
        return None
    missing = [_idx_names(name)[part] for part, path in files.items() if path is None]
    if missing:
        raise UserError(f"{name} files in {root} are incomplete: missing {', '.join(missing)}[.gz]")
    check_md5 = name == "fashion_mnist"
    arrays = {}
    for part, path in files.items():
        filename = _idx_names(name)[part]
        arrays[part] = _read_idx(
            path,
            ndim=3 if part.startswith("x") else 1,
            md5=_FASHION_MD5[filename] if check_md5 else None,
            not_md5=_other_idx_md5(name, filename),
        )
    x_train, x_test = arrays["x_train"][..., None], arrays["x_test"][..., None]
    y_train = arrays["y_train"].astype(np.int64)
    y_test = arrays["y_test"].astype(np.int64)
    if name == "emnist":
        # The official files hold letters transposed and labelled 1..26.
        x_train, x_test = x_train.transpose(0, 2, 1, 3), x_test.transpose(0, 2, 1, 3)
        for split, y in (("train", y_train), ("test", y_test)):
            if len(y) and y.min() < 1:
                raise UserError(f"emnist {split} labels in {root} are not the letters' 1..26")
        y_train -= 1
        y_test -= 1
    return _Raw(x_train, y_train, x_test, y_test, source=str(Path(files["x_train"]).parent))


def _other_idx_md5(name: str, filename: str) -> tuple[str, tuple[str, str]] | None:
    """The dataset whose same-named IDX file ``name``'s file must not be, with its sums."""
    other = {"mnist": ("Fashion-MNIST", _FASHION_MD5), "fashion_mnist": ("MNIST", _MNIST_MD5)}
    if name not in other:
        return None
    label, sums = other[name]
    return label, sums[filename]


def _read_idx(
    path: Path | None,
    ndim: int,
    md5: tuple[str, str] | None = None,
    not_md5: tuple[str, tuple[str, str]] | None = None,
) -> np.ndarray:
    """Reads one IDX file of unsigned bytes (gzipped or not), checked end to end.

    ``md5`` are the (gzipped, decompressed) sums the file must match; ``not_md5``
    names another dataset and the sums of its same-named file, which it must not match.
    """
    path = Path(path)  # never None here: callers check that every file was found
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    payload = data
    if data[:2] == b"\x1f\x8b":
        try:
            payload = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"corrupt file {path}: not a readable gzip file ({exc})") from exc
    if md5 is not None:
        gz_sum, plain_sum = md5
        # Either the official .gz file byte for byte, or its content recompressed.
        if (
            hashlib.md5(data).hexdigest() != gz_sum
            and hashlib.md5(payload).hexdigest() != plain_sum
        ):
            raise UserError(
                f"corrupt file {path}: its MD5 matches neither the official file "
                "nor its decompressed content; download it again"
            )
    if not_md5 is not None:
        other, sums = not_md5
        if hashlib.md5(data).hexdigest() in sums or hashlib.md5(payload).hexdigest() in sums:
            raise UserError(f"wrong dataset: {path} is the {other} file of the same name")
    header = 4 + 4 * ndim
    if len(payload) < header or payload[:3] != bytes((0, 0, _IDX_UBYTE)) or payload[3] != ndim:
        raise UserError(
            f"corrupt file {path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(magic {payload[:4].hex() or 'missing'})"
        )
    dims = tuple(int(d) for d in np.frombuffer(payload, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(payload) != expected:
        raise UserError(
            f"corrupt file {path}: {len(payload)} bytes where its header {dims} "
            f"implies {expected} ({'truncated' if len(payload) < expected else 'trailing data'})"
        )
    return np.frombuffer(payload, np.uint8, offset=header).reshape(dims)


# --- CIFAR python pickles -------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches, refusing any global but the few numpy arrays need.

    The CIFAR "python version" is a pickle by its authors' choice; it is read
    only from the user's own data dir. Pickles can run code, so this reader
    admits only numpy's array and dtype constructors: a tampered file fails
    instead of running anything.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # How Python 3 writes bytes into a protocol-2 pickle; pure, no side effect.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # files pickled before numpy 2
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            # The official format: pickled under Python 2, hence bytes keys.
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # any unpickling failure means the file is not a CIFAR batch
        raise UserError(f"corrupt file {path}: not a CIFAR python batch ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise UserError(f"corrupt file {path}: no {b'data'!r} and {label_key!r} entries")
    data = batch[b"data"]
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"corrupt file {path}: labels are not integers") from exc
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.shape != (len(data),)
    ):
        raise UserError(f"corrupt file {path}: expected uint8 data of shape (N, 3072) and N labels")
    # Rows are planar R, G, B planes of 32x32; NHWC is a view of them.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_dir(root: Path, dirname: str, marker: str) -> Path | None:
    if (root / dirname).is_dir():
        return root / dirname
    if root.name == dirname or (root / marker).is_file():
        return root
    return None


def _read_cifar10(root: Path) -> _Raw | None:
    folder = _cifar_dir(root, "cifar-10-batches-py", "data_batch_1")
    if folder is None:
        return None
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    test_file = folder / "test_batch"
    missing = [p.name for p in [*train_files, test_file] if not p.is_file()]
    if missing:
        raise UserError(f"cifar10 files in {folder} are incomplete: missing {', '.join(missing)}")
    parts = [_read_cifar_batch(p, b"labels") for p in train_files]
    x_test, y_test = _read_cifar_batch(test_file, b"labels")
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    return _Raw(x_train, y_train, x_test, y_test, source=str(folder))


def _read_cifar100(root: Path) -> _Raw | None:
    folder = _cifar_dir(root, "cifar-100-python", "meta")
    if folder is None:
        return None
    missing = [n for n in ("train", "test") if not (folder / n).is_file()]
    if missing:
        raise UserError(f"cifar100 files in {folder} are incomplete: missing {', '.join(missing)}")
    x_train, y_train = _read_cifar_batch(folder / "train", b"fine_labels")
    x_test, y_test = _read_cifar_batch(folder / "test", b"fine_labels")
    return _Raw(x_train, y_train, x_test, y_test, source=str(folder))


# --- downsampled ImageNet .npz batches --------------------------------------------------


def _npz_part(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except KeyError as exc:
        raise UserError(f"corrupt file {path}: no {key!r} array") from exc
    except Exception as exc:  # zip/format errors, or object arrays refused without pickle
        raise UserError(f"corrupt file {path}: not a readable .npz batch ({exc})") from exc


def _read_imagenet32_split(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    # Labels first (small), so the 3.9 GB of training pixels are filled into
    # one array instead of being concatenated from copies.
    labels = [_npz_part(p, "labels").astype(np.int64).ravel() - 1 for p in paths]
    x = np.empty((sum(len(y) for y in labels), 3 * 32 * 32), np.uint8)
    start = 0
    for path, y in zip(paths, labels, strict=True):
        data = _npz_part(path, "data")
        if data.dtype != np.uint8 or data.shape != (len(y), 3 * 32 * 32):
            raise UserError(
                f"corrupt file {path}: expected uint8 data of shape ({len(y)}, 3072), "
                f"got {data.dtype} {data.shape}"
            )
        x[start : start + len(y)] = data
        start += len(y)
        logger.debug("read %s", path)
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.concatenate(labels)


def _read_imagenet32(root: Path) -> _Raw | None:
    train_dir, val_dir = root / "Imagenet32_train_npz", root / "Imagenet32_val_npz"
    if not train_dir.is_dir() and not val_dir.is_dir():
        return None

    def batch_number(path: Path) -> int:
        found = re.search(r"(\d+)$", path.stem)
        return int(found.group(1)) if found else 0

    train_files = sorted(train_dir.glob("train_data_batch_*.npz"), key=batch_number)
    val_file = val_dir / "val_data.npz"
    if not train_files or not val_file.is_file():
        raise UserError(
            f"imagenet32 files in {root} are incomplete: need "
            "Imagenet32_train_npz/train_data_batch_*.npz and Imagenet32_val_npz/val_data.npz"
        )
    x_train, y_train = _read_imagenet32_split(train_files)
    x_test, y_test = _read_imagenet32_split([val_file])
    return _Raw(x_train, y_train, x_test, y_test, source=str(root))


_LOCAL_READERS = {
    "mnist": lambda root: _read_idx_dataset(root, "mnist"),
    "fashion_mnist": lambda root: _read_idx_dataset(root, "fashion_mnist"),
    "emnist": lambda root: _read_idx_dataset(root, "emnist"),
    "cifar10": _read_cifar10,
    "cifar100": _read_cifar100,
    "imagenet32": _read_imagenet32,
}


# --- scikit-learn digits ------------------------------------------------------------------


def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits  # deferred: only this dataset needs sklearn

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.uint8)[..., None]  # 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    # No official split: a fixed 80/20 split, stratified, always drawn with seed 0.
    test = _stratified(labels, round(0.2 * len(labels)), 10, np.random.default_rng(0))
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return _Raw(
        images[~is_test],
        labels[~is_test],
        images[is_test],
        labels[is_test],
        source="scikit-learn",
        scale=16.0,
    )


# --- tensorflow-datasets --------------------------------------------------------------------


def _reachable(host_port: str, timeout: float) -> bool:
    """Whether a TCP connection to `host:port` (or the proxy for it) opens within `timeout`."""
    host, _, port = host_port.rpartition(":")
    proxy = urllib.request.getproxies().get("https" if port == "443" else "http")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = parsed.hostname or host, str(parsed.port or 80)
    outcome: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    # A thread, because name resolution ignores socket timeouts and can hang.
    probe = threading.Thread(target=connect, daemon=True, name="dataset-network-probe")
    probe.start()
    probe.join(timeout + 1.0)
    return bool(outcome and outcome[0])


def _tfds_fetch(tfds: Any, spec: _Spec, data_dir: str | None, download: bool) -> _Raw:
    splits = tfds.load(
        spec.tfds_name,
        split=["train", spec.tfds_test_split],
        batch_size=-1,
        as_supervised=True,
        data_dir=data_dir,
        download=download,
    )
    # batch_size=-1 gives each split as one (images, labels) pair of eager tensors.
    (x_train, y_train), (x_test, y_test) = splits
    return _Raw(
        np.asarray(x_train, dtype=np.uint8),
        np.asarray(y_train, dtype=np.int64),
        np.asarray(x_test, dtype=np.uint8),
        np.asarray(y_test, dtype=np.int64),
        source=f"tensorflow-datasets ({spec.tfds_name})",
    )


def _from_tfds(name: str, spec: _Spec, download: bool) -> _Raw:
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise _unavailable(name, spec, f"tensorflow-datasets is not installed: {exc}") from exc
    data_dir = os.environ.get("TFDS_DATA_DIR") or None
    try:
        raw = _tfds_fetch(tfds, spec, data_dir, download=False)
    except Exception as exc:  # not prepared yet (AssertionError), or any other tfds failure
        logger.debug("%s is not prepared in tensorflow-datasets: %s", name, exc)
        if not download:
            raise _unavailable(
                name, spec, f"not prepared in tensorflow-datasets and download=False: {exc}"
            ) from exc
        if spec.tfds_host and not _reachable(spec.tfds_host, NETWORK_PROBE_TIMEOUT_S):
            raise _unavailable(
                name,
                spec,
                f"offline? cannot connect to {spec.tfds_host} within {NETWORK_PROBE_TIMEOUT_S:g} s",
            ) from exc
        logger.info("downloading %s with tensorflow-datasets", name)
        try:
            raw = _tfds_fetch(tfds, spec, data_dir, download=True)
        except Exception as exc2:  # network, checksum, missing-dependency... all one message
            raise _unavailable(
                name, spec, f"tensorflow-datasets failed: {type(exc2).__name__}: {exc2}"
            ) from exc2
    if name == "emnist":
        # tfds keeps the official orientation and 1-based labels; match the IDX reader.
        raw.x_train = raw.x_train.transpose(0, 2, 1, 3)
        raw.x_test = raw.x_test.transpose(0, 2, 1, 3)
        raw.y_train = raw.y_train - 1
        raw.y_test = raw.y_test - 1
    return raw
