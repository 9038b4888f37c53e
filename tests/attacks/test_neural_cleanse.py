"""Neural Cleanse: the MAD test, the trigger algebra, detection, caching, unlearning, the CLI."""

import json

import keras
import numpy as np
import pytest

import models
from attacks import cli
from attacks import neural_cleanse as nc
from attacks.neural_cleanse import (
    NeuralCleanse,
    NeuralCleanseConfig,
    NeuralCleanseResult,
    anomaly_indices,
    detect,
    reverse_engineer,
)
from models import classifier
from models.training import Hook, TrainConfig, set_caching, set_max_steps

TARGET = 0


def stamp(x):
    """The planted trigger: a white 2 x 2 square in the lower right corner of an 8 x 8 digit."""
    out = np.array(x, dtype=np.float32, copy=True)
    out[:, 6:8, 6:8, :] = 1.0
    return out


@pytest.fixture(scope="session")
def backdoored(digits):
    """The tiny CNN trained on digits plus 10% stamped images of other classes labelled 0."""
    rng = np.random.default_rng(0)
    others = np.flatnonzero(digits.y_train != TARGET)
    chosen = rng.choice(others, size=len(digits.y_train) // 10, replace=False)
    x = np.concatenate([digits.x_train, stamp(digits.x_train[chosen])])
    y = np.concatenate([digits.y_train, np.full(len(chosen), TARGET)])
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, (x, y), TrainConfig(epochs=30, batch_size=32), verbose=0)
    keep = digits.y_test != TARGET
    wm = classifier.accuracy(model, stamp(digits.x_test[keep]), np.full(keep.sum(), TARGET))
    assert wm > 0.85, f"the planted backdoor did not take (watermark accuracy {wm:.2f})"
    return model


def _result(masks, patterns, l1=None):
    masks = np.asarray(masks, np.float32)
    l1 = masks.reshape(len(masks), -1).sum(axis=1) if l1 is None else np.asarray(l1, float)
    indices = anomaly_indices(l1)
    return NeuralCleanseResult(
        masks=masks,
        patterns=np.asarray(patterns, np.float32),
        l1_norms=l1,
        anomaly_indices=indices,
        flagged=tuple(int(k) for k in np.flatnonzero((l1 < np.median(l1)) & (indices > 2))),
        attack_success=np.ones(len(masks)),
        steps=3,
        seconds=0.5,
        class_steps=np.full(len(masks), 3),
        found=np.ones(len(masks), bool),
    )


def test_anomaly_index_on_known_numbers():
    norms = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, |deviations| 2 1 0 1 97, their median 1
    expected = np.array([2.0, 1.0, 0.0, 1.0, 97.0]) / 1.4826
    np.testing.assert_allclose(anomaly_indices(norms), expected, rtol=1e-5)
    # median 100, |deviations| 50 10 0 10 0 5 5, their median 5
    norms = np.array([50.0, 90.0, 100.0, 110.0, 100.0, 95.0, 105.0])
    assert anomaly_indices(norms)[0] == pytest.approx(50.0 / (1.4826 * 5.0), rel=1e-5)
    # MAD 0: on the median 0, off it infinite
    np.testing.assert_array_equal(anomaly_indices([5.0, 5.0, 5.0, 1.0]), [0.0, 0.0, 0.0, np.inf])


def test_flagging_and_suspicion_follow_the_norms():
    l1 = np.array([10.0, 50.0, 52.0, 48.0, 51.0, 49.0, 200.0])
    result = _result(np.zeros((7, 2, 2)), np.zeros((7, 2, 2, 1)), l1)
    assert result.flagged == (0,)  # 200 is an outlier too, but above the median
    assert result.anomaly_indices[6] > 2
    assert result.most_suspicious() == 0
    assert result.least_suspicious() == 6
    mild = _result(np.zeros((5, 2, 2)), np.zeros((5, 2, 2, 1)), [45.0, 50.0, 52.0, 48.0, 55.0])
    assert mild.flagged == ()
    assert mild.most_suspicious() == 0  # smallest norm even when not flagged
    rows = result.per_class()
    assert [r["class"] for r in rows] == list(range(7))
    assert [r["flagged"] for r in rows] == [True] + [False] * 6
    assert [r["suspect"] for r in rows].index(True) == 0
    assert [r["least_likely"] for r in rows].index(True) == 6
    assert rows[3]["l1_norm"] == 48.0


def test_apply_is_the_trigger_formula():
    rng = np.random.default_rng(1)
    masks, patterns = rng.random((3, 4, 5)), rng.random((3, 4, 5, 2))
    result = _result(masks, patterns)
    x = rng.random((6, 4, 5, 2)).astype(np.float32)
    for target in range(3):
        m = masks[target][..., None]
        np.testing.assert_allclose(
            result.apply(x, target), x * (1 - m) + m * patterns[target], rtol=1e-6, atol=1e-6
        )
    per_image = np.array([0, 1, 2, 2, 1, 0])
    stamped = result.apply(x, per_image)
    np.testing.assert_allclose(stamped[3], result.apply(x[3:4], 2)[0], atol=1e-6)
    with pytest.raises(models.UserError):
        result.apply(x, 3)
    with pytest.raises(models.UserError):
        result.apply(x[:, :3], 0)


def test_config_is_validated():
    assert NeuralCleanseConfig().cost_multiplier_down == pytest.approx(1.5**1.5)
    for bad in (
        {"steps": 0},
        {"regularization": "l3"},
        {"attack_success_threshold": 1.5},
        {"cost_multiplier": 1.0},
        {"class_chunk": 0},
        {"early_stop": "yes"},
    ):
        with pytest.raises(models.UserError):
            NeuralCleanseConfig(**bad)


def test_planted_backdoor_is_found_and_flagged(backdoored, digits):
    config = NeuralCleanseConfig(steps=50)
    result = reverse_engineer(backdoored, digits.x_test, config, y_clean=digits.y_test)
    assert result.masks.shape == (10, 8, 8) and result.patterns.shape == (10, 8, 8, 1)
    assert result.masks.dtype == np.float32
    assert result.masks.min() >= 0.0 and result.masks.max() <= 1.0
    assert result.patterns.min() >= 0.0 and result.patterns.max() <= 1.0
    np.testing.assert_allclose(result.l1_norms, result.masks.sum(axis=(1, 2)), rtol=1e-5)
    assert result.most_suspicious() == TARGET
    assert int(np.argmin(result.l1_norms)) == TARGET
    assert TARGET in result.flagged, f"indices {np.round(result.anomaly_indices, 2)}"
    assert result.attack_success[TARGET] >= 0.9
    assert 1 <= result.steps <= 50
    # the reversed trigger does what the success rate says
    keep = digits.y_test != TARGET
    labels = np.argmax(backdoored.predict(result.apply(digits.x_test[keep], TARGET), verbose=0), -1)
    assert np.mean(labels == TARGET) == pytest.approx(result.attack_success[TARGET], abs=1e-6)


def test_all_classes_at_once_equal_one_class_at_a_time(backdoored, digits):
    x, y = digits.x_test[:160], digits.y_test[:160]
    # a short patience so that classes stop early, each at its own epoch
    base = dict(steps=40, mini_batches=3, patience=2, early_stop_patience=3, seed=3)
    together = reverse_engineer(backdoored, x, NeuralCleanseConfig(**base), y_clean=y)
    alone = reverse_engineer(backdoored, x, NeuralCleanseConfig(**base, class_chunk=1), y_clean=y)
    np.testing.assert_array_equal(together.class_steps, alone.class_steps)
    assert together.class_steps.min() < 40, "no class stopped early: the test checks nothing"
    np.testing.assert_allclose(together.masks, alone.masks, atol=1e-3)
    np.testing.assert_allclose(together.patterns, alone.patterns, atol=1e-3)
    np.testing.assert_allclose(together.l1_norms, alone.l1_norms, rtol=1e-3)
    # and the seed matters: another seed starts elsewhere
    other = reverse_engineer(
        backdoored, x, NeuralCleanseConfig(**{**base, "seed": 4, "steps": 1}), y_clean=y
    )
    assert not np.allclose(other.masks, together.masks, atol=1e-2)


def test_probabilities_and_logits_give_the_same_triggers(digits):
    """A Dense softmax (probabilities) and the same Dense without it (logits) agree."""
    models.seed_everything(0)
    inputs = keras.Input(digits.input_shape)
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(inputs))
    logits_model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    probs_model = keras.Sequential(
        [
            keras.Input(digits.input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    probs_model.set_weights(logits_model.get_weights())
    config = NeuralCleanseConfig(steps=4, mini_batches=3)
    x = digits.x_test[:96]
    a = reverse_engineer(logits_model, x, config)
    b = reverse_engineer(probs_model, x, config)
    np.testing.assert_allclose(a.masks, b.masks, atol=1e-3)
    np.testing.assert_allclose(a.attack_success, b.attack_success)


def test_json_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    result = _result(rng.random((4, 3, 3)), rng.random((4, 3, 3, 1)), [1.0, 1.0, 1.0, 0.5])
    assert np.isinf(result.anomaly_indices[3])
    path = result.save_json(tmp_path / "nc.json")
    assert [p.name for p in path.parent.iterdir()] == ["nc.json"]  # no staging file left
    raw = json.loads(path.read_text())  # strict JSON: infinity is written as null
    assert raw["anomaly_indices"][3] is None and raw["flagged"] == [3]
    back = NeuralCleanseResult.load_json(path)
    np.testing.assert_array_equal(back.masks, result.masks)
    np.testing.assert_array_equal(back.patterns, result.patterns)
    np.testing.assert_array_equal(back.l1_norms, result.l1_norms)
    np.testing.assert_array_equal(back.anomaly_indices, result.anomaly_indices)
    assert back.flagged == result.flagged and back.steps == result.steps
    assert back.most_suspicious() == result.most_suspicious() == 3
    with pytest.raises(models.UserError):
        NeuralCleanseResult.from_json('{"l1_norms": [1]}')


def test_a_result_is_cached_by_model_images_and_config(backdoored, digits, monkeypatch):
    x, y = digits.x_test[:96], digits.y_test[:96]
    config = NeuralCleanseConfig(steps=3, mini_batches=2, seed=11)
    first = reverse_engineer(backdoored, x, config, y_clean=y)

    def no_second_run(*args, **kwargs):
        raise AssertionError("Neural Cleanse ran twice on the same model, images and config")

    monkeypatch.setattr(nc, "_optimise", no_second_run)
    again = reverse_engineer(backdoored, x, config, y_clean=y)
    np.testing.assert_array_equal(again.masks, first.masks)
    np.testing.assert_array_equal(again.anomaly_indices, first.anomaly_indices)
    assert again.flagged == first.flagged and again.seconds == first.seconds
    # another config, other images or caching off: it runs
    for changed in (
        lambda: reverse_engineer(backdoored, x, NeuralCleanseConfig(steps=4, seed=11), y_clean=y),
        lambda: reverse_engineer(backdoored, x[:95], config, y_clean=y[:95]),
    ):
        with pytest.raises(AssertionError, match="ran twice"):
            changed()
    set_caching(False)
    try:
        with pytest.raises(AssertionError, match="ran twice"):
            reverse_engineer(backdoored, x, config, y_clean=y)
    finally:
        set_caching(True)


def test_max_steps_caps_the_epochs_and_is_cached_apart(backdoored, digits):
    """--max-steps N: at most N epochs, never served from (or as) the full run's cache entry."""
    x, y = digits.x_test[:64], digits.y_test[:64]
    config = NeuralCleanseConfig(steps=6, mini_batches=1, early_stop=False, seed=12)
    set_max_steps(2)
    try:
        short = reverse_engineer(backdoored, x, config, y_clean=y)
    finally:
        set_max_steps(None)
    assert short.steps == 2
    full = reverse_engineer(backdoored, x, config, y_clean=y)
    assert full.steps == 6


def test_a_model_on_another_input_range_gets_the_same_triggers(backdoored, digits):
    """The backdoored model behind a Rescaling(1/255): fed [0, 255], it must give the same triggers."""
    inputs = keras.Input(digits.input_shape)
    rescaled = keras.layers.Rescaling(1 / 255)(inputs)
    wrapped = keras.Model(inputs, backdoored(rescaled))
    config = NeuralCleanseConfig(steps=20)
    wide = digits.with_input_range(0, 255)
    plain = detect(backdoored, digits, config, split="test")
    scaled = detect(wrapped, wide, config, split="test")
    assert scaled.most_suspicious() == plain.most_suspicious() == TARGET
    np.testing.assert_allclose(scaled.l1_norms, plain.l1_norms, rtol=0.05)
    # the triggers stamp images of either range the same way
    stamped = scaled.apply(wide.x_test[:5], TARGET, data=wide)
    np.testing.assert_allclose(stamped / 255, scaled.apply(digits.x_test[:5], TARGET), atol=1e-5)


def test_a_model_with_nan_outputs_is_refused(digits):
    models.seed_everything(0)
    broken = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    broken.set_weights([np.full_like(w, np.nan) for w in broken.get_weights()])
    with pytest.raises(models.UserError, match="not finite"):
        reverse_engineer(broken, digits.x_test[:32], NeuralCleanseConfig(steps=1))


def _wm_accuracy(model, digits):
    keep = digits.y_test != TARGET
    return classifier.accuracy(model, stamp(digits.x_test[keep]), np.full(keep.sum(), TARGET))


def test_unlearning_removes_the_planted_backdoor(backdoored, digits):
    adversary = digits.subset(fraction=0.2, seed=1)
    attack = NeuralCleanse.from_preset("smoke", **{"detection.steps": 20})
    hook = Hook("wm", lambda m: _wm_accuracy(m, digits))
    removal = attack.remove(backdoored, adversary, hooks=[hook])
    info = removal.info
    assert info["detection"]["most_suspicious"] == TARGET
    assert TARGET in info["detection"]["flagged"]
    assert info["unlearned_classes"] == [TARGET]
    assert info["stamped"] == round(0.2 * len(adversary.y_train))
    assert len(info["curves"]["wm"]) == 1 == info["epochs_run"]
    json.dumps(info, allow_nan=False)  # JSON-able
    assert _wm_accuracy(backdoored, digits) > 0.9
    assert _wm_accuracy(removal.model, digits) < 0.3
    assert classifier.accuracy(removal.model, digits.x_test, digits.y_test) > 0.85


def test_the_papers_defender_does_nothing_when_no_class_is_flagged(backdoored, digits, monkeypatch):
    found = reverse_engineer(backdoored, digits.x_test[:64], NeuralCleanseConfig(steps=1))
    quiet = NeuralCleanseResult(**{**found.__dict__, "flagged": ()})
    monkeypatch.setattr(nc, "detect", lambda *args, **kwargs: quiet)
    removal = NeuralCleanse(unlearn="flagged").remove(backdoored, digits)
    assert removal.info["unlearned_classes"] == [] and removal.info["stamped"] == 0
    np.testing.assert_array_equal(
        classifier.predict(removal.model, digits.x_test),
        classifier.predict(backdoored, digits.x_test),
    )


@pytest.fixture(scope="module")
def user_model(tmp_path_factory, digits):
    """A plain keras.Sequential the suite did not build, trained briefly and saved."""
    models.seed_everything(0)
    model = keras.Sequential(
        [
            keras.Input(digits.input_shape),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=2, verbose=0)
    path = tmp_path_factory.mktemp("user") / "user.keras"
    model.save(path)
    return path


def test_cli_on_a_user_model(user_model, tmp_path, capsys):
    out = tmp_path / "nc.json"
    argv = ["neural-cleanse", "--model", str(user_model), "--dataset", "digits"]
    status = cli.main([*argv, "--n-clean", "64", "--steps", "2", "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "flagged" in printed and "most suspicious" in printed
    saved = NeuralCleanseResult.load_json(out)
    assert saved.masks.shape == (10, 8, 8) and len(saved.anomaly_indices) == 10
    assert saved.steps == 2
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_bad_input_with_exit_2(user_model, tmp_path, capsys):
    lambda_model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Lambda(lambda t: t * 2), keras.layers.Flatten()]
    )
    lambda_path = tmp_path / "lambda.keras"
    lambda_model.save(lambda_path)
    wrong_shape = keras.Sequential(
        [keras.Input((10, 10, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    wrong_path = tmp_path / "wrong.keras"
    wrong_shape.save(wrong_path)
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip")
    nan_model = keras.models.load_model(user_model)
    nan_model.set_weights([np.full_like(w, np.nan) for w in nan_model.get_weights()])
    nan_path = tmp_path / "nan.keras"
    nan_model.save(nan_path)
    cases = {
        "missing": ["--model", str(tmp_path / "nope.keras"), "--dataset", "digits"],
        "corrupt": ["--model", str(corrupt), "--dataset", "digits"],
        "lambda": ["--model", str(lambda_path), "--dataset", "digits"],
        "dataset": ["--model", str(user_model), "--dataset", "cifar"],
        "shape": ["--model", str(wrong_path), "--dataset", "digits"],
        "nan": ["--model", str(nan_path), "--dataset", "digits"],
        "steps": ["--model", str(user_model), "--dataset", "digits", "--steps", "0"],
    }
    for name, args in cases.items():
        out = tmp_path / f"{name}.json"
        status = cli.main(["neural-cleanse", "--steps", "1", *args, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert status == 2, name
        assert err.startswith("error:") and "\n" not in err, (name, err)
        assert not out.exists()
    assert "not finite" in _error(cli, ["--model", str(nan_path)], tmp_path, capsys)


def _error(cli, model_args, tmp_path, capsys) -> str:
    argv = ["neural-cleanse", *model_args, "--dataset", "digits", "--steps", "1"]
    assert cli.main([*argv, "--out", str(tmp_path / "x.json")]) == 2
    return capsys.readouterr().err.strip()


def test_cli_checks_out_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(models, "load_model", no_work)
    argv = ["neural-cleanse", "--model", str(tmp_path / "m.keras"), "--dataset", "digits"]
    for out, message in (
        (tmp_path / "missing" / "nc.json", "does not exist"),
        (tmp_path / "nc.txt", "must end in .json"),
        (tmp_path, "must end in .json"),
    ):
        assert cli.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
