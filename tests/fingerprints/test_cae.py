"""fingerprints.cae: eqs. 1-6, dropout, batching, filtering, CAEAcc and the decision threshold."""

import dataclasses
import math

import numpy as np
import pytest

from fingerprints.cae import (
    CAE,
    CaeConfig,
    caeacc,
    choose_threshold,
    conferrability,
    dropout_masks,
    optimize,
    predict_probabilities,
    score,
    transferability,
)
from fingerprints.families import input_range, pick_candidates
from models.errors import UserError
from tests.fingerprints.test_families import tiny_families

# Tiny digit CNNs are too alike for the paper's 0.95 filter; 0.5 keeps enough to test with.
CONFIG = CaeConfig(
    eps=0.25, iterations=60, learning_rate=1e-2, exclude_original=True, min_conferrability=0.5
)


@pytest.fixture(scope="module")
def setup(digits):
    families = tiny_families(digits)
    chosen = pick_candidates(families.source.model, digits, 48, seed=0)
    return families, digits.x_test[chosen]


@pytest.fixture(scope="module")
def fingerprints(setup):
    families, x = setup
    return CAE(CONFIG).generate(
        families.source.model,
        families.models("surrogate", "generation"),
        families.models("reference", "generation"),
        x,
        metadata={"dataset": "digits"},
    )


def test_config_is_checked():
    with pytest.raises(UserError, match="eps"):
        CaeConfig(eps=0)
    with pytest.raises(UserError, match="dropout"):
        CaeConfig(dropout=1.0)
    with pytest.raises(UserError, match="iterations"):
        CaeConfig(iterations=0)
    with pytest.raises(UserError, match="min_conferrability"):
        CaeConfig(min_conferrability=1.5)
    with pytest.raises(UserError, match="unknown option"):
        CAE(epsilon=0.1)


def test_conferrability_is_equation_2(setup):
    families, x = setup
    surrogates = families.models("surrogate", "generation")
    references = families.models("reference", "generation")
    labels = np.arange(len(x)) % 10
    rows = np.arange(len(x))
    s = np.mean([predict_probabilities(m, x)[rows, labels] for m in surrogates], axis=0)
    r = np.mean([predict_probabilities(m, x)[rows, labels] for m in references], axis=0)
    np.testing.assert_allclose(transferability(surrogates, x, labels), s, rtol=1e-5)
    np.testing.assert_allclose(
        conferrability(surrogates, references, x, labels), s * (1 - r), rtol=1e-5, atol=1e-7
    )


def test_dropout_masks_follow_algorithm_1():
    config = CaeConfig(iterations=4000, seed=5)
    keep_s, keep_r = dropout_masks(config, 6, 2)
    assert keep_s.shape == (4000, 6) and keep_r.shape == (4000, 2)
    assert keep_s.mean() == pytest.approx(0.7, abs=0.02)
    assert keep_s.any(axis=1).all() and keep_r.any(axis=1).all()  # a mean is always defined
    again = dropout_masks(config, 6, 2)
    assert np.array_equal(keep_s, again[0]) and np.array_equal(keep_r, again[1])
    other = dropout_masks(dataclasses.replace(config, seed=6), 6, 2)
    assert not np.array_equal(keep_s, other[0])


def test_optimize_stays_in_the_ball_and_raises_conferrability(setup):
    families, x = setup
    source = families.source.model
    surrogates = families.models("surrogate", "generation")
    references = families.models("reference", "generation")
    x_adv = optimize(source, surrogates, references, x, config=CONFIG, clip_values=(0.0, 1.0))
    assert np.abs(x_adv - x).max() <= CONFIG.eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    labels = np.argmax(predict_probabilities(source, x), axis=1)
    before = score(source, surrogates, references, x, x, labels)
    after = score(source, surrogates, references, x_adv, x, labels)
    assert not before.adversarial.any()
    assert after.adversarial.mean() > 0.5
    assert after.conferrability.mean() > before.conferrability.mean() + 0.1


def test_batched_equals_one_at_a_time_and_eps_per_example(setup):
    families, x = setup
    args = (
        families.source.model,
        families.models("surrogate", "generation"),
        families.models("reference", "generation"),
    )
    config = dataclasses.replace(CONFIG, iterations=15)
    x = x[:4]
    batched = optimize(*args, x, config=config)
    single = optimize(*args, x, config=dataclasses.replace(config, batch_size=1))
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # Several bounds in one run: each example keeps to its own.
    budgets = np.array([0.01, 0.05, 0.1, 0.3], np.float32)
    mixed = optimize(*args, x, config=config, eps=budgets)
    assert np.all(np.abs(mixed - x).reshape(4, -1).max(axis=1) <= budgets + 1e-6)
    alone = optimize(*args, x[3:], config=dataclasses.replace(config, eps=0.3))
    np.testing.assert_allclose(mixed[3:], alone, atol=1e-5)


def test_fingerprints_pass_the_filter(fingerprints, setup):
    families, x = setup
    source = families.source.model
    assert len(fingerprints) >= 5, fingerprints.metadata
    assert fingerprints.metadata["kept"] == len(fingerprints)
    assert np.abs(fingerprints.inputs - fingerprints.originals).max() <= CONFIG.eps + 1e-6
    np.testing.assert_array_equal(fingerprints.originals, x[fingerprints.arrays["candidate_index"]])
    predicted = np.argmax(predict_probabilities(source, fingerprints.inputs), axis=1)
    np.testing.assert_array_equal(predicted, fingerprints.labels)
    assert np.all(fingerprints.labels != fingerprints.original_labels)
    confer = conferrability(
        families.models("surrogate", "generation"),
        families.models("reference", "generation"),
        fingerprints.inputs,
        fingerprints.labels,
    )
    assert confer.min() >= CONFIG.min_conferrability - 1e-4
    assert fingerprints.metadata["dataset"] == "digits"


def test_caeacc_and_the_threshold_on_generation_families(fingerprints, setup):
    families, _ = setup
    assert caeacc(families.source.model, fingerprints) == 1.0
    surrogates = [caeacc(m, fingerprints) for m in families.models("surrogate", "generation")]
    references = [caeacc(m, fingerprints) for m in families.models("reference", "generation")]
    assert np.mean(surrogates) > np.mean(references)
    assert fingerprints.metadata["generation_caeacc"]["surrogates"] == pytest.approx(surrogates)
    threshold = fingerprints.threshold
    assert threshold == pytest.approx(choose_threshold(surrogates, references))
    scheme = CAE(CONFIG)
    assert scheme.verify(families.source.model, fingerprints).surrogate
    for model, acc in zip(families.models("reference", "generation"), references, strict=True):
        result = scheme.verify(model, fingerprints)
        assert result.accuracy == pytest.approx(acc)
        assert result.surrogate == (acc >= threshold)


def test_choose_threshold():
    assert choose_threshold([0.9, 1.0], [0.1, 0.3]) == pytest.approx(0.6)
    # Overlapping groups: the best balanced accuracy, nearest the centre.
    # 0.35 and 0.75 both reach 5/6 balanced; 0.35 lies nearer the centre (0.533).
    threshold = choose_threshold([0.5, 0.9, 1.0], [0.2, 0.6, 0.0])
    assert threshold == pytest.approx(0.35)
    assert math.isnan(choose_threshold([], [0.1]))
    assert math.isnan(choose_threshold([0.5], [float("nan")]))


def test_verify_refuses_files_without_fingerprints_or_threshold(fingerprints, setup):
    families, _ = setup
    empty = dataclasses.replace(
        fingerprints,
        inputs=fingerprints.inputs[:0],
        originals=fingerprints.originals[:0],
        labels=fingerprints.labels[:0],
        original_labels=fingerprints.original_labels[:0],
        arrays={},
    )
    with pytest.raises(UserError, match="no fingerprints"):
        CAE().verify(families.source.model, empty)
    no_threshold = dataclasses.replace(fingerprints, metadata={"threshold": None})
    with pytest.raises(UserError, match="threshold"):
        CAE().verify(families.source.model, no_threshold)


def test_logit_models_are_softmaxed(setup, digits):
    import keras

    families, x = setup
    source = families.source.model
    logits = keras.Model(source.inputs, source.get_layer("logits").output)
    np.testing.assert_allclose(
        predict_probabilities(logits, x), predict_probabilities(source, x), atol=1e-5
    )
    clip = input_range(digits)
    out = optimize(
        logits,
        families.models("surrogate", "generation")[:1],
        families.models("reference", "generation")[:1],
        x[:2],
        config=dataclasses.replace(CONFIG, iterations=3),
        clip_values=clip,
    )
    assert out.shape == x[:2].shape
