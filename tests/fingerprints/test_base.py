"""fingerprints.base: the .npz container (no pickle), its checks, the scheme registry."""

import json
import zipfile

import numpy as np
import pytest

import fingerprints
from fingerprints.base import Fingerprints
from models.errors import UnknownNameError, UserError
from models.registry import build_config


def make(n=5, shape=(8, 8, 1), **overrides):
    rng = np.random.default_rng(0)
    originals = rng.random((n, *shape), dtype=np.float32)
    values = dict(
        scheme="cae",
        inputs=np.clip(originals + 0.05, 0, 1),
        originals=originals,
        labels=np.arange(n) % 10,
        original_labels=(np.arange(n) + 1) % 10,
        eps=0.05,
        metadata={"threshold": 0.5, "config": {"eps": 0.05}},
        arrays={"conferrability": np.linspace(0.95, 1.0, n, dtype=np.float32)},
    )
    values.update(overrides)
    return Fingerprints(**values)


def test_round_trip_without_pickle(tmp_path):
    original = make()
    path = original.save(tmp_path / "fp.npz")
    with np.load(path, allow_pickle=False) as archive:  # readable with pickle off
        assert "inputs" in archive.files
    loaded = Fingerprints.load(path)
    assert loaded.scheme == "cae" and len(loaded) == 5 and loaded.eps == 0.05
    np.testing.assert_array_equal(loaded.inputs, original.inputs)
    np.testing.assert_array_equal(loaded.originals, original.originals)
    np.testing.assert_array_equal(loaded.labels, original.labels)
    np.testing.assert_array_equal(loaded.original_labels, original.original_labels)
    np.testing.assert_array_equal(
        loaded.arrays["conferrability"], original.arrays["conferrability"]
    )
    assert loaded.metadata == original.metadata
    assert loaded.threshold == 0.5
    assert not list(tmp_path.glob(".fp.*"))  # no staging file left behind


def test_empty_fingerprints_round_trip(tmp_path):
    empty = make(n=0, metadata={})
    loaded = Fingerprints.load(empty.save(tmp_path / "empty.npz"))
    assert len(loaded) == 0 and loaded.inputs.shape == (0, 8, 8, 1)
    assert np.isnan(loaded.threshold)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"inputs": np.zeros((5, 8, 8))}, "NHWC"),
        ({"originals": np.zeros((5, 4, 4, 1))}, "originals have shape"),
        ({"labels": np.zeros(4)}, "labels"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_malformed_fingerprints_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        make(**overrides)


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Fingerprints.load(tmp_path / "missing.npz")
    with pytest.raises(UserError, match="must end in .npz"):
        make().save(tmp_path / "fp.txt")
    with pytest.raises(UserError, match="does not exist"):
        make().save(tmp_path / "no" / "fp.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read"):
        Fingerprints.load(garbage)
    other = tmp_path / "other.npz"
    np.savez(other, inputs=np.zeros((1, 2, 2, 1)), labels=np.zeros(1))
    with pytest.raises(UserError, match="not a fingerprint file"):
        Fingerprints.load(other)
    # A pickled object array inside is refused, never unpickled.
    pickled = tmp_path / "pickled.npz"
    make().save(pickled)
    with zipfile.ZipFile(pickled, "a") as archive, archive.open("evil.npy", "w") as handle:
        np.lib.format.write_array(handle, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="cannot read|malformed"):
        Fingerprints.load(pickled)


def test_broken_metadata_is_a_user_error(tmp_path):
    path = make().save(tmp_path / "fp.npz")
    with np.load(path) as archive:
        contents = {name: archive[name] for name in archive.files}
    contents["metadata"] = np.array(json.dumps([1, 2]))
    np.savez(path, **contents)
    with pytest.raises(UserError, match="malformed"):
        Fingerprints.load(path)


def test_check_fits(tiny_model):
    make(shape=(8, 8, 1)).check_fits(tiny_model)
    with pytest.raises(UserError, match="shape"):
        make(shape=(9, 9, 1)).check_fits(tiny_model)
    with pytest.raises(UserError, match="classes"):
        make(labels=np.full(5, 12)).check_fits(tiny_model)


def test_registry_and_options():
    assert "cae" in fingerprints.names()
    assert fingerprints.get("cae").name == "cae"
    with pytest.raises(UnknownNameError, match="cae"):
        fingerprints.get("nope")
    config = build_config(fingerprints.get("cae").Config, {"eps": 0.1})
    assert config.eps == 0.1
    with pytest.raises(UserError, match="unknown option"):
        build_config(fingerprints.get("cae").Config, {"epsilon": 0.1})


def test_a_generation_that_keeps_nothing_is_an_error_not_a_file(monkeypatch):
    """Issue 15: evidence its own filter rejected entirely is an error (exit 2), not a key."""
    from fingerprints.cae import CAE
    from models.errors import EmbeddingFailed
    from models.training import set_max_steps

    facts = {"candidates": 300, "adversarial": 47, "max_conferrability": 0.497,
             "min_conferrability": 0.85}  # fmt: skip
    monkeypatch.setattr("models.sanity.check_model", lambda *a, **k: None)
    monkeypatch.setattr(CAE, "_generate", lambda self, m, d: make(n=0, metadata=facts))
    with pytest.raises(EmbeddingFailed, match="300 candidates, 47 adversarial.*0.497.*0.85"):
        CAE.from_preset("smoke").generate(None, None)
    set_max_steps(2)  # a preset proven at two steps logs it and goes on
    assert len(CAE.from_preset("smoke").generate(None, None)) == 0
