"""Training in a child process (models.isolation): same key, same weights, restored here."""

import argparse
import os
from pathlib import Path

import keras
import numpy as np
import pytest

import models
from models import training
from models.errors import UserError
from models.isolation import run_elsewhere, set_trainings_per_process, trainings_per_process
from models.training import TrainConfig, cache_key
from tests.conftest import weights_equal

FAST = TrainConfig(epochs=2, batch_size=32, learning_rate=1e-2, seed=4)


def _fresh(digits):
    models.seed_everything(3)
    return models.build("_tiny_cnn", digits.input_shape, digits.num_classes)


def _never_here(*args, **kwargs):
    raise AssertionError("trained in the test's own process")


def test_a_child_process_trains_what_this_one_would(digits, tmp_path, monkeypatch):
    here = _fresh(digits)
    expected = models.train(here, digits, FAST, cache_dir=tmp_path / "here", verbose=0)
    set_trainings_per_process(2)
    monkeypatch.setattr(training, "_fit", _never_here)  # the spawned child imports its own
    away = _fresh(digits)
    result = models.train(away, digits, FAST, cache_dir=tmp_path / "away", verbose=0)
    assert result.key == expected.key and not result.from_cache
    assert weights_equal(here, away)
    assert result.history == expected.history
    again = models.train(_fresh(digits), digits, FAST, cache_dir=tmp_path / "away", verbose=0)
    assert again.from_cache and weights_equal(again.model, away)


def test_probability_targets_keep_their_key_in_the_child(digits, tmp_path, monkeypatch):
    targets = keras.ops.convert_to_numpy(keras.ops.one_hot(digits.y_train, 10)) * 0.9 + 0.01
    data = (digits.x_train, targets.astype(np.float32))
    key = cache_key(_fresh(digits), data, FAST)
    set_trainings_per_process(1)
    monkeypatch.setattr(training, "_fit", _never_here)
    result = models.train(_fresh(digits), data, FAST, cache_dir=tmp_path, verbose=0)
    assert result.key == key and not result.from_cache


def test_callbacks_and_hooks_keep_the_training_here(digits, tmp_path, monkeypatch):
    set_trainings_per_process(1)
    calls = []
    monkeypatch.setattr(training, "_fit", lambda *args, **kwargs: calls.append(args))
    callback = keras.callbacks.Callback()
    models.train(_fresh(digits), digits, FAST, cache_dir=tmp_path, callbacks=[callback])
    hook = training.Hook("zero", lambda model: 0.0)
    models.train(_fresh(digits), digits, FAST, cache_dir=tmp_path / "h", hooks=[hook])
    assert len(calls) == 2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_the_setting_is_a_count(bad):
    with pytest.raises(UserError, match="non-negative integer"):
        set_trainings_per_process(bad)


def test_zero_trains_here():
    set_trainings_per_process(0)
    assert trainings_per_process() is None


def test_the_paper_preset_trains_in_child_processes_by_default():
    from models.isolation import TRAININGS_PER_PROCESS
    from reproduce.cli import _limits

    def limits(preset, every=None):
        _limits(argparse.Namespace(preset=preset, max_steps=None, devices=None,
                                   trainings_per_process=every))  # fmt: skip
        return trainings_per_process()

    assert limits("paper") == TRAININGS_PER_PROCESS
    assert limits("quick") is None
    assert limits("paper", 0) is None
    assert limits("quick", 3) == 3


def _where_and_how() -> tuple:
    return os.getpid(), training.max_steps(), training.caching(), trainings_per_process()


def test_a_stage_runs_elsewhere_with_this_process_settings():
    here = os.getpid()
    assert run_elsewhere(_where_and_how)[0] == here  # trainings here: so is the stage
    set_trainings_per_process(3)
    training.set_max_steps(2)
    training.set_caching(False)
    try:
        pid, *settings = run_elsewhere(_where_and_how)
        assert pid != here and settings == [2, False, 3]
    finally:
        training.set_caching(True)


@keras.saving.register_keras_serializable(package="test_isolation")
class _Twice(keras.layers.Layer):
    """A layer only this process knows: the spawned worker cannot read a model with it."""

    def call(self, x):
        return x * 2.0


def test_a_model_the_child_cannot_read_trains_here(digits, tmp_path, monkeypatch):
    inputs = keras.Input(digits.input_shape)
    hidden = keras.layers.Flatten()(_Twice()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(hidden))
    fits = []
    real_fit = training._fit
    monkeypatch.setattr(training, "_fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    set_trainings_per_process(1)
    result = models.train(model, digits, FAST, cache_dir=tmp_path, verbose=0)
    assert fits == [1] and not result.from_cache


def _busy_and_say(path: str) -> None:
    """Say this pid, then compute for minutes without letting go of the interpreter lock (as
    TensorFlow does while it traces a large graph)."""
    with open(path, "w") as handle:
        handle.write(str(os.getpid()))
    sum(range(10**12))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_child_process_ends_when_its_parent_is_killed(tmp_path):
    """Killing a run must not leave its stage running on as an orphan that holds its memory."""
    import signal
    import subprocess
    import sys
    import time

    said = tmp_path / "pid"
    script = (
        "from models.isolation import run_elsewhere, set_trainings_per_process\n"
        "from tests.models.test_isolation import _busy_and_say\n"
        f"set_trainings_per_process(1)\nrun_elsewhere(_busy_and_say, {str(said)!r})\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=root)
    try:
        deadline = time.monotonic() + 120
        while not (said.is_file() and said.read_text()) and time.monotonic() < deadline:
            time.sleep(0.5)
        child = int(said.read_text())
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.5)
    orphaned = _alive(child)
    if orphaned:  # leave no busy orphan behind when the test fails
        os.kill(child, signal.SIGKILL)
    assert not orphaned


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its parent (init here) has not reaped it yet
