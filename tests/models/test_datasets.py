"""Tests of models.datasets: sources, checks, preprocessing and seeded subsets."""

from __future__ import annotations

import gzip
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest

from models import datasets
from models.datasets import Dataset, DatasetUnavailable, load, names
from models.errors import UnknownNameError, UserError

needs_debian_fashion = pytest.mark.skipif(
    not (datasets.DEBIAN_FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist is not installed ({datasets.DEBIAN_FASHION_DIR})",
)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


# --- writers of tiny files in the official formats -----------------------------------


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes((0, 0, 0x08, array.ndim)) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def tiny_images(n: int, side: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side), dtype=np.uint8)


def write_mnist_dir(root: Path, n_train: int = 20, n_test: int = 10, prefix: str = "") -> dict:
    """Writes a tiny MNIST-layout data dir; returns the arrays written."""
    arrays = {
        "train-images-idx3-ubyte": tiny_images(n_train, seed=1),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": tiny_images(n_test, seed=2),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for i, (filename, array) in enumerate(arrays.items()):
        write_idx(root / (prefix + filename), array, gz=i % 2 == 0)  # gzipped and plain
    return arrays


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def write_pickle(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # the CIFAR files are protocol-2 pickles


def write_cifar10(root: Path, per_batch: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        write_pickle(
            folder / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": [(i + j) % 10 for j in range(per_batch)],
                b"data": cifar_rows(per_batch, seed=i),
                b"filenames": [b"x.png"] * per_batch,
            },
        )
    write_pickle(
        folder / "test_batch",
        {b"labels": list(range(per_batch)), b"data": cifar_rows(per_batch, seed=9)},
    )
    return folder


@pytest.fixture
def no_tfds(tmp_path, monkeypatch):
    """An empty TFDS_DATA_DIR and no network probe that could leave this machine."""
    tfds_dir = tmp_path / "tfds_empty"
    tfds_dir.mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    monkeypatch.setattr(datasets, "_reachable", lambda host, timeout: False)
    return tfds_dir


# --- names and arguments ------------------------------------------------------------------


def test_names():
    assert names() == [
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "imagenet32",
        "emnist",
        "digits",
    ]


def test_unknown_name_lists_the_names():
    with pytest.raises(UnknownNameError) as exc:
        load("cifar")
    message = one_line(exc)
    assert "'cifar'" in message
    assert all(name in message for name in names())
    assert isinstance(exc.value, UserError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"fraction": float("nan")},
        {"fraction": "half"},
        {"per_class": 0},
        {"per_class": 2.5},
        {"fraction": 0.1, "per_class": 1},
        {"size": 4},
        {"size": 16.0},
        {"size": True},
        {"channels": 2},
        {"max_train": 0},
        {"max_test": -1},
        {"seed": -1},
    ],
)
def test_bad_arguments_are_one_line_user_errors(kwargs):
    with pytest.raises(UserError) as exc:
        load("digits", **kwargs)
    one_line(exc)


def test_grey_from_rgb_is_refused_before_loading(tmp_path):
    with pytest.raises(UserError, match="channels=1") as exc:
        load("cifar10", channels=1, data_dir=tmp_path)
    one_line(exc)


# --- Fashion-MNIST from the Debian package --------------------------------------------------


@needs_debian_fashion
def test_fashion_mnist_from_debian_package():
    ds = load("fashion_mnist")
    assert ds.name == "fashion_mnist" and ds.num_classes == 10 and ds.mean is None
    assert ds.x_train.shape == (60000, 28, 28, 1)
    assert ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.input_shape == (28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.flags.c_contiguous and ds.x_test.flags.c_contiguous
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert not ds.x_train.flags.writeable  # the digest must not go stale


@needs_debian_fashion
def test_fashion_mnist_resized_to_rgb_32():
    ds = load("fashion_mnist", size=32, channels=3, max_train=500, max_test=100)
    assert ds.x_train.shape == (500, 32, 32, 3) and ds.x_test.shape == (100, 32, 32, 3)
    assert ds.input_shape == (32, 32, 3)
    assert ds.x_train.flags.c_contiguous
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    np.testing.assert_array_equal(ds.x_train[..., 0], ds.x_train[..., 2])
    assert np.bincount(ds.y_train).tolist() == [50] * 10  # the cap is stratified


@needs_debian_fashion
def test_fashion_fraction_is_stratified_and_seeded():
    a = load("fashion_mnist", fraction=0.006, max_test=10)
    b = load("fashion_mnist", fraction=0.006, max_test=10)
    c = load("fashion_mnist", fraction=0.006, max_test=10, seed=1)
    assert len(a.x_train) == 360
    assert np.bincount(a.y_train).tolist() == [36] * 10
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.digest() == b.digest()
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.digest() != c.digest()


@needs_debian_fashion
def test_fashion_per_class_and_centring():
    ds = load("fashion_mnist", per_class=1, center=True, channels=3)
    assert sorted(ds.y_train.tolist()) == list(range(10))
    assert ds.mean is not None and ds.mean.shape == (3,)
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2), dtype=np.float64), 0, atol=1e-6)
    assert len(ds.x_test) == 10000


def test_fashion_md5_mismatch_is_corrupt(tmp_path):
    write_mnist_dir(tmp_path)  # valid IDX files, but not the published ones
    with pytest.raises(UserError, match="corrupt") as exc:
        load("fashion_mnist", data_dir=tmp_path)
    assert "train-images-idx3-ubyte" in one_line(exc)


# --- scikit-learn digits -------------------------------------------------------------------------


def test_digits_fixed_split():
    ds = load("digits")
    assert ds.x_train.shape == (1438, 8, 8, 1) and ds.x_test.shape == (359, 8, 8, 1)
    assert ds.num_classes == 10
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # Pixels are 0..16 in sixteenths.
    np.testing.assert_array_equal(ds.x_train * 16, np.round(ds.x_train * 16))
    assert set(ds.y_test.tolist()) == set(range(10))
    # The split is the same whatever the seed.
    other = load("digits", seed=5)
    np.testing.assert_array_equal(ds.x_test, other.x_test)


def test_digits_resized_centred():
    ds = load("digits", size=32, channels=3, center=True)
    assert ds.x_train.shape == (1438, 32, 32, 3) and ds.x_test.shape == (359, 32, 32, 3)
    assert ds.mean is not None and ds.mean.shape == (3,) and ds.mean.dtype == np.float32
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2), dtype=np.float64), 0, atol=1e-6)
    assert abs(float(ds.x_test.mean())) < 0.05


def test_digest_is_stable_and_tracks_content():
    a, b = load("digits"), load("digits")
    assert a.digest() == b.digest() and len(a.digest()) == 64
    assert a == b and hash(a) == hash(b)
    half = load("digits", fraction=0.5)
    assert half.digest() != a.digest() and half != a
    assert load("digits", center=True).digest() != a.digest()


def test_per_class_and_caps():
    ds = load("digits", per_class=3, max_test=50, seed=3)
    assert np.bincount(ds.y_train).tolist() == [3] * 10
    assert len(ds.x_test) == 50 and set(ds.y_test.tolist()) == set(range(10))
    with pytest.raises(UserError, match="per_class") as exc:
        load("digits", per_class=1000)
    one_line(exc)


def test_stratified_quota_sums_exactly():
    labels = np.repeat(np.arange(3), [5, 7, 11])
    for n in range(1, len(labels) + 1):
        idx = datasets._stratified(labels, n, 3, np.random.default_rng(0))
        assert len(idx) == n and len(np.unique(idx)) == n
        assert np.all(np.diff(idx) > 0)


# --- a data dir of IDX files -----------------------------------------------------------------------


def test_idx_data_dir(tmp_path):
    arrays = write_mnist_dir(tmp_path / "mnist")  # found in the dataset's sub-folder too
    ds = load("mnist", data_dir=tmp_path, download=False)
    assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(
        ds.x_train[..., 0], arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    )
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    small = load("mnist", data_dir=tmp_path, size=32, channels=3, per_class=1)
    assert small.x_train.shape == (10, 32, 32, 3)


def test_emnist_letters_are_turned_upright_and_zero_based(tmp_path):
    images = tiny_images(6)
    labels = np.array([1, 2, 3, 26, 1, 2])
    for split in ("train", "test"):
        write_idx(tmp_path / f"emnist-letters-{split}-images-idx3-ubyte", images, gz=True)
        write_idx(tmp_path / f"emnist-letters-{split}-labels-idx1-ubyte", labels, gz=True)
    ds = load("emnist", data_dir=tmp_path)
    assert ds.num_classes == 26
    np.testing.assert_array_equal(ds.y_train, labels - 1)
    np.testing.assert_array_equal(ds.x_train[..., 0] * 255, images.transpose(0, 2, 1))
    assert ds.x_train.flags.c_contiguous


@pytest.mark.parametrize(
    "damage",
    ["bad magic", "truncated", "trailing", "truncated gzip", "empty", "images as labels"],
)
def test_corrupt_idx_is_a_one_line_user_error(tmp_path, damage):
    write_mnist_dir(tmp_path)
    target = tmp_path / "t10k-images-idx3-ubyte.gz"
    payload = gzip.decompress(target.read_bytes())
    target.unlink()
    target = tmp_path / "t10k-images-idx3-ubyte"
    if damage == "bad magic":
        target.write_bytes(b"\x00\x00\x09\x03" + payload[4:])
    elif damage == "truncated":
        target.write_bytes(payload[:-100])
    elif damage == "trailing":
        target.write_bytes(payload + b"\x00")
    elif damage == "truncated gzip":
        target = target.with_name(target.name + ".gz")
        target.write_bytes(gzip.compress(payload)[:500])
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        target.write_bytes((tmp_path / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(UserError, match="corrupt") as exc:
        load("mnist", data_dir=tmp_path)
    assert target.name in one_line(exc)


def test_incomplete_idx_dir(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", tiny_images(3))
    with pytest.raises(UserError, match="incomplete") as exc:
        load("mnist", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte" in one_line(exc)


def test_missing_data_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist") as exc:
        load("mnist", data_dir=tmp_path / "nowhere")
    one_line(exc)


# --- CIFAR pickles and ImageNet32 npz -----------------------------------------------------------


def test_cifar10_data_dir(tmp_path):
    folder = write_cifar10(tmp_path)
    for data_dir in (tmp_path, folder):  # the parent or the folder itself
        ds = load("cifar10", data_dir=data_dir, download=False)
        assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
        assert ds.num_classes == 10
    rows = cifar_rows(4, seed=1)
    # Rows are planar: red plane, green plane, blue plane, each 32x32 row-major.
    for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert ds.x_train[0, h, w, c] == np.float32(rows[0, c * 1024 + h * 32 + w]) / 255
    np.testing.assert_array_equal(ds.y_train[:4], [1, 2, 3, 4])


def test_cifar100_data_dir(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 12), ("test", 5)):
        write_pickle(
            folder / split,
            {b"data": cifar_rows(n, seed=n), b"fine_labels": list(range(100 - n, 100))},
        )
    ds = load("cifar100", data_dir=tmp_path)
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.num_classes == 100
    assert ds.y_train.tolist() == list(range(88, 100))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    write_pickle(folder / "test_batch", {b"data": _Payload(marker), b"labels": [0]})
    with pytest.raises(UserError, match="corrupt") as exc:
        load("cifar10", data_dir=tmp_path)
    one_line(exc)
    assert not marker.exists()


def test_imagenet32_data_dir(tmp_path):
    train, val = tmp_path / "Imagenet32_train_npz", tmp_path / "Imagenet32_val_npz"
    train.mkdir()
    val.mkdir()
    for i, n in ((1, 3), (2, 4), (10, 2)):
        np.savez(train / f"train_data_batch_{i}.npz", data=cifar_rows(n, i), labels=[1000] * n)
    np.savez(val / "val_data.npz", data=cifar_rows(5, 0), labels=[1, 2, 3, 4, 5])
    ds = load("imagenet32", data_dir=tmp_path)
    assert ds.x_train.shape == (9, 32, 32, 3) and ds.num_classes == 1000
    assert ds.y_train.tolist() == [999] * 9 and ds.y_test.tolist() == [0, 1, 2, 3, 4]
    # Batches are read in numeric order (10 after 2).
    assert ds.x_train[-1, 0, 0, 0] == np.float32(cifar_rows(2, 10)[-1, 0]) / 255


# --- when no source has it ---------------------------------------------------------------------


def test_unavailable_names_the_three_ways(tmp_path, no_tfds):
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DatasetUnavailable) as exc:
        load("cifar10", data_dir=empty, download=False)
    message = one_line(exc)
    assert "'cifar10'" in message
    assert "--data-dir" in message and "cifar-10-batches-py" in message
    assert "dataset-fashion-mnist" in message
    assert "tensorflow-datasets" in message and str(no_tfds) in message


@needs_debian_fashion
def test_data_dir_without_the_dataset_falls_through(tmp_path):
    write_cifar10(tmp_path)  # some other dataset
    ds = load("fashion_mnist", data_dir=tmp_path, max_train=10, max_test=10, download=False)
    assert ds.x_train.shape == (10, 28, 28, 1)


def test_fashion_without_debian_package(tmp_path, no_tfds, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_DIR", tmp_path / "not-installed")
    with pytest.raises(DatasetUnavailable, match="'fashion_mnist'") as exc:
        load("fashion_mnist", download=False)
    assert "train-images-idx3-ubyte" in one_line(exc)


def test_offline_download_fails_fast(tmp_path, no_tfds, monkeypatch):
    import tensorflow_datasets as tfds

    real_load, calls = tfds.load, []

    def spy(*args, **kwargs):
        calls.append(kwargs["download"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(tfds, "load", spy)
    with pytest.raises(DatasetUnavailable, match="offline") as exc:
        load("mnist", download=True)
    one_line(exc)
    assert calls == [False]  # never handed to tfds' own minutes-long retries


def test_tfds_errors_are_wrapped(no_tfds, monkeypatch):
    import tensorflow_datasets as tfds

    def failing(*args, download, **kwargs):
        if not download:
            raise AssertionError("Dataset mnist: could not find data in ...")
        raise ConnectionError("Max retries exceeded\nwith url")

    monkeypatch.setattr(datasets, "_reachable", lambda host, timeout: True)
    monkeypatch.setattr(tfds, "load", failing)
    with pytest.raises(DatasetUnavailable) as exc:
        load("mnist")
    assert "ConnectionError: Max retries exceeded with url" in one_line(exc)


def test_tfds_source(no_tfds, monkeypatch):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    seen = {}
    images, labels = tiny_images(4)[..., None], np.array([1, 2, 3, 26])

    def fake(name, *, split, batch_size, as_supervised, data_dir, download):
        seen.update(name=name, split=split, data_dir=data_dir, batch_size=batch_size)
        return [
            (tf.constant(images), tf.constant(labels)),
            (tf.constant(images[:2]), tf.constant(labels[:2])),
        ]

    monkeypatch.setattr(tfds, "load", fake)
    ds = load("emnist", download=False)
    assert seen == {
        "name": "emnist/letters",
        "split": ["train", "test"],
        "data_dir": str(no_tfds),
        "batch_size": -1,
    }
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 25])
    np.testing.assert_array_equal(ds.x_train[..., 0] * 255, images[..., 0].transpose(0, 2, 1))


def test_network_probe_stays_on_loopback(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert datasets._reachable(f"127.0.0.1:{port}", timeout=2)
    assert not datasets._reachable(f"127.0.0.1:{port}", timeout=2)  # now closed


def test_dataset_is_a_frozen_value():
    ds = load("digits", max_train=20, max_test=10)
    assert isinstance(ds, Dataset)
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError):
        ds.x_train[0, 0, 0, 0] = 1.0
    assert "digits" in repr(ds)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no Debian Fashion-MNIST"
)
def test_fashion_files_are_not_accepted_as_mnist():
    with pytest.raises(UserError, match="wrong dataset: .* is the Fashion-MNIST file"):
        load("mnist", data_dir="/usr/share/datasets/fashion-mnist")
