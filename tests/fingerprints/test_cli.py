"""python -m fingerprints: generate and verify on a model the suite did not make; errors exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import models
from fingerprints.base import Fingerprints
from fingerprints.cli import main
from models import classifier

REPO = Path(__file__).resolve().parents[2]
# The smoke preset sized for digits; the families copy the user's own architecture.
GENERATE = [
    "--scheme",
    "cae",
    "--preset",
    "smoke",
    "--dataset",
    "digits",
    "--families.generation",
    "2",
    "--families.unseen",
    "1",
    "--candidates",
    "40",
]


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def user_model(digits, tmp_path_factory):
    """A plain keras.Sequential the suite did not build, trained and saved as .keras."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(digits.input_shape),
            keras.layers.Conv2D(12, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(digits.num_classes, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=15, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("user") / "mine.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def generated(user_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp") / "mine.npz"
    assert main(["generate", "--model", str(user_model), *GENERATE, "--out", str(out)]) == 0
    return out


def test_generate_writes_fingerprints_of_the_users_model(generated, user_model, capsys):
    fingerprints = Fingerprints.load(generated)
    assert fingerprints.scheme == "cae" and len(fingerprints) > 0
    assert fingerprints.eps == 0.25  # the smoke preset's
    facts = fingerprints.metadata
    assert facts["dataset"] == "digits" and facts["config"]["families"]["generation"] == 2
    assert 0 < fingerprints.threshold <= 1
    assert len(facts["null_caeacc"]) == 1 and "held-out" in facts["null"]
    model = models.load_model(user_model)
    np.testing.assert_array_equal(
        classifier.labels(model, fingerprints.inputs), fingerprints.labels
    )


def test_verify_finds_the_source(generated, user_model, capsys):
    capsys.readouterr()
    assert main(["verify", "--model", str(user_model), "--fingerprints", str(generated)]) == 0
    out = capsys.readouterr().out
    assert "statistic:      1.0000" in out and "verdict:        present" in out
    assert "p-value:" in out and "held-out reference" in out
    argv = ["verify", "--model", str(user_model), "--fingerprints", str(generated), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["present"] is True and result["statistic"] == 1.0
    # empirical over one held-out reference: (1 + #{its CAEAcc >= 1.0}) / 2
    assert result["kind"] == "fingerprint" and result["p_value"] in (0.5, 1.0)


def test_verify_an_independent_model(generated, digits, tmp_path, capsys):
    models.seed_everything(11)
    other = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(other, digits, models.TrainConfig(epochs=8, batch_size=32, seed=11), verbose=0)
    path = tmp_path / "other.keras"
    other.save(path)
    capsys.readouterr()
    assert main(["verify", "--model", str(path), "--fingerprints", str(generated), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["statistic"] <= 1.0 and result["n"] > 0
    assert result["present"] == (result["statistic"] >= result["threshold"])


def test_generate_help_lists_the_config_flags(capsys):
    assert exit_code(["generate", "--scheme", "cae", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--eps",
        "--min-conferrability",
        "--families.generation",
        "--families.train.epochs",
    ):
        assert flag in out


def test_user_errors_exit_2_with_one_line(generated, user_model, tmp_path, capsys):
    lambda_model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Lambda(lambda x: x * 2), keras.layers.Flatten()]
    )
    lambda_path = tmp_path / "lambda.keras"
    lambda_model.save(lambda_path)
    wide = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    wide_path = tmp_path / "wide.keras"
    wide.save(wide_path)

    def gen(*extra, out="f.npz", dataset="digits"):
        options = [*GENERATE, *extra]
        options[options.index("--dataset") + 1] = dataset
        return ["generate", "--model", str(user_model), *options, "--out", str(tmp_path / out)]

    def ver(model, prints=generated):
        return ["verify", "--model", str(model), "--fingerprints", str(prints)]

    cases = [
        (ver(tmp_path / "none.keras"), "does not exist"),
        (ver(lambda_path), "Lambda"),
        (ver(user_model, tmp_path / "none.npz"), "does not exist"),
        (ver(user_model, user_model), "not a fingerprint file"),
        (ver(wide_path), "shape"),
        (gen(out="f.txt"), "must end in .npz"),
        (gen(dataset="cifar"), "unknown dataset 'cifar'"),
        (gen("--families.architectures", "nonet"), "unknown model 'nonet'"),
        (gen("--families.extraction", "steal"), "invalid choice: 'steal'"),
        (gen("--eps", "0"), "eps must lie in (0, inf]"),
        (gen("--iterations", "0"), "iterations must lie in [1, inf]"),
        (gen("--scheme", "nope"), "unknown fingerprint scheme 'nope'"),
        (gen(out="no/f.npz"), "does not exist"),
    ]
    for argv, message in cases:
        assert exit_code(argv) == 2, argv
        assert message in one_error_line(capsys), argv
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.slow  # a fresh interpreter imports TensorFlow: tens of seconds on a busy CPU
def test_entry_point_prints_one_line_on_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fingerprints",
            "verify",
            "--model",
            str(tmp_path / "x.keras"),
            "--fingerprints",
            str(tmp_path / "x.npz"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: fingerprint file '{tmp_path / 'x.npz'}' does not exist"
    ]
