"""Malicious fine-tuning (Yin et al. 2022, section 4.2): BIM backdoor data, all or last layers."""

import json

import keras
import numpy as np
import pytest

import attacks
import attacks.malicious as malicious
import models
from attacks.base import Inapplicable
from attacks.cli import main as attacks_main
from attacks.malicious import MaliciousConfig, MaliciousFineTune, backdoor_data, last_layers
from models import classifier
from models.errors import UserError
from models.training import Hook, TrainConfig, default_cache_dir, set_caching

SMALL = dict(epochs=2, backdoor_images=40, batch_size=32, max_iter=3)


@pytest.fixture(scope="module")
def trained(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=8, batch_size=32), verbose=0)
    return model


@pytest.fixture(scope="module")
def adversary(digits):
    return digits.subset(fraction=0.3, seed=1)


def test_registered_validated_and_presets():
    assert attacks.get("malicious_fine_tune") is MaliciousFineTune
    with pytest.raises(UserError, match="unknown layers 'first'"):
        MaliciousConfig(layers="first")
    with pytest.raises(UserError, match="eps must lie in"):
        MaliciousConfig(eps=0)
    with pytest.raises(UserError, match="epochs must lie in"):
        MaliciousConfig(epochs=-1)
    with pytest.raises(UserError, match="unknown optimizer"):
        MaliciousConfig(optimizer="rmsprop")
    with pytest.raises(UserError, match="unknown option"):
        MaliciousFineTune(lr=0.1)
    assert MaliciousFineTune.preset_config("quick").epochs == 5
    paper = MaliciousFineTune.preset_config("paper")
    assert (paper.epochs, paper.backdoor_images, paper.optimizer) == (60, 1000, "auto")
    assert MaliciousFineTune.zero_strength == {"epochs": 0, "backdoor_images": 0}
    assert MaliciousFineTune.requires.white_box


def test_paper_optimiser_resolved_from_the_model(trained, monkeypatch):
    config = MaliciousConfig()
    assert config.resolved_optimizer(trained) == ("sgd", 1e-3)
    monkeypatch.setattr(malicious, "LARGE_MODEL_PARAMETERS", 10)
    assert config.resolved_optimizer(trained) == ("adam", 1e-5)
    recipe = MaliciousConfig(epochs=3, learning_rate=1e-4).train_config(trained)
    assert (recipe.optimizer, recipe.learning_rate, recipe.epochs) == ("adam", 1e-4, 3)
    assert MaliciousConfig(optimizer="sgd").resolved_optimizer(trained) == ("sgd", 1e-3)


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


def test_backdoor_data_is_bim_within_eps_and_cached_while_caching_is_on(trained, adversary):
    config = MaliciousConfig(**SMALL, target_class=3)
    folder = default_cache_dir() / "malicious_bim"
    cached = len(list(folder.glob("*.npz")))
    set_caching(False)
    try:
        x_bd, y_bd, source = backdoor_data(trained, adversary, config)
    finally:
        set_caching(True)
    assert len(list(folder.glob("*.npz"))) == cached
    assert x_bd.shape == (40, 8, 8, 1) and set(y_bd.tolist()) == {3}
    assert not np.any(adversary.y_train[source] == 3)
    delta = np.abs(x_bd - adversary.x_train[source])
    assert delta.max() <= config.eps + 1e-5 and delta.max() > 0
    assert x_bd.min() >= 0.0 and x_bd.max() <= 1.0
    first = backdoor_data(trained, adversary, config)[0]
    assert len(list(folder.glob("*.npz"))) == cached + 1
    again = backdoor_data(trained, adversary, config)[0]
    np.testing.assert_array_equal(first, x_bd)
    np.testing.assert_array_equal(again, x_bd)


def test_last_layer_attack_trains_only_the_last_layers(trained, adversary):
    before = trained.get_weights()
    attack = MaliciousFineTune(layers="last", **SMALL)
    removal = attack.remove(trained, adversary, hooks=[Hook("probe", lambda m: 0.5)])
    model, info = removal.model, removal.info
    assert all(np.array_equal(a, b) for a, b in zip(before, trained.get_weights(), strict=True))
    assert info["trained_layers"] == ["fc1", "logits", "predictions"]
    for layer in model.layers:
        same = all(
            np.array_equal(a, b)
            for a, b in zip(
                layer.get_weights(), trained.get_layer(layer.name).get_weights(), strict=True
            )
        )
        if layer.weights:
            assert same == (layer.name not in info["trained_layers"]), layer.name
    assert info["curves"] == {"probe": [0.5, 0.5]}
    assert (info["optimizer"], info["learning_rate"], info["epochs_run"]) == ("sgd", 1e-3, 2)
    assert len(info["history"]["loss"]) == 2 and "probe" not in info["history"]
    x_bd, y_bd, _ = backdoor_data(trained, adversary, attack.config)
    assert info["backdoor_success"] == classifier.accuracy(model, x_bd, y_bd)
    assert info["backdoor_images"] == 40 and info["clean_images"] == len(adversary.y_train)
    json.dumps(info)  # JSON-able, as the command's --info writes it
    assert model.input_shape == trained.input_shape
    assert model.output_shape == trained.output_shape


def test_all_layer_attack_changes_every_weighted_layer(trained, adversary):
    model = MaliciousFineTune(layers="all", **SMALL).remove(trained, adversary).model
    for layer in model.layers:
        if layer.weights:
            assert not all(
                np.array_equal(a, b)
                for a, b in zip(
                    layer.get_weights(), trained.get_layer(layer.name).get_weights(), strict=True
                )
            ), layer.name


def test_zero_strength_is_a_no_op(trained, adversary):
    attack = MaliciousFineTune.from_preset("smoke", **MaliciousFineTune.zero_strength)
    removal = attack.remove(trained, adversary)
    np.testing.assert_array_equal(
        classifier.predict(removal.model, adversary.x_test),
        classifier.predict(trained, adversary.x_test),
    )
    assert removal.info["backdoor_success"] is None and removal.info["epochs_run"] == 0


def test_too_few_images_is_inapplicable(trained, adversary):
    attack = MaliciousFineTune(backdoor_images=10**6)
    assert "outside target_class 0" in attack.applicable(trained, adversary)
    with pytest.raises(Inapplicable, match="backdoor_images"):
        attack.remove(trained, adversary)
    with pytest.raises(Inapplicable, match="target_class 12 is not a class"):
        MaliciousFineTune(target_class=12).remove(trained, adversary)


def test_cli_on_a_user_model(trained, tmp_path, capsys):
    trained.save(tmp_path / "user.keras")
    out, info = tmp_path / "attacked.keras", tmp_path / "info.json"
    argv = ["remove", "--attack", "malicious_fine_tune", "--preset", "smoke", "--dataset", "digits"]
    argv += ["--model", str(tmp_path / "user.keras"), "--layers", "last", "--max-train", "400"]
    assert attacks_main([*argv, "--out", str(out), "--info", str(info)]) == 0
    assert out.is_file() and "test accuracy" in capsys.readouterr().out
    assert models.load_model(out).output_shape == (None, 10)
    facts = json.loads(info.read_text())
    assert facts["layers"] == "last" and facts["backdoor_images"] == 40
    bad = ["remove", "--attack", "malicious_fine_tune", "--dataset", "digits", "--model"]
    bad += [str(tmp_path / "none.keras"), "--out", str(tmp_path / "x.keras")]
    assert attacks_main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "x.keras").exists()
