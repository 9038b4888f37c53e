"""to_art(): ART's evasion, poisoning and extraction attacks run on zoo models."""

import numpy as np
import pytest

import models
from models import classifier
from models.art import evasion_attack
from models.errors import UnknownNameError, UserError
from models.training import TrainConfig

RECIPE = TrainConfig(epochs=8, batch_size=32, learning_rate=3e-3)


@pytest.fixture(scope="module")
def trained(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, RECIPE, verbose=0)
    return model


def test_wrapper_matches_the_model(trained, digits):
    classifier = models.to_art(trained)
    assert classifier.nb_classes == digits.num_classes
    assert classifier.input_shape == digits.input_shape
    x = digits.x_test[:32]
    np.testing.assert_allclose(
        classifier.predict(x), trained.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    grads = classifier.loss_gradient(x, np.eye(digits.num_classes)[digits.y_test[:32]])
    assert grads.shape == x.shape and np.abs(grads).sum() > 0


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("FastGradientMethod", {"eps": 0.3}),
        ("BasicIterativeMethod", {"eps": 0.3, "eps_step": 0.05, "max_iter": 10}),
        (
            "art:ProjectedGradientDescent",
            {"eps": 0.3, "eps_step": 0.05, "max_iter": 10, "verbose": False},
        ),
    ],
)
def test_evasion_attacks_lower_accuracy_within_budget(trained, digits, name, params):
    x, y = digits.x_test[:200], digits.y_test[:200]
    attack = evasion_attack(name, models.to_art(trained), **params)
    adversarial = attack.generate(x=x)
    assert np.max(np.abs(adversarial - x)) <= params["eps"] + 1e-5
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    clean, attacked = (
        classifier.accuracy(trained, x, y),
        classifier.accuracy(trained, adversarial, y),
    )
    assert clean > 0.85 and attacked < clean - 0.3


def test_attack_names_are_checked(trained):
    classifier = models.to_art(trained)
    with pytest.raises(UnknownNameError, match="FastGradientMethod"):
        evasion_attack("art:NoSuchAttack", classifier)
    with pytest.raises(UserError, match="bad parameters"):
        evasion_attack("FastGradientMethod", classifier, epsilon_typo=0.1)


def test_backdoor_poisoning_plants_a_working_backdoor(digits):
    from art.attacks.poisoning import PoisoningAttackBackdoor
    from art.attacks.poisoning.perturbations import add_pattern_bd

    target = 0
    attack = PoisoningAttackBackdoor(lambda x: add_pattern_bd(x, distance=1, pixel_value=1.0))
    rng = np.random.default_rng(0)
    x, y = digits.x_train.copy(), digits.y_train.copy()
    chosen = rng.choice(np.flatnonzero(y != target), size=len(y) // 10, replace=False)
    poisoned, _ = attack.poison(
        x[chosen], y=np.eye(digits.num_classes)[np.full(len(chosen), target)]
    )
    x[chosen], y[chosen] = poisoned, target

    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(
        model, (x, y), TrainConfig(epochs=15, batch_size=32, learning_rate=1e-2), verbose=0
    )

    others = digits.y_test != target
    triggered, _ = attack.poison(
        digits.x_test[others], y=np.eye(digits.num_classes)[digits.y_test[others]]
    )
    success = classifier.accuracy(model, triggered, np.full(int(others.sum()), target))
    assert classifier.accuracy(model, digits.x_test, digits.y_test) > 0.8
    assert success > 0.8
    # The same images without the trigger are not sent to the target class.
    assert (
        classifier.accuracy(model, digits.x_test[others], np.full(int(others.sum()), target)) < 0.1
    )


def test_clean_label_backdoor_poisons_through_the_bridge(trained, digits):
    from art.attacks.poisoning import PoisoningAttackBackdoor, PoisoningAttackCleanLabelBackdoor
    from art.attacks.poisoning.perturbations import add_pattern_bd

    target = np.eye(digits.num_classes)[0]
    backdoor = PoisoningAttackBackdoor(lambda x: add_pattern_bd(x, distance=1, pixel_value=1.0))
    attack = PoisoningAttackCleanLabelBackdoor(
        backdoor, models.to_art(trained), target, pp_poison=0.5, eps=0.2, eps_step=0.05, max_iter=5
    )
    chosen = np.flatnonzero(digits.y_train == 0)[:40]
    labels = np.eye(digits.num_classes)[digits.y_train[chosen]]
    poisoned, poisoned_labels = attack.poison(digits.x_train[chosen], labels)
    assert poisoned.shape == digits.x_train[chosen].shape
    np.testing.assert_array_equal(poisoned_labels, labels)  # clean label: labels untouched
    changed = np.any(poisoned != digits.x_train[chosen], axis=(1, 2, 3))
    assert 0 < changed.sum() <= len(chosen)
    assert poisoned.min() >= 0.0 and poisoned.max() <= 1.0


def test_models_without_a_fixed_input_shape_are_refused():
    import keras

    inputs = keras.Input((None, None, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    with pytest.raises(UserError, match="fixed"):
        models.to_art(model)


def test_extraction_trains_a_thieved_copy(trained, digits):
    from art.attacks.extraction import CopycatCNN

    models.seed_everything(1)
    thief = models.to_art(
        models.build("_tiny_cnn", digits.input_shape, digits.num_classes), learning_rate=3e-3
    )
    attack = CopycatCNN(
        models.to_art(trained),
        batch_size_fit=32,
        batch_size_query=64,
        nb_epochs=8,
        nb_stolen=len(digits.x_train),
    )
    stolen = attack.extract(digits.x_train, thieved_classifier=thief)
    agreement = np.mean(
        stolen.predict(digits.x_test).argmax(1)
        == trained.predict(digits.x_test, verbose=0).argmax(1)
    )
    assert agreement > 0.7
