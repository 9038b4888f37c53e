"""Neural Network Laundering (Aiken et al.): Algorithm 1's parts and the whole attack on a tiny model."""

import dataclasses
import json

import keras
import numpy as np
import pytest

import models
from attacks.laundering import (
    Laundering,
    LaunderingConfig,
    activation_difference,
    reset_batch_norm,
    reset_layers,
    reset_units,
    share_thresholds,
)
from attacks.neural_cleanse import NeuralCleanseConfig, detect
from models import classifier
from models.errors import UserError
from models.training import Hook, TrainConfig, set_max_steps


def _stamp(x):
    x = np.array(x, copy=True)
    x[:, -3:, -3:, :] = 1.0
    return x


@pytest.fixture(scope="module")
def backdoored(digits):
    """A tiny CNN on digits with a 3x3 white corner that sends any image to class 0."""
    rng = np.random.default_rng(0)
    source = rng.choice(np.flatnonzero(digits.y_train != 0), 150, replace=False)
    x = np.concatenate([digits.x_train, _stamp(digits.x_train[source])])
    y = np.concatenate([digits.y_train, np.zeros(len(source), dtype=np.int64)])
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, (x, y), TrainConfig(epochs=25, batch_size=32), verbose=0)
    return model


def _wm_acc(model, digits):
    x = _stamp(digits.x_test[digits.y_test != 0])
    return classifier.accuracy(model, x, np.zeros(len(x), dtype=np.int64))


def test_config_is_validated():
    with pytest.raises(UserError, match="rounds"):
        LaunderingConfig(rounds=-1)
    with pytest.raises(UserError, match="reset_scope"):
        LaunderingConfig(reset_scope="first_half")
    with pytest.raises(UserError, match="dense_threshold"):
        LaunderingConfig(dense_threshold=-1)
    with pytest.raises(UserError, match="thresholds"):
        LaunderingConfig(thresholds="sometimes")
    with pytest.raises(UserError, match="reset_shares"):
        LaunderingConfig(thresholds="auto", reset_shares=())
    with pytest.raises(UserError, match="reset_shares"):
        LaunderingConfig(reset_shares=(0.1, 1.5))
    config = LaunderingConfig(neural_cleanse={"steps": 7}, reset_shares=[0.1, 0.2])
    assert config.neural_cleanse.steps == 7 and config.reset_shares == (0.1, 0.2)


def test_output_layer_is_never_reset_and_scope_halves(digits):
    model = models.build("resnet20v1", (28, 28, 1), 10)
    every = reset_layers(model)
    assert "logits" not in {layer.name for layer in every}
    half = reset_layers(model, "second_half")
    assert [layer.name for layer in half] == [layer.name for layer in every[len(every) // 2 :]]


def test_activation_difference_reads_units_after_batch_norm_and_relu():
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 1, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("conv").set_weights([np.array([[[[1.0, -1.0]]]], dtype=np.float32)])
    clean = np.zeros((5, 4, 4, 1), dtype=np.float32)
    triggered = np.ones((5, 4, 4, 1), dtype=np.float32)
    diff = activation_difference(model, reset_layers(model), clean, triggered)["conv"]
    # channel 0 fires on the trigger; channel 1 goes negative and the ReLU keeps it at 0
    assert diff[0] == pytest.approx(1.0 / np.sqrt(1 + 1e-3), rel=1e-4)
    assert diff[1] == pytest.approx(0.0, abs=1e-6)


def test_reset_units_zeroes_incoming_weights_of_units_above_threshold(backdoored):
    model = keras.models.clone_model(backdoored)
    model.set_weights(backdoored.get_weights())
    diff = {"conv1": np.array([0.0, 2.0, 0.1, 0.0, 5.0, 0.0, 0.0, 0.0]), "fc1": np.zeros(16)}
    diff["fc1"][3] = 9.0
    masks, counts = reset_units(model, diff, dense_threshold=1.0, conv_threshold=1.0)
    assert counts == {"conv1": 2, "fc1": 1}
    kernel, bias = model.get_layer("conv1").get_weights()
    assert np.all(kernel[..., [1, 4]] == 0) and np.all(bias[[1, 4]] == 0)
    assert np.array_equal(kernel[..., 0], backdoored.get_layer("conv1").get_weights()[0][..., 0])
    assert np.all(model.get_layer("fc1").get_weights()[0][:, 3] == 0)
    assert masks[f"{model.get_layer('fc1').path}/bias"][3] == 0


def test_softplus_units_are_reset_to_the_median_weight():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="softplus", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(hidden))
    before = model.get_layer("hidden").get_weights()[0].copy()
    masks, counts = reset_units(model, {"hidden": np.array([0, 3.0, 0, 0])}, 1.0, 1.0)
    after = model.get_layer("hidden").get_weights()[0]
    assert counts["hidden"] == 1 and not masks
    assert np.allclose(after[:, 1], np.median(before))


def test_batch_norm_statistics_are_reset():
    model = models.build("resnet20v1", (28, 28, 1), 10)
    bn = model.get_layer("conv1_bn")
    bn.moving_mean.assign(np.full(16, 3.0, dtype=np.float32))
    assert reset_batch_norm(model) > 0
    assert np.all(keras.ops.convert_to_numpy(bn.moving_mean) == 0)
    assert np.all(keras.ops.convert_to_numpy(bn.moving_variance) == 1)


def test_share_thresholds_reset_the_top_share_of_each_kind():
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(10, 1, name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(4, name="dense")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))
    differences = {"conv": np.arange(10, dtype=float) - 2.0, "dense": np.array([0.5, -1, 3, 2.0])}
    dt, ct = share_thresholds(model, differences, 0.5)
    assert (differences["dense"] > dt).sum() == 2 and (differences["conv"] > ct).sum() == 5
    dt, ct = share_thresholds(model, differences, 0.0)  # nothing reset
    assert dt == 3.0 and ct == 7.0
    dt, ct = share_thresholds(model, differences, 1.0)  # never a unit whose activation falls
    assert dt == 0.0 and ct == 0.0 and (differences["conv"] > ct).sum() == 7


def _adversary(digits, n=300):
    return dataclasses.replace(digits, x_train=digits.x_train[:n], y_train=digits.y_train[:n])


def _fixed_config(**extra):
    values = dict(
        rounds=2,
        dense_threshold=3.0,
        conv_threshold=1.0,
        retrain_epochs=30,
        retrain_learning_rate=1e-3,
        neural_cleanse=NeuralCleanseConfig(steps=40),
    )
    return LaunderingConfig(**{**values, **extra})


def test_laundering_removes_a_planted_backdoor_without_the_key(backdoored, digits):
    assert _wm_acc(backdoored, digits) > 0.9
    adversary = _adversary(digits)
    hook = Hook("wm_acc", lambda m: _wm_acc(m, digits))
    attack = Laundering(_fixed_config())
    removal = attack.remove(backdoored, adversary, hooks=[hook])
    info = removal.info
    json.dumps(info, allow_nan=False)
    rounds = info["rounds"]
    assert rounds[0]["suspect"] == 0, "Neural Cleanse should point at the backdoor's class"
    assert sum(rounds[0]["reset_units"].values()) > 0
    assert set(rounds[0]) >= {"least_likely", "flagged", "anomaly_indices", "l1_norms", "seconds"}
    assert info["thresholds"] == {"mode": "fixed", "dense": 3.0, "conv": 1.0}
    curve = info["curves"]["wm_acc"]
    assert len(curve) == len(rounds) and curve[-1] == pytest.approx(_wm_acc(removal.model, digits))
    laundered = removal.model
    assert _wm_acc(laundered, digits) < 0.5 * _wm_acc(backdoored, digits)
    assert classifier.accuracy(laundered, digits.x_test, digits.y_test) > 0.8
    assert _wm_acc(backdoored, digits) > 0.9, "the suspect model must be left untouched"
    # the first round's Neural Cleanse comes back from the cache, the same
    again = detect(backdoored, adversary, attack.detection_config(1))
    assert again.l1_norms.tolist() == rounds[0]["l1_norms"]


def test_auto_thresholds_come_from_the_adversarys_own_held_out_split(backdoored, digits):
    adversary = _adversary(digits)
    config = _fixed_config(
        thresholds="auto",
        rounds=1,
        max_drop=0.05,
        held_out=0.3,
        reset_shares=(0.5, 0.2, 0.05),
        retrain_epochs=10,
        neural_cleanse=NeuralCleanseConfig(steps=20),
    )
    removal = Laundering(config).remove(backdoored, adversary)
    choice = removal.info["thresholds"]
    assert choice["mode"] == "auto"
    assert choice["held_out_images"] == 90 and choice["laundering_images"] == 210
    grid = choice["grid"]
    assert grid and all(not row["accepted"] for row in grid[:-1])
    shares = [row["share"] for row in grid]
    assert shares == sorted(shares, reverse=True)  # the largest reset first
    resets = [row["reset_units"] for row in grid]
    assert resets == sorted(resets, reverse=True)
    if grid[-1]["accepted"]:
        assert grid[-1]["drop"] <= 0.05 + 1e-9
        assert (choice["dense"], choice["conv"]) == (grid[-1]["dense"], grid[-1]["conv"])
        assert choice["share"] == grid[-1]["share"]
    else:
        assert choice["share"] == 0.0
    assert removal.info["rounds"][0]["suspect"] == 0


def test_max_steps_caps_the_rounds(backdoored, digits):
    """--max-steps N: at most N rounds, each with Neural Cleanse and retraining capped too."""
    config = _fixed_config(rounds=5, early_stop=False, neural_cleanse=NeuralCleanseConfig(steps=9))
    hook = Hook("wm_acc", lambda m: _wm_acc(m, digits))
    set_max_steps(2)
    try:
        info = Laundering(config).remove(backdoored, _adversary(digits, 100), hooks=[hook]).info
    finally:
        set_max_steps(None)
    assert len(info["rounds"]) == 2 and len(info["curves"]["wm_acc"]) == 2


def test_zero_rounds_is_no_attack(backdoored, digits):
    out = Laundering(rounds=0).remove(backdoored, digits).model
    np.testing.assert_array_equal(
        classifier.predict(out, digits.x_test), classifier.predict(backdoored, digits.x_test)
    )


def test_laundering_refuses_images_of_another_shape(backdoored, digits):
    wrong = dataclasses.replace(
        digits,
        x_train=np.zeros((4, 28, 28, 1), np.float32),
        y_train=np.zeros(4, np.int64),
        x_test=np.zeros((4, 28, 28, 1), np.float32),
        y_test=np.zeros(4, np.int64),
    )
    with pytest.raises(UserError, match="shape"):
        Laundering().remove(backdoored, wrong)


@pytest.fixture(scope="module")
def foreign_model(tmp_path_factory, digits):
    """A Keras model the suite did not make: plain Sequential, trained with model.fit."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(24, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=3, verbose=0)
    path = tmp_path_factory.mktemp("foreign") / "suspect.keras"
    model.save(path)
    return path


def test_remove_command_launders_a_foreign_model(foreign_model, tmp_path, capsys):
    from attacks.cli import main

    out, info = tmp_path / "laundered.keras", tmp_path / "info.json"
    argv = ["remove", "--attack", "laundering", "--preset", "smoke", "--model", str(foreign_model)]
    argv += ["--dataset", "digits", "--per-class", "5", "--retrain_epochs", "2"]
    assert main([*argv, "--out", str(out), "--info", str(info)]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "laundering" in printed
    laundered = models.load_model(out)
    assert laundered.input_shape == (None, 8, 8, 1)
    facts = json.loads(info.read_text())
    assert len(facts["rounds"]) == 1 and facts["thresholds"]["mode"] == "fixed"
    assert sum(facts["rounds"][0]["units"].values()) == 8 + 24  # conv channels and hidden units


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "fashion_mnist"], "inputs of shape"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["--dataset", "digits", "--fraction", "2"], "--fraction"),
        (["--dataset", "digits", "--rounds", "-1"], "rounds"),
        (["--dataset", "digits", "--thresholds", "sometimes"], "--thresholds"),
    ],
)
def test_remove_command_bad_input_exits_2(foreign_model, tmp_path, capsys, extra, message):
    argv = ["remove", "--attack", "laundering", "--model", str(foreign_model)]
    assert _status([*argv, "--out", str(tmp_path / "x.keras"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.keras").exists()


def _status(argv) -> int:
    """The exit status of ``python -m attacks`` (usage errors exit inside argparse)."""
    from attacks.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_the_launder_command_is_gone(foreign_model, tmp_path, capsys):
    argv = ["launder", "--model", str(foreign_model), "--dataset", "digits"]
    assert _status([*argv, "--out", str(tmp_path / "x.keras")]) == 2
    assert "invalid choice" in capsys.readouterr().err
