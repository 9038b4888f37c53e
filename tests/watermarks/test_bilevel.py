"""Bi-level watermark (Yang et al. 2021): masks of eq. 6, the inner loop, embedding, verification, CLI."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
import watermarks
from models.errors import UserError
from models.registry import build_config
from models.training import TrainConfig
from watermarks import bilevel as bl
from watermarks.base import Key

# A strong, short embedding for the tiny CNN (1418 parameters): 10% of each layer, large steps.
FAST = dict(
    keys=8,
    phases=2,
    inner_steps=1,
    steps=60,
    learning_rate=0.05,
    trade_off=0.5,
    top_fraction=0.1,
    mask_samples=128,
)


@pytest.fixture(scope="module")
def trained(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=8, batch_size=32), verbose=0)
    return model


@pytest.fixture(scope="module")
def embedded(trained, digits):
    before = [w.copy() for w in trained.get_weights()]
    marked, key = bl.BiLevel(**FAST).embed(trained, digits)
    after = trained.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)), "input changed"
    return marked, key


# ----------------------------------------------------------------------------- eq. 6


def test_layer_mask_matches_the_hand_computed_one():
    key = np.array([5.0, 4, 3, 2, 1, 0])  # H_s (top 2, largest): {0, 1}
    natural = np.array([9.0, 0, 1, 2, 8, 3])  # H_t (top 2, smallest): {1, 2}
    mask, literal = bl.layer_mask(key, natural, 2, "intersection")
    assert literal == 1 and np.flatnonzero(mask).tolist() == [1]
    # widened: worse of the two ranks, key rank  = [0 1 2 3 4 5], natural rank = [5 0 1 2 4 3]
    mask, literal = bl.layer_mask(key, natural, 2, "widened")
    assert literal == 1 and np.flatnonzero(mask).tolist() == [1, 2]
    # parameters changed in an earlier phase stay; new ones join only while the budget lasts
    used = np.zeros(6, dtype=bool)
    used[3] = True
    mask, _ = bl.layer_mask(key, natural, 2, "intersection", used)
    assert np.flatnonzero(mask).tolist() == [1, 3]
    full = np.zeros(6, dtype=bool)
    full[[4, 5]] = True
    mask, _ = bl.layer_mask(key, natural, 2, "widened", full)
    assert np.flatnonzero(mask).tolist() == [4, 5]


def test_eq6_masks_on_a_toy_model_equal_the_hand_computed_ones():
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((2, 2, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="dense"),
            keras.layers.Softmax(),
        ]
    )
    rng = np.random.default_rng(0)
    exemplars, targets = rng.normal(size=(4, 2, 2, 1)).astype("float32"), np.array([0, 1, 2, 0])
    natural, labels = rng.normal(size=(6, 2, 2, 1)).astype("float32"), rng.integers(0, 3, 6)
    config = bl.BiLevelConfig(top_fraction=0.2)  # 15 parameters -> N = 3

    def mean_abs_gradient(x, y):  # by hand: dCE/dW = x (p - e_y)^T, dCE/db = p - e_y
        w, b = model.get_layer("dense").get_weights()
        flat = x.reshape(len(x), -1).astype(np.float64)
        z = flat @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        delta = p - np.eye(3)[y]
        dw = np.abs(flat[:, :, None] * delta[:, None, :]).mean(0)
        return np.concatenate([dw.ravel(), np.abs(delta).mean(0)])

    s, t = mean_abs_gradient(exemplars, targets), mean_abs_gradient(natural, labels)
    top_s = set(sorted(range(15), key=lambda i: (-s[i], i))[:3])
    top_t = set(sorted(range(15), key=lambda i: (t[i], i))[:3])
    rank_s = {i: r for r, i in enumerate(sorted(range(15), key=lambda i: (-s[i], i)))}
    rank_t = {i: r for r, i in enumerate(sorted(range(15), key=lambda i: (t[i], i)))}
    widened = set(sorted(range(15), key=lambda i: (max(rank_s[i], rank_t[i]), rank_s[i]))[:3])
    for rule, expected in (("intersection", top_s & top_t), ("widened", widened)):
        found = bl.eq6_masks(
            model, exemplars, targets, natural, labels, dataclasses.replace(config, mask_rule=rule)
        )
        (masks, literal) = found["dense"]
        flat = np.concatenate([masks["kernel"].ravel(), masks["bias"].ravel()])
        assert set(np.flatnonzero(flat)) == expected, rule
        assert literal == len(top_s & top_t)


# ----------------------------------------------------------------------------- eq. 5


def _smooth_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((2, 2, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
            keras.layers.Softmax(),
        ]
    )


def test_eq5_hypergradient_matches_a_finite_difference_and_its_first_order_approximation():
    model = _smooth_model()
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(3, 2, 2, 1)).astype("float32")
    targets = np.array([0, 1, 2])
    config = bl.BiLevelConfig(learning_rate=0.5)
    exact = bl.hypergradient(model, keys, targets, config)
    (w1, b1), (w2, b2) = (model.layers[i].get_weights() for i in (1, 2))

    def validation_loss(s):  # L(theta - a grad L(theta; S); D_wm), written out independently
        theta = [tf.constant(v) for v in (w1, b1, w2, b2)]

        def loss(params, x):
            h = tf.tanh(tf.reshape(x, (len(x), -1)) @ params[0] + params[1])
            logits = h @ params[2] + params[3]
            return tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(targets), logits)
            )

        with tf.GradientTape() as tape:
            tape.watch(theta)
            inner = loss(theta, tf.constant(s))
        grads = tape.gradient(inner, theta)
        return float(loss([p - 0.5 * g for p, g in zip(theta, grads, strict=True)], keys))

    direction = rng.normal(size=keys.shape).astype("float32")
    step = 1e-2
    numeric = (
        validation_loss(keys + step * direction) - validation_loss(keys - step * direction)
    ) / (2 * step)
    assert np.sum(exact * direction) == pytest.approx(numeric, rel=2e-2, abs=1e-5)
    assert np.abs(exact).max() > 0
    assert bl.hypergradient_cosine(model, keys, targets, config) > 0.99


# ----------------------------------------------------------------------------- embedding


def test_verify_detects_after_embed_and_not_on_the_unmarked_model(trained, embedded):
    marked, key = embedded
    found = watermarks.verify(marked, key)
    assert found.detected and found.accuracy >= found.threshold and found.p_value <= 0.01
    clean = watermarks.verify(trained, key)
    assert not clean.detected and clean.accuracy == 0.0 and clean.p_value == 1.0
    # every key's target differs from the unmarked model's label
    assert np.all(key.labels != key.arrays["original_labels"])
    assert np.all(key.labels != np.argmax(trained.predict(key.inputs, verbose=0), -1))


def test_keys_are_the_highest_entropy_held_out_inputs(trained, digits, embedded):
    _, key = embedded
    probabilities = trained.predict(digits.x_test, verbose=0)
    entropy = bl.entropy(probabilities)
    chosen = key.arrays["pool_indices"]
    np.testing.assert_array_equal(key.inputs, digits.x_test[chosen])
    assert entropy[chosen].min() >= np.delete(entropy, chosen).max()
    runner_up = np.argsort(-probabilities[chosen], axis=-1)[:, 1]
    np.testing.assert_array_equal(key.labels, runner_up)


def test_target_rules_and_their_null_probabilities():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=200)
    index, runner, predicted = bl.select_keys(p, 50, np.random.default_rng(1), "runner_up")
    np.testing.assert_array_equal(runner, np.argsort(-p[index], axis=-1)[:, 1])
    _, random, _ = bl.select_keys(p, 50, np.random.default_rng(1), "random")
    assert np.all(random != predicted) and len(set(random.tolist())) > 3
    assert bl.null_probability("random", 10) == pytest.approx(1 / 9)
    assert bl.null_probability("runner_up", 10) == 0.5
    # the exact binomial tail and the smallest detectable share
    assert bl.binomial_p_value(8, 8, 0.5) == pytest.approx(0.5**8)
    assert bl.binomial_threshold(8, 0.5, 0.01) == 1.0
    assert bl.binomial_threshold(5, 0.5, 0.01) == float("inf")
    assert bl.binomial_threshold(5, 1 / 9, 0.01) == 0.8


def test_changed_parameter_count_is_exact_and_within_the_budget(trained, digits):
    config = dict(FAST, top_fraction=0.025, phases=2, steps=20)
    marked, key = bl.BiLevel(**config).embed(trained, digits)
    counted = sum(
        int(np.count_nonzero(a != b))
        for a, b in zip(trained.get_weights(), marked.get_weights(), strict=True)
    )
    assert key.metadata["changed_parameters"] == counted > 0
    assert counted <= sum(key.metadata["mask_sizes"]) <= 0.025 * trained.count_params()
    assert key.metadata["changed_fraction"] == counted / trained.count_params() <= 0.025
    for layer in trained.layers:  # only layers with kernels may change
        if not any("kernel" in w.path for w in layer.weights):
            other = marked.get_layer(layer.name)
            for a, b in zip(layer.get_weights(), other.get_weights(), strict=True):
                np.testing.assert_array_equal(a, b)


def test_key_round_trip(embedded, tmp_path):
    marked, key = embedded
    path = key.save(tmp_path / "key.npz")
    loaded = Key.load(path)
    assert loaded.scheme == "bilevel" and loaded.metadata == key.metadata
    np.testing.assert_array_equal(loaded.inputs, key.inputs)
    np.testing.assert_array_equal(loaded.labels, key.labels)
    for name in ("original_labels", "exemplars", "pool_indices"):
        np.testing.assert_array_equal(loaded.arrays[name], key.arrays[name])
    config = build_config(bl.BiLevelConfig, loaded.metadata["config"])
    assert config == bl.BiLevelConfig(**FAST)
    assert watermarks.verify(marked, loaded) == watermarks.verify(marked, key)


def test_saved_and_reloaded_marked_model_predicts_the_same(embedded, tmp_path):
    marked, key = embedded
    marked.save(tmp_path / "marked.keras")
    reloaded = models.load_model(tmp_path / "marked.keras")
    np.testing.assert_array_equal(
        marked.predict(key.inputs, verbose=0), reloaded.predict(key.inputs, verbose=0)
    )
    assert watermarks.verify(reloaded, key).detected


def test_same_seed_same_watermark(trained, digits):
    config = dict(FAST, phases=1, steps=5)
    (a, key_a), (b, key_b) = (bl.BiLevel(**config).embed(trained, digits) for _ in range(2))
    np.testing.assert_array_equal(key_a.labels, key_b.labels)
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_literal_intersection_is_recorded_and_can_embed_nothing(trained, digits):
    config = dict(FAST, phases=1, steps=5, mask_rule="intersection", top_fraction=0.025)
    marked, key = bl.BiLevel(**config).embed(trained, digits)
    sizes = key.metadata["intersection_sizes"][0]
    assert len(sizes) == len(key.metadata["layers"]) == 3
    assert sum(key.metadata["mask_sizes"]) == sum(sizes)
    assert key.metadata["changed_parameters"] <= sum(sizes)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keys": 0}, "keys must be"),
        ({"mask_rule": "union"}, "unknown mask_rule 'union'"),
        ({"inner": "third_order"}, "unknown inner"),
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"top_fraction": 0.0}, "top_fraction must be in"),
        ({"trade_off": 1.5}, "trade_off must be in"),
        ({"layers": "conv1"}, "list of layer names"),
        ({"lambda": 0.5}, "unknown option"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(UserError, match=message):
        bl.BiLevel(**options)


def test_embed_rejects_data_that_does_not_fit(trained, digits):
    with pytest.raises(UserError, match="held-out pool has 3"):
        bl.BiLevel(keys=5).embed(trained, dataclasses.replace(digits, x_test=digits.x_test[:3]))
    with pytest.raises(UserError, match="no layer 'nope'"):
        bl.BiLevel(layers=("nope",)).embed(trained, digits)


# ----------------------------------------------------------------------------- command line


def _user_model(path, digits):
    """A plain keras.Sequential the suite did not make, softmax inside its last Dense."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x_train, digits.y_train, epochs=5, batch_size=32, verbose=0)
    model.save(path)
    return path


def test_cli_embeds_and_verifies_a_users_sequential_model(tmp_path, digits, capsys):
    from watermarks.cli import main

    source = _user_model(tmp_path / "user.keras", digits)
    out_model, out_key = tmp_path / "marked.keras", tmp_path / "key.npz"
    code = main(
        [
            "bilevel",
            "--model",
            str(source),
            "--dataset",
            "digits",
            "--keys",
            "8",
            "--phases",
            "2",
            "--inner-steps",
            "1",
            "--steps",
            "60",
            "--learning-rate",
            "0.05",
            "--trade-off",
            "0.5",
            "--top-fraction",
            "0.1",
            "--mask-samples",
            "128",
            "--out-model",
            str(out_model),
            "--out-key",
            str(out_key),
        ]
    )
    assert code == 0 and out_model.is_file() and out_key.is_file()
    assert "embedded 8 keys" in capsys.readouterr().out
    assert main(["verify", "--model", str(out_model), "--key", str(out_key)]) == 0
    assert "watermark present" in capsys.readouterr().out
    assert main(["verify", "--model", str(source), "--key", str(out_key)]) == 0
    assert "no watermark shown" in capsys.readouterr().out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "missing.keras"], "does not exist"),
        (["--out-model", "{tmp}/x.h5"], "must end in .keras"),
        (["--out-key", "{tmp}/nofolder/k.npz"], "does not exist"),
        (["--mask-rule", "union"], "unknown mask_rule"),
        (["--size", "16"], "pass --size 8 --channels 1"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, digits, capsys, extra, message):
    from watermarks.cli import main

    source = tmp_path / "user.keras"
    keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10, "softmax")]
    ).save(source)
    argv = {
        "--model": str(source),
        "--dataset": "digits",
        "--keys": "2",
        "--phases": "1",
        "--steps": "1",
        "--out-model": str(tmp_path / "m.keras"),
        "--out-key": str(tmp_path / "k.npz"),
    }
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        argv[flag] = value.format(tmp=tmp_path)
    assert main(["bilevel", *[part for pair in argv.items() for part in pair]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "m.keras").exists() and not (tmp_path / "k.npz").exists()
