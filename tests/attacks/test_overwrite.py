"""Overwriting (Yang et al. 2021, section 5.2.2): a second bi-level watermark, at once or key by key."""

import dataclasses

import numpy as np
import pytest

import attacks
import models
from attacks.overwrite import Overwrite, OverwriteConfig
from models.errors import UserError
from models.training import TrainConfig
from tests.conftest import weights_equal
from watermarks.bilevel import BiLevel, BiLevelConfig, r_auth

SCHEME = BiLevelConfig(
    phases=2,
    inner_steps=1,
    steps=40,
    learning_rate=0.05,
    trade_off=0.5,
    top_fraction=0.1,
    mask_samples=64,
)


@pytest.fixture(scope="module")
def marked(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=8, batch_size=32), verbose=0)
    owner = BiLevel(dataclasses.replace(SCHEME, keys=4))
    return owner.embed(model, digits)


def test_registered_and_validated():
    assert attacks.get("overwrite") is Overwrite
    with pytest.raises(UserError, match="unknown overwriting setting"):
        OverwriteConfig(setting="half")
    with pytest.raises(UserError, match="pool_fraction"):
        OverwriteConfig(pool_fraction=1.0)
    with pytest.raises(UserError, match="unknown option"):
        OverwriteConfig(scheme={"lambda": 0.3})
    assert OverwriteConfig(scheme={"phases": 3}).scheme.phases == 3


@pytest.mark.parametrize("setting", ["all", "sequential"])
def test_overwriting_runs_and_leaves_the_input_alone(marked, digits, setting):
    model, key = marked
    before = [w.copy() for w in model.get_weights()]
    steps = []
    attack = Overwrite(OverwriteConfig(setting=setting, keys=3, scheme=SCHEME, max_phases=2))
    result = attack.run(
        model, digits, callback=lambda step, m: steps.append((step, r_auth(m, key)))
    )
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    assert not weights_equal(result.model, model)
    assert result.model.input_shape == model.input_shape
    assert result.model.output_shape == model.output_shape
    if setting == "all":
        assert (
            [s for s, _ in steps] == [1, 2] and len(result.keys) == 1 and len(result.keys[0]) == 3
        )
    else:
        assert [s for s, _ in steps] == [1, 2, 3] and len(result.keys) == 3
        chosen = [k.inputs[0].tobytes() for k in result.keys]
        assert len(set(chosen)) == 3, "a key was drawn twice"
        assert all(len(k) == 1 for k in result.keys)
    assert len(result.embedded) == len(result.keys)
    # the adversary never saw the owner's key: its keys are other inputs
    owner = {x.tobytes() for x in key.inputs}
    assert not owner & {x.tobytes() for k in result.keys for x in k.inputs}


def test_too_little_adversary_data_is_a_user_error(marked, digits):
    model, _ = marked
    tiny = dataclasses.replace(digits, x_train=digits.x_train[:8], y_train=digits.y_train[:8])
    with pytest.raises(UserError, match="pool of 2 for 3 keys"):
        Overwrite(OverwriteConfig(keys=3, scheme=SCHEME)).remove(model, tiny)
