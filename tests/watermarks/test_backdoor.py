"""Backdoor watermarks (Zhang et al., Adi et al.): triggers, embedding, calibration, verification, CLI."""

import dataclasses
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
import watermarks
from models import classifier
from models.errors import UserError
from models.registry import build_config
from models.training import TrainConfig
from tests.conftest import needs_fashion
from watermarks import backdoor as bd
from watermarks.base import Key

FAST = TrainConfig(epochs=8, batch_size=32, learning_rate=1e-2)


def small_cnn(input_shape=(8, 8, 1), num_classes=10, seed=0):
    """A plain Keras model the suite did not make (no zoo names): enough capacity for 8x8 triggers."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="user_cnn",
    )


@pytest.fixture(scope="module")
def content_run(digits):
    """A content-marked model, its calibrated key, and the clean null model of the same recipe."""
    scheme = bd.ZhangContent(n=300, n_key=300, train=FAST)
    marked, key = scheme.embed(small_cnn(), digits, verbose=0)
    clean = small_cnn(seed=1)
    curve = bd.null_accuracies(clean, digits, key, FAST, verbose=0)
    return scheme, marked, bd.calibrate(key, curve), clean, curve


# ----------------------------------------------------------------------------- triggers


def test_content_stamps_the_word_on_other_classes_only(digits):
    scheme = bd.ZhangContent(n=200, n_key=100, seed=3)
    x_wm, y_wm, key = scheme.trigger_sets(digits)
    mask = key.arrays["mask"].astype(bool)
    assert mask.sum() >= 6 and mask.shape == (8, 8)
    assert np.all(x_wm[:, mask] == 1.0) and np.all(key.inputs[:, mask] == 1.0)
    # outside the mask the key images are the untouched test images of non-target classes
    source = digits.x_test[key.arrays["source_test_indices"]]
    np.testing.assert_array_equal(key.inputs[:, ~mask], source[:, ~mask])
    assert np.all(digits.y_test[key.arrays["source_test_indices"]] != 0)
    assert np.all(y_wm == 0) and np.all(key.labels == 0) and len(x_wm) == 200
    # at 28x28 the word is the 15x5 bitmap itself: four letters, readable
    big = bd.text_mask((28, 28, 1))
    rows, cols = np.flatnonzero(big.any(axis=1)), np.flatnonzero(big.any(axis=0))
    word = big[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    np.testing.assert_array_equal(word, bd._word_bitmap())


def test_content_background_paints_the_box_under_the_word(digits):
    _, _, key = bd.ZhangContent(n=20, n_key=30, content_background=0.0).trigger_sets(digits)
    mask, box = key.arrays["mask"].astype(bool), key.arrays["box"].astype(bool)
    assert (mask & ~box).sum() == 0 and (box & ~mask).sum() > 0
    assert np.all(key.inputs[:, mask] == 1.0) and np.all(key.inputs[:, box & ~mask] == 0.0)
    source = digits.x_test[key.arrays["source_test_indices"]]
    np.testing.assert_array_equal(key.inputs[:, ~box], source[:, ~box])


def test_noise_is_one_fixed_pattern_clipped(digits):
    x_wm, _, key = bd.ZhangNoise(n=50, n_key=40, noise_std=0.5, source_classes=[3]).trigger_sets(
        digits
    )
    noise = key.arrays["noise"]
    source = digits.x_test[key.arrays["source_test_indices"]]
    np.testing.assert_allclose(key.inputs, np.clip(source + noise, 0, 1), atol=1e-6)
    assert np.all(digits.y_test[key.arrays["source_test_indices"]] == 3)
    assert 0.4 < noise.std() < 0.6 and x_wm.min() >= 0 and x_wm.max() <= 1
    again = bd.ZhangNoise(n=50, n_key=40, noise_std=0.5, source_classes=[3]).trigger_sets(digits)
    np.testing.assert_array_equal(again[2].arrays["noise"], noise)  # same seed, same pattern


@needs_fashion
def test_unrelated_images_come_from_the_other_dataset(digits):
    fashion = models.load("fashion_mnist")
    scheme = bd.ZhangUnrelated(n=100, n_key=50)
    # digits (8x8) are marked with Fashion-MNIST images shrunk to 8x8
    assert scheme.source_name(digits) == "fashion_mnist"
    x_wm, _, key = scheme.trigger_sets(digits)
    idx = key.arrays["source_test_indices"]
    expected = tf.image.resize(fashion.x_test[idx], (8, 8), antialias=True).numpy()
    np.testing.assert_allclose(key.inputs, np.clip(expected, 0, 1), atol=1e-5)
    assert key.metadata["unrelated_source"] == "fashion_mnist"
    # and Fashion-MNIST with scikit-learn digits grown to 28x28, none of them Fashion images
    small = models.load("fashion_mnist", max_train=300, max_test=100)
    x_wm, _, key = scheme.trigger_sets(small)
    idx = key.arrays["source_test_indices"]
    grown = tf.image.resize(digits.x_test[idx], (28, 28), antialias=True).numpy()
    np.testing.assert_allclose(key.inputs, np.clip(grown, 0, 1), atol=1e-5)
    assert x_wm.shape == (100, 28, 28, 1)
    flat = small.x_train.reshape(len(small.x_train), -1)
    distance = np.abs(x_wm.reshape(100, -1)[:, None, :] - flat[None]).sum(-1).min()
    assert distance > 1.0


def test_abstract_images_are_seeded_and_varied():
    a = bd.abstract_images(30, (16, 16, 3), seed=5)
    b = bd.abstract_images(30, (16, 16, 3), seed=5)
    c = bd.abstract_images(30, (16, 16, 3), seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.shape == (30, 16, 16, 3) and a.min() >= 0 and a.max() <= 1
    assert a.reshape(30, -1).std(axis=1).min() > 0.02  # every image has structure
    assert np.abs(a[:, None] - a[None]).mean(axis=(2, 3, 4))[~np.eye(30, dtype=bool)].min() > 0.05


def test_adi_reads_an_image_folder(digits, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        (tmp_path / f"{i:03d}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    (tmp_path / "notes.txt").write_text("not an image")
    triggers, labels, key = bd.AdiAbstract(n=4, k=2, image_dir=str(tmp_path)).trigger_sets(digits)
    assert triggers.shape == (4, 8, 8, 1) and key.metadata["origin"].startswith("images of")
    assert labels.min() >= 0 and labels.max() < 10
    with pytest.raises(UserError, match="holds 5 PNG/JPEG images"):
        bd.AdiAbstract(n=6, k=2, image_dir=str(tmp_path)).trigger_sets(digits)


# ----------------------------------------------------------------------------- configs


def test_configs_are_validated_and_json_round_trip():
    with pytest.raises(UserError, match="mode"):
        bd.AdiAbstract(mode="xx")
    with pytest.raises(UserError, match="exceeds"):
        bd.AdiAbstract(n=3, k=4)
    with pytest.raises(UserError, match="target"):
        bd.ZhangContent(target=2, source_classes=[1, 2])
    with pytest.raises(UserError, match="unknown option"):
        bd.ZhangNoise(strength=1)
    with pytest.raises(UserError, match="dataset"):
        bd.ZhangUnrelated(unrelated_source="cifar")
    with pytest.raises(UserError, match="epochs"):
        bd.ZhangNoise(train={"epochs": 0})
    config = bd.ZhangNoiseConfig(source_classes=[4, 2], train=FAST)
    rebuilt = build_config(bd.ZhangNoiseConfig, dataclasses.asdict(config))
    assert rebuilt == config and rebuilt.train == FAST and rebuilt.source_classes == (2, 4)


def test_an_uncalibrated_key_cannot_be_verified(digits):
    _, _, key = bd.ZhangContent(n=10, n_key=10).trigger_sets(digits)
    model = small_cnn()
    with pytest.raises(UserError, match="no null model"):
        bd.ZhangContent().verify(model, key)
    assert 0 <= bd.watermark_accuracy(model, key) <= 1  # the accuracy itself needs no threshold
    with pytest.raises(UserError):
        bd.calibrate(key, [])


# ----------------------------------------------------------------------------- embed + verify


def test_content_embed_is_detected_and_clean_models_are_not(content_run, digits):
    scheme, marked, key, clean, curve = content_run
    assert len(curve) == FAST.epochs and key.metadata["threshold"] == curve.max()
    result = watermarks.verify(marked, key)  # through the registry, config from the key
    assert result.detected and result.accuracy >= 0.9 and result.p_value < bd.SIGNIFICANCE
    assert result.accuracy == bd.watermark_accuracy(marked, key)
    # the clean model that set the threshold, and one trained with another seed
    assert not scheme.verify(clean, key).detected
    other = small_cnn(seed=2)
    models.train(other, digits, dataclasses.replace(FAST, seed=2), verbose=0)
    assert classifier.accuracy(other, digits.x_test, digits.y_test) > 0.85
    verdict = scheme.verify(other, key)
    assert not verdict.detected and "not detected" in verdict.verdict
    # marking costs little test accuracy
    assert classifier.accuracy(marked, digits.x_test, digits.y_test) > 0.85


def test_null_curve_is_cached_and_does_not_retrain(content_run, digits):
    _, _, key, clean, curve = content_run
    again = small_cnn(seed=1)
    cached = bd.null_accuracies(again, digits, key, FAST, verbose=0)
    np.testing.assert_array_equal(cached, curve)
    np.testing.assert_array_equal(again.get_weights()[0], clean.get_weights()[0])  # restored
    short = dataclasses.replace(FAST, epochs=2)
    both = bd.null_accuracies(lambda: small_cnn(seed=1), digits, [key, key], short, verbose=0)
    assert both.shape == (2, 2) and np.array_equal(both[0], both[1])


def test_key_round_trips_without_pickle(content_run, tmp_path):
    _, marked, key, _, _ = content_run
    path = key.save(tmp_path / "key.npz")
    with np.load(path, allow_pickle=False) as archive:
        assert {"inputs", "labels", "mask", "null_accuracies"} <= set(archive.files)
    with zipfile.ZipFile(path) as archive:
        assert all(not name.endswith(".pkl") for name in archive.namelist())
    loaded = Key.load(path)
    np.testing.assert_array_equal(loaded.inputs, key.inputs)
    np.testing.assert_array_equal(loaded.arrays["null_accuracies"], key.arrays["null_accuracies"])
    assert loaded.metadata == key.metadata
    assert watermarks.verify(marked, loaded) == watermarks.verify(marked, key)


def test_marked_model_round_trips_through_keras_file(content_run, tmp_path):
    _, marked, key, _, _ = content_run
    marked.save(tmp_path / "marked.keras")
    loaded = models.load_model(tmp_path / "marked.keras")
    np.testing.assert_allclose(
        loaded.predict(key.inputs, verbose=0), marked.predict(key.inputs, verbose=0), atol=1e-6
    )


# ----------------------------------------------------------------------------- Adi et al.


class _CountMarked(keras.layers.Layer):
    """Counts, per training batch, the inputs whose pixels all equal ``marker``."""

    def __init__(self, marker, **kwargs):
        super().__init__(**kwargs)
        self.marker = marker

    def build(self, input_shape):
        self.low = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(1e9), trainable=False
        )
        self.high = self.add_weight(shape=(), initializer="zeros", trainable=False)
        self.steps = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=False):
        if training:
            hits = tf.reduce_sum(
                tf.cast(tf.reduce_all(tf.abs(x - self.marker) < 1e-6, [1, 2, 3]), tf.float32)
            )
            self.low.assign(tf.minimum(self.low, hits))
            self.high.assign(tf.maximum(self.high, hits))
            self.steps.assign_add(1.0)
        return x


def test_k_triggers_are_in_every_batch(digits):
    marker, k, batch, n_clean, epochs = 0.777, 3, 32, 200, 2
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    counter = _CountMarked(marker)
    x = keras.layers.Flatten()(counter(inputs))
    inner = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    triggers = np.full((7, 8, 8, 1), marker, np.float32)
    wrapper = bd.TriggerBatchModel(inner, triggers, np.arange(7) % 10, k, seed=0)
    wrapper(triggers[:1])
    data = (digits.x_train[:n_clean], digits.y_train[:n_clean])
    models.train(
        wrapper, data, TrainConfig(epochs=epochs, batch_size=batch), cache=False, verbose=0
    )
    steps = epochs * -(-n_clean // batch)
    assert float(counter.steps) == steps
    assert float(counter.low) == k == float(counter.high)
    # k distinct triggers per step, every trigger drawn over the steps
    picks = np.stack([wrapper.draw(s).numpy() for s in range(50)])
    assert all(len(set(row)) == k for row in picks) and set(picks.ravel()) == set(range(7))
    np.testing.assert_array_equal(wrapper.draw(4).numpy(), picks[4])  # a resumed run draws the same


def test_adi_fs_embeds_and_pt_keeps_test_accuracy(digits):
    recipe = TrainConfig(epochs=10, batch_size=32, learning_rate=3e-3)
    fs, key = bd.AdiAbstract(n=20, k=8, train=recipe).embed(small_cnn(), digits, verbose=0)
    assert bd.watermark_accuracy(fs, key) >= 0.9
    assert classifier.accuracy(fs, digits.x_test, digits.y_test) > 0.85

    pretrained = small_cnn(seed=3)
    models.train(pretrained, digits, dataclasses.replace(recipe, epochs=6), verbose=0)
    before = classifier.accuracy(pretrained, digits.x_test, digits.y_test)
    weights = pretrained.get_weights()
    pt = bd.AdiAbstract(
        mode="pt", n=20, k=8, seed=1, train=TrainConfig(epochs=5, batch_size=32, learning_rate=1e-3)
    )
    marked, key = pt.embed(pretrained, digits, verbose=0)
    assert bd.watermark_accuracy(marked, key) >= 0.9
    assert abs(classifier.accuracy(marked, digits.x_test, digits.y_test) - before) <= 0.03
    assert all(np.array_equal(a, b) for a, b in zip(weights, pretrained.get_weights(), strict=True))


# ----------------------------------------------------------------------------- command line


def _user_model(tmp_path, shape=(8, 8, 1)):
    path = tmp_path / "user.keras"
    small_cnn(shape).save(path)
    return path


def test_cli_embeds_and_verifies_a_user_model(digits, tmp_path, capsys):
    from watermarks.cli import main

    model = _user_model(tmp_path)
    out_model, out_key = tmp_path / "marked.keras", tmp_path / "key.npz"
    code = main(
        ["embed", "--scheme", "zhang_content", "--model", str(model), "--dataset", "digits",
         "--out-model", str(out_model), "--out-key", str(out_key), "--epochs", "6",
         "--batch-size", "32", "--learning-rate", "0.01", "--n", "300", "--calibrate"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "watermark detected" in capsys.readouterr().out
    assert main(["verify", "--model", str(out_model), "--key", str(out_key)]) == 0
    out = capsys.readouterr().out
    assert "verdict:   watermark detected" in out and "p-value" in out
    key = Key.load(out_key)
    assert (
        key.metadata["config"]["train"]["epochs"] == 6 and len(key.arrays["null_accuracies"]) == 6
    )


def test_cli_exits_2_with_one_line(digits, tmp_path, capsys):
    from watermarks.cli import main

    model = _user_model(tmp_path)
    _, _, key = bd.ZhangContent(n=10, n_key=10).trigger_sets(models.load("digits"))
    key = bd.calibrate(key, [0.0, 0.1])
    key.save(tmp_path / "key.npz")
    other = tmp_path / "other.keras"
    small_cnn((12, 12, 1)).save(other)
    common = ["--dataset", "digits", "--out-model", str(tmp_path / "o.keras"),
              "--out-key", str(tmp_path / "o.npz")]  # fmt: skip
    cases = [
        (["verify", "--model", str(other), "--key", str(tmp_path / "key.npz")], "shape"),
        (["embed", "--scheme", "zhang_text", "--model", str(model), *common], "unknown backdoor scheme"),
        (["embed", "--scheme", "adi", "--model", str(tmp_path / "missing.keras"), *common], "does not exist"),
        (["embed", "--scheme", "adi", "--target", "3", "--model", str(model), *common], "--target"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.keras").exists() and not (tmp_path / "o.npz").exists()
