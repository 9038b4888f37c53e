"""ART classes as removal attacks by name, and distillation on soft labels."""

from __future__ import annotations

import numpy as np
import pytest

import attacks
import models
from models import classifier
from models.errors import UnknownNameError, UserError
from models.suspect import QueryModel
from models.training import TrainConfig
from tests.conftest import weights_equal


@pytest.fixture(scope="module")
def victim(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=15, batch_size=32))
    return model


@pytest.fixture(scope="module")
def adversary(digits):
    return digits.subset(fraction=0.3, seed=2)


def test_art_names_resolve_by_kind_and_evasion_names_are_refused():
    assert attacks.get("art:JpegCompression").art_kind == "preprocessor"
    assert attacks.get("art:CopycatCNN").art_kind == "extraction"
    assert "art:CopycatCNN" not in attacks.names()
    with pytest.raises(UserError, match="evasion attack"):
        attacks.get("art:FastGradientMethod")
    with pytest.raises(UnknownNameError, match="art:JpegCompression"):
        attacks.get("art:NoSuchThing")


def test_bad_art_parameters_are_one_line_errors(victim, adversary):
    with pytest.raises(UserError, match="bad ART parameter"):
        attacks.get("art:FeatureSqueezing")(params="bit_depth")
    unit = attacks.get("art:FeatureSqueezing")(params="bit_depht=2")
    with pytest.raises(UserError, match="bad parameters for art:FeatureSqueezing"):
        unit.remove(victim, adversary)


def test_a_preprocessor_transforms_every_query_and_keeps_the_weights(victim, adversary):
    removal = attacks.get("art:FeatureSqueezing")(params="bit_depth=1").remove(victim, adversary)
    assert isinstance(removal.model, QueryModel) and removal.model.model is victim
    x = adversary.x_test[:50]
    squeezed = np.round(x)  # bit depth 1 on [0, 1]
    np.testing.assert_allclose(
        classifier.predict(removal.model, x), classifier.probabilities(victim, squeezed), atol=1e-5
    )


def test_extraction_trains_a_fresh_thief_that_learns_the_victim(victim, adversary, digits):
    unit = attacks.get("art:CopycatCNN").from_preset(
        "smoke", epochs=30, queries=0, learning_rate=1e-2
    )
    removal = unit.remove(victim, adversary)
    assert removal.model is not victim and removal.info["queries"] == len(adversary.y_train)
    agreement = np.mean(
        classifier.labels(removal.model, digits.x_test) == classifier.labels(victim, digits.x_test)
    )
    assert agreement > 0.5


def test_knockoff_nets_on_labels_is_copycat_cnn_so_the_matrix_gives_it_probabilities(
    victim, adversary
):
    """The quick matrix's two extraction columns were identical in every row."""
    from reproduce.cells import column_unit
    from reproduce.matrix import ART_COLUMNS

    def thief(name, **options):
        return attacks.get(name).from_preset("smoke", **options).remove(victim, adversary).model

    copycat = thief("art:CopycatCNN")
    assert weights_equal(thief("art:KnockoffNets"), copycat)
    (column,) = [c for c in ART_COLUMNS if c.startswith("art:KnockoffNets")]
    name, options = column_unit(column)
    assert options == {"use_probability": True}
    assert not weights_equal(thief(name, **options), copycat)


def test_strip_refuses_some_queries_and_refusals_never_match(victim, adversary, digits):
    removal = attacks.get("art:STRIP").from_preset("smoke", queries=100).remove(victim, adversary)
    out = removal.model.predict(digits.x_test[:60])
    refused = ~np.all(np.isfinite(out), axis=1)
    assert 0.0 <= removal.info["clean_refusal_rate"] < 0.5
    assert refused.sum() < len(out)  # it still answers clean queries


def test_distillation_student_learns_from_soft_labels(victim, adversary, digits):
    unit = attacks.get("distillation").from_preset("smoke", epochs=20)
    removal = unit.remove(victim, adversary)
    assert classifier.accuracy(removal.model, digits.x_test, digits.y_test) > 0.5
    assert removal.info["queries"] == len(adversary.y_train)
