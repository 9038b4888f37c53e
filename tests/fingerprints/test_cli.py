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

REPO = Path(__file__).resolve().parents[2]
GENERATE = [
    "--dataset",
    "digits",
    "--architectures",
    "_tiny_cnn",
    "--family-size",
    "3",
    "--epochs",
    "30",
    "--batch-size",
    "32",
    "--thief-examples",
    "700",
    "--candidates",
    "40",
    "--iterations",
    "60",
    "--learning-rate",
    "0.01",
    "--eps",
    "0.25",
    "--exclude-original",
    "--min-conferrability",
    "0.3",  # two tiny digit CNNs per family are too alike for the paper's 0.95
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
    assert fingerprints.eps == 0.25
    assert fingerprints.metadata["dataset"] == "digits"
    assert 0 < fingerprints.threshold <= 1
    model = models.load_model(user_model)
    predicted = np.argmax(model.predict(fingerprints.inputs, verbose=0), axis=1)
    np.testing.assert_array_equal(predicted, fingerprints.labels)


def test_verify_calls_the_source_a_surrogate(generated, user_model, capsys):
    capsys.readouterr()
    assert main(["verify", "--model", str(user_model), "--fingerprints", str(generated)]) == 0
    out = capsys.readouterr().out
    assert "CAEAcc:    1.0000" in out and "verdict:   surrogate" in out
    assert (
        main(["verify", "--model", str(user_model), "--fingerprints", str(generated), "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["surrogate"] is True and result["accuracy"] == 1.0


def test_verify_an_independent_model(generated, digits, tmp_path, capsys):
    models.seed_everything(11)
    other = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(other, digits, models.TrainConfig(epochs=8, batch_size=32, seed=11), verbose=0)
    path = tmp_path / "other.keras"
    other.save(path)
    capsys.readouterr()
    assert main(["verify", "--model", str(path), "--fingerprints", str(generated), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["fingerprints"] > 0
    assert result["surrogate"] == (result["accuracy"] >= result["threshold"])


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
    cases = [
        (
            ["verify", "--model", str(tmp_path / "none.keras"), "--fingerprints", str(generated)],
            "does not exist",
        ),
        (["verify", "--model", str(lambda_path), "--fingerprints", str(generated)], "Lambda"),
        (
            ["verify", "--model", str(user_model), "--fingerprints", str(tmp_path / "none.npz")],
            "does not exist",
        ),
        (
            ["verify", "--model", str(user_model), "--fingerprints", str(user_model)],
            "not a fingerprint file",
        ),
        (["verify", "--model", str(wide_path), "--fingerprints", str(generated)], "shape"),
        (
            ["generate", "--model", str(user_model), *GENERATE, "--out", str(tmp_path / "f.txt")],
            "must end in .npz",
        ),
        (
            [
                "generate",
                "--model",
                str(user_model),
                *GENERATE[2:],
                "--dataset",
                "cifar",
                "--out",
                str(tmp_path / "f.npz"),
            ],
            "unknown dataset 'cifar'",
        ),
        (
            [
                "generate",
                "--model",
                str(user_model),
                *GENERATE,
                "--architectures",
                "nonet",
                "--out",
                str(tmp_path / "f.npz"),
            ],
            "unknown model 'nonet'",
        ),
        (
            [
                "generate",
                "--model",
                str(user_model),
                *GENERATE,
                "--extraction",
                "steal",
                "--out",
                str(tmp_path / "f.npz"),
            ],
            "unknown extraction 'steal'",
        ),
        (
            [
                "generate",
                "--model",
                str(user_model),
                *GENERATE,
                "--eps",
                "0",
                "--out",
                str(tmp_path / "f.npz"),
            ],
            "eps must be positive",
        ),
        (
            [
                "generate",
                "--model",
                str(user_model),
                *GENERATE,
                "--out",
                str(tmp_path / "no" / "f.npz"),
            ],
            "does not exist",
        ),
        (
            [
                "generate",
                "--model",
                str(user_model),
                *GENERATE,
                "--iterations",
                "0",
                "--out",
                str(tmp_path / "f.npz"),
            ],
            "positive integer",
        ),
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
