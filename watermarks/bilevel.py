"""Bi-level robust watermarking: exemplars from an inner bi-level loop, embedded by masked sparse updates.

P. Yang, Y. Lao, P. Li, "Robust Watermarking for Deep Neural Networks via
Bi-level Optimization", ICCV 2021 (Algorithm 1; eqs. 2 and 4-7; sections 4 and
5.1.4). The watermark is a set D_wm of key samples, each with a target label
the unmarked model does not give it. Each of N outer phases runs the inner
loop (M iterations: move the exemplars S to maximise, by eq. 5, the loss on
D_wm of a temporary copy trained on S by eq. 4), then per layer picks the mask
C of eq. 6 and updates only the parameters in C on the loss of eq. 2.
``BiLevel(...).embed(model, data)`` reports exactly how many parameters
changed (elementwise ``!=`` against the original weights).

Data: ``data.x_train``/``y_train`` is D_tr, the natural data whose function
must be kept (the owner's training data); ``data.x_test`` is the held-out
pool the keys are drawn from (never trained on).

Choices the paper leaves open, made here:

* Key samples (section 4): the ``keys`` inputs of the pool with the highest
  prediction entropy under the unmarked model. The target label of a key
  (``target``) is by default its runner-up class, the second most likely
  under the unmarked model: the key lies near the boundary between the two
  ("the model could easily manipulate their labels with a slight
  modification"). ``target="random"`` draws it uniformly (seeded) from the
  classes other than the prediction instead.
* Verification (the paper reports R_auth only): :meth:`BiLevel.verify`
  runs a one-sided binomial test of the number of keys labelled with their
  target against Binomial(n, p0) and detects the watermark when
  p <= ``alpha`` (0.01); ``threshold`` is the smallest R_auth with
  p <= ``alpha``. For random targets p0 = 1 / (num_classes - 1) is a proven
  bound: a model not trained towards the secret targets hits each one with
  at most that probability, whatever it predicts, since the target is
  independent of it. For runner-up targets no such bound exists; p0 = 1/2
  assumes that a model without the watermark resolves each near-boundary
  key between the unmarked model's two most likely classes no more often
  towards the target than a fair coin. The reproduction checks it against
  the unmarked model after fine-tuning and pruning (the controls). With
  p0 = 1/2 the test needs at least 7 keys to reach p <= 0.01.
* S_0 = D_wm (Algorithm 1 "S_0 subset of D_wm": the whole set), so eq. 5's
  gradient has S's shape and needs none of the paper's "clustering and
  reshaping". Eq. 5's gradient is the hyper-gradient of the temporary
  model's loss on D_wm with respect to S, back-propagated through one step
  of eq. 4 (``inner="second_order"``, nested ``tf.GradientTape``s).
  ``inner="first_order"`` replaces the mixed second derivative by the
  central finite difference of DARTS (Liu, Simonyan, Yang, ICLR 2019):
  -a [grad_S L(w + e v; S) - grad_S L(w - e v; S)] / (2 e), v the gradient on
  D_wm at the updated weights, e = 0.01 / |v|. Exemplars are clipped to the
  data's range.
* Eq. 7 as printed also moves every parameter outside the mask along the
  training-data gradient, which would change all of them, against the
  paper's own count of changed parameters (Fig. 3, "we only modify a tiny
  subset of weights"). Here the update is the masked form of eq. 2 that
  section 4.4 writes as L(M . Theta): the parameters in C descend
  lambda * L_c(D_tr batch) + (1 - lambda) * L_c(S_wm); all others stay
  exactly as they were.
* Masks: only layers with a kernel (convolutions, dense; their biases
  included) are watermarked, per layer as Algorithm 1's steps 10-13; N is
  ``top_fraction`` (2.5%) of the layer's parameters, rounded down (so
  no layer changes in more than 2.5% of its parameters). The mean
  absolute per-example gradients of eq. 6 are taken over S_wm and over
  ``mask_samples`` natural examples drawn from D_tr. Algorithm 1 recomputes
  C every phase; the set of parameters that ever change is capped at N per
  layer, so a new phase's mask keeps the parameters already changed and
  adds the best-ranked new ones only while the layer's budget lasts.
* ``mask_rule="intersection"`` is eq. 6 as printed (C = H_s and H_t, top-N
  each). The two rankings barely overlap on real models (the parameters
  with the largest gradients on keys also have large gradients on natural
  data), so C can be empty and nothing is embedded. ``mask_rule="widened"``
  (default) widens both top-N lists together until their intersection holds
  N parameters: it ranks parameters by the worse of their two ranks
  (ties by the key-gradient rank). It equals eq. 6 whenever the literal
  intersection is full, always contains it, and keeps the paper's intent
  (large gradient on keys, small on natural data). The literal sizes are
  recorded in the key either way.
* How many masked steps a phase takes is not in the paper: ``steps`` steps,
  each on a natural batch of ``batch_size`` and the whole S_wm ("batches
  of comparable size", Algorithm 1 step 9). Eq. 7 is plain gradient
  descent (``optimizer="sgd"``); ``optimizer="adam"`` (default) uses Adam
  moments for the masked parameters, one reading of section 4.4's "masked
  adaptive optimization": at the paper's learning rates plain gradient
  descent moves the 2.5% of parameters slowly (REPORT.md compares both).
  Learning rate alpha1 = alpha2 = beta1 = ``learning_rate`` (5.1.4: 0.002
  for MNIST-size models, 0.02 for CIFAR-size).
* The model runs in inference mode throughout (batch normalisation uses
  its moving statistics, dropout is off), so statistics outside the mask
  do not change either. The loss is cross-entropy on the logits (the input
  of a final softmax layer when there is one).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from models import classifier
from models.errors import UserError
from models.zoo import copy_model
from watermarks.base import Key, Verification, Watermark

__all__ = [
    "BiLevel",
    "BiLevelConfig",
    "add_command",
    "binomial_p_value",
    "binomial_threshold",
    "changed_parameters",
    "eq6_masks",
    "hypergradient",
    "hypergradient_cosine",
    "kernel_layers",
    "layer_mask",
    "null_probability",
    "r_auth",
    "select_keys",
]

log = logging.getLogger(__name__)

MASK_RULES = ("widened", "intersection")
TARGETS = ("runner_up", "random")
INNER_MODES = ("second_order", "first_order")
OPTIMIZERS = ("adam", "sgd")
_ADAM = (0.9, 0.999, 1e-7)  # beta1, beta2, epsilon (Keras' defaults)
_CHUNK_VALUES = 2e7  # per-example gradient values held at once
_WORK: collections.OrderedDict = collections.OrderedDict()  # see BiLevel._embedder
_WORK_SIZE = 4


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(name: str, value: object, low: float, high: float, *, open_low=False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{name} must be a number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise UserError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class BiLevelConfig:
    """Hyper-parameters of Algorithm 1.

    Args:
        keys: number of key samples |D_wm|.
        phases: outer phases N (paper: 10).
        inner_steps: inner iterations M (paper: 3).
        learning_rate: alpha1 = alpha2 = beta1 (paper: 0.002 for MNIST-size
            models, 0.02 for CIFAR-size).
        trade_off: lambda of eq. 2, the weight of the natural-data loss.
        top_fraction: N of eq. 6 as a fraction of each layer's parameters
            (paper: 2.5%).
        steps: masked update steps per phase.
        batch_size: natural examples per masked step (with all of S_wm).
        mask_samples: natural examples whose gradients rank parameters (eq. 6).
        mask_rule: ``"widened"`` or ``"intersection"`` (eq. 6 as printed).
        inner: ``"second_order"`` (exact eq. 5) or ``"first_order"`` (DARTS'
            finite-difference approximation).
        optimizer: ``"adam"`` or ``"sgd"`` (eq. 7's plain gradient descent).
        target: a key's target label: ``"runner_up"`` or ``"random"``.
        layers: names of the layers to watermark; empty: every layer with a
            kernel.
        alpha: significance level of the verification test.
        stop_when_embedded: end the outer loop after the first phase at which
            every key carries its target (the sequential overwriting of
            section 5.2.2 embeds each key until it is embedded).
        seed: seeds the targets and the natural batches.
    """

    keys: int = 20
    phases: int = 10
    inner_steps: int = 3
    learning_rate: float = 0.002
    trade_off: float = 0.9
    top_fraction: float = 0.025
    steps: int = 200
    batch_size: int = 32
    mask_samples: int = 512
    mask_rule: str = "widened"
    inner: str = "second_order"
    optimizer: str = "adam"
    target: str = "runner_up"
    layers: tuple[str, ...] = ()
    alpha: float = 0.01
    stop_when_embedded: bool = False
    seed: int = 0

    def __post_init__(self):
        _check_int("keys", self.keys, 1)
        _check_int("phases", self.phases, 1)
        _check_int("inner_steps", self.inner_steps, 0)
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("mask_samples", self.mask_samples, 1)
        _check_number("learning_rate", self.learning_rate, 0.0, 10.0, open_low=True)
        _check_number("trade_off", self.trade_off, 0.0, 1.0)
        _check_number("top_fraction", self.top_fraction, 0.0, 1.0, open_low=True)
        _check_number("alpha", self.alpha, 0.0, 1.0, open_low=True)
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**32
        ):
            raise UserError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for name, value, known in (
            ("mask_rule", self.mask_rule, MASK_RULES),
            ("inner", self.inner, INNER_MODES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("target", self.target, TARGETS),
        ):
            if value not in known:
                raise UserError(f"unknown {name} {value!r}; expected one of: {', '.join(known)}")
        if not isinstance(self.stop_when_embedded, bool):
            raise UserError(
                f"stop_when_embedded must be true or false, got {self.stop_when_embedded!r}"
            )
        if isinstance(self.layers, str):
            raise UserError(f"layers must be a list of layer names, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))


# --------------------------------------------------------------------------- model plumbing


def kernel_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers that own a kernel (convolutions, dense, ...), nested models included, in order."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(kernel_layers(layer))
        elif any(w.path.split("/")[-1].endswith("kernel") for w in layer.trainable_weights):
            found.append(layer)
    return found


def _logits_model(model: keras.Model) -> tuple[keras.Model, bool]:
    """A model sharing ``model``'s variables that outputs logits, and whether it does.

    The zoo's models (and most user models) end in a separate softmax layer,
    whose input is the logits. Otherwise the model itself is used and its
    probabilities are turned into a log-likelihood (clipped at 1e-12).
    """
    last = model.layers[-1] if model.layers else None
    is_softmax = isinstance(last, keras.layers.Softmax) or (
        isinstance(last, keras.layers.Activation)
        and getattr(last.activation, "__name__", "") == "softmax"
    )
    if is_softmax:
        try:
            return keras.Model(model.inputs, last.input), True
        except (ValueError, AttributeError, TypeError):  # a subclassed model: no graph to cut
            pass

    return model, not classifier.outputs_probabilities(model)


def changed_parameters(original: keras.Model, marked: keras.Model) -> int:
    """The number of weights (all variables) of ``marked`` that differ from ``original``'s."""
    a, b = original.get_weights(), marked.get_weights()
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        raise UserError("the two models do not have the same architecture")
    return int(sum(np.count_nonzero(x != y) for x, y in zip(a, b, strict=True)))


def _parameter_count(model: keras.Model) -> int:
    return int(sum(np.prod(w.shape) for w in model.weights))


# --------------------------------------------------------------------------- keys and the test


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``probabilities``."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def select_keys(
    probabilities: np.ndarray, n: int, rng: np.random.Generator, target: str = "runner_up"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n`` highest-entropy rows, each with a target other than the row's prediction.

    Args:
        probabilities: the unmarked model's class probabilities on the pool.
        n: how many keys.
        rng: draws the targets (``"random"``).
        target: ``"runner_up"`` (each row's second most likely class) or
            ``"random"`` (uniform over the classes other than the prediction).

    Returns:
        ``(indices, targets, predictions)``: indices into the pool, the target
        labels and the unmarked model's labels of the keys.
    """
    num_classes = probabilities.shape[-1]
    order = np.argsort(-entropy(probabilities), kind="stable")[:n]
    predictions = probabilities[order].argmax(axis=-1)
    if target == "runner_up":
        targets = np.argsort(-probabilities[order], axis=-1, kind="stable")[:, 1]
    elif target == "random":
        targets = (predictions + rng.integers(1, num_classes, size=len(order))) % num_classes
    else:
        raise ValueError(f"unknown target rule {target!r}")
    return order, targets.astype(np.int64), predictions.astype(np.int64)


def null_probability(target: str, num_classes: int) -> float:
    """p0 of the verification test for the target rule (see the module docstring)."""
    return 0.5 if target == "runner_up" else 1.0 / (num_classes - 1)


def binomial_p_value(hits: int, n: int, p0: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p0), summed exactly."""
    if hits <= 0:
        return 1.0
    return float(
        min(1.0, sum(math.comb(n, k) * p0**k * (1.0 - p0) ** (n - k) for k in range(hits, n + 1)))
    )


def binomial_threshold(n: int, p0: float, alpha: float) -> float:
    """The smallest share of ``n`` keys whose binomial p-value is at most ``alpha`` (>1: none)."""
    for hits in range(n + 1):
        if binomial_p_value(hits, n, p0) <= alpha:
            return hits / n
    return math.inf


# --------------------------------------------------------------------------- masks (eq. 6)


def _budget(fraction: float, size: int) -> int:
    """N of eq. 6 for a layer of ``size`` parameters: ``fraction`` of them, rounded down.

    Rounded down, so that no layer (and so no model) changes in more than
    ``fraction`` of its parameters; a layer too small for one is left alone.
    """
    return math.floor(fraction * size + 1e-9)


def _ranks(values: np.ndarray, descending: bool) -> np.ndarray:
    """0-based rank of each value (ties by position)."""
    order = np.argsort(-values if descending else values, kind="stable")
    ranks = np.empty(values.size, dtype=np.int64)
    ranks[order] = np.arange(values.size)
    return ranks


def layer_mask(
    key_scores: np.ndarray,
    natural_scores: np.ndarray,
    budget: int,
    rule: str,
    used: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """The mask C of eq. 6 for one layer (its parameters flattened into one vector).

    Args:
        key_scores: mean |gradient| over the exemplars S_wm, per parameter.
        natural_scores: mean |gradient| over natural data D_tr, per parameter.
        budget: N, the number of parameters a mask may hold.
        rule: ``"intersection"`` (H_s and H_t, top-N each, as printed) or
            ``"widened"`` (the top-N by the worse of the two ranks, ties by
            the key rank: both lists widened until they share N parameters).
        used: parameters already changed in earlier phases; they stay in the
            mask, and new ones join only while fewer than N are used.

    Returns:
        ``(mask, literal)``: the boolean mask and the size of the literal
        intersection H_s and H_t of eq. 6.
    """
    key_scores = np.asarray(key_scores, dtype=np.float64).ravel()
    natural_scores = np.asarray(natural_scores, dtype=np.float64).ravel()
    if key_scores.shape != natural_scores.shape:
        raise ValueError("key and natural scores must have one value per parameter")
    size = key_scores.size
    used = np.zeros(size, dtype=bool) if used is None else np.asarray(used, dtype=bool).ravel()
    budget = min(int(budget), size)
    key_rank = _ranks(key_scores, descending=True)  # H_s: largest gradient on keys first
    natural_rank = _ranks(natural_scores, descending=False)  # H_t: smallest on natural data first
    intersection = (key_rank < budget) & (natural_rank < budget)
    if rule == "intersection":
        candidates = np.flatnonzero(intersection)
        candidates = candidates[np.argsort(key_rank[candidates], kind="stable")]
    elif rule == "widened":
        candidates = np.lexsort((key_rank, np.maximum(key_rank, natural_rank)))[:budget]
    else:
        raise ValueError(f"unknown mask rule {rule!r}")
    room = max(budget - int(used.sum()), 0)
    fresh = candidates[~used[candidates]][:room]
    mask = used.copy()
    mask[fresh] = True
    return mask, int(intersection.sum())


# --------------------------------------------------------------------------- the optimisation


@contextlib.contextmanager
def _quiet_tensorflow():
    """Keep TensorFlow's Python-side warnings (pfor fallbacks) out of the log for a moment."""
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Embedder:
    """The tf.functions of Algorithm 1 for one model (its variables are closed over)."""

    def __init__(self, model: keras.Model, config: BiLevelConfig, layers: list):
        self.config = config
        self.net, self.from_logits = _logits_model(model)
        self.theta = list(self.net.trainable_variables)
        self.fixed = list(self.net.non_trainable_variables)
        index = {id(v): i for i, v in enumerate(self.theta)}
        # per watermarked layer: the positions of its trainable variables in theta
        self.groups = []
        for layer in layers:
            positions = [index[id(w)] for w in layer.trainable_weights if id(w) in index]
            if positions:
                self.groups.append((layer, positions))
        self.marked = sorted({i for _, positions in self.groups for i in positions})
        self.variables = [self.theta[i] for i in self.marked]
        self.masks = [
            tf.Variable(tf.zeros(v.shape, tf.bool), trainable=False) for v in self.variables
        ]
        self.moments = [
            (tf.Variable(tf.zeros(v.shape)), tf.Variable(tf.zeros(v.shape))) for v in self.variables
        ]
        self.step_count = tf.Variable(0.0, trainable=False)
        self.model = model
        # Signatures with free batch sizes: one trace serves every number of keys and batch.
        image = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        labels = tf.TensorSpec((None,), tf.int64)
        scalar = tf.TensorSpec((), tf.float32)
        self.inner_loop = tf.function(
            self._inner_loop, input_signature=[image, labels, scalar, scalar]
        )
        self.masked_steps = tf.function(
            self._masked_steps,
            input_signature=[
                tf.TensorSpec((None, None, *model.input_shape[1:]), tf.float32),
                tf.TensorSpec((None, None), tf.int64),
                image,
                labels,
            ],
        )
        self.mean_abs_gradients = tf.function(
            self._mean_abs_gradients, input_signature=[image, labels]
        )

    def reset(self, weights: list[np.ndarray]) -> None:
        """Load ``weights`` into the model and clear the masks and Adam's moments."""
        self.model.set_weights(weights)
        for mask in self.masks:
            mask.assign(tf.zeros_like(mask))
        for m, v in self.moments:
            m.assign(tf.zeros_like(m))
            v.assign(tf.zeros_like(v))
        self.step_count.assign(0.0)

    # -- losses
    def _loss_per_example(self, outputs, labels):
        labels = tf.cast(labels, tf.int64)
        if self.from_logits:
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, outputs)
        picked = tf.gather(outputs, labels, axis=-1, batch_dims=1)
        return -tf.math.log(tf.clip_by_value(picked, 1e-12, 1.0))

    def _loss(self, theta, x, y):
        outputs, _ = self.net.stateless_call(theta, self.fixed, x, training=False)
        return tf.reduce_mean(self._loss_per_example(outputs, y))

    def _sgd(self, theta, x, y):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = self._loss(theta, x, y)
        grads = tape.gradient(loss, theta)
        return [t - self.config.learning_rate * g for t, g in zip(theta, grads, strict=True)]

    # -- eq. 5: the hyper-gradient of the temporary model's loss on D_wm
    def _hypergradient(self, theta, s, keys, targets):
        lr = self.config.learning_rate
        if self.config.inner == "second_order":
            with tf.GradientTape() as outer:
                outer.watch(s)
                updated = self._sgd(theta, s, targets)  # eq. 4, differentiable in s
                validation = self._loss(updated, keys, targets)
            return outer.gradient(validation, s)
        updated = self._sgd(theta, s, targets)
        with tf.GradientTape() as tape:
            tape.watch(updated)
            validation = self._loss(updated, keys, targets)
        v = tape.gradient(validation, updated)
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(g * g) for g in v]))
        eps = 0.01 / tf.maximum(norm, 1e-12)

        def grad_s(sign):
            shifted = [t + sign * eps * g for t, g in zip(theta, v, strict=True)]
            with tf.GradientTape() as tape:
                tape.watch(s)
                loss = self._loss(shifted, s, targets)
            return tape.gradient(loss, s)

        return -lr * (grad_s(1.0) - grad_s(-1.0)) / (2.0 * eps)

    def _inner_loop(self, keys, targets, low, high):
        """Algorithm 1 steps 4-8: S from D_wm, M times eq. 5 then eq. 4; returns S_M and |h_1|."""
        theta = [tf.convert_to_tensor(v) for v in self.theta]
        s = tf.identity(keys)
        first = tf.constant(0.0)
        for j in range(self.config.inner_steps):
            h = self._hypergradient(theta, s, keys, targets)
            if j == 0:
                first = tf.norm(h)
            s = tf.clip_by_value(s + self.config.learning_rate * h, low, high)  # eq. 5 (ascent)
            theta = self._sgd(theta, s, targets)  # eq. 4
        return s, first

    def first_hypergradient(self, keys, targets):
        """The eq. 5 hyper-gradient at the current weights (for comparing the two modes)."""
        theta = [tf.convert_to_tensor(v) for v in self.theta]
        return self._hypergradient(theta, tf.identity(keys), keys, targets)

    # -- eq. 6: mean absolute per-example gradients of the watermarked variables
    def _mean_abs_gradients(self, x, y):
        theta = [tf.convert_to_tensor(v) for v in self.theta]

        def one(pair):
            xi, yi = pair
            with tf.GradientTape() as tape:
                tape.watch(theta)
                outputs, _ = self.net.stateless_call(theta, self.fixed, xi[None], training=False)
                loss = tf.reduce_sum(self._loss_per_example(outputs, yi[None]))
            grads = tape.gradient(loss, [theta[i] for i in self.marked])
            return [tf.abs(g) for g in grads]

        return [tf.reduce_sum(g, axis=0) for g in tf.vectorized_map(one, (x, y))]

    def scores(self, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        """Mean |per-example gradient| over ``(x, y)`` of every watermarked variable.

        ``tf.vectorized_map`` runs a convolution's filter gradient as a loop
        (TensorFlow says so in a warning per layer, silenced here); still
        faster than one gradient per example.
        """
        per_example = sum(int(np.prod(v.shape)) for v in self.variables)
        chunk = max(1, min(len(x), int(_CHUNK_VALUES // max(per_example, 1))))
        totals = None
        for start in range(0, len(x), chunk):
            with _quiet_tensorflow():
                part = self.mean_abs_gradients(
                    tf.convert_to_tensor(x[start : start + chunk]),
                    tf.convert_to_tensor(y[start : start + chunk]),
                )
            part = [p.numpy().astype(np.float64) for p in part]
            totals = part if totals is None else [a + b for a, b in zip(totals, part, strict=True)]
        return [t / len(x) for t in totals]

    # -- eq. 7 on the loss of eq. 2, masked
    def _masked_steps(self, batches_x, batches_y, exemplars, targets):
        config = self.config
        lam = config.trade_off
        beta1, beta2, eps = _ADAM
        for i in tf.range(tf.shape(batches_x)[0]):
            with tf.GradientTape() as tape:
                natural = self._net_loss(batches_x[i], batches_y[i])
                watermark = self._net_loss(exemplars, targets)
                loss = lam * natural + (1.0 - lam) * watermark
            grads = tape.gradient(loss, self.variables)
            self.step_count.assign_add(1.0)
            t = self.step_count
            for variable, grad, mask, (m, v) in zip(
                self.variables, grads, self.masks, self.moments, strict=True
            ):
                grad = tf.where(mask, grad, tf.zeros_like(grad))
                if config.optimizer == "sgd":
                    step = config.learning_rate * grad
                else:
                    m.assign(beta1 * m + (1.0 - beta1) * grad)
                    v.assign(beta2 * v + (1.0 - beta2) * grad * grad)
                    m_hat = m / (1.0 - tf.pow(beta1, t))
                    v_hat = v / (1.0 - tf.pow(beta2, t))
                    step = config.learning_rate * m_hat / (tf.sqrt(v_hat) + eps)
                # tf.where, not a product: parameters outside C keep their exact value
                variable.assign(tf.where(mask, variable - step, variable))

    def eq6(self, exemplars, targets, x_natural, y_natural, used=None):
        """Eq. 6 for every watermarked layer at the current weights.

        Args:
            exemplars: S_wm's inputs; ``targets`` their labels.
            x_natural: natural inputs (a sample of D_tr); ``y_natural`` their labels.
            used: per layer id, the parameters changed so far (see :func:`layer_mask`).

        Returns:
            Per watermarked layer ``(flat_mask, [(slot, variable_mask), ...], literal_size)``.
        """
        key_scores = self.scores(exemplars, targets)
        natural_scores = self.scores(x_natural, y_natural)
        where = {position: slot for slot, position in enumerate(self.marked)}
        result = []
        for layer, positions in self.groups:
            slots = [where[p] for p in positions]
            flat_key = np.concatenate([key_scores[k].ravel() for k in slots])
            flat_natural = np.concatenate([natural_scores[k].ravel() for k in slots])
            budget = _budget(self.config.top_fraction, flat_key.size)
            previous = None if used is None else used.get(id(layer))
            flat, size = layer_mask(flat_key, flat_natural, budget, self.config.mask_rule, previous)
            per_variable, offset = [], 0
            for k in slots:
                shape = tuple(self.variables[k].shape)
                count = int(np.prod(shape))
                per_variable.append((k, flat[offset : offset + count].reshape(shape)))
                offset += count
            result.append((flat, per_variable, size))
        return result

    def group_size(self, k: int) -> int:
        """The number of parameters of the ``k``-th watermarked layer."""
        return int(sum(np.prod(self.theta[i].shape) for i in self.groups[k][1]))

    def _net_loss(self, x, y):
        return tf.reduce_mean(self._loss_per_example(self.net(x, training=False), y))


# --------------------------------------------------------------------------- the scheme


class BiLevel(Watermark):
    """Yang et al.'s bi-level robust watermark (Algorithm 1), verified by a binomial test."""

    name = "bilevel"
    Config = BiLevelConfig

    def _layers(self, model: keras.Model) -> list[keras.layers.Layer]:
        layers = kernel_layers(model)
        if self.config.layers:
            by_name = {layer.name: layer for layer in layers}
            missing = [name for name in self.config.layers if name not in by_name]
            if missing:
                raise UserError(
                    f"model {model.name!r} has no layer {missing[0]!r} with a kernel; "
                    f"its layers with kernels: {', '.join(by_name) or 'none'}"
                )
            layers = [by_name[name] for name in self.config.layers]
        if not layers:
            raise UserError(f"model {model.name!r} has no layer with a kernel to watermark")
        return layers

    def _check(self, model: keras.Model, data) -> None:
        for name in ("x_train", "y_train", "x_test"):
            if not hasattr(data, name):
                raise UserError(
                    "bi-level embedding needs a Dataset (training data and a held-out pool)"
                )
        if tuple(model.input_shape[1:]) != tuple(data.x_train.shape[1:]):
            raise UserError(
                f"the model expects inputs of shape {tuple(model.input_shape[1:])} but the data "
                f"has {tuple(data.x_train.shape[1:])}"
            )
        classes = model.output_shape[-1]
        if classes < 2:
            raise UserError("a watermark needs a classifier with at least two classes")
        if len(data.y_train) and int(np.max(data.y_train)) >= classes:
            raise UserError(
                f"the data has labels up to {int(np.max(data.y_train))} but the model has "
                f"{classes} classes"
            )
        if len(data.x_train) == 0:
            raise UserError("the training data D_tr is empty")
        if len(data.x_test) < self.config.keys:
            raise UserError(
                f"the held-out pool has {len(data.x_test)} inputs; {self.config.keys} keys need "
                "at least as many"
            )

    def _embedder(self, model: keras.Model) -> _Embedder:
        """The tf.functions for ``model``'s architecture, on a working copy holding its weights.

        Tracing Algorithm 1's functions takes longer than running them on a
        small model, so a working copy and its traced functions are kept per
        architecture and per value the graphs hold (learning rate, lambda,
        inner loop, optimizer, layers), for the last few of them.
        """
        config = self.config
        try:
            architecture = hashlib.sha256(model.to_json().encode()).hexdigest()
        except (NotImplementedError, TypeError, ValueError):  # a subclassed model: no reuse
            architecture = None
        graph = (
            architecture,
            config.learning_rate,
            config.trade_off,
            config.inner_steps,
            config.inner,
            config.optimizer,
            config.layers,
        )
        embedder = _WORK.pop(graph, None) if architecture else None
        if embedder is None:
            work = keras.models.clone_model(model)
            embedder = _Embedder(work, config, self._layers(work))
        if architecture:
            _WORK[graph] = embedder
            while len(_WORK) > _WORK_SIZE:
                _WORK.popitem(last=False)
        embedder.config = config  # equal in every value the graphs hold (the key above)
        embedder.reset(model.get_weights())
        return embedder

    def _update_masks(self, embedder, exemplars, targets, x_tr, y_tr, used, rng):
        """Eq. 6 per layer; sets the embedder's masks; returns the literal intersection sizes."""
        sample = rng.choice(len(x_tr), size=min(self.config.mask_samples, len(x_tr)), replace=False)
        masks = embedder.eq6(exemplars.numpy(), targets, x_tr[sample], y_tr[sample], used)
        sizes = []
        for (layer, _), (flat, per_variable, size) in zip(embedder.groups, masks, strict=True):
            used[id(layer)] = flat
            sizes.append(size)
            for slot, mask in per_variable:
                embedder.masks[slot].assign(mask)
        return sizes

    def embed(
        self,
        model: keras.Model,
        data,
        *,
        callback: Callable[[int, keras.Model], None] | None = None,
    ) -> tuple[keras.Model, Key]:
        """Watermark a copy of ``model`` (Algorithm 1).

        Args:
            model: the pre-trained classifier (left untouched).
            data: a :class:`models.Dataset`: ``x_train``/``y_train`` is D_tr,
                ``x_test`` the held-out pool the keys come from.
            callback: called as ``callback(phase, model)`` after every outer
                phase (``phase`` from 1), e.g. to trace an overwriting; ``model``
                is the working copy being marked (score it, do not keep it).

        Returns:
            ``(marked_model, key)``; ``key.metadata`` holds the exact number
            of changed parameters, the literal eq. 6 intersection sizes and
            the masks' sizes.
        """
        config = self.config
        self._check(model, data)
        started = time.perf_counter()
        rng = np.random.default_rng(config.seed)
        embedder = self._embedder(model)
        marked = embedder.model  # a private working copy, reused by later embeddings

        pool = np.asarray(data.x_test, dtype=np.float32)
        probabilities = _probabilities(embedder, pool)
        index, targets, predictions = select_keys(probabilities, config.keys, rng, config.target)
        keys = pool[index]
        low, high = tf.constant(np.min(pool)), tf.constant(np.max(pool))
        x_tr = np.asarray(data.x_train, dtype=np.float32)
        y_tr = np.asarray(data.y_train, dtype=np.int64)
        keys_t, targets_t = tf.constant(keys), tf.constant(targets)

        used = {id(layer): None for layer, _ in embedder.groups}
        budgets = [_budget(config.top_fraction, embedder.group_size(k)) for k in range(len(used))]
        literal: list[list[int] | None] = []
        hyper_norms = []
        exemplars = keys_t
        phases_run = 0
        for phase in range(1, config.phases + 1):
            exemplars, first_norm = embedder.inner_loop(keys_t, targets_t, low, high)
            hyper_norms.append(float(first_norm))
            if all(
                m is not None and int(m.sum()) >= b
                for m, b in zip(used.values(), budgets, strict=True)
            ):
                sizes = None  # every layer's budget is used: eq. 6 cannot change the masks
            else:
                sizes = self._update_masks(embedder, exemplars, targets, x_tr, y_tr, used, rng)
            literal.append(sizes)
            batches = rng.integers(0, len(x_tr), size=(config.steps, config.batch_size))
            embedder.masked_steps(
                tf.constant(x_tr[batches]), tf.constant(y_tr[batches]), exemplars, targets_t
            )
            if callback is not None:
                callback(phase, marked)
            log.info(
                "bilevel phase %d/%d: eq. 6 intersection %s of %d, mask %d",
                phase,
                config.phases,
                "-" if sizes is None else sum(sizes),
                sum(budgets),
                sum(int(m.sum()) for m in used.values()),
            )
            phases_run = phase
            if config.stop_when_embedded and _all_embedded(marked, keys, targets):
                break

        marked = copy_model(marked)  # the caller's own model; the working copy stays here
        changed = changed_parameters(model, marked)
        total = _parameter_count(marked)
        num_classes = int(model.output_shape[-1])
        p0 = null_probability(config.target, num_classes)
        key = Key(
            scheme=self.name,
            inputs=keys,
            labels=targets,
            metadata={
                "config": {**dataclasses.asdict(config), "layers": list(config.layers)},
                "dataset": getattr(data, "name", None),
                "num_classes": num_classes,
                "null_probability": p0,
                "threshold": binomial_threshold(len(keys), p0, config.alpha),
                "changed_parameters": changed,
                "total_parameters": total,
                "changed_fraction": changed / total,
                "layers": [layer.name for layer, _ in embedder.groups],
                "budgets": budgets,
                "mask_sizes": [int(used[id(layer)].sum()) for layer, _ in embedder.groups],
                "intersection_sizes": literal,
                "hypergradient_norms": hyper_norms,
                "phases_run": phases_run,
                "max_exemplar_shift": float(np.max(np.abs(exemplars.numpy() - keys))),
                "seconds": time.perf_counter() - started,
            },
            arrays={
                "original_labels": predictions,
                "exemplars": exemplars.numpy(),
                "pool_indices": index.astype(np.int64),
            },
        )
        log.info(
            "bilevel: %d keys embedded, %d of %d parameters changed (%.3f%%) in %.1f s",
            len(keys),
            changed,
            total,
            100 * changed / total,
            key.metadata["seconds"],
        )
        return marked, key

    def verify(self, model, key: Key, *, batch_size: int = 256) -> Verification:
        """R_auth (share of keys labelled with their target) and the binomial test against p0."""
        key.check_fits(model)
        n = len(key)
        if n == 0:
            raise UserError("the key holds no key samples")
        num_classes = int(key.metadata.get("num_classes", model.output_shape[-1]))
        p0 = null_probability(self.config.target, num_classes)
        predictions = np.argmax(model.predict(key.inputs, batch_size=batch_size, verbose=0), -1)
        hits = int(np.sum(predictions == key.labels))
        p_value = binomial_p_value(hits, n, p0)
        threshold = binomial_threshold(n, p0, self.config.alpha)
        detected = p_value <= self.config.alpha
        verdict = (
            f"watermark present: {hits} of {n} keys carry their target label "
            f"(p = {p_value:.3g} <= {self.config.alpha} under Binomial({n}, {p0:.3g}))"
            if detected
            else f"no watermark shown: {hits} of {n} keys carry their target label "
            f"(p = {p_value:.3g} > {self.config.alpha})"
        )
        return Verification(self.name, hits / n, threshold, p_value, bool(detected), verdict)


def eq6_masks(
    model: keras.Model,
    exemplars: np.ndarray,
    targets: np.ndarray,
    x_natural: np.ndarray,
    y_natural: np.ndarray,
    config: BiLevelConfig | None = None,
) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    """The masks of eq. 6 at ``model``'s weights, per watermarked layer.

    Args:
        model: the classifier (not changed).
        exemplars: S_wm's inputs; ``targets`` their labels.
        x_natural: the natural examples the ranking H_t uses; ``y_natural`` their labels.
        config: ``top_fraction``, ``mask_rule`` and ``layers`` (defaults otherwise).

    Returns:
        ``{layer name: ({variable name: boolean mask}, literal intersection size)}``.
    """
    config = config or BiLevelConfig()
    embedder = _Embedder(model, config, BiLevel(config)._layers(model))
    masks = embedder.eq6(
        np.asarray(exemplars, dtype=np.float32),
        np.asarray(targets, dtype=np.int64),
        np.asarray(x_natural, dtype=np.float32),
        np.asarray(y_natural, dtype=np.int64),
    )
    result = {}
    for (layer, _), (_, per_variable, size) in zip(embedder.groups, masks, strict=True):
        named = {embedder.variables[k].path.split("/")[-1]: mask for k, mask in per_variable}
        result[layer.name] = (named, size)
    return result


def hypergradient(model: keras.Model, keys: np.ndarray, targets: np.ndarray, config: BiLevelConfig):
    """Eq. 5's hyper-gradient with respect to S = D_wm at ``model``'s weights, as ``config.inner`` computes it.

    Args:
        model: the classifier (not changed).
        keys: D_wm's inputs.
        targets: their target labels.
        config: the learning rate and the inner-loop mode.

    Returns:
        An array shaped like ``keys``.
    """
    embedder = _Embedder(model, config, kernel_layers(model))
    keys_t = tf.constant(np.asarray(keys, dtype=np.float32))
    targets_t = tf.constant(np.asarray(targets, dtype=np.int64))
    return tf.function(embedder.first_hypergradient)(keys_t, targets_t).numpy()


def hypergradient_cosine(
    model: keras.Model, keys: np.ndarray, targets: np.ndarray, config: BiLevelConfig
) -> float:
    """Cosine similarity of the exact (second-order) and the first-order hyper-gradients of eq. 5."""
    exact = hypergradient(model, keys, targets, dataclasses.replace(config, inner="second_order"))
    approx = hypergradient(model, keys, targets, dataclasses.replace(config, inner="first_order"))
    norm = float(np.linalg.norm(exact) * np.linalg.norm(approx))
    return float(np.sum(exact * approx) / norm) if norm > 0 else math.nan


def _all_embedded(model: keras.Model, keys: np.ndarray, targets: np.ndarray) -> bool:
    predictions = np.argmax(model.predict(keys, batch_size=256, verbose=0), -1)
    return bool(np.all(predictions == targets))


def _probabilities(embedder: _Embedder, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    outputs = embedder.net.predict(x, batch_size=batch_size, verbose=0)
    if embedder.from_logits:
        outputs = tf.nn.softmax(outputs).numpy()
    return outputs


def r_auth(model: keras.Model, key: Key, batch_size: int = 256) -> float:
    """The share of the key's samples that ``model`` labels with their target label."""
    predictions = np.argmax(model.predict(key.inputs, batch_size=batch_size, verbose=0), -1)
    return float(np.mean(predictions == key.labels))


# --------------------------------------------------------------------------- command line


def _embed_command(args) -> int:
    import models

    out_model = models.loading.output_path(args.out_model, ".keras", "--out-model")
    out_key = models.loading.output_path(args.out_key, ".npz", "--out-key")
    options = {
        "keys": args.keys,
        "seed": args.seed,
        "mask_rule": args.mask_rule,
        "inner": args.inner,
        "optimizer": args.optimizer,
        "target": args.target,
    }
    for name in (
        "phases",
        "inner_steps",
        "steps",
        "learning_rate",
        "trade_off",
        "top_fraction",
        "mask_samples",
    ):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    scheme = BiLevel(**options)
    model = models.load_model(args.model)
    size, channels = model.input_shape[1], model.input_shape[-1]
    data = models.load(
        args.dataset,
        data_dir=args.data_dir,
        size=args.size,
        channels=args.channels,
        max_train=args.max_train,
        seed=args.seed,
    )
    if tuple(data.input_shape) != tuple(model.input_shape[1:]):
        raise UserError(
            f"model '{args.model}' expects inputs {tuple(model.input_shape[1:])} but dataset "
            f"'{args.dataset}' gives {data.input_shape}; pass --size {size} --channels {channels}"
        )
    marked, key = scheme.embed(model, data)
    models.save_model(marked, out_model)
    key.save(out_key)
    meta = key.metadata
    print(
        f"embedded {len(key)} keys; changed {meta['changed_parameters']} of "
        f"{meta['total_parameters']} parameters ({100 * meta['changed_fraction']:.3f}%); "
        f"R_auth {r_auth(marked, key):.3f}"
    )
    print(f"wrote {out_model} and {out_key}")
    return 0


def add_command(subparsers) -> None:
    """``python -m watermarks bilevel``: watermark a user's model with Algorithm 1."""
    parser = subparsers.add_parser(
        "bilevel",
        help="embed Yang et al.'s bi-level robust watermark into a .keras model",
        description=(
            "Embed a bi-level watermark (Yang et al., ICCV 2021). D_tr is the dataset's "
            "training split, the keys come from its test split. Verify later with "
            "'python -m watermarks verify --model W.keras --key K.npz'."
        ),
    )
    parser.add_argument("--model", required=True, help="the model to mark (.keras)")
    parser.add_argument("--dataset", required=True, help="the data it was trained on, by name")
    parser.add_argument("--data-dir", help="folder holding the dataset's files")
    parser.add_argument("--size", type=int, help="resize the images to SIZE x SIZE")
    parser.add_argument("--channels", type=int, help="1 or 3 image channels")
    parser.add_argument("--max-train", type=int, help="use at most this many training images")
    parser.add_argument("--keys", type=int, default=20, help="number of key samples (default 20)")
    parser.add_argument("--phases", type=int, help="outer phases N (default 10)")
    parser.add_argument("--inner-steps", type=int, help="inner iterations M (default 3)")
    parser.add_argument("--steps", type=int, help="masked steps per phase (default 200)")
    parser.add_argument("--mask-samples", type=int, help="natural examples ranked by eq. 6")
    parser.add_argument("--learning-rate", type=float, help="0.002 MNIST-size, 0.02 CIFAR-size")
    parser.add_argument("--trade-off", type=float, help="lambda of eq. 2")
    parser.add_argument("--top-fraction", type=float, help="N of eq. 6 per layer (0.025)")
    parser.add_argument("--mask-rule", default="widened", help="widened | intersection")
    parser.add_argument("--inner", default="second_order", help="second_order | first_order")
    parser.add_argument("--optimizer", default="adam", help="adam | sgd")
    parser.add_argument("--target", default="runner_up", help="runner_up | random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-model", required=True, help="where to write the marked model")
    parser.add_argument("--out-key", required=True, help="where to write the key (.npz)")
    parser.set_defaults(handler=_embed_command)
