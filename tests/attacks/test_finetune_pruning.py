"""Fine-tuning (FTLL/FTAL/RTLL/RTAL), magnitude pruning and fine-pruning on tiny models."""

import keras
import numpy as np
import pytest

import attacks
import models
from attacks.finetune import FineTuneConfig, last_layers, reinitialise
from attacks.pruning import (
    FinePruning,
    FinePruningConfig,
    KeepMasks,
    MagnitudePruning,
    PruningConfig,
    apply_masks,
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


def _changed_layers(a, b) -> set[str]:
    return {
        layer.name
        for layer in a.layers
        if layer.weights
        and not all(
            np.array_equal(x, y)
            for x, y in zip(layer.get_weights(), b.get_layer(layer.name).get_weights(), strict=True)
        )
    }


def _test_accuracy(digits):
    return Hook("test_acc", lambda m: classifier.accuracy(m, digits.x_test, digits.y_test))


def test_registry_lists_the_four_variants_and_the_pruning_attacks():
    assert {"ftll", "ftal", "rtll", "rtal", "magnitude_pruning", "fine_pruning"} <= set(
        attacks.names()
    )
    assert "fine_tune" not in attacks.names()
    for name in ("ftll", "ftal", "rtll", "rtal"):
        assert attacks.get(name).Config is FineTuneConfig
    with pytest.raises(UserError, match="expected one of"):
        attacks.get("no_such_attack")


def test_configs_reject_bad_values():
    with pytest.raises(UserError, match="epochs"):
        FineTuneConfig(epochs=-1)
    with pytest.raises(UserError, match="optimizer"):
        FineTuneConfig(optimizer="rmsprop")
    with pytest.raises(UserError, match="unknown option"):
        attacks.get("ftal")(learning_rat=0.1)
    with pytest.raises(UserError, match="rate"):
        PruningConfig(rate=1.5)
    with pytest.raises(UserError, match="max_rate"):
        FinePruningConfig(max_rate=2.0)
    # nested configs come back from JSON as mappings
    config = PruningConfig(rate=0.5, fine_tune={"epochs": 2, "last_layers": ["logits"]})
    assert config.fine_tune == FineTuneConfig(epochs=2, last_layers=("logits",))


@pytest.mark.parametrize("name", ["ftll", "ftal", "rtll", "rtal"])
def test_variants_train_what_they_say(trained, digits, name):
    before = [w.copy() for w in trained.get_weights()]
    removal = attacks.get(name)(epochs=1, learning_rate=0.05).remove(trained, digits)
    out = removal.model
    assert all(np.array_equal(a, b) for a, b in zip(before, trained.get_weights(), strict=True)), (
        "the attacked model must be left untouched"
    )
    changed = _changed_layers(out, trained)
    if name.endswith("ll"):
        assert changed == {"logits"}
        assert removal.info["trained"] == ["logits"]
    else:
        assert "logits" in changed and len(changed) > 1
        assert removal.info["trained"] == "all"
    assert removal.info["reinitialised"] == (["logits"] if name.startswith("rt") else [])
    assert removal.info["epochs_run"] == 1
    assert out.input_shape == trained.input_shape and out.output_shape == trained.output_shape
    assert all(layer.trainable for layer in out.layers)


def test_reinitialise_draws_the_layer_afresh(trained):
    copy = attacks.clone(trained)
    layer = copy.get_layer("logits")
    reinitialise(layer, seed=3)
    kernel, bias = layer.get_weights()
    assert not np.allclose(kernel, trained.get_layer("logits").get_weights()[0])
    assert np.array_equal(bias, np.zeros(10))
    again = attacks.clone(trained)
    reinitialise(again.get_layer("logits"), seed=3)
    np.testing.assert_array_equal(again.get_layer("logits").get_weights()[0], kernel)


def test_last_layers_by_name_and_on_a_plain_sequential(trained):
    assert last_layers(trained) == ["logits"]
    assert last_layers(trained, ("fc1",)) == ["fc1"]
    plain = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="h"), keras.layers.Dense(2, name="out")]
    )
    assert last_layers(plain) == ["out"]


def test_hooks_are_measured_after_every_epoch(trained, digits):
    removal = attacks.get("ftal")(epochs=2).remove(trained, digits, hooks=[_test_accuracy(digits)])
    curve = removal.info["curves"]["test_acc"]
    assert len(curve) == 2 and all(0 <= v <= 1 for v in curve)
    assert curve[-1] == pytest.approx(
        classifier.accuracy(removal.model, digits.x_test, digits.y_test)
    )


def test_zero_epochs_is_no_attack_even_when_retraining(trained, digits):
    out = attacks.get("rtal")(epochs=0).remove(trained, digits).model
    assert weights_equal(out, trained) and out is not trained


def test_unknown_last_layer_is_a_user_error(trained, digits):
    with pytest.raises(UserError, match="no layer 'nope'"):
        attacks.get("ftll")(last_layers=("nope",)).remove(trained, digits)


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
    attack = MagnitudePruning(rate=0.6, fine_tune={"epochs": 2, "learning_rate": 0.05})
    removal = attack.remove(trained, digits, hooks=[_test_accuracy(digits)])
    pruned, _ = magnitude_prune(trained, 0.6)
    for layer in prunable_layers(removal.model):
        kernel = layer.get_weights()[0]
        zero_before = pruned.get_layer(layer.name).get_weights()[0] == 0
        assert np.all(kernel[zero_before] == 0)
        assert not np.array_equal(kernel, pruned.get_layer(layer.name).get_weights()[0])
    # after pruning, then after each of the two epochs
    curve = removal.info["curves"]["test_acc"]
    assert len(curve) == 3
    assert curve[0] == pytest.approx(classifier.accuracy(pruned, digits.x_test, digits.y_test))
    info = removal.info
    assert info["pruned_weights"] == pytest.approx(0.6 * info["prunable_weights"], rel=0.01)


def test_masks_hold_in_a_model_trained_before_and_are_lifted_after(trained, digits):
    """The masks reach a training step traced earlier, and stop holding once the fit ends."""
    model, masks = magnitude_prune(trained, 0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    x, y = digits.x_train[:64], digits.y_train[:64]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # traces the step without the masks
    apply_masks(model, masks)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[KeepMasks(masks)])
    for layer in prunable_layers(model):
        assert np.all(layer.get_weights()[0][masks[layer.path] == 0] == 0)
        assert layer.kernel.constraint is None
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for layer in prunable_layers(model):  # an unmasked fit moves them again
        assert np.any(layer.get_weights()[0][masks[layer.path] == 0] != 0)


def test_pruning_without_fine_tuning_measures_once(trained, digits):
    removal = MagnitudePruning(rate=0.3).remove(trained, digits, hooks=[_test_accuracy(digits)])
    assert len(removal.info["curves"]["test_acc"]) == 1
    assert removal.info["fine_tune_epochs"] == 0


def test_fine_pruning_prunes_dormant_channels_within_the_accuracy_budget(trained, digits):
    attack = FinePruning(max_accuracy_drop=0.05, fine_tune={"epochs": 0})
    copy, masks, facts = attack.prune(trained, digits)
    assert facts["pruned_channels"] and facts["layer"] == "conv1"
    base = classifier.accuracy(trained, digits.x_train, digits.y_train)
    assert base - classifier.accuracy(copy, digits.x_train, digits.y_train) <= 0.05
    removal = FinePruning(max_accuracy_drop=0.05, fine_tune={"epochs": 1}).remove(trained, digits)
    conv = removal.model.get_layer(facts["layer"])
    dead = next(iter(v for k, v in masks.items() if k.endswith("/bias")))
    assert np.all(conv.get_weights()[0][..., dead == 0] == 0)
    assert np.all(conv.get_weights()[1][dead == 0] == 0)
    assert removal.info["pruned_channels"] == facts["pruned_channels"]


def test_fine_pruning_says_why_it_does_not_apply_to_a_dense_model(digits):
    models.seed_everything(0)
    dense = keras.Sequential(
        [
            keras.Input(digits.input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    reason = FinePruning().applicable(dense, digits)
    assert reason is not None and "Conv2D" in reason
    with pytest.raises(attacks.Inapplicable, match="Conv2D"):
        FinePruning().remove(dense, digits)
