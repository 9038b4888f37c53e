"""Registry-wide tests: every scheme, fingerprint and attack, on a tiny model, the day it is registered.

* every watermark scheme embeds on a tiny model and its own verification
  says present (fragile: intact) on the marked model, and not on an
  independently trained twin;
* every fingerprint scheme generates fingerprints that find the source
  present;
* every attack runs on every scheme's marked model and returns a model with
  the same input/output signature, and its zero strength leaves the
  predictions unchanged;
* every unit has the three presets and builds from each.

Everything runs each unit's ``smoke`` preset on scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import attacks
import fingerprints
import models
import watermarks
from models import classifier
from models.registry import PRESETS
from models.training import TrainConfig

SCHEMES = watermarks.names()
ATTACKS = attacks.names()
FINGERPRINTS = fingerprints.names()
BASE_RECIPE = TrainConfig(epochs=15, batch_size=32, seed=0)


def _trained(digits, seed: int):
    models.seed_everything(seed)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, dataclasses.replace(BASE_RECIPE, seed=seed))
    return model


@pytest.fixture(scope="module")
def base(digits):
    """The owner's trained tiny CNN."""
    return _trained(digits, 0)


@pytest.fixture(scope="module")
def twin(digits):
    """The same architecture trained independently: never saw any key."""
    return _trained(digits, 1)


@pytest.fixture(scope="module")
def adversary(digits):
    """The adversary's data: a fifth of the training split, and the test split."""
    return digits.subset(fraction=0.2, seed=1)


_MARKED: dict[str, watermarks.Marked] = {}


def _marked(name: str, base, digits) -> watermarks.Marked:
    if name not in _MARKED:
        _MARKED[name] = watermarks.get(name).from_preset("smoke").embed(base, digits)
    return _MARKED[name]


@pytest.mark.parametrize("kind", ["watermarks", "attacks", "fingerprints"])
def test_every_unit_has_the_three_presets(kind):
    package = {"watermarks": watermarks, "attacks": attacks, "fingerprints": fingerprints}[kind]
    for name in package.names():
        cls = package.get(name)
        assert set(cls.presets) == set(PRESETS), f"{kind} {name} presets: {sorted(cls.presets)}"
        for preset in PRESETS:
            assert isinstance(cls.from_preset(preset).config, cls.Config)


@pytest.mark.parametrize("name", SCHEMES)
def test_every_scheme_verifies_after_embedding_and_not_on_a_twin(name, base, twin, digits):
    scheme = watermarks.get(name).from_preset("smoke")
    marked = _marked(name, base, digits)
    result = scheme.verify(marked.model, marked.key)
    assert result.kind == scheme.kind and result.positive, result.verdict
    on_twin = scheme.verify(twin, marked.key)
    assert not on_twin.positive, on_twin.verdict
    assert tuple(marked.model.input_shape) == tuple(base.input_shape)


@pytest.mark.parametrize("name", SCHEMES)
def test_every_key_round_trips_and_finds_its_scheme(name, base, digits, tmp_path):
    marked = _marked(name, base, digits)
    path = marked.key.save(tmp_path / f"{name}.npz")
    again = watermarks.Key.load(path)
    assert watermarks.verify(marked.model, again).positive


@pytest.mark.parametrize("name", FINGERPRINTS)
def test_every_fingerprint_finds_its_source(name, base, digits):
    scheme = fingerprints.get(name).from_preset("smoke")
    prints = scheme.generate(base, digits)
    assert len(prints) > 0
    result = scheme.verify(base, prints)
    assert result.kind == "fingerprint" and result.present, result.verdict


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("attack", ATTACKS)
def test_every_attack_runs_on_every_marked_model(attack, scheme, base, digits, adversary):
    marked = _marked(scheme, base, digits)
    unit = attacks.get(attack).from_preset("smoke")
    reason = unit.applicable(marked.model, adversary)
    if reason is not None:
        pytest.skip(f"{attack} does not apply: {reason}")
    hook = models.training.Hook("test_accuracy", lambda m: classifier.accuracy(m, *_test(digits)))
    removal = unit.remove(marked.model, adversary, hooks=[hook])
    assert removal.model is not marked.model
    assert tuple(removal.model.input_shape) == tuple(marked.model.input_shape)
    assert tuple(removal.model.output_shape) == tuple(marked.model.output_shape)
    assert removal.info["seconds"] >= 0 and "curves" in removal.info
    assert len(removal.info["curves"].get("test_accuracy", [])) >= 1
    watermarks.verify(removal.model, marked.key)  # the suite's verifier reads any attacked model


def _test(digits):
    return digits.x_test, digits.y_test


@pytest.mark.parametrize("attack", ATTACKS)
def test_zero_strength_leaves_predictions_unchanged(attack, base, adversary):
    cls = attacks.get(attack)
    if cls.zero_strength is None:
        pytest.skip(f"{attack} trains a fresh model: it has no strength that is a no-op")
    unit = cls.from_preset("smoke", **cls.zero_strength)
    before = classifier.predict(base, adversary.x_test)
    after = classifier.predict(unit.remove(base, adversary).model, adversary.x_test)
    np.testing.assert_allclose(after, before, atol=1e-5)
