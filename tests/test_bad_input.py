"""The bad-input battery: every command, every kind of mistake: exit 2, one line, nothing written.

Models made outside the suite, as a new user brings them: NaN weights, a
model that expects pixels in [0, 255], the wrong input shape or class
count, truncated, empty or directory files, keys of another scheme or
shape, zero and negative numbers, unreachable outputs. Each case asserts
exit status 2, exactly one line on stderr, no traceback, and no output
left behind. Two cases run as real processes, where TensorFlow's own start-up
lines would show.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from attacks.cli import main as attacks_main
from fingerprints.cli import main as fingerprints_main
from models.training import TrainConfig
from reproduce.cli import main as reproduce_main
from watermarks.base import Key
from watermarks.cli import main as watermarks_main

REPO = Path(__file__).resolve().parents[1]
MAINS = {
    "watermarks": watermarks_main,
    "attacks": attacks_main,
    "fingerprints": fingerprints_main,
    "reproduce": reproduce_main,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """Models and keys as a user would bring them, in one folder."""
    root = tmp_path_factory.mktemp("user")
    models.seed_everything(0)
    good = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(good, digits, TrainConfig(epochs=10, batch_size=32), verbose=0)
    models.save_model(good, root / "good.keras")
    broken = models.zoo.copy_model(good)
    broken.get_layer("logits").kernel.assign(
        np.full(broken.get_layer("logits").kernel.shape, np.nan)
    )
    models.save_model(broken, root / "nan.keras")
    inputs = keras.Input(digits.input_shape)  # expects [0, 255]: a Rescaling inside
    models.save_model(
        keras.Model(inputs, good(keras.layers.Rescaling(1 / 255)(inputs))), root / "wide.keras"
    )
    models.save_model(models.build("_tiny_cnn", (28, 28, 1), 10), root / "shape28.keras")
    models.save_model(models.build("_tiny_cnn", digits.input_shape, 5), root / "five.keras")
    (root / "truncated.keras").write_bytes((root / "good.keras").read_bytes()[:200])
    (root / "empty.keras").write_bytes(b"")
    (root / "folder.keras").mkdir()
    (root / "folder.npz").mkdir()
    labels = np.arange(20) % 10
    Key("fragile", np.zeros((20, 8, 8, 1)), labels, metadata={}).save(root / "key.npz")
    Key("fragile", np.zeros((20, 28, 28, 1)), labels, metadata={}).save(root / "key28.npz")
    Key("no_such_scheme", np.zeros((20, 8, 8, 1)), labels).save(root / "alien.npz")
    (root / "truncated.npz").write_bytes((root / "key.npz").read_bytes()[:100])
    (root / "out").mkdir()
    return root


def _run(command: str, argv: list[str]) -> int:
    try:
        return MAINS[command](argv)
    except SystemExit as exc:
        return int(exc.code)


def _cases(root: Path) -> list[tuple[str, list[str], str]]:
    out = root / "out"
    good, key = str(root / "good.keras"), str(root / "key.npz")
    embed = ["embed", "--scheme", "fragile", "--preset", "smoke", "--dataset", "digits"]
    remove = ["remove", "--attack", "ftal", "--preset", "smoke", "--dataset", "digits"]
    return [
        ("watermarks", ["verify", "--model", str(root / "nan.keras"), "--key", key], "not finite"),
        (
            "watermarks",
            [*embed, "--model", str(root / "nan.keras"), "--out-key", f"{out}/k.npz"],
            "not finite",
        ),
        (
            "watermarks",
            [*embed, "--model", str(root / "wide.keras"), "--out-key", f"{out}/k.npz"],
            "--input-range 0,255",
        ),
        (
            "attacks",
            ["neural-cleanse", "--model", str(root / "wide.keras"), "--dataset", "digits"],
            "no better than chance",
        ),
        (
            "attacks",
            ["neural-cleanse", "--model", str(root / "nan.keras"), "--dataset", "digits"],
            "not finite",
        ),
        (
            "attacks",
            ["neural-cleanse", "--model", good, "--dataset", "digits", "--out", "/proc/x/nc.json"],
            "does not exist",
        ),
        (
            "attacks",
            [*remove, "--model", str(root / "shape28.keras"), "--out", f"{out}/a.keras"],
            "--resize",
        ),
        (
            "attacks",
            [*remove, "--model", str(root / "five.keras"), "--out", f"{out}/a.keras"],
            "5 outputs",
        ),
        ("attacks", [*remove, "--model", good, "--out", "/proc/x/a.keras"], "does not exist"),
        (
            "attacks",
            [*remove, "--model", good, "--out", f"{out}/a.keras", "--epochs", "-1"],
            "epochs must lie in",
        ),
        ("attacks", [*remove, "--model", good, "--out", f"{out}/a.txt"], "must end in .keras"),
        (
            "attacks",
            [
                "remove",
                "--attack",
                "no_such",
                "--model",
                good,
                "--dataset",
                "digits",
                "--out",
                f"{out}/a.keras",
            ],
            "unknown removal attack 'no_such'",
        ),
        (
            "watermarks",
            ["verify", "--model", str(root / "truncated.keras"), "--key", key],
            "not a valid Keras 3 .keras archive",
        ),
        (
            "watermarks",
            ["verify", "--model", str(root / "empty.keras"), "--key", key],
            "not a valid Keras 3 .keras archive",
        ),
        (
            "watermarks",
            ["verify", "--model", str(root / "folder.keras"), "--key", key],
            "is not a file",
        ),
        (
            "watermarks",
            ["verify", "--model", good, "--key", str(root / "folder.npz")],
            "is a directory",
        ),
        (
            "watermarks",
            ["verify", "--model", good, "--key", str(root / "key28.npz")],
            "key inputs have shape",
        ),
        (
            "watermarks",
            ["verify", "--model", good, "--key", str(root / "alien.npz")],
            "unknown watermark scheme 'no_such_scheme'",
        ),
        (
            "watermarks",
            ["verify", "--model", good, "--key", str(root / "truncated.npz")],
            "cannot read key file",
        ),
        ("watermarks", [*embed, "--model", good, "--out-key", "/proc/x/k.npz"], "does not exist"),
        (
            "watermarks",
            [
                *embed,
                "--model",
                good,
                "--out-key",
                f"{out}/k.npz",
                "--epochs",
                "5",
                "--max-epochs",
                "2",
            ],
            "max_epochs must be >= epochs",
        ),
        (
            "watermarks",
            [*embed, "--model", good, "--out-key", f"{out}/k.npz", "--n", "-3"],
            "n must lie in",
        ),
        (
            "watermarks",
            [*embed, "--model", good, "--out-key", f"{out}/k.npz", "--input-range", "5,1"],
            "LOW < HIGH",
        ),
        (
            "watermarks",
            [
                "embed",
                "--scheme",
                "nope",
                "--model",
                good,
                "--dataset",
                "digits",
                "--out-key",
                f"{out}/k.npz",
            ],
            "unknown watermark scheme 'nope'",
        ),
        (
            "watermarks",
            [*embed, "--model", good, "--out-key", f"{out}/k.npz", "--dataset", "cifar"],
            "unknown dataset 'cifar'",
        ),
        (
            "fingerprints",
            ["verify", "--model", good, "--fingerprints", key],
            "not a fingerprint file",
        ),
        (
            "fingerprints",
            [
                "verify",
                "--model",
                str(root / "nan.keras"),
                "--fingerprints",
                str(root / "folder.npz"),
            ],
            "is a directory",
        ),
        (
            "reproduce",
            ["models", "--preset", "smoke", "--max-steps", "0"],
            "expected a positive integer",
        ),
        (
            "reproduce",
            ["models", "--preset", "smoke", "--devices", "-1"],
            "expected a positive integer",
        ),
    ]


_IDS = [f"{i:02d}" for i in range(29)]


@pytest.mark.parametrize("index", range(29), ids=_IDS)
def test_bad_input_is_one_line_exit_2_and_nothing_written(index, files, capsys):
    command, argv, message = _cases(files)[index]
    before = sorted(p.name for p in (files / "out").iterdir())
    assert _run(command, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert message in err[0], err[0]
    assert sorted(p.name for p in (files / "out").iterdir()) == before


@settings(max_examples=15, deadline=None)
@given(value=st.integers(max_value=0))
def test_non_positive_counts_are_refused_in_one_line(value):
    for command, argv in (
        ("reproduce", ["models", "--max-steps", str(value)]),
        ("attacks", ["remove", "--attack", "ftal", "--model", "m.keras", "--dataset", "digits",
                     "--out", "a.keras", "--per-class", str(value)]),
    ):  # fmt: skip
        code = _run(command, argv)
        assert code == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["watermarks", "verify", "--model", "nan.keras", "--key", "key.npz"], "not finite"),
        (["attacks", "neural-cleanse", "--model", "wide.keras", "--dataset", "digits"], "chance"),
    ],
)
def test_stderr_holds_the_one_line_and_nothing_from_tensorflow(argv, message, files):
    package, *rest = argv
    rest = [str(files / a) if a.endswith((".keras", ".npz")) else a for a in rest]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user runs it
    done = subprocess.run(
        [sys.executable, "-m", package, *rest],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr[-1500:]


def test_a_degenerate_null_never_gives_p_zero(files, digits):
    """A clean twin that scores 0 at every epoch: the p-value is the exact empirical one."""
    from watermarks.backdoor import ZhangNoise

    model = models.load_model(files / "good.keras")
    scheme = ZhangNoise.from_preset("smoke")
    inputs = digits.x_test[:50]
    labels = models.classifier.labels(model, inputs)  # the model gets every one right
    key = Key("zhang_noise", inputs, labels, metadata={"threshold": 0.0},
              arrays={"null_accuracies": np.zeros(15)})  # fmt: skip
    result = scheme.verify(model, key)
    assert result.statistic == 1.0 and result.present
    assert result.p_value == pytest.approx(1 / 16) and "empirical" in result.null
