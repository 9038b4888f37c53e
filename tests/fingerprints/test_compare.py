"""fingerprints.compare: ART's attacks at the same eps, filtered and scored like the CAEs."""

import numpy as np
import pytest

from fingerprints.cae import CaeConfig
from fingerprints.compare import COLUMNS, art_examples, attack_class, compare
from fingerprints.families import pick_candidates
from models import classifier
from models.errors import UnknownNameError, UserError
from tests.fingerprints.test_families import tiny_families

EPS = (0.05, 0.2)


@pytest.fixture(scope="module")
def setup(digits):
    families = tiny_families(digits)
    chosen = pick_candidates(families.source.model, digits, 16, seed=1)
    return families, digits.x_test[chosen]


def test_attack_names():
    assert attack_class("pgd") == "ProjectedGradientDescent"
    assert attack_class("art:DeepFool") == "DeepFool"
    with pytest.raises(UserError, match="unknown attack 'pdg'"):
        attack_class("pdg")


@pytest.mark.parametrize(
    "method",
    ["fgsm", "bim", "pgd", pytest.param("cw", marks=pytest.mark.slow), "art:FastGradientMethod"],
)
def test_examples_respect_each_bound(setup, method):
    families, x = setup
    source = families.source.model
    examples = art_examples(source, x, method, EPS, clip_values=(0.0, 1.0))
    assert sorted(examples) == list(EPS)
    labels = classifier.labels(source, x)
    for eps, x_adv in examples.items():
        assert x_adv.shape == x.shape
        assert np.abs(x_adv - x).max() <= eps + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    fooled = classifier.labels(source, examples[0.2]) != labels
    assert fooled.mean() > 0.3, method


def test_unknown_art_attack_is_a_user_error(setup):
    families, x = setup
    with pytest.raises(UnknownNameError):
        art_examples(families.source.model, x, "art:NoSuchAttack", EPS)


def test_compare_scores_every_method_and_bound(setup):
    families, x = setup
    table = compare(
        families.source.model,
        (families.models("surrogate", "generation"), families.models("reference", "generation")),
        (families.models("surrogate", "unseen"), families.models("reference", "unseen")),
        x,
        EPS,
        methods=("fgsm", "pgd"),
        cae=CaeConfig(iterations=30, learning_rate=1e-2, min_conferrability=0.2),
    )
    assert list(table.columns) == COLUMNS
    assert list(table["method"]) == ["cae", "cae", "fgsm", "fgsm", "pgd", "pgd"]
    assert (table["candidates"] == len(x)).all()
    assert (table["adversarial"] <= table["candidates"]).all()
    assert (table["filtered"] <= table["adversarial"]).all()
    scored = table.dropna(subset=["conferrability"])
    assert ((scored["conferrability"] >= 0) & (scored["conferrability"] <= 1)).all()
    assert (scored["mean_linf"] <= scored["eps"] + 1e-6).all()
    with pytest.raises(UserError, match="unknown attack"):
        compare(families.source.model, ([], []), ([], []), x, EPS, methods=("nope",))


def test_max_steps_caps_the_attacks_iterations(setup):
    """--max-steps 2: BIM's 10 iterations run as 2 (the same images as max_iter=2)."""
    from models.training import set_max_steps

    families, x = setup
    source = families.source.model
    two = art_examples(source, x, "bim", (0.2,), params={"max_iter": 2})[0.2]
    set_max_steps(2)
    try:
        capped = art_examples(source, x, "bim", (0.2,))[0.2]
    finally:
        set_max_steps(None)
    np.testing.assert_array_equal(capped, two)
    assert not np.array_equal(capped, art_examples(source, x, "bim", (0.2,))[0.2])
