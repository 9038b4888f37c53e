"""Bi-level watermark (Yang et al. 2021): masks of eq. 6, the inner loop, masked steps, embedding, verification, CLI."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import models
import watermarks
from models import classifier
from models.errors import UserError
from models.evidence import binomial_threshold
from models.registry import build_config
from models.training import Hook, TrainConfig, set_max_steps
from watermarks import bilevel as bl
from watermarks.base import EmbeddingFailed, Key


@pytest.fixture(scope="module")
def trained(digits):
    models.seed_everything(0)
    model = models.build("_tiny_cnn", digits.input_shape, digits.num_classes)
    models.train(model, digits, TrainConfig(epochs=8, batch_size=32), verbose=0)
    return model


@pytest.fixture(scope="module")
def embedded(trained, digits):
    before = [w.copy() for w in trained.get_weights()]
    marked = bl.BiLevel.from_preset("smoke").embed(trained, digits)
    after = trained.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)), "input changed"
    return marked


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


def test_ties_are_ranked_by_position():
    # three equal key scores: the earlier parameter ranks first (rankdata "ordinal")
    key = np.array([1.0, 1.0, 1.0, 0.0])
    natural = np.zeros(4)
    mask, literal = bl.layer_mask(key, natural, 2, "intersection")
    assert np.flatnonzero(mask).tolist() == [0, 1] and literal == 2


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


# ----------------------------------------------------------------------------- masked steps


def _toy_embedder(optimizer="adam"):
    model = _smooth_model()
    config = bl.BiLevelConfig(learning_rate=0.05, trade_off=0.5, optimizer=optimizer)
    embedder = bl._Embedder(model, config, bl.kernel_layers(model))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4, 2, 2, 1)).astype("float32")  # 6 steps of batch 4
    y = rng.integers(0, 3, size=(6, 4))
    keys, targets = rng.normal(size=(3, 2, 2, 1)).astype("float32"), np.array([2, 0, 1])
    inputs = (tf.constant(x), tf.constant(y), tf.constant(keys), tf.constant(targets))
    return embedder, inputs, rng


def _values(embedder):
    return [keras.ops.convert_to_numpy(v).copy() for v in embedder.variables]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_masked_steps_move_only_masked_parameters_bit_for_bit(optimizer):
    embedder, inputs, rng = _toy_embedder(optimizer)
    masks = {k: rng.random(v.shape) < 0.3 for k, v in enumerate(embedder.variables)}
    embedder.set_masks(masks)
    before = _values(embedder)
    embedder.masked_steps(*inputs)
    after = _values(embedder)
    for k, (a, b) in enumerate(zip(before, after, strict=True)):
        np.testing.assert_array_equal(a[~masks[k]], b[~masks[k]])
        assert np.all(a[masks[k]] != b[masks[k]]), "a masked parameter did not move"


def test_a_parameter_leaving_the_mask_stays_put_under_adam():
    embedder, inputs, rng = _toy_embedder("adam")
    wide = {k: np.ones(v.shape, dtype=bool) for k, v in enumerate(embedder.variables)}
    narrow = {k: rng.random(v.shape) < 0.5 for k, v in enumerate(embedder.variables)}

    # the hazard: Adam's moments keep moving a parameter with zero gradients ...
    embedder.set_masks(wide)
    embedder.masked_steps(*inputs)
    for k, mask in narrow.items():
        embedder.masks[k].assign(mask)  # behind set_masks' back: the moments stay
    before = _values(embedder)
    embedder.masked_steps(*inputs)
    moved = [
        np.any(a[~narrow[k]] != b[~narrow[k]])
        for k, (a, b) in enumerate(zip(before, _values(embedder), strict=True))
    ]
    assert any(moved)

    # ... which set_masks prevents by starting the optimizer afresh
    embedder.reset(embedder.model.get_weights())
    embedder.set_masks(wide)
    embedder.masked_steps(*inputs)
    embedder.set_masks(narrow)
    before = _values(embedder)
    embedder.masked_steps(*inputs)
    for k, (a, b) in enumerate(zip(before, _values(embedder), strict=True)):
        np.testing.assert_array_equal(a[~narrow[k]], b[~narrow[k]])


# ----------------------------------------------------------------------------- embedding


def test_verify_says_present_after_embed_and_not_on_the_unmarked_model(trained, embedded):
    found = watermarks.verify(embedded.model, embedded.key)
    assert found.kind == "robust" and found.scheme == "bilevel" and found.n == 8
    assert found.present and found.statistic >= found.threshold and found.p_value <= 0.01
    assert found.threshold == 1.0 == binomial_threshold(8, 0.5, 0.01)
    assert "Binomial(8, 0.5)" in found.null
    clean = watermarks.verify(trained, embedded.key)
    assert not clean.present and clean.statistic == 0.0 and clean.p_value == 1.0
    # every key's target differs from the unmarked model's label
    key = embedded.key
    assert np.all(key.labels != key.arrays["original_labels"])
    assert np.all(key.labels != classifier.labels(trained, key.inputs))


def test_a_refused_query_never_matches(embedded):
    scheme, key = bl.BiLevel.from_preset("smoke"), embedded.key
    outputs = np.eye(10, dtype=np.float32)[key.labels]
    assert scheme.decide(key, outputs).statistic == 1.0
    outputs[0] = np.nan
    result = scheme.decide(key, outputs)
    assert result.statistic == 7 / 8 and not result.present


def test_keys_are_the_highest_entropy_held_out_inputs(trained, digits, embedded):
    key = embedded.key
    probabilities = classifier.probabilities(trained, digits.x_test)
    entropy = stats.entropy(probabilities, axis=-1)
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


def test_changed_parameters_are_exact_within_the_budget_and_only_in_kernel_layers(trained, digits):
    scheme = bl.BiLevel.from_preset("smoke", top_fraction=0.025, steps=20)
    marked = scheme.embed(trained, digits)
    meta = marked.key.metadata
    counted = sum(
        int(np.count_nonzero(a != b))
        for a, b in zip(trained.get_weights(), marked.model.get_weights(), strict=True)
    )
    assert meta["changed_parameters"] == counted > 0
    assert counted <= sum(meta["mask_sizes"]) <= 0.025 * trained.count_params()
    assert meta["changed_fraction"] == counted / trained.count_params() <= 0.025
    for layer in trained.layers:  # only layers with kernels may change
        if not any("kernel" in w.path for w in layer.weights):
            other = marked.model.get_layer(layer.name)
            for a, b in zip(layer.get_weights(), other.get_weights(), strict=True):
                np.testing.assert_array_equal(a, b)


def test_hooks_run_after_every_phase(trained, digits):
    calls = []

    def measure(model):
        calls.append(model)
        return float(len(calls))

    scheme = bl.BiLevel.from_preset("smoke", phases=3)
    marked = scheme.embed(trained, digits, hooks=[Hook("count", measure)])
    assert marked.key.metadata["curves"] == {"count": [1.0, 2.0, 3.0]}
    assert marked.key.metadata["phases_run"] == 3


def test_max_steps_caps_phases_steps_and_inner_iterations(trained, digits):
    calls = []
    scheme = bl.BiLevel.from_preset("smoke", phases=4, inner_steps=3, steps=50)
    set_max_steps(2)
    try:
        marked = scheme.mark(trained, digits, hooks=[Hook("n", lambda m: calls.append(1) or 0.0)])
        embedder = scheme._embedder(trained)
    finally:
        set_max_steps(None)
    assert marked.key.metadata["phases_run"] == 2 and len(calls) == 2
    assert embedder.optimizer.iterations.numpy() == 0  # reset; the run itself took 2 x 2 steps
    # the capped inner loop is a graph of its own, never served to an uncapped embedding
    assert scheme._embedder(trained) is not embedder


def test_too_few_keys_cannot_be_significant_and_fail_the_embedding(trained, digits):
    with pytest.raises(EmbeddingFailed, match="did not take"):
        bl.BiLevel.from_preset("smoke", keys=3, phases=1, steps=5).embed(trained, digits)


def test_key_round_trip(embedded, tmp_path):
    key = embedded.key
    path = key.save(tmp_path / "key.npz")
    loaded = Key.load(path)
    assert loaded.scheme == "bilevel" and loaded.metadata == key.metadata
    assert loaded.metadata["dataset"] == "digits" and loaded.metadata["input_range"] == [0.0, 1.0]
    np.testing.assert_array_equal(loaded.inputs, key.inputs)
    np.testing.assert_array_equal(loaded.labels, key.labels)
    for name in ("original_labels", "exemplars", "pool_indices"):
        np.testing.assert_array_equal(loaded.arrays[name], key.arrays[name])
    config = build_config(bl.BiLevelConfig, loaded.metadata["config"])
    assert config == bl.BiLevel.preset_config("smoke")
    assert watermarks.verify(embedded.model, loaded) == watermarks.verify(embedded.model, key)


def test_saved_and_reloaded_marked_model_predicts_the_same(embedded, tmp_path):
    embedded.model.save(tmp_path / "marked.keras")
    reloaded = models.load_model(tmp_path / "marked.keras")
    x = embedded.key.inputs
    np.testing.assert_array_equal(
        classifier.predict(embedded.model, x), classifier.predict(reloaded, x)
    )
    assert watermarks.verify(reloaded, embedded.key).present


def test_same_seed_same_watermark(trained, digits):
    scheme = bl.BiLevel.from_preset("smoke", phases=1, steps=5)
    a, b = (scheme._embed(trained, digits, hooks=()) for _ in range(2))
    np.testing.assert_array_equal(a.key.labels, b.key.labels)
    for x, y in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_literal_intersection_is_recorded_and_can_embed_nothing(trained, digits):
    scheme = bl.BiLevel.from_preset(
        "smoke", phases=1, steps=5, mask_rule="intersection", top_fraction=0.025
    )
    marked = scheme._embed(trained, digits, hooks=())
    sizes = marked.key.metadata["intersection_sizes"][0]
    assert len(sizes) == len(marked.key.metadata["layers"]) == 3
    assert sum(marked.key.metadata["mask_sizes"]) == sum(sizes)
    assert marked.key.metadata["changed_parameters"] <= sum(sizes)


def test_presets():
    assert set(bl.BiLevel.presets) == {"smoke", "quick", "paper"}
    assert bl.BiLevel.preset_config("quick") == bl.BiLevelConfig(keys=20, learning_rate=0.002)
    paper = bl.BiLevel.preset_config("paper")
    assert (paper.keys, paper.phases, paper.inner_steps, paper.top_fraction) == (30, 10, 3, 0.025)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keys": 0}, "keys must lie in"),
        ({"mask_rule": "union"}, "unknown mask_rule 'union'"),
        ({"inner": "third_order"}, "unknown inner"),
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"top_fraction": 0.0}, "top_fraction must lie in"),
        ({"trade_off": 1.5}, "trade_off must lie in"),
        ({"layers": "conv1"}, "layers must be a list"),
        ({"seed": -1}, "seed must lie in"),
        ({"stop_when_embedded": "yes"}, "must be true or false"),
        ({"lambda": 0.5}, "unknown option"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(UserError, match=message):
        bl.BiLevel(**options)


def test_embed_rejects_data_that_does_not_fit(trained, digits):
    few = dataclasses.replace(digits, x_test=digits.x_test[:3], y_test=digits.y_test[:3])
    with pytest.raises(UserError, match="held-out pool has 3"):
        bl.BiLevel.from_preset("smoke", keys=5)._embed(trained, few, hooks=())
    with pytest.raises(UserError, match="no layer 'nope'"):
        bl.BiLevel.from_preset("smoke", layers=("nope",)).embed(trained, digits)


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


def test_generic_cli_embeds_and_verifies_a_users_sequential_model(tmp_path, digits, capsys):
    from watermarks.cli import main

    source = _user_model(tmp_path / "user.keras", digits)
    out_model, out_key = tmp_path / "marked.keras", tmp_path / "key.npz"
    argv = ["embed", "--scheme", "bilevel", "--preset", "smoke", "--model", str(source)]
    argv += ["--dataset", "digits", "--phases", "3", "--out-model", str(out_model)]
    assert main([*argv, "--out-key", str(out_key)]) == 0
    assert out_model.is_file() and out_key.is_file()
    out = capsys.readouterr().out
    assert "scheme:         bilevel (robust)" in out and "present" in out
    assert Key.load(out_key).metadata["config"]["phases"] == 3
    assert main(["verify", "--model", str(out_model), "--key", str(out_key)]) == 0
    assert "watermark present" in capsys.readouterr().out
    assert main(["verify", "--model", str(source), "--key", str(out_key)]) == 0
    assert "no watermark shown" in capsys.readouterr().out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_bespoke_bilevel_command_is_gone(capsys):
    from watermarks.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bilevel", "--model", "m.keras"])
    assert exit_.value.code == 2
    assert "invalid choice: 'bilevel'" in capsys.readouterr().err
