"""Overwriting (Yang et al. 2021, section 5.2.2) with any scheme: bi-level at once or key by key, Adi et al. PT."""

import dataclasses
import math

import numpy as np
import pytest

import attacks
import models
from attacks.base import Inapplicable
from attacks.overwrite import Overwrite, OverwriteConfig, _without
from models import classifier
from models.errors import UserError
from models.training import Hook, TrainConfig, set_max_steps
from tests.conftest import weights_equal
from watermarks.bilevel import BiLevel, BiLevelConfig


@pytest.fixture(scope="module")
def marked(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=8, batch_size=32), verbose=0)
    return BiLevel.from_preset("smoke").embed(model, digits)


@pytest.fixture(scope="module")
def adversary(digits):
    return digits.subset(fraction=0.25, seed=1)


def test_registered_validated_and_presets_build():
    assert attacks.get("overwrite") is Overwrite
    with pytest.raises(UserError, match="unknown setting 'half'"):
        OverwriteConfig(setting="half")
    with pytest.raises(UserError, match="pool_fraction must lie in"):
        OverwriteConfig(pool_fraction=1.0)
    with pytest.raises(UserError, match="unknown option"):
        OverwriteConfig(scheme_options={"lambda": 0.3})
    with pytest.raises(UserError, match="unknown watermark scheme 'nope'"):
        OverwriteConfig(scheme="nope")
    with pytest.raises(UserError, match="JSON object"):
        OverwriteConfig(scheme_options="{phases: 3")
    with pytest.raises(UserError, match="setting 'sequential' needs"):
        OverwriteConfig(scheme="adi", setting="sequential")
    with pytest.raises(UserError, match="train_steps applies"):
        OverwriteConfig(train_steps=10)
    assert OverwriteConfig(scheme_options={"phases": 3}).scheme_config().phases == 3
    assert OverwriteConfig(scheme_options='{"phases": 4}').scheme_config().phases == 4
    owner = BiLevelConfig(phases=5, learning_rate=0.02)
    assert OverwriteConfig(scheme_options=owner).scheme_config() == owner
    for preset in ("smoke", "quick", "paper"):
        config = Overwrite.preset_config(preset)
        assert config.scheme == "bilevel" and config.scheme_preset == preset


@pytest.mark.parametrize("setting", ["all", "sequential"])
def test_overwriting_runs_and_leaves_the_input_alone(marked, adversary, digits, setting):
    model, key = marked.model, marked.key
    before = [w.copy() for w in model.get_weights()]
    hook = Hook("owner_r_auth", lambda m: classifier.accuracy(m, key.inputs, key.labels))
    attack = Overwrite.from_preset("smoke", setting=setting, keys=3)
    removal = attack.remove(model, adversary, hooks=[hook])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    assert not weights_equal(removal.model, model)
    assert removal.model.input_shape == model.input_shape
    assert removal.model.output_shape == model.output_shape
    info = removal.info
    assert info["scheme"] == "bilevel" and info["setting"] == setting
    assert 0.0 <= info["adversary_watermark_accuracy"] <= 1.0
    curve = info["curves"]["owner_r_auth"]
    if setting == "all":
        # one value per outer phase of the adversary's embedding
        assert len(curve) == info["phases_run"][0] == 2 and len(info["embedded"]) == 1
        assert info["adversary_config"]["keys"] == 3 and info["adversary_config"]["seed"] == 1
    else:
        assert len(curve) == len(info["embedded"]) == len(info["phases_run"]) == 3
        assert all(1 <= p <= 2 for p in info["phases_run"])
        assert info["adversary_config"]["keys"] == 1
        assert info["adversary_config"]["stop_when_embedded"] is True
    assert curve[-1] == classifier.accuracy(removal.model, key.inputs, key.labels)


def test_max_steps_caps_the_sequential_keys(marked, adversary):
    attack = Overwrite.from_preset("smoke", setting="sequential", keys=5)
    set_max_steps(1)
    try:
        info = attack.remove(marked.model, adversary).info
    finally:
        set_max_steps(None)
    assert len(info["embedded"]) == 1 and info["phases_run"] == [1]


def test_a_used_key_leaves_the_pool(digits):
    pool = _without(digits, [0, 2])
    assert len(pool.y_test) == len(digits.y_test) - 2
    np.testing.assert_array_equal(pool.x_test[0], digits.x_test[1])
    np.testing.assert_array_equal(pool.x_test[1], digits.x_test[3])


def test_the_adversarys_pool_is_a_stratified_share_of_its_own_data(adversary):
    attack = Overwrite.from_preset("smoke")
    data = attack._adversary_data(adversary)
    n = len(adversary.y_train)
    assert len(data.y_test) == math.ceil(0.25 * n) and len(data.y_train) == n - len(data.y_test)
    train_rows = {x.tobytes() for x in data.x_train}
    assert not train_rows & {x.tobytes() for x in data.x_test}
    assert set(np.unique(data.y_test)) == set(np.unique(adversary.y_train))
    whole = Overwrite.from_preset("smoke", pool_fraction=0.0)._adversary_data(adversary)
    assert whole is adversary


def test_zero_strength_is_a_copy(marked, adversary):
    attack = Overwrite.from_preset("smoke", **Overwrite.zero_strength)
    removal = attack.remove(marked.model, adversary)
    assert removal.model is not marked.model and weights_equal(removal.model, marked.model)


def test_too_little_adversary_data_says_why(marked, adversary):
    tiny = dataclasses.replace(
        adversary, x_train=adversary.x_train[:8], y_train=adversary.y_train[:8]
    )
    attack = Overwrite.from_preset("smoke", keys=3)
    assert "pool of 2 for 3 keys" in attack.applicable(marked.model, tiny)
    with pytest.raises(Inapplicable, match="pool of 2 for 3 keys"):
        attack.remove(marked.model, tiny)


def test_backdoor_overwrite_fine_tunes_the_stolen_weights_as_long_as_the_owner(adversary):
    """Table 2's Adi et al. overwrite: PT mode, as many training steps as the owner took."""
    attack = Overwrite.from_preset(
        "smoke", scheme="adi", scheme_preset="smoke", keys=10, pool_fraction=0.0, train_steps=50
    )
    scheme = attack._scheme(adversary)
    batches = math.ceil(len(adversary.y_train) / scheme.config.train.batch_size)
    assert scheme.config.mode == "pt" and scheme.uses_weights
    assert scheme.config.n == 10 and scheme.config.seed == 1
    assert scheme.config.train.epochs == math.ceil(50 / batches)
    zhang = Overwrite.from_preset("smoke", scheme="zhang_noise", scheme_preset="smoke", keys=50)
    assert zhang._scheme(adversary).uses_weights  # from_scratch=False: fine-tunes


@pytest.mark.slow
def test_adi_overwrite_embeds_the_adversarys_triggers(marked, adversary):
    attack = Overwrite.from_preset(
        "smoke", scheme="adi", scheme_preset="smoke", keys=10, pool_fraction=0.0, train_steps=60
    )
    removal = attack.remove(marked.model, adversary)
    info = removal.info
    assert info["adversary_config"]["mode"] == "pt"
    assert info["adversary_watermark_accuracy"] >= 0.5
    assert removal.model.output_shape == marked.model.output_shape
