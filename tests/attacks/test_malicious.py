"""Malicious fine-tuning (Yin et al. 2022, section 4.2): BIM backdoor data, all or last layers."""

import keras
import numpy as np
import pytest

import attacks
import attacks.malicious as malicious
import models
from attacks.cli import main as attacks_main
from attacks.malicious import MaliciousConfig, MaliciousFineTune, backdoor_data, last_layers
from models.errors import UserError
from models.training import Hook, TrainConfig, default_cache_dir

SMALL = dict(epochs=2, backdoor_images=40, batch_size=32, max_iter=3)


@pytest.fixture(scope="module")
def trained(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=8, batch_size=32), verbose=0)
    return model


def test_registered_and_validated():
    assert attacks.get("malicious_fine_tune") is MaliciousFineTune
    with pytest.raises(UserError, match="layers"):
        MaliciousConfig(layers="first")
    with pytest.raises(UserError, match="eps"):
        MaliciousConfig(eps=0)
    with pytest.raises(UserError, match="epochs"):
        MaliciousConfig(epochs=0)
    with pytest.raises(UserError, match="unknown option"):
        MaliciousFineTune(lr=0.1)


def test_paper_optimiser_by_model_size(trained, monkeypatch):
    small = MaliciousConfig.paper(trained)
    assert (small.optimizer, small.learning_rate) == ("sgd", 1e-3)
    monkeypatch.setattr(malicious, "LARGE_MODEL_PARAMETERS", 10)
    large = MaliciousConfig.paper(trained, epochs=3)
    assert (large.optimizer, large.learning_rate, large.epochs) == ("adam", 1e-5, 3)


@pytest.mark.parametrize(
    ("name", "shape", "first", "absent"),
    [
        ("resnet20v1", (28, 28, 1), "conv4_block1", "conv3_block3_out"),
        ("resnet18", (32, 32, 3), "conv5_block1", "conv4_block2_out"),
        ("lenet5", (28, 28, 1), "fc2", "fc1"),
    ],
)
def test_last_layers_found_by_name(name, shape, first, absent):
    model = models.build(name, shape, 10)
    chosen = last_layers(model)
    assert chosen[0].startswith(first)
    assert absent not in chosen
    assert chosen[-2:] == ["logits", "predictions"]
    if name.startswith("resnet"):
        assert "avg_pool" in chosen


def test_last_layers_of_a_plain_sequential():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, name="c"),
            keras.layers.Flatten(name="f"),
            keras.layers.Dense(16, name="h"),
            keras.layers.Dense(10, activation="softmax", name="out"),
        ]
    )
    assert last_layers(model) == ["h", "out"]


def test_backdoor_data_is_bim_within_eps(trained, digits):
    config = MaliciousConfig(**SMALL, target_class=3)
    x_bd, y_bd, source = backdoor_data(trained, digits.x_train, digits.y_train, config)
    assert x_bd.shape == (40, 8, 8, 1) and set(y_bd.tolist()) == {3}
    assert not np.any(digits.y_train[source] == 3)
    delta = np.abs(x_bd - digits.x_train[source])
    assert delta.max() <= config.eps + 1e-5 and delta.max() > 0
    assert x_bd.min() >= 0.0 and x_bd.max() <= 1.0
    first = backdoor_data(trained, digits.x_train, digits.y_train, config, cache=True)[0]
    again = backdoor_data(trained, digits.x_train, digits.y_train, config, cache=True)[0]
    np.testing.assert_array_equal(first, x_bd)
    np.testing.assert_array_equal(again, x_bd)
    assert list((default_cache_dir() / "malicious_bim").glob("*.npz"))


def test_last_layer_attack_trains_only_the_last_layers(trained, digits):
    before = trained.get_weights()
    attack = MaliciousFineTune(layers="last", **SMALL)
    metric = Hook("probe", lambda m: 0.5)
    run = attack.run(trained, digits, callbacks=[metric])
    assert all(np.array_equal(a, b) for a, b in zip(before, trained.get_weights(), strict=True))
    assert run.trained_layers == ["fc1", "logits", "predictions"]
    for layer in run.model.layers:
        same = all(
            np.array_equal(a, b)
            for a, b in zip(
                layer.get_weights(), trained.get_layer(layer.name).get_weights(), strict=True
            )
        )
        if layer.weights:
            assert same == (layer.name not in run.trained_layers), layer.name
    assert run.result.history["probe"] == [0.5, 0.5]
    assert 0.0 <= run.backdoor_success() <= 1.0
    assert run.model.input_shape == trained.input_shape
    assert run.model.output_shape == trained.output_shape


def test_all_layer_attack_changes_every_weighted_layer(trained, digits):
    model = MaliciousFineTune(layers="all", **SMALL).remove(trained, digits)
    for layer in model.layers:
        if layer.weights:
            assert not all(
                np.array_equal(a, b)
                for a, b in zip(
                    layer.get_weights(), trained.get_layer(layer.name).get_weights(), strict=True
                )
            ), layer.name


def test_too_few_images_is_a_user_error(trained, digits):
    with pytest.raises(UserError, match="backdoor_images"):
        MaliciousFineTune(backdoor_images=10**6).run(trained, digits)


def test_cli_on_a_user_model(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.save(tmp_path / "user.keras")
    out = tmp_path / "attacked.keras"
    argv = ["malicious", "--model", str(tmp_path / "user.keras"), "--dataset", "digits"]
    argv += ["--epochs", "1", "--backdoor-images", "20", "--layers", "last", "--out", str(out)]
    assert attacks_main(argv) == 0
    assert out.is_file() and "backdoor success" in capsys.readouterr().out
    assert models.load_model(out).output_shape == (None, 10)
    bad = ["malicious", "--model", str(tmp_path / "none.keras"), "--dataset", "digits"]
    assert attacks_main([*bad, "--out", str(tmp_path / "x.keras")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
