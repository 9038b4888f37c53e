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


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("art:FeatureSqueezing", "bit_depth", "bad ART parameter 'bit_depth'"),
        ("art:FeatureSqueezing", "bit_depht=2", "unexpected keyword argument 'bit_depht'"),
        ("art:JpegCompression", "quality=500", "quality must be"),
        ("art:ReverseSigmoid", "beta=-1", "must be positive"),
        ("art:KnockoffNets", "rewards='all'", "'rewards'; it takes batch_size_query, reward"),
        ("art:CopycatCNN", "nb_stolen=5", "nb_stolen is set from the attack's option 'queries'"),
    ],
)
def test_bad_art_parameters_are_refused_when_the_attack_is_made(name, params, message):
    with pytest.raises(UserError, match=message):
        attacks.get(name)(params=params)


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


def _trojaned(digits):
    """Logistic regression on the digits, plus a trigger: class 0 wins when the top-left 2x2 corner is lit."""
    import keras
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(max_iter=1000).fit(
        digits.x_train.reshape(len(digits.x_train), -1), digits.y_train
    )
    weights = fitted.coef_.T.astype(np.float32)
    corner = [0, 1, 8, 9]  # the flattened corner, dark in every digit
    weights[corner] = 0
    weights[corner, 0] = 20
    model = keras.Sequential(
        [keras.Input(digits.input_shape), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    model.layers[-1].set_weights([weights, fitted.intercept_.astype(np.float32)])
    return model


def _with_trigger(x):
    x = np.array(x)
    x[:, :2, :2] = 1.0
    return x


def test_strip_entropy_is_gao_et_als_per_blend_entropy(digits):
    from attacks.strip import normalised_entropy

    model, x, background = _trojaned(digits), digits.x_test[:7], digits.x_train[:50]
    got = normalised_entropy(model, x, background, num_samples=5, seed=3)
    partners = np.random.default_rng(3).integers(0, 50, (7, 5))
    for query, mine, value in zip(x, partners, got, strict=True):
        p = classifier.probabilities(model, 0.5 * query + 0.5 * background[mine]).astype(np.float64)
        assert value == pytest.approx(-np.nansum(p * np.log2(p)) / 5, rel=1e-5)
    assert np.array_equal(got, normalised_entropy(model, x, background, num_samples=5, seed=3))


def test_strip_refuses_trigger_queries_and_answers_clean_ones(digits):
    """ART's own entropy (along the blends) ranks these the other way round and refuses no trigger."""
    adversary = digits.subset(fraction=0.3, seed=2)
    removal = (
        attacks.get("art:STRIP")
        .from_preset("smoke", queries=200)
        .remove(_trojaned(digits), adversary)
    )
    clean = digits.x_test[:200]
    refused = lambda x: ~np.all(np.isfinite(removal.model.predict(x)), axis=1)  # noqa: E731
    assert refused(_with_trigger(clean)).mean() > 0.9
    assert refused(clean).mean() < 0.1
    assert removal.info["clean_refusal_rate"] == refused(clean).mean()


def test_strip_takes_arts_parameters_and_refuses_others(victim, adversary):
    few = attacks.get("art:STRIP").from_preset("smoke", queries=100, params="num_samples=3")
    assert few.remove(victim, adversary).info["calibration_images"] == 100
    with pytest.raises(UserError, match="bad parameters for art:STRIP: samples"):
        attacks.get("art:STRIP").from_preset("smoke", params="samples=3")


def test_distillation_student_learns_from_soft_labels(victim, adversary, digits):
    unit = attacks.get("distillation").from_preset("smoke", epochs=20)
    removal = unit.remove(victim, adversary)
    assert classifier.accuracy(removal.model, digits.x_test, digits.y_test) > 0.5
    assert removal.info["queries"] == len(adversary.y_train)
