"""Tiny fabricated data folders in the formats the loaders read, for tests only.

Random pixels with balanced labels, written as the official files are:
MNIST-family IDX files (``mnist``; Fashion-MNIST has the same layout),
``cifar-10-batches-py``, ``cifar-100-python`` and the ImageNet32 npz batches.
They exercise a code path (``--data-dir``), never a claim: no number computed
on them means anything, and no loader falls back to them.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

__all__ = ["fabricate"]


def _idx(path: Path, array: np.ndarray) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes((0, 0, 0x08, array.ndim)) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(gzip.compress(header + array.tobytes()))


def _pixels(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size), dtype=np.uint8)


def _labels(n: int, classes: int) -> np.ndarray:
    return np.arange(n) % classes


def _mnist(root: Path, n_train: int, n_test: int) -> None:
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        _idx(root / f"{prefix}-images-idx3-ubyte", _pixels(n, 784, seed).reshape(n, 28, 28))
        _idx(root / f"{prefix}-labels-idx1-ubyte", _labels(n, 10))


def _emnist(root: Path, n_train: int, n_test: int) -> None:
    for split, n, seed in (("train", n_train, 5), ("test", n_test, 6)):
        images = _pixels(n, 784, seed).reshape(n, 28, 28)
        _idx(root / f"emnist-letters-{split}-images-idx3-ubyte", images)
        _idx(root / f"emnist-letters-{split}-labels-idx1-ubyte", _labels(n, 26) + 1)  # 1..26


def _pickle(path: Path, obj: object) -> None:
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=2)  # the CIFAR files are protocol-2 pickles


def _cifar10(root: Path, n_train: int, n_test: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    per_batch = max(1, n_train // 5)
    for i in range(1, 6):
        labels = [(j + i) % 10 for j in range(per_batch)]
        _pickle(
            folder / f"data_batch_{i}", {b"labels": labels, b"data": _pixels(per_batch, 3072, i)}
        )
    _pickle(
        folder / "test_batch",
        {b"labels": list(_labels(n_test, 10)), b"data": _pixels(n_test, 3072, 9)},
    )


def _cifar100(root: Path, n_train: int, n_test: int) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        labels = list(_labels(n, 100))
        _pickle(
            folder / name,
            {b"fine_labels": labels, b"coarse_labels": [0] * n, b"data": _pixels(n, 3072, seed)},
        )


def _imagenet32(root: Path, n_train: int, n_test: int) -> None:
    train, val = root / "Imagenet32_train_npz", root / "Imagenet32_val_npz"
    train.mkdir(parents=True, exist_ok=True)
    val.mkdir(parents=True, exist_ok=True)
    half = max(1, n_train // 2)
    for i in (1, 2):  # labels are 1-based in the official files
        np.savez(
            train / f"train_data_batch_{i}.npz",
            data=_pixels(half, 3072, 10 + i),
            labels=_labels(half, 1000) + 1,
        )
    np.savez(val / "val_data.npz", data=_pixels(n_test, 3072, 20), labels=_labels(n_test, 1000) + 1)


_WRITERS = {
    "mnist": _mnist,
    "emnist": _emnist,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "imagenet32": _imagenet32,
}


def fabricate(root: Path, names=tuple(_WRITERS), n_train: int = 300, n_test: int = 100) -> Path:
    """Write fabricated ``names`` datasets under ``root`` (a ``--data-dir``); returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        _WRITERS[name](root, n_train, n_test)
    return root
