"""train(): recipes, determinism, the model cache, checkpoints and resume."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import models
from models.errors import UserError
from models.training import TrainConfig, _step_schedule, cache_key, evaluate_accuracy
from tests.conftest import weights_equal

REPO = Path(__file__).resolve().parents[2]
FAST = TrainConfig(epochs=3, batch_size=32, learning_rate=1e-2)


def test_training_learns(tiny_model, digits, tmp_path):
    before = evaluate_accuracy(tiny_model, digits.x_test, digits.y_test)
    result = models.train(tiny_model, digits, FAST, cache_dir=tmp_path, verbose=0)
    after = evaluate_accuracy(tiny_model, digits.x_test, digits.y_test)
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
    base = cache_key(a, x, y, FAST)
    assert base == cache_key(a, x, y, FAST)
    assert base != cache_key(b, x, y, FAST)  # other initial weights
    assert base != cache_key(a, x[:-1], y[:-1], FAST)  # other data
    assert base != cache_key(a, x, y, TrainConfig(epochs=4))  # other recipe
    assert base != cache_key(
        a, x, y, TrainConfig(epochs=3, batch_size=32, learning_rate=3e-3, seed=9)
    )


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

    models.seed_everything(5)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    result = models.train(
        model,
        digits,
        TrainConfig(epochs=4, batch_size=32, learning_rate=3e-3),
        cache_dir=tmp_path,
        verbose=0,
    )
    assert result.epochs_run == 2, "resumed run should only do the two epochs left"
    assert not checkpoints[0].exists(), "the checkpoint is removed once training finishes"
    assert evaluate_accuracy(model, digits.x_test, digits.y_test) > 0.8


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
        {"epochs": 0},
        {"optimizer": "rmsprop"},
        {"lr_schedule": "cosine"},
        {"validation_split": 1.0},
        {"learning_rate": -1.0},
        {"epochz": 3},
    ],
)
def test_bad_recipes_are_user_errors(values):
    with pytest.raises(UserError):
        TrainConfig.from_dict(values)


def test_bad_training_data_is_a_user_error(tiny_model, digits):
    with pytest.raises(UserError, match="same non-zero number"):
        models.train(tiny_model, (digits.x_train, digits.y_train[:-1]), FAST)
