"""Fine-tuning (FTLL/FTAL/RTLL/RTAL), magnitude pruning and fine-pruning on tiny models."""

import numpy as np
import pytest

import attacks
import models
from attacks.finetune import FineTune, FineTuneConfig, output_layers, variant
from attacks.pruning import (
    FinePruning,
    FinePruningConfig,
    MagnitudePruning,
    PruningConfig,
    magnitude_prune,
    prunable_layers,
)
from models import classifier
from models.errors import UserError
from models.training import Hook, TrainConfig
from tests.conftest import weights_equal


@pytest.fixture(scope="module")
def trained(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=8, batch_size=32), verbose=0)
    return model


def _layer_weights(model, name):
    return [w.copy() for w in model.get_layer(name).get_weights()]


def test_registry_lists_the_attacks():
    assert {"fine_tune", "magnitude_pruning", "fine_pruning"} <= set(attacks.names())
    with pytest.raises(UserError, match="expected one of"):
        attacks.get("no_such_attack")


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="variant"):
        FineTuneConfig(variant="ftxx")
    with pytest.raises(UserError, match="epochs"):
        FineTuneConfig(epochs=0)
    with pytest.raises(UserError, match="unknown option"):
        FineTune(learning_rat=0.1)
    with pytest.raises(UserError, match="rate"):
        PruningConfig(rate=1.5)


@pytest.mark.parametrize("name", ["ftll", "ftal", "rtll", "rtal"])
def test_variants_train_what_they_say(trained, digits, name):
    before = trained.get_weights()
    attack = variant(name, epochs=1, learning_rate=0.05)
    out = attack.remove(trained, digits)
    assert weights_equal(trained, trained) and all(
        np.array_equal(a, b) for a, b in zip(before, trained.get_weights(), strict=True)
    ), "the attacked model must be left untouched"
    last = output_layers(out)[0].name
    assert last == "logits"
    changed = {
        layer.name
        for layer in out.layers
        if layer.weights
        and not all(
            np.array_equal(a, b)
            for a, b in zip(
                layer.get_weights(), trained.get_layer(layer.name).get_weights(), strict=True
            )
        )
    }
    if name.endswith("ll"):
        assert changed == {last}
    else:
        assert last in changed and len(changed) > 1
    assert out.input_shape == trained.input_shape and out.output_shape == trained.output_shape
    assert all(layer.trainable for layer in out.layers)


def test_retraining_reinitialises_the_last_layer(trained, digits):
    attack = variant("rtll", epochs=1)
    prepared = attack.prepare(trained)
    assert not np.allclose(
        prepared.get_layer("logits").get_weights()[0], _layer_weights(trained, "logits")[0]
    )
    assert np.array_equal(prepared.get_layer("logits").get_weights()[1], np.zeros(10))
    ftal = variant("ftal", epochs=1).prepare(trained)
    assert weights_equal(ftal, trained)


def test_per_epoch_metric_lands_in_history(trained, digits):
    result = variant("ftal", epochs=2).run(
        trained,
        digits,
        callbacks=[
            Hook("test_acc", lambda m: classifier.accuracy(m, digits.x_test, digits.y_test))
        ],
    )
    assert len(result.history["test_acc"]) == 2


def test_unknown_last_layer_is_a_user_error(trained, digits):
    with pytest.raises(UserError, match="no layer 'nope'"):
        variant("ftll", last_layers=("nope",)).remove(trained, digits)


def test_zero_rate_pruning_changes_nothing(trained):
    pruned, _ = magnitude_prune(trained, 0.0)
    assert weights_equal(pruned, trained)


def test_magnitude_pruning_zeroes_the_smallest_weights(trained):
    pruned, masks = magnitude_prune(trained, 0.5)
    for layer in prunable_layers(pruned):
        kernel = layer.get_weights()[0]
        original = trained.get_layer(layer.name).get_weights()[0]
        zero = kernel == 0
        assert abs(zero.mean() - 0.5) < 0.02
        assert np.abs(original[zero]).max() <= np.abs(original[~zero]).min()
        bias = layer.get_weights()[1]
        assert np.array_equal(bias, trained.get_layer(layer.name).get_weights()[1])


def test_pruned_weights_stay_zero_through_fine_tuning(trained, digits):
    attack = MagnitudePruning(
        PruningConfig(rate=0.6, fine_tune=FineTuneConfig(epochs=2, learning_rate=0.05))
    )
    out = attack.remove(trained, digits)
    pruned, _ = magnitude_prune(trained, 0.6)
    for layer in prunable_layers(out):
        kernel = layer.get_weights()[0]
        zero_before = pruned.get_layer(layer.name).get_weights()[0] == 0
        assert np.all(kernel[zero_before] == 0)
        assert not np.array_equal(kernel, pruned.get_layer(layer.name).get_weights()[0])


def test_fine_pruning_prunes_dormant_channels_within_the_accuracy_budget(trained, digits):
    attack = FinePruning(FinePruningConfig(max_accuracy_drop=0.05, fine_tune=None))
    copy, masks, pruned = attack.prune(trained, digits)
    assert pruned > 0
    base = classifier.accuracy(trained, digits.x_train, digits.y_train)
    assert base - classifier.accuracy(copy, digits.x_train, digits.y_train) <= 0.05
    out = FinePruning(
        FinePruningConfig(max_accuracy_drop=0.05, fine_tune=FineTuneConfig(epochs=1))
    ).remove(trained, digits)
    conv = [lay for lay in out.layers if lay.__class__.__name__ == "Conv2D"][-1]
    dead = next(iter(v for k, v in masks.items() if k.endswith("/bias")))
    assert np.all(conv.get_weights()[0][..., dead == 0] == 0)
    assert np.all(conv.get_weights()[1][dead == 0] == 0)
