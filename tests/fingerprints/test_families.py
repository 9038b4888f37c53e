"""fingerprints.families: the source, surrogate and reference families, trained once and cached."""

import dataclasses

import numpy as np
import pytest

import models
from fingerprints.families import (
    FamilyConfig,
    build_families,
    input_range,
    pick_candidates,
    split_training_set,
)
from models import classifier
from models.errors import UnknownNameError, UserError
from models.training import TrainConfig
from tests.conftest import weights_equal

RECIPE = TrainConfig(epochs=8, batch_size=32, learning_rate=3e-3)
TINY = FamilyConfig(
    architectures=("_tiny_cnn",),
    generation=2,
    unseen=1,
    train=RECIPE,
    source_architecture="_tiny_cnn",
    source_train=RECIPE,
    source_examples=700,
    thief_examples=700,
)


def tiny_families(digits):
    """Source + 2 + 2 generation + 1 + 1 unseen tiny CNNs on digits (cached for the session)."""
    return build_families(digits, TINY)


@pytest.fixture(scope="module")
def families(digits):
    return tiny_families(digits)


def test_config_is_checked():
    with pytest.raises(UnknownNameError, match="lenet5"):
        FamilyConfig(architectures=("no_such_net",))
    with pytest.raises(UserError, match="generation"):
        FamilyConfig(generation=0)
    with pytest.raises(UnknownNameError, match="copycat"):
        FamilyConfig(extraction="steal")
    with pytest.raises(UserError, match="thief_examples"):
        FamilyConfig(thief_examples=1)
    recipe = TrainConfig(epochs=3)
    config = FamilyConfig(recipes=(("lenet5", recipe),), seed=2)
    assert config.recipe("lenet5", 7) == TrainConfig(epochs=3, seed=7)
    assert config.recipe("zhang_mnist", 7).epochs == config.train.epochs


def test_split_is_disjoint_seeded_and_sized(digits):
    source_idx, thief_idx = split_training_set(digits, TINY)
    assert len(source_idx) == 700 and len(thief_idx) == 700
    assert not set(source_idx) & set(thief_idx)
    again = split_training_set(digits, TINY)
    assert np.array_equal(source_idx, again[0]) and np.array_equal(thief_idx, again[1])
    none, everything = split_training_set(
        digits, FamilyConfig(thief_examples=None), with_source=False
    )
    assert len(none) == 0 and len(everything) == len(digits.y_train)
    with pytest.raises(UserError, match="exceeds"):
        split_training_set(digits, FamilyConfig(source_examples=1000, thief_examples=1000))


def test_families_have_the_planned_members(families, digits):
    assert families.source.role == "source"
    for split, count in (("generation", 2), ("unseen", 1)):
        for role in ("surrogate", "reference"):
            chosen = families.select(role, split)
            assert len(chosen) == count
            assert all(m.architecture == "_tiny_cnn" for m in chosen)
    seeds = [m.seed for m in families.members]
    assert len(set(seeds)) == len(seeds)
    # Every model learned something (10 classes: chance is 0.1).
    assert families.source.test_accuracy > 0.8
    assert all(m.test_accuracy > 0.6 for m in families.members)
    with pytest.raises(UnknownNameError):
        families.select("thief", "generation")


def test_surrogates_learn_the_source_labels_references_the_truth(families, digits):
    """A surrogate agrees with the source where the source is wrong more than a reference does."""
    x, y = digits.x_train, digits.y_train
    source = classifier.labels(families.source.model, x)
    wrong = source != y
    assert wrong.sum() > 5  # the source errs on some training images it never saw
    for split in ("generation", "unseen"):
        surrogate = np.mean(
            [
                np.mean(classifier.labels(m, x[wrong]) == source[wrong])
                for m in families.models("surrogate", split)
            ]
        )
        reference = np.mean(
            [
                np.mean(classifier.labels(m, x[wrong]) == source[wrong])
                for m in families.models("reference", split)
            ]
        )
        assert surrogate > reference


def test_second_build_comes_from_the_cache(families, digits):
    again = tiny_families(digits)
    assert again.source.from_cache and all(m.from_cache for m in again.members)
    x = digits.x_test[:50]
    for first, second in zip(families.members, again.members, strict=True):
        np.testing.assert_allclose(
            first.model.predict(x, verbose=0), second.model.predict(x, verbose=0), atol=1e-6
        )


def test_soft_label_surrogates_are_distilled_from_the_source(families, digits):
    """Surrogates on the source's softmax copy its probabilities more closely; references stay."""
    soft = build_families(digits, dataclasses.replace(TINY, extraction="soft_labels"))
    x = digits.x_test
    source = families.source.model.predict(x, verbose=0)

    def distance(model):  # mean L1 distance between the model's and the source's probabilities
        return float(np.abs(model.predict(x, verbose=0) - source).sum(axis=1).mean())

    assert soft.source.from_cache
    for split in ("generation", "unseen"):
        hard_s, soft_s = families.select("surrogate", split), soft.select("surrogate", split)
        assert not any(m.from_cache for m in soft_s), "soft labels are other training data"
        assert [m.seed for m in soft_s] == [m.seed for m in hard_s]
        assert np.mean([distance(m.model) for m in soft_s]) < np.mean(
            [distance(m.model) for m in hard_s]
        )
        for first, second in zip(
            families.select("reference", split), soft.select("reference", split), strict=True
        ):
            assert second.from_cache and weights_equal(first.model, second.model)
    again = build_families(digits, dataclasses.replace(TINY, extraction="soft_labels"))
    assert all(m.from_cache for m in again.members)


@pytest.mark.parametrize(
    "extraction", ["copycat", pytest.param("knockoff", marks=pytest.mark.slow)]
)
def test_art_extraction_makes_cached_surrogates(digits, families, extraction):
    config = FamilyConfig(
        architectures=("_tiny_cnn",),
        generation=1,
        unseen=0,
        train=RECIPE,
        source_architecture="_tiny_cnn",
        source_train=RECIPE,
        source_examples=700,
        thief_examples=700,
        extraction=extraction,
    )
    built = build_families(digits, config)
    surrogate = built.select("surrogate", "generation")[0]
    agreement = np.mean(
        classifier.labels(surrogate.model, digits.x_test)
        == classifier.labels(built.source.model, digits.x_test)
    )
    assert agreement > 0.7
    again = build_families(digits, config)
    assert again.select("surrogate", "generation")[0].from_cache


def test_input_range_follows_centring(digits):
    assert input_range(digits) == (0.0, 1.0)
    centred = models.load("digits", center=True)
    low, high = input_range(centred)
    assert low == pytest.approx(-float(centred.mean[0])) and high - low == pytest.approx(1.0)


def test_candidates_are_classified_correctly(families, digits):
    chosen = pick_candidates(families.source.model, digits, 40, seed=3)
    assert len(chosen) == 40 and len(set(chosen)) == 40
    predicted = classifier.labels(families.source.model, digits.x_test[chosen])
    assert np.array_equal(predicted, digits.y_test[chosen])
    with pytest.raises(UserError):
        pick_candidates(families.source.model, digits, 0)
