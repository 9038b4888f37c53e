"""The redesign's shared pieces: configs, the classifier view, evidence statistics, files, the gate."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import keras
import numpy as np
import pytest
from scipy import stats

import models
from models import classifier
from models.config import as_dict, build_config, option, replace, validate
from models.errors import UserError
from models.evidence import (
    Verification,
    answers,
    binomial_p_value,
    binomial_threshold,
    empirical_p_value,
    null_p_value,
)
from models.io import array_digest, atomic_write, check_output, load_npz, save_npz
from models.sanity import check_model
from models.training import TrainConfig


@dataclass(frozen=True)
class _Inner:
    rate: float = option(0.5, low=0, high=1)

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class _Outer:
    n: int = option(3, low=1)
    mode: str = option("a", choices=("a", "b"))
    sizes: tuple[int, ...] = option((1, 2))
    inner: _Inner = option(factory=_Inner)
    name: str | None = option(None)

    def __post_init__(self):
        validate(self)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n": 0}, "n must lie in"),
        ({"n": 1.5}, "n must be an integer"),
        ({"n": True}, "n must be an integer"),
        ({"mode": "c"}, "unknown mode 'c'; expected one of: a, b"),
        ({"sizes": "12"}, "sizes must be a list"),
        ({"inner": {"rate": 2}}, "rate must lie in"),
        ({"inner": {"speed": 1}}, "unknown option(s) 'speed'"),
        ({"nn": 1}, "unknown option(s) 'nn'"),
    ],
)
def test_bad_config_values_name_the_field(values, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(_Outer, values)


def test_json_values_come_back_as_the_same_config():
    config = _Outer(n=4, sizes=(3,), inner=_Inner(rate=0.25))
    again = build_config(_Outer, as_dict(config))  # lists and dicts, as JSON gives them
    assert again == config and isinstance(again.sizes, tuple) and isinstance(again.inner, _Inner)
    assert isinstance(build_config(_Inner, {"rate": 1}).rate, float)


def test_replace_reaches_nested_configs_by_dotted_name():
    config = replace(_Outer(), **{"inner.rate": 0.1, "n": 2})
    assert config.inner.rate == 0.1 and config.n == 2
    with pytest.raises(UserError, match="unknown option"):
        replace(_Outer(), **{"inner.nope": 1})


def test_train_config_allows_zero_epochs_but_not_negative():
    assert TrainConfig(epochs=0).epochs == 0
    with pytest.raises(UserError):
        TrainConfig(epochs=-1)


# --------------------------------------------------------------------------- statistics


def test_normal_p_value_matches_scipy_and_degenerate_null_is_never_zero():
    null = np.array([0.01, 0.02, 0.03, 0.05])
    p, method = null_p_value(0.2, null)
    assert p == pytest.approx(stats.norm.sf(0.2, null.mean(), null.std(ddof=1)))
    assert "normal" in method
    p, method = null_p_value(1.0, np.zeros(15))
    assert p == pytest.approx(1 / 16) and "empirical" in method
    assert empirical_p_value(0.0, np.zeros(3)) == 1.0


def test_binomial_test_and_threshold_agree():
    n, p0, alpha = 20, 0.5, 0.01
    t = binomial_threshold(n, p0, alpha)
    k = round(t * n)
    assert binomial_p_value(k, n, p0) <= alpha < binomial_p_value(k - 1, n, p0)
    assert binomial_threshold(3, 0.5, 0.01) == float("inf")


def test_answers_mark_refused_queries():
    outputs = np.array([[0.1, 0.9], [np.nan, np.nan], [0.8, 0.2]])
    assert answers(outputs).tolist() == [1, -1, 0]


def test_verification_sets_present_or_intact_by_kind():
    common = dict(scheme="s", statistic=1.0, threshold=0.5, p_value=0.01, verdict="", n=10)
    assert Verification("robust", present=True, intact=None, **common).label == "present"
    assert Verification("fragile", present=None, intact=False, **common).label == "modified"
    with pytest.raises(ValueError):
        Verification("fragile", present=True, intact=None, **common)


# --------------------------------------------------------------------------- files


def test_atomic_write_respects_the_umask_and_leaves_nothing_on_failure(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "out.bin"
        with atomic_write(path) as handle:
            handle.write(b"x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        with pytest.raises(RuntimeError), atomic_write(tmp_path / "broken.bin") as handle:
            handle.write(b"half")
            raise RuntimeError
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    finally:
        os.umask(old)


def test_npz_round_trip_without_pickle_and_clear_errors(tmp_path):
    path = save_npz(tmp_path / "k.npz", {"a": np.arange(3)}, {"x": 1}, what="key file")
    arrays, metadata = load_npz(path, what="key file")
    assert arrays["a"].tolist() == [0, 1, 2] and metadata == {"x": 1}
    with pytest.raises(UserError, match="is a directory"):
        load_npz(tmp_path, what="key file")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read key file"):
        load_npz(tmp_path / "bad.npz", what="key file")
    with pytest.raises(UserError, match="does not exist"):
        check_output(tmp_path / "nope" / "x.npz", ".npz")
    assert array_digest(np.arange(3)) != array_digest(np.arange(4))


# --------------------------------------------------------------------------- classifier view


def test_logits_and_probabilities_agree_for_softmax_and_logit_models(tiny_model, digits):
    x = digits.x_test[:20]
    probs = classifier.probabilities(tiny_model, x)
    f, from_logits = classifier.logit_function(tiny_model)
    logits = keras.ops.convert_to_numpy(f(x))
    assert from_logits
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.softmax(logits)), probs, atol=1e-5
    )
    body = keras.Model(tiny_model.inputs, tiny_model.get_layer("logits").output)
    np.testing.assert_allclose(classifier.probabilities(body, x), probs, atol=1e-5)
    assert classifier.labels(body, x).tolist() == classifier.labels(tiny_model, x).tolist()


def test_digest_tells_weights_apart(tiny_model):
    copy = models.zoo.copy_model(tiny_model)
    assert classifier.digest(copy) == classifier.digest(tiny_model)
    copy.layers[-2].kernel.assign(copy.layers[-2].kernel + 1.0)
    assert classifier.digest(copy) != classifier.digest(tiny_model)


def test_input_range_follows_the_dataset(digits):
    assert classifier.input_range(digits) == (0.0, 1.0)
    scaled = digits.with_input_range(0, 255)
    assert classifier.input_range(scaled) == (0.0, 255.0)
    np.testing.assert_allclose(scaled.to_unit(scaled.x_test), digits.x_test, atol=1e-5)


# --------------------------------------------------------------------------- the gate


@pytest.fixture(scope="module")
def trained(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=10, batch_size=32))
    return model


def test_gate_refuses_nan_weights(trained, digits):
    broken = models.zoo.copy_model(trained)
    broken.layers[-2].kernel.assign(np.full(broken.layers[-2].kernel.shape, np.nan, np.float32))
    with pytest.raises(UserError, match="outputs are not finite"):
        check_model(broken, digits)


def test_gate_catches_a_misread_input_range(trained, digits):
    # a model that expects [0, 255] (a Rescaling inside, as many Keras models have)
    inputs = keras.Input(digits.input_shape)
    wide = keras.Model(inputs, trained(keras.layers.Rescaling(1 / 255)(inputs)))
    assert check_model(wide, digits.with_input_range(0, 255)) > 0.5
    with pytest.raises(UserError, match="no better than chance.*--input-range 0,255"):
        check_model(wide, digits)


def test_gate_checks_shape_and_classes_but_not_accuracy_of_an_architecture(digits):
    fresh = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    assert check_model(fresh, digits, trained=False) is None
    other = models.build("_tiny_cnn", (10, 10, 1), digits.num_classes)
    with pytest.raises(UserError, match="--resize"):
        check_model(other, digits)
