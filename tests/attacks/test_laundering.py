"""Neural Network Laundering (Aiken et al.): Algorithm 1's parts and the whole attack on a tiny model."""

import dataclasses

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
)
from attacks.neural_cleanse import NeuralCleanseConfig
from models import classifier
from models.errors import UserError
from models.training import TrainConfig


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
        LaunderingConfig(rounds=0)
    with pytest.raises(UserError, match="reset_scope"):
        LaunderingConfig(reset_scope="first_half")
    with pytest.raises(UserError, match="dense_threshold"):
        LaunderingConfig(dense_threshold=-1)
    config = LaunderingConfig(neural_cleanse={"steps": 7})
    assert config.neural_cleanse.steps == 7


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


def test_laundering_removes_a_planted_backdoor_without_the_key(backdoored, digits):
    assert _wm_acc(backdoored, digits) > 0.9
    adversary = dataclasses.replace(
        digits, x_train=digits.x_train[:300], y_train=digits.y_train[:300]
    )
    config = LaunderingConfig(
        rounds=2,
        dense_threshold=3.0,
        conv_threshold=1.0,
        retrain_epochs=30,
        retrain_learning_rate=1e-3,
        neural_cleanse=NeuralCleanseConfig(steps=40),
    )
    seen = []
    result = Laundering(config).run(
        backdoored, adversary, on_round=lambda n, m: seen.append(n), cache=False
    )
    assert result.rounds[0].suspect == 0, "Neural Cleanse should point at the backdoor's class"
    assert sum(result.rounds[0].reset_units.values()) > 0
    assert seen == [r.round for r in result.rounds]
    laundered = result.model
    assert _wm_acc(laundered, digits) < 0.5 * _wm_acc(backdoored, digits)
    assert classifier.accuracy(laundered, digits.x_test, digits.y_test) > 0.8
    assert _wm_acc(backdoored, digits) > 0.9, "the suspect model must be left untouched"


def test_laundering_refuses_images_of_another_shape(backdoored):
    with pytest.raises(UserError, match="shape"):
        Laundering().run(backdoored, (np.zeros((4, 28, 28, 1)), np.zeros(4, dtype=np.int64)))


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


def test_launder_command_on_a_foreign_model(foreign_model, tmp_path, capsys):
    from attacks.cli import main

    out = tmp_path / "laundered.keras"
    argv = ["launder", "--model", str(foreign_model), "--dataset", "digits", "--per-class", "5"]
    argv += ["--nc-steps", "3", "--retrain-epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "before" in printed
    laundered = models.load_model(out)
    assert laundered.input_shape == (None, 8, 8, 1)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "fashion_mnist"], "inputs of shape"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["--dataset", "digits", "--fraction", "2"], "bad --fraction"),
    ],
)
def test_launder_command_bad_input_exits_2(foreign_model, tmp_path, capsys, extra, message):
    from attacks.cli import main

    argv = ["launder", "--model", str(foreign_model), "--out", str(tmp_path / "x.keras"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x.keras").exists()


def test_launder_command_missing_model_exits_2(tmp_path, capsys):
    from attacks.cli import main

    argv = ["launder", "--model", str(tmp_path / "nope.keras"), "--dataset", "digits"]
    assert main([*argv, "--out", str(tmp_path / "x.keras")]) == 2
    assert "does not exist" in capsys.readouterr().err
