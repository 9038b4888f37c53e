"""fingerprints.families: distilled surrogates and references on the source's images, cached."""

import dataclasses

import numpy as np
import pytest

import models
from fingerprints.families import FamilyConfig, build_families, pick_candidates
from models import classifier
from models.config import replace
from models.errors import UnknownNameError, UserError
from models.training import TrainConfig
from tests.conftest import weights_equal

RECIPE = TrainConfig(epochs=8, batch_size=32, learning_rate=3e-3)
TINY = FamilyConfig(architectures=("_tiny_cnn",), generation=2, unseen=1, train=RECIPE)


def tiny_data(digits):
    """The source's training images: 700 digits (the families learn from the same ones)."""
    return digits.subset(max_train=700, seed=0)


def tiny_source(digits):
    """The owner's tiny CNN, trained on :func:`tiny_data` (cached for the session)."""
    models.seed_everything(0)
    source = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(source, tiny_data(digits), RECIPE, verbose=0)
    return source


def tiny_families(digits, config: FamilyConfig = TINY):
    """Source + 2 + 2 generation + 1 + 1 unseen tiny CNNs on digits (cached for the session)."""
    return build_families(tiny_source(digits), tiny_data(digits), config)


@pytest.fixture(scope="module")
def families(digits):
    return tiny_families(digits)


def test_config_is_checked():
    with pytest.raises(UnknownNameError, match="lenet5"):
        FamilyConfig(architectures=("no_such_net",))
    with pytest.raises(UserError, match="generation"):
        FamilyConfig(generation=0)
    with pytest.raises(UserError, match="unknown extraction 'steal'"):
        FamilyConfig(extraction="steal")
    with pytest.raises(UserError, match="images"):
        FamilyConfig(images=1)
    config = replace(FamilyConfig(), **{"train.epochs": 3, "architectures": ["lenet5"]})
    assert config.train.epochs == 3 and config.architectures == ("lenet5",)
    assert FamilyConfig().extraction == "soft_labels"  # the report's code distils


def test_families_have_the_planned_members(families):
    assert families.source.role == "source"
    for split, count in (("generation", 2), ("unseen", 1)):
        for role in ("surrogate", "reference"):
            chosen = families.select(role, split)
            assert len(chosen) == count
            assert all(m.architecture == "_tiny_cnn" for m in chosen)
    seeds = [m.seed for m in families.members]
    assert len(set(seeds)) == len(seeds)
    assert families.source.test_accuracy > 0.8
    assert all(m.test_accuracy > 0.6 for m in families.members)
    with pytest.raises(UnknownNameError):
        families.select("thief", "generation")


def _distance(model, source, x) -> float:
    """Mean L1 distance between a model's and the source's probabilities."""
    return float(np.abs(classifier.probabilities(model, x) - source).sum(axis=1).mean())


def test_surrogates_are_distilled_from_the_source(families, digits):
    """Surrogates copy the source's probabilities more closely than references do."""
    x = digits.x_test
    source = classifier.probabilities(families.source.model, x)
    for split in ("generation", "unseen"):
        surrogates = [_distance(m, source, x) for m in families.models("surrogate", split)]
        references = [_distance(m, source, x) for m in families.models("reference", split)]
        assert np.mean(surrogates) < np.mean(references)


def test_hard_label_variant_retrains_only_the_surrogates(families, digits):
    hard = tiny_families(digits, dataclasses.replace(TINY, extraction="labels"))
    for split in ("generation", "unseen"):
        soft_s, hard_s = families.select("surrogate", split), hard.select("surrogate", split)
        assert not any(m.from_cache for m in hard_s), "hard labels are other training targets"
        assert [m.seed for m in soft_s] == [m.seed for m in hard_s]
        for first, second in zip(
            families.select("reference", split), hard.select("reference", split), strict=True
        ):
            assert second.from_cache and weights_equal(first.model, second.model)


def test_second_build_comes_from_the_cache(families, digits):
    again = tiny_families(digits)
    assert all(m.from_cache for m in again.members)
    # restored members keep no optimizer state (a cached restore loads it)
    assert not any(m.model.optimizer.built for m in [*families.members, *again.members])
    x = digits.x_test[:50]
    for first, second in zip(families.members, again.members, strict=True):
        np.testing.assert_allclose(
            classifier.predict(first.model, x), classifier.predict(second.model, x), atol=1e-6
        )


def test_default_members_copy_the_source_architecture(digits):
    config = FamilyConfig(generation=1, unseen=0, train=dataclasses.replace(RECIPE, epochs=1))
    built = tiny_families(digits, config)
    member = built.select("surrogate", "generation")[0]
    assert member.architecture == "source"
    assert member.model.get_config() == built.source.model.get_config()
    assert not weights_equal(member.model, built.source.model)


def test_images_take_a_stratified_subset(digits):
    config = dataclasses.replace(TINY, generation=1, unseen=0, images=300)
    built = build_families(tiny_source(digits), digits, config)
    assert not built.members[0].from_cache  # other images than the 700 of the fixture
    same = build_families(
        tiny_source(digits), digits.subset(max_train=300), dataclasses.replace(config, images=None)
    )
    assert all(m.from_cache for m in same.members)


@pytest.mark.parametrize(
    "extraction", ["copycat", pytest.param("knockoff", marks=pytest.mark.slow)]
)
def test_art_extraction_makes_cached_surrogates(digits, extraction):
    config = dataclasses.replace(TINY, generation=1, unseen=0, extraction=extraction)
    built = tiny_families(digits, config)
    surrogate = built.select("surrogate", "generation")[0]
    source = built.source.model
    agreement = np.mean(
        classifier.labels(surrogate.model, digits.x_test)
        == classifier.labels(source, digits.x_test)
    )
    assert agreement > 0.7
    assert tiny_families(digits, config).select("surrogate", "generation")[0].from_cache


def test_candidates_are_classified_correctly(families, digits):
    chosen = pick_candidates(families.source.model, digits, 40, seed=3)
    assert len(chosen) == 40 and len(set(chosen)) == 40
    predicted = classifier.labels(families.source.model, digits.x_test[chosen])
    assert np.array_equal(predicted, digits.y_test[chosen])
    with pytest.raises(UserError):
        pick_candidates(families.source.model, digits, 0)


def test_a_source_with_no_correct_test_image_stops_the_run_unless_max_steps_cut_it(
    families, digits, monkeypatch
):
    """At --max-steps 2 the paper preset's ImageNet32 source (100 classes) got none right."""
    from models import training

    wrong = lambda model, x, **kw: (digits.y_test[: len(x)] + 1) % 10  # noqa: E731
    monkeypatch.setattr(classifier, "labels", wrong)
    with pytest.raises(UserError, match="no test image correctly"):
        pick_candidates(families.source.model, digits, 5)
    training.set_max_steps(2)
    chosen = pick_candidates(families.source.model, digits, 5, seed=3)
    assert len(chosen) == 5 and len(set(chosen)) == 5
