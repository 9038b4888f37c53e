"""Fragile triggers (Yin et al. 2022): the model stays bit-identical, AccTri catches changes."""

import json

import keras
import numpy as np
import pytest

import models
import watermarks
from models.errors import UserError
from models.training import TrainConfig, default_cache_dir, set_caching
from tests.conftest import weights_equal
from watermarks.base import EmbeddingFailed, Key
from watermarks.cli import main as watermarks_main
from watermarks.fragile import (
    FragileConfig,
    FragileFineTune,
    FragileFineTuneConfig,
    FragileTrigger,
    build_generator,
    fragile_loss,
    fragility_check,
    generator_from_key,
    regenerate,
    secret_key,
    softmax_variance,
    trigger_margins,
    trigger_report,
)


@pytest.fixture(scope="module")
def classifier(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=8, batch_size=32), verbose=0)
    return model


@pytest.fixture(scope="module")
def marked(classifier, digits):
    before = [w.copy() for w in classifier.get_weights()]
    result = FragileTrigger.from_preset("smoke").embed(classifier, digits)
    assert result.model is classifier  # the marked model is the original object
    assert all(np.array_equal(a, b) for a, b in zip(before, classifier.get_weights(), strict=True))
    return result


@pytest.fixture(scope="module")
def full_key(marked):
    return marked.key


def test_registered_and_config_validated():
    assert {"fragile", "fragile_finetune"} <= set(watermarks.names())
    assert watermarks.get("fragile") is FragileTrigger
    assert watermarks.get("fragile_finetune") is FragileFineTune
    assert FragileTrigger.kind == FragileFineTune.kind == "fragile"
    with pytest.raises(UserError, match="unknown variant 'half'"):
        FragileConfig(variant="half")
    with pytest.raises(UserError, match="unknown generator"):
        FragileConfig(generator="gan")
    with pytest.raises(UserError, match="a must lie in"):
        FragileConfig(a=-1.0)
    with pytest.raises(UserError, match="max_epochs"):
        FragileConfig(epochs=10, max_epochs=5)
    with pytest.raises(UserError, match="threshold must lie in"):
        FragileConfig(threshold=0.0)
    with pytest.raises(UserError, match="max_epochs"):
        FragileFineTuneConfig(epochs=10, max_epochs=5)
    with pytest.raises(UserError, match="unknown option"):
        FragileTrigger(alpha=3)


def test_presets():
    quick = FragileTrigger.preset_config("quick")
    # what python -m reproduce fragile --preset quick trains its G_full with
    assert (quick.n, quick.a, quick.generator, quick.width) == (100, 200.0, "conv", 64)
    assert (quick.epochs, quick.max_epochs, quick.margin) == (60, 180, 0.05)
    paper = FragileTrigger.preset_config("paper")
    assert (paper.generator, paper.epochs, paper.n, paper.a) == ("progressive", 300, 100, 200.0)
    baseline = FragileFineTune.preset_config("quick")
    assert (baseline.repeats, baseline.epochs, baseline.learning_rate) == (10, 3, 1e-3)
    assert (baseline.generator, baseline.width, baseline.n) == (quick.generator, quick.width, 100)


def test_secret_key_and_variance_definitions():
    assert secret_key(12, 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    p = np.random.default_rng(0).dirichlet(np.ones(10), size=7).astype(np.float32)
    assert float(softmax_variance(p)) == pytest.approx(np.var(p, axis=1).mean(), rel=1e-5)
    flat = np.full((3, 10), 0.1, np.float32)
    assert float(softmax_variance(flat)) == pytest.approx(0.0, abs=1e-9)


def test_loss_without_margin_is_equation_one():
    logits = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32)
    keys = secret_key(6, 10)
    loss, ce, var, hinge = fragile_loss(logits, keys, variant="full", a=200.0, margin=0.0)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected_ce = -np.log(p[np.arange(6), keys]).mean()
    assert float(ce) == pytest.approx(expected_ce, rel=1e-5)
    assert float(var) == pytest.approx(np.var(p, axis=1).mean(), rel=1e-5)
    assert float(loss) == pytest.approx(expected_ce + 200 * np.var(p, axis=1).mean(), rel=1e-5)
    assert float(hinge) == 0.0
    loss_var, *_ = fragile_loss(logits, keys, variant="var", a=200.0, margin=0.05)
    assert float(loss_var) == pytest.approx(200 * np.var(p, axis=1).mean(), rel=1e-5)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
@pytest.mark.parametrize("kind", ["conv", "progressive"])
def test_generators_make_the_input_shape(kind, shape):
    generator = build_generator(kind, shape, z_dim=16, width=16)
    out = np.asarray(generator(np.zeros((2, 16), np.float32)))
    assert out.shape == (2, *shape)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_key_holds_what_the_paper_says(full_key, classifier, digits):
    assert full_key.scheme == "fragile"
    assert full_key.inputs.shape == (30, 8, 8, 1)
    assert full_key.labels.tolist() == secret_key(30, 10).tolist()
    meta = full_key.metadata
    assert meta["a"] == 200.0 and meta["seed"] == 0 and meta["variant"] == "full"
    assert meta["fit_for_verification"] is True and meta["dataset"] == "digits"
    assert full_key.arrays["z"].shape == (30, 512)
    assert full_key.inputs.min() >= 0.0 and full_key.inputs.max() <= 1.0
    # G_full spreads the softmax: far from one-hot, and every trigger takes its key
    assert meta["mean_max_softmax"] < 0.6
    accuracy, gaps = trigger_report(classifier, full_key.inputs, full_key.labels)
    assert accuracy == 1.0 and gaps.min() > 1e-3
    np.testing.assert_allclose(gaps, trigger_margins(classifier, full_key.inputs, full_key.labels))


def test_generator_regenerates_the_triggers(full_key, tmp_path):
    full_key.save(tmp_path / "k.npz")
    loaded = Key.load(tmp_path / "k.npz")
    np.testing.assert_allclose(regenerate(loaded), full_key.inputs, atol=1e-5)
    assert generator_from_key(loaded).count_params() > 0


def test_same_seed_same_triggers_and_the_cache_follows_the_switch(classifier, digits, full_key):
    cached = sorted((default_cache_dir() / "fragile").glob("*.npz"))
    assert cached  # the fixture's embed stored its key (caching is on by default)
    set_caching(False)
    try:
        again = FragileTrigger.from_preset("smoke").trigger_set(classifier, digits)
    finally:
        set_caching(True)
    np.testing.assert_array_equal(again.inputs, full_key.inputs)
    assert sorted((default_cache_dir() / "fragile").glob("*.npz")) == cached


def test_verification_is_the_exact_match_rule(classifier, full_key):
    result = watermarks.verify(classifier, full_key)  # dispatch by key.scheme, config from key
    assert result.kind == "fragile" and result.scheme == "fragile"
    assert result.statistic == 1.0 and result.threshold == 1.0 and result.intact
    assert result.present is None and np.isnan(result.p_value) and result.n == 30
    assert "exact match" in result.null and result.label == "intact"
    outputs = classifier.predict(full_key.inputs, verbose=0)
    outputs[4] = np.nan  # a refused query never matches its key
    refused = FragileTrigger.from_preset("smoke").decide(full_key, outputs)
    assert refused.statistic == pytest.approx(29 / 30) and not refused.intact
    assert "1 of 30 triggers changed label" in refused.verdict


def test_no_false_alarm_after_round_trip_and_batch_sizes(classifier, full_key, tmp_path):
    rows = fragility_check(classifier, {"G_full": full_key}, tmp_path)
    row = rows["G_full"]
    assert row["acctri"] == row["acctri_roundtrip_batch1"] == row["acctri_roundtrip_batch30"] == 1.0
    assert row["acctri_repeat"] == 1.0 and row["fit_for_verification"] is True
    assert row["variant"] == "full" and row["min_logit_gap"] > 1e-3
    assert (tmp_path / f"{classifier.name}.keras").is_file()


def test_modification_is_detected(classifier, full_key):
    tampered = keras.models.clone_model(classifier)
    tampered.set_weights(classifier.get_weights())
    kernel, bias = tampered.get_layer("logits").get_weights()
    bias = bias.copy()
    bias[3] += 2.0  # a small change to one class's bias: the flat triggers move to class 3
    tampered.get_layer("logits").set_weights([kernel, bias])
    result = watermarks.verify(tampered, full_key)
    assert result.statistic < 1.0 and not result.intact and result.label == "modified"
    assert "triggers changed label" in result.verdict


def test_variants_give_table3_shapes(classifier, digits, full_key):
    cla = FragileTrigger.from_preset("smoke", variant="cla").trigger_set(classifier, digits)
    non = FragileTrigger.from_preset("smoke", variant="non").trigger_set(classifier, digits)
    # G_cla: near one-hot; G_full: spread (Table 3), after the same few steps
    assert cla.metadata["mean_max_softmax"] > 0.8
    assert cla.metadata["mean_max_softmax"] > full_key.metadata["mean_max_softmax"] + 0.3
    assert non.metadata["epochs_run"] == 0
    # G_non's key is what the classifier says about its triggers, not Y_sk
    predicted = np.argmax(classifier.predict(non.inputs, verbose=0), axis=1)
    assert non.labels.tolist() == predicted.tolist()


def test_a_key_unfit_for_verification_is_refused(classifier, digits):
    options = dict(epochs=3, max_epochs=3, min_margin=100.0)  # no trigger can clear that gap
    scheme = FragileTrigger.from_preset("smoke", **options)
    with pytest.raises(EmbeddingFailed, match="smallest logit gap .* not above min_margin 100"):
        scheme.embed(classifier, digits)
    key = scheme.trigger_set(classifier, digits)  # the study path still gives it
    assert key.metadata["fit_for_verification"] is False
    assert "unfit for verification" in scheme.verify(classifier, key).verdict


def test_key_for_another_shape_is_refused(full_key):
    other = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    with pytest.raises(UserError, match="another model"):
        FragileTrigger().verify(other, full_key)


def test_fine_tuning_baseline_changes_the_weights_and_learns_g_non(classifier, digits, full_key):
    before = [w.copy() for w in classifier.get_weights()]
    result = FragileFineTune.from_preset("smoke").embed(classifier, digits)
    assert result.model is not classifier
    assert all(np.array_equal(a, b) for a, b in zip(before, classifier.get_weights(), strict=True))
    assert not weights_equal(result.model, classifier)
    key = result.key
    assert key.scheme == "fragile_finetune" and key.labels.tolist() == secret_key(10, 10).tolist()
    assert 3 <= key.metadata["epochs_run"] <= 40
    assert watermarks.verify(result.model, key).intact
    assert not watermarks.verify(classifier, key).intact  # the original never learnt them
    # its triggers are G_non's: the untrained generator of the same seed and shape
    non = FragileTrigger(n=10, width=16, variant="non").trigger_set(classifier, digits)
    np.testing.assert_array_equal(key.inputs, non.inputs)


# --------------------------------------------------------------------------- command line


def _exit_code(argv) -> int:
    """The status of ``python -m watermarks ARGV`` (usage errors exit through SystemExit)."""
    try:
        return watermarks_main(argv)
    except SystemExit as exc:
        return exc.code


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def saved(classifier, digits, tmp_path_factory):
    """The trained classifier and an independently trained twin, as a user's .keras files."""
    folder = tmp_path_factory.mktemp("user")
    classifier.save(folder / "user.keras")
    keras.utils.set_random_seed(1)
    twin = keras.models.clone_model(classifier)  # fresh initial weights
    models.train(twin, digits, TrainConfig(epochs=8, batch_size=32, seed=1), verbose=0)
    twin.save(folder / "twin.keras")
    return folder / "user.keras", folder / "twin.keras"


def test_cli_embeds_and_verifies_a_key_for_a_user_model(saved, tmp_path, capsys):
    model, twin = saved
    key = tmp_path / "key.npz"
    argv = ["embed", "--scheme", "fragile", "--preset", "smoke", "--model", str(model)]
    assert watermarks_main([*argv, "--dataset", "digits", "--out-key", str(key)]) == 0
    out = capsys.readouterr().out
    assert "intact" in out and f"wrote {key}" in out
    assert watermarks_main(["verify", "--model", str(model), "--key", str(key), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scheme"] == "fragile" and result["statistic"] == 1.0 and result["intact"]
    assert watermarks_main(["verify", "--model", str(twin), "--key", str(key), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["intact"] is False


@pytest.mark.parametrize("problem", ["unfit", "bad_out", "bad_option", "shape"])
def test_cli_bad_input_exits_2(saved, tmp_path, capsys, full_key, problem):
    model, _ = saved
    key = tmp_path / "k.npz"
    embed = ["embed", "--scheme", "fragile", "--preset", "smoke", "--model", str(model)]
    embed += ["--dataset", "digits"]
    if problem == "unfit":
        argv = [*embed, "--out-key", str(key), "--epochs", "3", "--max_epochs", "3"]
        argv += ["--min_margin", "100"]
    elif problem == "bad_out":
        argv = [*embed, "--out-key", str(tmp_path / "k.txt")]
    elif problem == "bad_option":
        argv = [*embed, "--out-key", str(key), "--variant", "half"]
    else:
        wide = keras.Sequential(
            [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
        )
        wide.save(tmp_path / "wide.keras")
        full_key.save(tmp_path / "full.npz")
        argv = [
            "verify",
            "--model",
            str(tmp_path / "wide.keras"),
            "--key",
            str(tmp_path / "full.npz"),
        ]
    expected = {
        "unfit": "not above min_margin 100",
        "bad_out": "must end in .npz",
        "bad_option": "invalid choice: 'half'",
        "shape": "the key was made for another model",
    }[problem]
    assert _exit_code(argv) == 2
    assert expected in _one_line(capsys)
    assert not key.exists()
