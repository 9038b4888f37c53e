"""load_model: the one safe way to open a user's model."""

import zipfile

import keras
import numpy as np
import pytest

import models
from models.errors import UserError


def test_round_trip_predicts_the_same(tiny_model, digits, tmp_path):
    path = tmp_path / "m.keras"
    tiny_model.save(path)
    loaded = models.load_model(path)
    x = digits.x_test[:16]
    np.testing.assert_array_equal(tiny_model.predict(x, verbose=0), loaded.predict(x, verbose=0))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "is not a file"),
        (
            lambda p: (p.with_suffix(".h5").write_bytes(b"\x89HDF"), p.with_suffix(".h5"))[1],
            "not a Keras 3 .keras file",
        ),
        (
            lambda p: (p.write_bytes(b"not a zip at all"), p)[1],
            "not a valid Keras 3 .keras archive",
        ),
    ],
    ids=["missing", "directory", "h5", "corrupt"],
)
def test_bad_files_are_one_line_user_errors(tmp_path, make, message):
    path = make(tmp_path / "model.keras")
    with pytest.raises(UserError, match=message) as info:
        models.load_model(path)
    assert "\n" not in str(info.value)


def test_archive_without_config_is_refused(tmp_path):
    path = tmp_path / "empty.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", "{}")
    with pytest.raises(UserError, match="not a valid Keras 3"):
        models.load_model(path)


def test_truncated_weights_are_refused(tiny_model, tmp_path):
    good = tmp_path / "good.keras"
    tiny_model.save(good)
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 3] if item.filename.endswith(".h5") else data)
    with pytest.raises(UserError, match="cannot load model"):
        models.load_model(bad)


def test_lambda_layer_is_refused_and_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "lambda-ran"
    monkeypatch.setenv("WMSUITE_TEST_MARKER", str(marker))
    inputs = keras.Input((4,))
    # A lambda (not a def) so that Keras stores its bytecode in the file.
    payload = lambda x: (  # noqa: E731
        __import__("pathlib").Path(__import__("os").environ["WMSUITE_TEST_MARKER"]).touch(),
        x,
    )[1]
    outputs = keras.layers.Lambda(payload, name="payload")(inputs)
    path = tmp_path / "hostile.keras"
    keras.Model(inputs, outputs).save(path)
    marker.unlink(missing_ok=True)  # building the model above ran the lambda once

    with pytest.raises(UserError, match="Lambda layer") as info:
        models.load_model(path)
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the Lambda's code ran while loading"

    # Control: the payload is live, so the check above could have failed.
    keras.saving.load_model(path, safe_mode=False)
    assert marker.exists()
