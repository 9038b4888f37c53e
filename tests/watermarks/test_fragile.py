"""Fragile triggers (Yin et al. 2022): the model stays bit-identical, AccTri catches changes."""

import json

import keras
import numpy as np
import pytest

import models
import watermarks
from models.errors import UserError
from models.training import TrainConfig
from watermarks.base import Key
from watermarks.cli import main as watermarks_main
from watermarks.fragile import (
    FragileConfig,
    FragileTrigger,
    build_generator,
    fragile_loss,
    generator_from_key,
    regenerate,
    secret_key,
    softmax_variance,
    trigger_accuracy,
    trigger_margins,
)

FAST = dict(n=30, epochs=40, max_epochs=120, width=16, learning_rate=3e-3)


@pytest.fixture(scope="module")
def classifier(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=8, batch_size=32), verbose=0)
    return model


@pytest.fixture(scope="module")
def full_key(classifier, digits):
    before = [w.copy() for w in classifier.get_weights()]
    returned, key = FragileTrigger(**FAST).embed(classifier, digits)
    after = classifier.get_weights()
    assert returned is classifier
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    return key


def test_registered_and_config_validated():
    assert "fragile" in watermarks.names()
    assert watermarks.get("fragile") is FragileTrigger
    with pytest.raises(UserError, match="fragile variant"):
        FragileConfig(variant="half")
    with pytest.raises(UserError, match="generator"):
        FragileConfig(generator="gan")
    with pytest.raises(UserError, match="a must be"):
        FragileConfig(a=-1.0)
    with pytest.raises(UserError, match="max_epochs"):
        FragileConfig(epochs=10, max_epochs=5)
    with pytest.raises(UserError, match="unknown option"):
        FragileTrigger(alpha=3)


def test_secret_key_and_variance_definitions():
    assert secret_key(12, 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    p = np.random.default_rng(0).dirichlet(np.ones(10), size=7).astype(np.float32)
    assert float(softmax_variance(p)) == pytest.approx(np.var(p, axis=1).mean(), rel=1e-5)
    flat = np.full((3, 10), 0.1, np.float32)
    assert float(softmax_variance(flat)) == pytest.approx(0.0, abs=1e-9)


def test_loss_without_margin_is_equation_one():
    logits = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32)
    keys = secret_key(6, 10)
    loss, ce, var, hinge = fragile_loss(logits, keys, variant="full", a=200.0, margin=0.0)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected_ce = -np.log(p[np.arange(6), keys]).mean()
    assert float(ce) == pytest.approx(expected_ce, rel=1e-5)
    assert float(var) == pytest.approx(np.var(p, axis=1).mean(), rel=1e-5)
    assert float(loss) == pytest.approx(expected_ce + 200 * np.var(p, axis=1).mean(), rel=1e-5)
    assert float(hinge) == 0.0
    loss_var, *_ = fragile_loss(logits, keys, variant="var", a=200.0, margin=0.05)
    assert float(loss_var) == pytest.approx(200 * np.var(p, axis=1).mean(), rel=1e-5)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
@pytest.mark.parametrize("kind", ["conv", "progressive"])
def test_generators_make_the_input_shape(kind, shape):
    generator = build_generator(kind, shape, z_dim=16, width=16)
    out = np.asarray(generator(np.zeros((2, 16), np.float32)))
    assert out.shape == (2, *shape)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_key_holds_what_the_paper_says(full_key, classifier):
    assert full_key.scheme == "fragile"
    assert full_key.inputs.shape == (30, 8, 8, 1)
    assert full_key.labels.tolist() == secret_key(30, 10).tolist()
    meta = full_key.metadata
    assert meta["a"] == 200.0 and meta["seed"] == 0 and meta["variant"] == "full"
    assert meta["fit_for_verification"] is True
    assert full_key.arrays["z"].shape == (30, 512)
    assert full_key.inputs.min() >= 0.0 and full_key.inputs.max() <= 1.0
    # G_full spreads the softmax: far from one-hot, and every trigger takes its key
    assert meta["mean_max_softmax"] < 0.6
    assert trigger_accuracy(classifier, full_key.inputs, full_key.labels) == 1.0
    assert trigger_margins(classifier, full_key.inputs, full_key.labels).min() > 1e-3


def test_generator_regenerates_the_triggers(full_key, tmp_path):
    full_key.save(tmp_path / "k.npz")
    loaded = Key.load(tmp_path / "k.npz")
    np.testing.assert_allclose(regenerate(loaded), full_key.inputs, atol=1e-5)
    assert generator_from_key(loaded).count_params() > 0


def test_same_seed_same_triggers(classifier, digits, full_key):
    _, again = FragileTrigger(**FAST).embed(classifier, digits)
    np.testing.assert_array_equal(again.inputs, full_key.inputs)


def test_no_false_alarm_after_round_trip_and_batch_sizes(classifier, full_key, tmp_path):
    classifier.save(tmp_path / "m.keras")
    loaded = models.load_model(tmp_path / "m.keras")
    scheme = FragileTrigger(**FAST)
    for model in (classifier, loaded):
        for batch_size in (1, 30, 256):
            result = scheme.verify(model, full_key, batch_size=batch_size)
            assert result.accuracy == 1.0 and result.detected
            assert result.verdict.startswith("unmodified")
    result = watermarks.verify(loaded, full_key)  # dispatch by key.scheme, config from metadata
    assert result.threshold == 1.0 and result.detected and np.isnan(result.p_value)


def test_modification_is_detected(classifier, full_key):
    tampered = keras.models.clone_model(classifier)
    tampered.set_weights(classifier.get_weights())
    kernel, bias = tampered.get_layer("logits").get_weights()
    bias = bias.copy()
    bias[3] += 2.0  # a small change to one class's bias: the flat triggers move to class 3
    tampered.get_layer("logits").set_weights([kernel, bias])
    result = FragileTrigger(**FAST).verify(tampered, full_key)
    assert result.accuracy < 1.0 and not result.detected
    assert result.verdict.startswith("modified")


def test_variants_give_table3_shapes(classifier, digits, full_key):
    _, cla = FragileTrigger(variant="cla", **FAST).embed(classifier, digits)
    _, non = FragileTrigger(variant="non", **FAST).embed(classifier, digits)
    # G_cla: near one-hot; G_full: spread (Table 3), after the same few steps
    assert cla.metadata["mean_max_softmax"] > 0.8
    assert cla.metadata["mean_max_softmax"] > full_key.metadata["mean_max_softmax"] + 0.3
    assert non.metadata["epochs_run"] == 0
    # G_non's key is what the classifier says about its triggers, not Y_sk
    predicted = np.argmax(classifier.predict(non.inputs, verbose=0), axis=1)
    assert non.labels.tolist() == predicted.tolist()


def test_key_for_another_shape_is_refused(full_key):
    other = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    with pytest.raises(UserError, match="another model"):
        FragileTrigger().verify(other, full_key)


# --------------------------------------------------------------------------- command line


def _user_model(path, shape=(8, 8, 1)):
    """A plain (untrained) Sequential the suite did not make, saved as .keras."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.save(path)
    return path


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_makes_and_verifies_a_key_for_a_user_model(tmp_path, capsys):
    model = _user_model(tmp_path / "user.keras")
    key = tmp_path / "key.npz"
    argv = ["fragile", "--model", str(model), "--dataset", "digits", "--n", "20", "--epochs", "40"]
    assert watermarks_main([*argv, "--out", str(key)]) == 0
    assert "AccTri:             1.0000" in capsys.readouterr().out
    assert watermarks_main(["verify", "--model", str(model), "--key", str(key), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scheme"] == "fragile" and result["accuracy"] == 1.0
    assert result["verdict"].startswith("unmodified")
    # the same architecture with other weights is a modified model
    keras.utils.set_random_seed(1)
    other = keras.models.clone_model(keras.saving.load_model(model))
    other.save(tmp_path / "other.keras")
    assert (
        watermarks_main(["verify", "--model", str(tmp_path / "other.keras"), "--key", str(key)])
        == 0
    )
    out = capsys.readouterr().out
    assert "verdict:   modified" in out


@pytest.mark.parametrize("problem", ["missing", "corrupt", "shape", "bad_out", "bad_option"])
def test_cli_bad_input_exits_2(tmp_path, capsys, full_key, problem):
    model = _user_model(tmp_path / "user.keras")
    key = tmp_path / "key.npz"
    full_key.save(key)
    if problem == "missing":
        argv = ["verify", "--model", str(tmp_path / "nope.keras"), "--key", str(key)]
    elif problem == "corrupt":
        (tmp_path / "bad.keras").write_bytes(b"not a zip")
        argv = ["fragile", "--model", str(tmp_path / "bad.keras"), "--dataset", "digits"]
        argv += ["--out", str(tmp_path / "k2.npz")]
    elif problem == "shape":
        wide = _user_model(tmp_path / "wide.keras", shape=(28, 28, 1))
        argv = ["verify", "--model", str(wide), "--key", str(key)]
    elif problem == "bad_out":
        argv = [
            "fragile",
            "--model",
            str(model),
            "--dataset",
            "digits",
            "--out",
            str(tmp_path / "k.txt"),
        ]
    else:
        argv = ["fragile", "--model", str(model), "--dataset", "digits", "--variant", "half"]
        argv += ["--out", str(tmp_path / "k3.npz")]
    assert watermarks_main(argv) == 2
    assert _one_line(capsys).startswith("error: ")
    assert not (tmp_path / "k2.npz").exists() and not (tmp_path / "k3.npz").exists()
