"""Backdoor watermarks (Zhang et al., Adi et al.): triggers, calibrated embedding, verification, CLI."""

import dataclasses
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
import watermarks
from models import classifier
from models.config import as_dict, build_config
from models.errors import UserError
from models.training import Hook, TrainConfig
from tests.conftest import needs_fashion
from watermarks import backdoor as bd
from watermarks.base import Key

FAST = TrainConfig(epochs=8, batch_size=32, learning_rate=1e-2)


def small_cnn(input_shape=(8, 8, 1), num_classes=10, seed=0):
    """A plain Keras model the suite did not make: enough capacity for 8x8 triggers.

    Its layers are named, so every copy has the same architecture JSON (the cache key).
    """
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(input_shape, name="image"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(64, activation="relu", name="fc"),
            keras.layers.Dense(num_classes, activation="softmax", name="out"),
        ],
        name="user_cnn",
    )


def trained_cnn(digits, seed, recipe=FAST):
    model = small_cnn(seed=seed)
    models.train(model, digits, dataclasses.replace(recipe, seed=seed), verbose=0)
    return model


@pytest.fixture(scope="module")
def content_run(digits):
    """A content-marked model, the scheme and its calibrated key."""
    scheme = bd.ZhangContent(n=300, n_key=300, train=FAST)
    marked = scheme.embed(small_cnn(), digits)
    return scheme, marked.model, marked.key


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
    scheme = bd.ZhangNoise(n=50, n_key=40, noise_std=0.5, source_classes=[3])
    x_wm, _, key = scheme.trigger_sets(digits)
    noise = key.arrays["noise"]
    source = digits.x_test[key.arrays["source_test_indices"]]
    np.testing.assert_allclose(key.inputs, np.clip(source + noise, 0, 1), atol=1e-6)
    assert np.all(digits.y_test[key.arrays["source_test_indices"]] == 3)
    assert 0.4 < noise.std() < 0.6 and x_wm.min() >= 0 and x_wm.max() <= 1
    again = bd.ZhangNoise(n=50, n_key=40, noise_std=0.5, source_classes=[3]).trigger_sets(digits)
    np.testing.assert_array_equal(again[2].arrays["noise"], noise)  # same seed, same pattern


def test_triggers_follow_the_models_input_range(digits):
    """For a model that expects [0, 255], the stamped pixels are 255 and the rest is scaled."""
    wide = digits.with_input_range(0.0, 255.0)
    _, _, key = bd.ZhangContent(n=20, n_key=30).trigger_sets(wide)
    _, _, unit = bd.ZhangContent(n=20, n_key=30).trigger_sets(digits)
    mask = key.arrays["mask"].astype(bool)
    assert np.all(key.inputs[:, mask] == 255.0)
    np.testing.assert_allclose(key.inputs, unit.inputs * 255.0, rtol=1e-5, atol=1e-3)
    triggers, _, _ = bd.AdiAbstract(n=5, k=2).trigger_sets(wide)
    assert triggers.max() > 1.5 and triggers.min() >= 0.0


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
    with pytest.raises(UserError, match="unrelated_source"):
        bd.ZhangUnrelated(unrelated_source="cifar")
    with pytest.raises(UserError, match="train.epochs"):
        bd.ZhangNoise(train={"epochs": 0})
    with pytest.raises(UserError, match="null_train.epochs"):
        bd.AdiAbstract(null_train={"epochs": 0})
    with pytest.raises(UserError, match="noise_std"):
        bd.ZhangNoise(noise_std=0.0)
    with pytest.raises(UserError, match="n must"):
        bd.ZhangContent(n=0)
    config = bd.ZhangNoiseConfig(source_classes=[4, 2], train=FAST, null_train=FAST)
    rebuilt = build_config(bd.ZhangNoiseConfig, as_dict(config))  # what a key's JSON gives back
    assert rebuilt == config and rebuilt.train == FAST and rebuilt.null_train == FAST
    assert rebuilt.source_classes == (2, 4)


def test_presets_match_the_reproduction_and_the_papers():
    quick_recipe = TrainConfig.cae(15, early_stopping_patience=3)
    for cls, n in ((bd.ZhangContent, 2000), (bd.ZhangNoise, 2000), (bd.ZhangUnrelated, 1000)):
        quick = cls.from_preset("quick").config
        assert (quick.n, quick.n_key, quick.train, quick.null_train) == (
            n,
            1000,
            quick_recipe,
            None,
        )
        assert cls.from_preset("paper").config.n == 1000
        assert cls.from_preset("smoke").config.train.epochs <= 10
    adi = bd.AdiAbstract.from_preset("quick").config
    assert (adi.mode, adi.n, adi.k) == ("fs", 100, 8) and adi.train.epochs == 6
    paper = bd.AdiAbstract.from_preset("paper").config
    assert (paper.n, paper.k, paper.train.batch_size) == (100, 2, 100)
    # overrides reach nested recipes
    assert bd.AdiAbstract.from_preset("smoke", **{"train.epochs": 3}).config.train.epochs == 3


def test_only_zhang_fine_tuning_and_adi_pt_use_the_weights():
    assert not bd.ZhangContent().uses_weights
    assert bd.ZhangNoise(from_scratch=False).uses_weights
    assert not bd.AdiAbstract().uses_weights
    assert bd.AdiAbstract(mode="pt").uses_weights


# ----------------------------------------------------------------------------- verification


def _calibrated_key(digits, null):
    _, _, key = bd.ZhangContent(n=10, n_key=20).trigger_sets(digits)
    null = np.asarray(null, dtype=np.float64)
    arrays = {**key.arrays, "null_accuracies": null}
    metadata = {**key.metadata, "threshold": float(null.max())}
    return Key(key.scheme, key.inputs, key.labels, metadata=metadata, arrays=arrays)


def test_decide_counts_refused_queries_as_misses_and_a_flat_null_never_gives_p_zero(digits):
    scheme = bd.ZhangContent()
    key = _calibrated_key(digits, [0.0] * 9)
    outputs = np.zeros((len(key), 10), np.float32)
    outputs[:, 0] = 1.0  # every query answered with the target
    outputs[:5] = np.nan  # ... but five refused
    result = scheme.decide(key, outputs)
    assert result.statistic == pytest.approx(15 / 20) and result.present
    assert result.kind == "robust" and result.intact is None and result.n == 20
    assert result.p_value == pytest.approx(1 / 10)  # exact: (1 + 0) / (1 + 9), never 0
    assert "present" in result.verdict and "p = 0.1" in result.verdict
    # at the threshold exactly: absent
    flat = scheme.decide(key, np.full((len(key), 10), np.nan, np.float32))
    assert flat.statistic == 0.0 and not flat.present and flat.p_value == 1.0
    assert "absent" in flat.verdict and "<= threshold" in flat.verdict


def test_an_uncalibrated_key_cannot_be_verified(digits):
    _, _, key = bd.ZhangContent(n=10, n_key=10).trigger_sets(digits)
    with pytest.raises(UserError, match="no null curve"):
        bd.ZhangContent().verify(small_cnn(), key)


# ----------------------------------------------------------------------------- embed + verify


def test_content_embed_is_present_and_clean_models_are_not(content_run, digits):
    scheme, marked, key = content_run
    null = key.arrays["null_accuracies"]
    assert len(null) == FAST.epochs and key.metadata["threshold"] == null.max()
    assert key.metadata["dataset"] == "digits" and key.metadata["input_range"] == [0.0, 1.0]
    result = watermarks.verify(marked, key)  # through the registry, config from the key
    assert result.present and result.statistic >= 0.9 and result.p_value < bd.SIGNIFICANCE
    assert result.statistic == classifier.accuracy(marked, key.inputs, key.labels)
    # the clean twin that set the threshold, and one trained with another seed
    twin = bd.vanilla(small_cnn(), digits, FAST)
    assert not scheme.verify(twin.model, key).present
    other = trained_cnn(digits, seed=2)
    assert classifier.accuracy(other, digits.x_test, digits.y_test) > 0.85
    verdict = scheme.verify(other, key)
    assert not verdict.present and "absent" in verdict.verdict
    # marking costs little test accuracy
    assert classifier.accuracy(marked, digits.x_test, digits.y_test) > 0.85


def test_one_clean_training_calibrates_every_key(content_run, digits):
    """The twin's training is cached under a key-independent tag and replays any key's curve."""
    _, _, key = content_run
    twin = bd.vanilla(small_cnn(seed=7), digits, FAST)  # the weights given do not matter
    assert twin.from_cache and len(twin.snapshots) == FAST.epochs
    curve = twin.replay(lambda m: classifier.accuracy(m, key.inputs, key.labels))
    np.testing.assert_array_equal(curve, key.arrays["null_accuracies"])
    # another scheme with the same recipe is calibrated on the same training
    noise = bd.ZhangNoise(n=300, n_key=300, train=FAST).trigger_sets(digits)[2]
    again = bd.vanilla(small_cnn(), digits, FAST)
    assert again.from_cache and again.key == twin.key
    assert len(again.replay(lambda m: classifier.accuracy(m, noise.inputs, noise.labels))) == 8


def test_key_round_trips_without_pickle(content_run, tmp_path):
    _, marked, key = content_run
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
    _, marked, key = content_run
    models.save_model(marked, tmp_path / "marked.keras")
    loaded = models.load_model(tmp_path / "marked.keras")
    np.testing.assert_allclose(
        classifier.predict(loaded, key.inputs), classifier.predict(marked, key.inputs), atol=1e-6
    )


def test_embedding_leaves_the_given_model_untouched_and_calls_the_hooks(digits):
    model = trained_cnn(digits, seed=4)
    weights = model.get_weights()
    seen = []
    hook = Hook("seen", lambda m: seen.append(1) or 0.0)
    recipe = dataclasses.replace(FAST, epochs=4)
    marked = bd.ZhangNoise(n=200, n_key=200, train=recipe).embed(model, digits, hooks=[hook])
    assert len(seen) == recipe.epochs and marked.model is not model
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True))


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


@pytest.mark.slow
def test_adi_fs_embeds_and_pt_keeps_test_accuracy(digits):
    recipe = TrainConfig(epochs=10, batch_size=32, learning_rate=3e-3)
    fs = bd.AdiAbstract(n=20, k=8, train=recipe).embed(small_cnn(), digits)
    assert classifier.accuracy(fs.model, fs.key.inputs, fs.key.labels) >= 0.9
    assert classifier.accuracy(fs.model, digits.x_test, digits.y_test) > 0.85

    pretrained = trained_cnn(digits, seed=3, recipe=dataclasses.replace(recipe, epochs=6))
    before = classifier.accuracy(pretrained, digits.x_test, digits.y_test)
    weights = pretrained.get_weights()
    pt = bd.AdiAbstract(
        mode="pt",
        n=20,
        k=8,
        seed=1,
        train=TrainConfig(epochs=5, batch_size=32, learning_rate=1e-3),
        null_train=dataclasses.replace(recipe, epochs=6),
    )
    marked = pt.embed(pretrained, digits)
    assert len(marked.key.arrays["null_accuracies"]) == 6  # the pre-training recipe's epochs
    assert classifier.accuracy(marked.model, marked.key.inputs, marked.key.labels) >= 0.9
    assert abs(classifier.accuracy(marked.model, digits.x_test, digits.y_test) - before) <= 0.03
    assert all(np.array_equal(a, b) for a, b in zip(weights, pretrained.get_weights(), strict=True))


# ----------------------------------------------------------------------------- command line


def test_cli_embeds_and_verifies_with_the_smoke_preset(digits, tmp_path, capsys):
    from watermarks.cli import main

    model = tmp_path / "user.keras"
    models.save_model(trained_cnn(digits, seed=0), model)
    out_model, out_key = tmp_path / "marked.keras", tmp_path / "key.npz"
    code = main(
        ["embed", "--scheme", "zhang_noise", "--preset", "smoke", "--model", str(model),
         "--dataset", "digits", "--out-model", str(out_model), "--out-key", str(out_key),
         "--train.epochs", "4"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "present" in capsys.readouterr().out
    assert main(["verify", "--model", str(out_model), "--key", str(out_key)]) == 0
    out = capsys.readouterr().out
    assert "verdict:        present" in out and "p-value" in out
    key = Key.load(out_key)
    assert key.metadata["config"]["train"]["epochs"] == 4
    assert len(key.arrays["null_accuracies"]) == 4


def test_cli_exits_2_with_one_line(digits, tmp_path, capsys):
    from watermarks.cli import main

    model = tmp_path / "user.keras"
    models.save_model(small_cnn(), model)
    _calibrated_key(digits, [0.0, 0.1]).save(tmp_path / "key.npz")
    other = tmp_path / "other.keras"
    models.save_model(small_cnn((12, 12, 1)), other)
    common = ["--dataset", "digits", "--out-model", str(tmp_path / "o.keras"),
              "--out-key", str(tmp_path / "o.npz")]  # fmt: skip
    cases = [
        (["verify", "--model", str(other), "--key", str(tmp_path / "key.npz")], "shape"),
        (["embed", "--scheme", "adi", "--mode", "xx", "--model", str(model), *common], "mode"),
        (["embed", "--scheme", "adi", "--k", "500", "--model", str(model), *common], "exceeds"),
        (["embed", "--scheme", "adi", "--target", "3", "--model", str(model), *common], "--target"),
    ]  # fmt: skip
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.keras").exists() and not (tmp_path / "o.npz").exists()
