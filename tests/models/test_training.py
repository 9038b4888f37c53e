"""train(): recipes, determinism, the model cache, checkpoints and resume."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import models
from models import classifier
from models.config import build_config
from models.errors import UserError
from models.training import TrainConfig, _step_schedule, cache_key
from tests.conftest import weights_equal

REPO = Path(__file__).resolve().parents[2]
FAST = TrainConfig(epochs=3, batch_size=32, learning_rate=1e-2)


def test_training_learns(tiny_model, digits, tmp_path):
    before = classifier.accuracy(tiny_model, digits.x_test, digits.y_test)
    result = models.train(tiny_model, digits, FAST, cache_dir=tmp_path, verbose=0)
    after = classifier.accuracy(tiny_model, digits.x_test, digits.y_test)
    assert result.model is tiny_model and not result.from_cache
    assert result.epochs_run == 3 and result.train_examples == len(digits.x_train)
    assert after > 0.8 > before
    assert result.history["loss"][-1] < result.history["loss"][0]
    assert result.images_per_second > 0


def test_same_seed_gives_the_same_weights(digits, tmp_path):
    runs = []
    for folder in ("a", "b"):
        models.seed_everything(1)
        model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
        models.train(model, digits, FAST, cache_dir=tmp_path / folder, verbose=0)
        runs.append(model)
    assert weights_equal(*runs)


def test_cache_reuses_and_no_cache_retrains(digits, tmp_path):
    def fresh():
        models.seed_everything(2)
        return models.build("_tiny_cnn", digits.input_shape, digits.num_classes)

    first = models.train(fresh(), digits, FAST, cache_dir=tmp_path, verbose=0)
    again = models.train(fresh(), digits, FAST, cache_dir=tmp_path, verbose=0)
    assert again.from_cache and again.key == first.key
    assert weights_equal(first.model, again.model)
    assert again.history == first.history
    forced = models.train(fresh(), digits, FAST, cache=False, cache_dir=tmp_path, verbose=0)
    assert not forced.from_cache


def test_cache_key_depends_on_what_is_trained(digits):
    x, y = digits.x_train, digits.y_train
    models.seed_everything(3)
    a = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.seed_everything(4)
    b = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    base = cache_key(a, (x, y), FAST)
    assert base == cache_key(a, (x, y), FAST)
    assert cache_key(a, digits, FAST) == cache_key(a, digits, FAST)  # a Dataset keys by its digest
    assert base != cache_key(b, (x, y), FAST)  # other initial weights
    assert base != cache_key(a, (x[:-1], y[:-1]), FAST)  # other data
    assert base != cache_key(a, (x, y), dataclasses.replace(FAST, epochs=4))  # other recipe
    assert base != cache_key(a, (x, y), dataclasses.replace(FAST, seed=9))  # other seed only
    assert base != cache_key(a, (x, y), FAST, tag="masked")  # other training step


def test_cache_key_ignores_how_the_model_was_compiled_before(digits):
    """A clone of a compiled source trains like a clone of an uncompiled one: one cache entry.

    Keyed with the source's compile config, the quick matrix retrained its 26 CAE family
    members in the next process.
    """
    x, y = digits.x_train, digits.y_train
    models.seed_everything(3)
    compiled = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.seed_everything(3)
    plain = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    before = cache_key(compiled, (x, y), FAST)
    compiled.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    assert cache_key(compiled, (x, y), FAST) == before
    clones = []
    for source in (compiled, plain):
        models.seed_everything(5)
        clones.append(keras.models.clone_model(source))
    assert cache_key(clones[0], (x, y), FAST) == cache_key(clones[1], (x, y), FAST)


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import keras, models
    from models.training import TrainConfig

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:  # after the second epoch's checkpoint
                os.kill(os.getpid(), signal.SIGKILL)

    data = models.load("digits")
    models.seed_everything(5)
    model = models.build("_tiny_cnn", data.input_shape, data.num_classes)
    config = TrainConfig(epochs=4, batch_size=32, learning_rate=3e-3)
    models.train(model, data, config, cache_dir={cache!r}, callbacks=[Kill()], verbose=0)
    """
)


def test_resumes_after_the_process_is_killed(digits, tmp_path):
    script = KILLED_RUN.format(repo=str(REPO), cache=str(tmp_path))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and not (tmp_path / "models").exists()

    class Count(keras.callbacks.Callback):
        epochs = 0

        def on_epoch_end(self, epoch, logs=None):
            Count.epochs += 1

    models.seed_everything(5)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    result = models.train(
        model,
        digits,
        TrainConfig(epochs=4, batch_size=32, learning_rate=3e-3),
        cache_dir=tmp_path,
        callbacks=[Count()],
        verbose=0,
    )
    assert Count.epochs == 2, "the resumed run should only do the two epochs left"
    assert result.epochs_run == 4 and len(result.history["loss"]) == 4, "history spans the kill"
    assert not checkpoints[0].exists(), "the checkpoint is removed once training finishes"
    assert classifier.accuracy(model, digits.x_test, digits.y_test) > 0.8


def test_step_schedule_follows_the_keras_resnet_recipe():
    schedule = _step_schedule(TrainConfig(epochs=200, lr_schedule="step"))
    lrs = {epoch: schedule(epoch, 0.0) for epoch in (0, 79, 80, 120, 160, 180, 199)}
    assert lrs[0] == lrs[79] == pytest.approx(1e-3)
    assert lrs[80] == pytest.approx(1e-4)
    assert lrs[120] == pytest.approx(1e-5)
    assert lrs[160] == pytest.approx(1e-6)
    assert lrs[199] == pytest.approx(5e-7)


@pytest.mark.parametrize(
    "values",
    [
        {"epochs": -1},
        {"epochs": 1.5},
        {"batch_size": 0},
        {"optimizer": "rmsprop"},
        {"lr_schedule": "cosine"},
        {"validation_split": 1.0},
        {"learning_rate": -1.0},
        {"epochz": 3},
    ],
)
def test_bad_recipes_are_user_errors(values):
    with pytest.raises(UserError):
        build_config(TrainConfig, values)


def test_bad_training_data_is_a_user_error(tiny_model, digits):
    with pytest.raises(UserError, match="same non-zero number"):
        models.train(tiny_model, (digits.x_train, digits.y_train[:-1]), FAST)


def test_no_cache_drops_an_old_checkpoint(digits, tmp_path):
    models.seed_everything(6)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    stale = tmp_path / "checkpoints" / cache_key(model, digits, FAST)
    stale.mkdir(parents=True)
    (stale / "training_metadata.json").write_text('{"epoch": 3, "batch": 0}')
    result = models.train(model, digits, FAST, cache=False, cache_dir=tmp_path, verbose=0)
    assert result.epochs_run == 3 and not stale.exists()


def test_cache_hit_leaves_the_same_model_and_random_state_as_training(digits, tmp_path):
    outcomes = []
    for _ in range(2):
        models.seed_everything(7)
        model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
        result = models.train(model, digits, FAST, cache_dir=tmp_path, verbose=0)
        assert model.optimizer is not None, "compiled whether trained or restored"
        outcomes.append((result.from_cache, keras.ops.convert_to_numpy(keras.random.uniform((3,)))))
    assert [hit for hit, _ in outcomes] == [False, True]
    assert (outcomes[0][1] == outcomes[1][1]).all()


def test_softmax_layer_models_are_trained_on_probabilities(digits, tmp_path):
    models.seed_everything(0)
    inputs = keras.Input(digits.input_shape)
    logits = keras.layers.Dense(digits.num_classes)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    assert classifier.outputs_probabilities(model)
    assert classifier.outputs_probabilities(keras.Sequential([model]))
    assert not classifier.outputs_probabilities(keras.Model(inputs, logits))
    models.train(model, digits, FAST, cache_dir=tmp_path, verbose=0)
    assert classifier.accuracy(model, digits.x_test, digits.y_test) > 0.8


def _soft_targets(labels, num_classes, seed=0):
    """Probability targets whose arg-max is ``labels``: 0.5 on the label, the rest spread at random."""
    rng = np.random.default_rng(seed)
    rest = rng.dirichlet(np.ones(num_classes - 1), size=len(labels)).astype(np.float32)
    targets = np.zeros((len(labels), num_classes), np.float32)
    others = np.arange(num_classes)[None, :] != labels[:, None]
    targets[others] = (0.5 * rest).reshape(-1)
    targets[np.arange(len(labels)), labels] = 0.5
    return targets


def test_probability_targets_train_differently_from_their_arg_max_and_cache_apart(digits, tmp_path):
    x, y = digits.x_train, digits.y_train
    soft = _soft_targets(y, digits.num_classes)
    assert np.array_equal(np.argmax(soft, axis=1), y)

    def fresh():
        models.seed_everything(9)
        return models.build("_tiny_cnn", digits.input_shape, digits.num_classes)

    hard_run = models.train(fresh(), (x, y), FAST, cache_dir=tmp_path, verbose=0)
    soft_run = models.train(fresh(), (x, soft), FAST, cache_dir=tmp_path, verbose=0)
    assert not soft_run.from_cache and soft_run.key != hard_run.key
    assert not weights_equal(hard_run.model, soft_run.model)
    assert "accuracy" in soft_run.history  # arg-max against arg-max
    # The soft model learns the labels, and the targets' confidence: about 0.5, not near 1.
    assert classifier.accuracy(soft_run.model, digits.x_test, digits.y_test) > 0.8
    confidence = {
        name: float(run.model.predict(digits.x_test, verbose=0).max(axis=1).mean())
        for name, run in (("hard", hard_run), ("soft", soft_run))
    }
    assert confidence["soft"] < 0.7 < confidence["hard"], confidence

    again = models.train(fresh(), (x, soft), FAST, cache_dir=tmp_path, verbose=0)
    assert again.from_cache and again.key == soft_run.key
    assert weights_equal(again.model, soft_run.model)
    retrained = models.train(fresh(), (x, soft), FAST, cache_dir=tmp_path / "b", verbose=0)
    assert not retrained.from_cache and weights_equal(retrained.model, soft_run.model)

    model = fresh()
    other = _soft_targets(y, digits.num_classes, seed=1)  # the same arg-max, other probabilities
    assert cache_key(model, (x, soft), FAST) != cache_key(model, (x, other), FAST)
    assert cache_key(model, (x, soft), FAST) == cache_key(model, (x, soft.astype(np.float64)), FAST)


def test_bad_probability_targets_are_user_errors(tiny_model, digits):
    x, y = digits.x_train, digits.y_train
    soft = _soft_targets(y, digits.num_classes)
    with pytest.raises(UserError, match="summing to 1"):
        models.train(tiny_model, (x, soft * 2), FAST)
    with pytest.raises(UserError, match="one column per class"):
        models.train(tiny_model, (x, soft[:, :5] / soft[:, :5].sum(axis=1, keepdims=True)), FAST)


class Subclassed(keras.Model):
    """A subclassed model whose config Keras cannot serialise."""

    def __init__(self, num_classes, width):
        super().__init__()
        self.flatten = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(width, activation="relu")
        self.out = keras.layers.Dense(num_classes, activation="softmax")

    def call(self, x):
        return self.out(self.hidden(self.flatten(x)))


def test_subclassed_models_train_and_cache(digits, tmp_path):
    def fresh():
        models.seed_everything(8)
        model = Subclassed(digits.num_classes, 32)
        model(digits.x_train[:1])
        return model

    first = models.train(fresh(), digits, FAST, cache_dir=tmp_path, verbose=0)
    again = models.train(fresh(), digits, FAST, cache_dir=tmp_path, verbose=0)
    assert not first.from_cache and again.from_cache
    assert weights_equal(first.model, again.model)
