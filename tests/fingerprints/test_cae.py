"""fingerprints.cae: eqs. 1-6, dropout, batching, filtering, CAEAcc, thresholds and the verdict."""

import dataclasses
import math

import numpy as np
import pytest

from fingerprints.cae import (
    CAE,
    CaeConfig,
    assess,
    caeacc,
    choose_threshold,
    conferrability,
    dropout_masks,
    optimize,
    score,
    separation,
    transferability,
)
from fingerprints.families import pick_candidates
from models import classifier
from models.config import replace
from models.errors import UserError
from tests.fingerprints.test_families import TINY, tiny_data, tiny_families

# Tiny digit CNNs trained on the same images are too alike for the code's 0.85 filter;
# 0.2 keeps enough to test with. Adam at 1e-2: 8x8 pixels must move in 60 steps.
CONFIG = replace(
    CaeConfig(),
    eps=0.25,
    iterations=60,
    learning_rate=1e-2,
    min_conferrability=0.2,
    candidates=48,
    families=TINY,
)


@pytest.fixture(scope="module")
def families(digits):
    return tiny_families(digits)


@pytest.fixture(scope="module")
def candidates(families, digits):
    return digits.x_test[pick_candidates(families.source.model, digits, 48, seed=0)]


@pytest.fixture(scope="module")
def fingerprints(families, digits):
    return CAE(CONFIG).fingerprint(families.source.model, families, tiny_data(digits))


def _generation(families):
    return (
        families.source.model,
        families.models("surrogate", "generation"),
        families.models("reference", "generation"),
    )


def test_config_is_checked():
    for options, message in (
        ({"eps": 0}, "eps must lie in"),
        ({"dropout": 1.0}, "dropout"),
        ({"iterations": 0}, "iterations"),
        ({"min_conferrability": 1.5}, "min_conferrability"),
        ({"target": "best"}, "unknown target 'best'"),
        ({"threshold": -0.1}, "threshold"),
    ):
        with pytest.raises(UserError, match=message):
            CaeConfig(**options)
    with pytest.raises(UserError, match="unknown option"):
        CAE(epsilon=0.1)
    # The report's code: Adam 5e-4, eps 0.15, filter 0.85, the source's current label.
    config = CaeConfig()
    assert (config.learning_rate, config.eps, config.min_conferrability) == (5e-4, 0.15, 0.85)
    assert config.target == "source" and 100 <= config.iterations <= 300
    assert CAE.preset_config("quick").families.generation >= 8
    paper = CAE.preset_config("paper")
    assert (paper.families.generation, paper.families.unseen) == (14, 5)


def test_conferrability_is_equation_2(families, candidates):
    _, surrogates, references = _generation(families)
    x = candidates
    labels = np.arange(len(x)) % 10
    rows = np.arange(len(x))
    s = np.mean([classifier.probabilities(m, x)[rows, labels] for m in surrogates], axis=0)
    r = np.mean([classifier.probabilities(m, x)[rows, labels] for m in references], axis=0)
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


@pytest.mark.parametrize("target", ["source", "max", "max_other"])
def test_optimize_stays_in_the_ball_and_raises_conferrability(families, candidates, target):
    source, surrogates, references = _generation(families)
    x = candidates
    config = dataclasses.replace(CONFIG, target=target)
    x_adv = optimize(source, surrogates, references, x, config=config, clip_values=(0.0, 1.0))
    assert np.abs(x_adv - x).max() <= CONFIG.eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    labels = classifier.labels(source, x)
    before = score(source, surrogates, references, x, x, labels)
    after = score(source, surrogates, references, x_adv, x, labels)
    assert not before.adversarial.any()
    assert after.adversarial.mean() > 0.3
    assert after.conferrability[after.adversarial].mean() > before.conferrability.mean()


def test_batched_and_one_at_a_time_agree_and_eps_per_example(families, candidates):
    every = _generation(families)
    config = dataclasses.replace(CONFIG, iterations=5, dropout=0.0)
    x = candidates[:4]
    batched = optimize(*every, x, config=config)
    single = optimize(*every, x, config=dataclasses.replace(config, batch_size=1))
    # Each candidate's path is its own; only floating-point summation order differs.
    assert np.abs(batched - single).max() < 0.02
    np.testing.assert_array_equal(
        classifier.labels(every[0], batched), classifier.labels(every[0], single)
    )
    budgets = np.array([0.01, 0.05, 0.1, 0.3], np.float32)
    mixed = optimize(*every, x, config=config, eps=budgets)
    assert np.all(np.abs(mixed - x).reshape(4, -1).max(axis=1) <= budgets + 1e-6)


def test_fingerprints_pass_the_filter(fingerprints, families, digits):
    source = families.source.model
    data = tiny_data(digits)
    assert len(fingerprints) >= 5, fingerprints.metadata
    assert fingerprints.metadata["kept"] == len(fingerprints)
    assert np.abs(fingerprints.inputs - fingerprints.originals).max() <= CONFIG.eps + 1e-6
    np.testing.assert_array_equal(
        fingerprints.originals, data.x_test[fingerprints.arrays["candidate_index"]]
    )
    np.testing.assert_array_equal(
        classifier.labels(source, fingerprints.inputs), fingerprints.labels
    )
    assert np.all(fingerprints.labels != fingerprints.original_labels)
    confer = conferrability(*_generation(families)[1:], fingerprints.inputs, fingerprints.labels)
    assert confer.min() >= CONFIG.min_conferrability - 1e-4
    facts = fingerprints.metadata
    assert facts["dataset"] == "digits" and facts["config"]["eps"] == CONFIG.eps
    assert facts["counts"]["0.8"] <= facts["adversarial"] <= facts["candidates"] == 48


def test_threshold_and_verdicts(fingerprints, families):
    scheme = CAE(CONFIG)
    surrogates = [caeacc(m, fingerprints) for m in families.models("surrogate", "generation")]
    references = [caeacc(m, fingerprints) for m in families.models("reference", "generation")]
    assert np.mean(surrogates) > np.mean(references)
    assert fingerprints.metadata["generation_caeacc"]["surrogates"] == pytest.approx(surrogates)
    assert fingerprints.threshold == pytest.approx(choose_threshold(surrogates, references))
    on_source = scheme.verify(families.source.model, fingerprints)
    assert on_source.kind == "fingerprint" and on_source.present and on_source.statistic == 1.0
    assert on_source.n == len(fingerprints)
    # Empirical p-value over the one held-out reference: (1 + #{null >= 1.0}) / 2.
    held_out = fingerprints.metadata["unseen_caeacc"]["references"]
    assert fingerprints.metadata["null_caeacc"] == held_out and "held-out" in on_source.null
    assert on_source.p_value == pytest.approx((1 + sum(v >= 1.0 for v in held_out)) / 2)
    for model, acc in zip(families.models("reference", "generation"), references, strict=True):
        result = scheme.verify(model, fingerprints)
        assert result.statistic == pytest.approx(acc)
        assert result.present == (acc >= fingerprints.threshold)


def test_a_fixed_threshold_is_the_decision(families, digits):
    config = dataclasses.replace(CONFIG, threshold=0.75, candidates=16)
    prints = CAE(config).fingerprint(families.source.model, families, tiny_data(digits))
    assert prints.threshold == 0.75
    assert prints.metadata["chosen_threshold"] != 0.75


def test_a_stricter_filter_keeps_a_subset(fingerprints, families):
    level = float(np.median(fingerprints.arrays["conferrability"]))
    strict = CAE(CONFIG).filtered(fingerprints, families, level)
    assert len(strict) == np.sum(fingerprints.arrays["conferrability"] >= level) > 0
    assert np.all(strict.arrays["conferrability"] >= level)
    assert set(strict.arrays["candidate_index"]) <= set(fingerprints.arrays["candidate_index"])
    assert strict.metadata["min_conferrability"] == level
    assert strict.metadata["candidates"] == fingerprints.metadata["candidates"]
    nothing = CAE(CONFIG).filtered(fingerprints, families, 1.0)
    assert len(nothing) == 0 and math.isnan(nothing.threshold)


def test_assess_scores_every_member(fingerprints, families):
    rows, summary = assess(families, fingerprints, code_threshold=0.75)
    assert len(rows) == len(families.members)
    assert {r["role"] for r in rows} == {"surrogate", "reference"}
    threshold = fingerprints.metadata["chosen_threshold"]
    for row in rows:
        assert row["surrogate_chosen"] == (row["caeacc"] >= threshold)
        assert row["surrogate_code"] == (row["caeacc"] >= 0.75)
    assert summary["fingerprints"] == len(fingerprints)
    assert summary["adversarial_share"] == 1.0 and summary["max_linf_over_eps"] <= 1 + 1e-6
    assert summary["caeacc_unseen_difference"] == pytest.approx(
        summary["caeacc_unseen_surrogates"] - summary["caeacc_unseen_references"]
    )
    assert 0 <= summary["roc_auc_unseen"] <= 1


def test_separation_is_scikit_learns_roc():
    out = separation([0.9, 0.8], [0.1, 0.85], threshold=0.5)
    assert out["roc_auc"] == pytest.approx(0.75)
    assert out["tpr_at_fpr"] == pytest.approx(0.5)  # above every reference: one surrogate
    assert out["balanced_accuracy"] == pytest.approx(0.75)
    assert math.isnan(separation([], [0.1])["roc_auc"])
    assert math.isnan(separation([0.9], [0.1])["balanced_accuracy"])  # no threshold


def test_choose_threshold():
    assert choose_threshold([0.9, 1.0], [0.1, 0.3]) == pytest.approx(0.6)
    # Overlapping groups: the best balanced accuracy, nearest the centre.
    # 0.35 and 0.75 both reach 5/6 balanced; 0.35 lies nearer the centre (0.533).
    assert choose_threshold([0.5, 0.9, 1.0], [0.2, 0.6, 0.0]) == pytest.approx(0.35)
    assert math.isnan(choose_threshold([], [0.1]))
    assert math.isnan(choose_threshold([0.5], [float("nan")]))


def test_verify_refuses_files_without_fingerprints_or_threshold(fingerprints, families):
    empty = CAE(CONFIG).filtered(fingerprints, families, 1.0)
    with pytest.raises(UserError, match="no fingerprints"):
        CAE().verify(families.source.model, empty)
    no_threshold = dataclasses.replace(fingerprints, metadata={"threshold": None})
    with pytest.raises(UserError, match="threshold"):
        CAE().verify(families.source.model, no_threshold)


def test_logit_models_are_softmaxed(families, candidates):
    import keras

    source = families.source.model
    logits = keras.Model(source.inputs, source.get_layer("logits").output)
    x = candidates
    np.testing.assert_allclose(
        classifier.probabilities(logits, x), classifier.probabilities(source, x), atol=1e-5
    )
    out = optimize(
        logits,
        families.models("surrogate", "generation")[:1],
        families.models("reference", "generation")[:1],
        x[:2],
        config=dataclasses.replace(CONFIG, iterations=3),
    )
    assert out.shape == x[:2].shape


def test_max_steps_caps_the_generation(families, candidates):
    """--max-steps 2: 300 configured Adam steps run as 2 (the same images as iterations=2)."""
    from models.training import set_max_steps

    every = _generation(families)
    x = candidates[:4]
    config = dataclasses.replace(CONFIG, iterations=300, dropout=0.0)
    two = optimize(*every, x, config=dataclasses.replace(config, iterations=2))
    three = optimize(*every, x, config=dataclasses.replace(config, iterations=3))
    set_max_steps(2)
    try:
        capped = optimize(*every, x, config=config)
    finally:
        set_max_steps(None)
    np.testing.assert_array_equal(capped, two)
    assert not np.array_equal(capped, three)
