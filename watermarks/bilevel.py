"""Bi-level robust watermarking: exemplars from an inner bi-level loop, embedded by masked sparse updates.

P. Yang, Y. Lao, P. Li, "Robust Watermarking for Deep Neural Networks via
Bi-level Optimization", ICCV 2021 (Algorithm 1; eqs. 2 and 4-7; sections 4 and
5.1.4). The watermark is a set D_wm of key samples, each with a target label
the unmarked model does not give it. Each of N outer phases runs the inner
loop (M iterations: move the exemplars S to maximise, by eq. 5, the loss on
D_wm of a temporary copy trained on S by eq. 4), then per layer picks the mask
C of eq. 6 and updates only the parameters in C on the loss of eq. 2.
``BiLevel(...).embed(model, data)`` records in the key exactly how many
parameters changed (elementwise ``!=`` against the original weights).

Data: ``data.x_train``/``y_train`` is D_tr, the natural data whose function
must be kept (the owner's training data); ``data.x_test`` is the held-out
pool the keys are drawn from (never trained on).

Choices the paper leaves open, made here:

* Key samples (section 4): the ``keys`` inputs of the pool with the highest
  prediction entropy (``scipy.stats.entropy``) under the unmarked model. The
  target label of a key (``target``) is by default its runner-up class, the
  second most likely under the unmarked model: the key lies near the
  boundary between the two ("the model could easily manipulate their labels
  with a slight modification"). ``target="random"`` draws it uniformly
  (seeded) from the classes other than the prediction instead.
* Verification (the paper reports R_auth only): :meth:`BiLevel.decide`
  runs a one-sided binomial test (:func:`models.evidence.binomial_p_value`)
  of the number of keys labelled with their target against Binomial(n, p0)
  and calls the watermark present when p <= ``alpha`` (0.01); the threshold
  is the smallest R_auth with p <= ``alpha``. For random targets
  p0 = 1 / (num_classes - 1) is a proven bound: a model not trained towards
  the secret targets hits each one with at most that probability, whatever
  it predicts, since the target is independent of it. For runner-up targets
  no such bound exists; p0 = 1/2 assumes that a model without the watermark
  resolves each near-boundary key between the unmarked model's two most
  likely classes no more often towards the target than a fair coin. The
  reproduction checks it against the unmarked model after fine-tuning and
  pruning (the controls). With p0 = 1/2 the test needs at least 7 keys to
  reach p <= 0.01, so an embedding with fewer keys fails (``embed`` raises
  :class:`watermarks.base.EmbeddingFailed`).
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
  (``scipy.stats.rankdata``, ties by position; ties of the worse rank by the
  key-gradient rank). It equals eq. 6 whenever the literal intersection is
  full, always contains it, and keeps the paper's intent (large gradient on
  keys, small on natural data). The literal sizes are recorded in the key
  either way.
* How many masked steps a phase takes is not in the paper: ``steps`` steps,
  each on a natural batch of ``batch_size`` and the whole S_wm ("batches
  of comparable size", Algorithm 1 step 9). Eq. 7 is plain gradient
  descent (``optimizer="sgd"``); ``optimizer="adam"`` (default) uses Adam
  moments for the masked parameters, one reading of section 4.4's "masked
  adaptive optimization": at the paper's learning rates plain gradient
  descent moves the 2.5% of parameters slowly (REPORT.md compares both).
  Both are ``keras.optimizers`` (Keras' defaults beta1 0.9, beta2 0.999,
  epsilon 1e-7), given the gradients with every entry outside the mask set
  to zero. One optimizer serves a whole embedding (its moments carry over
  the phases); since the masks only grow within an embedding, a parameter
  outside the mask has had a zero gradient since the optimizer started, so
  its moments are zero and Adam's step for it is exactly zero: it stays
  bit-identical. Should a mask ever lose a parameter, the optimizer starts
  afresh (:meth:`_Embedder.set_masks`). ``bench/bilevel_masked_steps.py``
  times this against the hand-written masked Adam it replaced (same model,
  same steps, interleaved): the same CPU time (ratio 1.00 for Adam and 0.96
  for SGD on LeNet5, 1.02 on the tiny test CNN), so the library optimiser
  is used. SGD gives the same weights bit for bit; Keras' Adam adds epsilon
  to sqrt(v) rather than to the bias-corrected sqrt(v_hat), which moves the
  masked weights slightly (smoke preset: largest difference 2e-4, the same
  R_auth 1.0 and R_loss 7.52 pp).
  Learning rate alpha1 = alpha2 = beta1 = ``learning_rate`` (5.1.4: 0.002
  for MNIST-size models, 0.02 for CIFAR-size).
* The model runs in inference mode throughout (batch normalisation uses
  its moving statistics, dropout is off), so statistics outside the mask
  do not change either. The loss is cross-entropy on the logits
  (:func:`models.classifier.logit_function`: the input of a final softmax
  when there is one); the temporary models of eqs. 4-5 are the same
  function evaluated at other weights (``keras.StatelessScope``).
* Under ``--max-steps N`` (:func:`models.training.limit`) an embedding runs
  at most N outer phases of at most N masked steps and N inner iterations,
  and eq. 6 ranks on at most N chunks of examples: it proves the code path,
  not the watermark.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from scipy import stats

from models import classifier
from models.config import as_dict, option, validate
from models.errors import UserError
from models.evidence import answers, binomial_p_value, binomial_threshold
from models.training import limit
from models.zoo import copy_model
from watermarks.base import Key, Marked, Verification, Watermark

__all__ = [
    "BiLevel",
    "BiLevelConfig",
    "changed_parameters",
    "eq6_masks",
    "hypergradient",
    "hypergradient_cosine",
    "kernel_layers",
    "layer_mask",
    "null_probability",
    "select_keys",
]

log = logging.getLogger(__name__)

MASK_RULES = ("widened", "intersection")
TARGETS = ("runner_up", "random")
INNER_MODES = ("second_order", "first_order")
OPTIMIZERS = ("adam", "sgd")
_CHUNK_VALUES = 2e7  # per-example gradient values held at once
_WORK: collections.OrderedDict = collections.OrderedDict()  # see BiLevel._embedder
_WORK_SIZE = 4


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

    keys: int = option(20, low=1, help="number of key samples |D_wm|")
    phases: int = option(10, low=1, help="outer phases N")
    inner_steps: int = option(3, low=0, help="inner iterations M")
    learning_rate: float = option(
        0.002, low=0.0, low_open=True, high=10.0, help="alpha1 = alpha2 = beta1"
    )
    trade_off: float = option(0.9, low=0.0, high=1.0, help="lambda of eq. 2 (natural-data weight)")
    top_fraction: float = option(
        0.025, low=0.0, low_open=True, high=1.0, help="N of eq. 6 per layer, as a fraction"
    )
    steps: int = option(200, low=1, help="masked update steps per phase")
    batch_size: int = option(32, low=1, help="natural examples per masked step")
    mask_samples: int = option(512, low=1, help="natural examples ranked by eq. 6")
    mask_rule: str = option("widened", choices=MASK_RULES, help="eq. 6 widened or as printed")
    inner: str = option("second_order", choices=INNER_MODES, help="the inner loop's gradient")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="masked Adam or eq. 7's SGD")
    target: str = option("runner_up", choices=TARGETS, help="a key's target label")
    layers: tuple[str, ...] = option((), help="layers to watermark (empty: every kernel layer)")
    alpha: float = option(
        0.01, low=0.0, low_open=True, high=1.0, help="significance of the verification"
    )
    stop_when_embedded: bool = option(False, help="stop once every key carries its target")
    seed: int = option(0, low=0, high=2**32 - 1, help="seeds the targets and the batches")

    def __post_init__(self):
        validate(self)


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


def changed_parameters(original: keras.Model, marked: keras.Model) -> int:
    """The number of weights (all variables) of ``marked`` that differ from ``original``'s."""
    a, b = original.get_weights(), marked.get_weights()
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        raise UserError("the two models do not have the same architecture")
    return int(sum(np.count_nonzero(x != y) for x, y in zip(a, b, strict=True)))


def _parameter_count(model: keras.Model) -> int:
    return int(sum(np.prod(w.shape) for w in model.weights))


# --------------------------------------------------------------------------- keys and the test


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
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = probabilities.shape[-1]
    order = np.argsort(-stats.entropy(probabilities, axis=-1), kind="stable")[:n]
    predictions = probabilities[order].argmax(axis=-1)
    if target == "runner_up":
        targets = np.argsort(-probabilities[order], axis=-1, kind="stable")[:, 1]
    elif target == "random":
        targets = (predictions + rng.integers(1, num_classes, size=len(order))) % num_classes
    else:
        raise UserError(f"unknown target {target!r}; expected one of: {', '.join(TARGETS)}")
    return order, targets.astype(np.int64), predictions.astype(np.int64)


def null_probability(target: str, num_classes: int) -> float:
    """p0 of the verification test for the target rule (see the module docstring)."""
    return 0.5 if target == "runner_up" else 1.0 / (num_classes - 1)


# --------------------------------------------------------------------------- masks (eq. 6)


def _budget(fraction: float, size: int) -> int:
    """N of eq. 6 for a layer of ``size`` parameters: ``fraction`` of them, rounded down.

    Rounded down, so that no layer (and so no model) changes in more than
    ``fraction`` of its parameters; a layer too small for one is left alone.
    """
    return math.floor(fraction * size + 1e-9)


def _ranks(values: np.ndarray, descending: bool) -> np.ndarray:
    """0-based rank of each value, ties by position (``rankdata``'s ordinal method)."""
    return stats.rankdata(-values if descending else values, method="ordinal").astype(np.int64) - 1


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
        raise UserError(f"unknown mask_rule {rule!r}; expected one of: {', '.join(MASK_RULES)}")
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


def _optimizer(config: BiLevelConfig) -> keras.optimizers.Optimizer:
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(config.learning_rate)
    return keras.optimizers.Adam(config.learning_rate)


class _Embedder:
    """The tf.functions of Algorithm 1 for one model (its variables are closed over)."""

    def __init__(self, model: keras.Model, config: BiLevelConfig, layers: list):
        self.config = config
        self.model = model
        self.logits, self.from_logits = classifier.logit_function(model)
        self.theta = list(model.trainable_variables)
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
        self.optimizer = _optimizer(config)
        self.optimizer.build(self.variables)
        self._fresh_state = [keras.ops.convert_to_numpy(v) for v in self.optimizer.variables]
        self._trace(model.input_shape[1:])

    def _trace(self, input_shape) -> None:
        # Signatures with free batch sizes: one trace serves every number of keys and batch.
        image = tf.TensorSpec((None, *input_shape), tf.float32)
        labels = tf.TensorSpec((None,), tf.int64)
        scalar = tf.TensorSpec((), tf.float32)
        self.inner_loop = tf.function(
            self._inner_loop, input_signature=[image, labels, scalar, scalar]
        )
        self.masked_steps = tf.function(
            self._masked_steps,
            input_signature=[
                tf.TensorSpec((None, None, *input_shape), tf.float32),
                tf.TensorSpec((None, None), tf.int64),
                image,
                labels,
            ],
        )
        self.mean_abs_gradients = tf.function(
            self._mean_abs_gradients, input_signature=[image, labels]
        )

    def reset(self, weights: list[np.ndarray]) -> None:
        """Load ``weights`` into the model, clear the masks and start the optimizer afresh."""
        self.model.set_weights(weights)
        for mask in self.masks:
            mask.assign(tf.zeros_like(mask))
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        """The optimizer's state (step count, moments) as it was when built."""
        for variable, value in zip(self.optimizer.variables, self._fresh_state, strict=True):
            variable.assign(value)

    def set_masks(self, masks: dict[int, np.ndarray]) -> None:
        """Set the masks of the variables in slots ``masks`` (others keep theirs).

        A parameter leaving its mask has moments that would keep moving it
        under Adam with zero gradients; the optimizer then starts afresh.
        (Within one embedding the masks only grow, so this never happens.)
        """
        shrinks = False
        for slot, mask in masks.items():
            old = self.masks[slot].numpy()
            shrinks = shrinks or bool(np.any(old & ~mask))
            self.masks[slot].assign(mask)
        if shrinks:
            self.reset_optimizer()

    # -- losses
    def _loss_per_example(self, outputs, labels):
        labels = tf.cast(labels, tf.int64)
        if self.from_logits:
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, outputs)
        picked = tf.gather(outputs, labels, axis=-1, batch_dims=1)
        return -tf.math.log(tf.clip_by_value(picked, 1e-12, 1.0))

    def _outputs(self, theta, x):
        """The model's logits on ``x`` at weights ``theta`` (a list like ``self.theta``)."""
        with keras.StatelessScope(state_mapping=list(zip(self.theta, theta, strict=True))):
            return self.logits(x)

    def _loss(self, theta, x, y):
        return tf.reduce_mean(self._loss_per_example(self._outputs(theta, x), y))

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
        for j in range(limit(self.config.inner_steps)):  # unrolled when traced (--max-steps)
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
                loss = tf.reduce_sum(
                    self._loss_per_example(self._outputs(theta, xi[None]), yi[None])
                )
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
        starts = range(0, len(x), chunk)
        starts = starts[: limit(len(starts))]  # --max-steps: at most N chunks
        totals, seen = None, 0
        for start in starts:
            with _quiet_tensorflow():
                part = self.mean_abs_gradients(
                    tf.convert_to_tensor(x[start : start + chunk]),
                    tf.convert_to_tensor(y[start : start + chunk]),
                )
            part = [p.numpy().astype(np.float64) for p in part]
            totals = part if totals is None else [a + b for a, b in zip(totals, part, strict=True)]
            seen += len(x[start : start + chunk])
        return [t / seen for t in totals]

    # -- eq. 7 on the loss of eq. 2, masked
    def _masked_steps(self, batches_x, batches_y, exemplars, targets):
        lam = self.config.trade_off
        for i in tf.range(tf.shape(batches_x)[0]):
            with tf.GradientTape() as tape:
                natural = self._net_loss(batches_x[i], batches_y[i])
                watermark = self._net_loss(exemplars, targets)
                loss = lam * natural + (1.0 - lam) * watermark
            grads = tape.gradient(loss, self.variables)
            masked = [
                tf.where(mask, grad, tf.zeros_like(grad))
                for grad, mask in zip(grads, self.masks, strict=True)
            ]
            self.optimizer.apply_gradients(zip(masked, self.variables, strict=True))

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
        return tf.reduce_mean(self._loss_per_example(self.logits(x), y))


# --------------------------------------------------------------------------- the scheme


@dataclass
class _Progress:
    """What the outer loop of one embedding has done so far."""

    used: dict  # layer id -> flat mask of the parameters changed so far (None: none yet)
    budgets: list[int]
    literal: list = dataclasses.field(default_factory=list)
    hyper_norms: list[float] = dataclasses.field(default_factory=list)
    curves: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    phases_run: int = 0

    def full(self) -> bool:
        """Every layer's budget is used: eq. 6 cannot change the masks any more."""
        return all(
            m is not None and int(m.sum()) >= b
            for m, b in zip(self.used.values(), self.budgets, strict=True)
        )


class BiLevel(Watermark):
    """Yang et al.'s bi-level robust watermark (Algorithm 1), verified by a binomial test."""

    name = "bilevel"
    kind = "robust"
    Config = BiLevelConfig
    presets = {
        # digits 8x8 and the zoo's _tiny_cnn (1418 parameters): 10% per layer, large steps
        "smoke": {
            "keys": 8,
            "phases": 2,
            "inner_steps": 1,
            "steps": 60,
            "learning_rate": 0.05,
            "trade_off": 0.5,
            "top_fraction": 0.1,
            "mask_samples": 128,
        },
        # reproduce bilevel --preset quick: LeNet5 on Fashion-MNIST, 20 keys, lr 0.002
        "quick": {"keys": 20, "learning_rate": 0.002},
        # the paper's LeNet5/MNIST setting (5.1.4); CIFAR-size models: keys 60, lr 0.02
        "paper": {"keys": 30, "phases": 10, "inner_steps": 3, "learning_rate": 0.002},
    }

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

    def _check(self, data) -> None:
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
            limit(config.inner_steps),  # the traced inner loop's length
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
        sizes, per_slot = [], {}
        for (layer, _), (flat, per_variable, size) in zip(embedder.groups, masks, strict=True):
            used[id(layer)] = flat
            sizes.append(size)
            per_slot.update(dict(per_variable))
        embedder.set_masks(per_slot)
        return sizes

    def _phase(self, embedder, keys, targets, bounds, data, progress, rng):
        """One outer phase: the inner loop, eq. 6, ``steps`` masked steps; returns S_M."""
        config = self.config
        x_tr = np.asarray(data.x_train, dtype=np.float32)
        y_tr = np.asarray(data.y_train, dtype=np.int64)
        keys_t, targets_t = tf.constant(keys), tf.constant(targets)
        exemplars, first_norm = embedder.inner_loop(keys_t, targets_t, *bounds)
        progress.hyper_norms.append(float(first_norm))
        sizes = None  # every layer's budget is used: eq. 6 cannot change the masks
        if not progress.full():
            sizes = self._update_masks(embedder, exemplars, targets, x_tr, y_tr, progress.used, rng)
        progress.literal.append(sizes)
        batches = rng.integers(0, len(x_tr), size=(limit(config.steps), config.batch_size))
        embedder.masked_steps(
            tf.constant(x_tr[batches]), tf.constant(y_tr[batches]), exemplars, targets_t
        )
        return exemplars

    def _embed(self, model, data, *, hooks: tuple) -> Marked:
        """Watermark a copy of ``model`` (Algorithm 1); hooks run after every outer phase.

        ``key.metadata`` holds the exact number of changed parameters, the
        literal eq. 6 intersection sizes, the masks' sizes and the hooks'
        values per phase (``curves``).
        """
        config = self.config
        self._check(data)
        started = time.perf_counter()
        rng = np.random.default_rng(config.seed)
        embedder = self._embedder(model)
        marked = embedder.model  # a private working copy, reused by later embeddings
        pool = np.asarray(data.x_test, dtype=np.float32)
        index, targets, predictions = select_keys(
            classifier.probabilities(marked, pool), config.keys, rng, config.target
        )
        keys = pool[index]
        bounds = (tf.constant(np.min(pool)), tf.constant(np.max(pool)))
        progress = _Progress(
            used={id(layer): None for layer, _ in embedder.groups},
            budgets=[
                _budget(config.top_fraction, embedder.group_size(k))
                for k in range(len(embedder.groups))
            ],
            curves={hook.name: [] for hook in hooks},
        )
        exemplars = tf.constant(keys)
        for phase in range(1, limit(config.phases) + 1):
            exemplars = self._phase(embedder, keys, targets, bounds, data, progress, rng)
            for hook in hooks:
                progress.curves[hook.name].append(hook(marked))
            self._log_phase(phase, progress)
            progress.phases_run = phase
            if config.stop_when_embedded and np.all(classifier.labels(marked, keys) == targets):
                break
        marked = copy_model(marked)  # the caller's own model; the working copy stays here
        facts = {
            "layers": [layer.name for layer, _ in embedder.groups],
            "mask_sizes": [int(progress.used[id(layer)].sum()) for layer, _ in embedder.groups],
            "max_exemplar_shift": float(np.max(np.abs(exemplars.numpy() - keys))),
            "seconds": time.perf_counter() - started,
        }
        arrays = {
            "original_labels": predictions,
            "exemplars": exemplars.numpy(),
            "pool_indices": index.astype(np.int64),
        }
        key = self._key(model, marked, keys, targets, progress, facts, arrays)
        return Marked(marked, key)

    def _log_phase(self, phase: int, progress: _Progress) -> None:
        sizes = progress.literal[-1]
        log.info(
            "bilevel phase %d/%d: eq. 6 intersection %s of %d, mask %d",
            phase,
            self.config.phases,
            "-" if sizes is None else sum(sizes),
            sum(progress.budgets),
            sum(int(m.sum()) for m in progress.used.values() if m is not None),
        )

    def _key(self, model, marked, keys, targets, progress, facts, arrays) -> Key:
        changed = changed_parameters(model, marked)
        total = _parameter_count(marked)
        num_classes = int(model.output_shape[-1])
        p0 = null_probability(self.config.target, num_classes)
        metadata = {
            "config": as_dict(self.config),
            "num_classes": num_classes,
            "null_probability": p0,
            "threshold": binomial_threshold(len(keys), p0, self.config.alpha),
            "changed_parameters": changed,
            "total_parameters": total,
            "changed_fraction": changed / total,
            "budgets": progress.budgets,
            "intersection_sizes": progress.literal,
            "hypergradient_norms": progress.hyper_norms,
            "phases_run": progress.phases_run,
            "curves": progress.curves,
            **facts,
        }
        log.info(
            "bilevel: %d keys embedded, %d of %d parameters changed (%.3f%%) in %.1f s",
            len(keys),
            changed,
            total,
            100 * changed / total,
            facts["seconds"],
        )
        return Key(scheme=self.name, inputs=keys, labels=targets, metadata=metadata, arrays=arrays)

    def decide(self, key: Key, outputs: np.ndarray) -> Verification:
        """R_auth (the share of keys labelled with their target) and the binomial test against p0."""
        n = len(key)
        if n == 0:
            raise UserError("the bilevel key holds no key samples")
        num_classes = int(key.metadata.get("num_classes", np.shape(outputs)[-1]))
        p0 = null_probability(self.config.target, num_classes)
        alpha = self.config.alpha
        hits = int(np.sum(answers(outputs) == key.labels))
        p_value = binomial_p_value(hits, n, p0)
        present = p_value <= alpha
        verdict = (
            f"watermark present: {hits} of {n} keys carry their target label "
            f"(p = {p_value:.3g} <= {alpha})"
            if present
            else f"no watermark shown: {hits} of {n} keys carry their target label "
            f"(p = {p_value:.3g} > {alpha})"
        )
        return Verification(
            kind=self.kind,
            scheme=self.name,
            statistic=hits / n,
            threshold=binomial_threshold(n, p0, alpha),
            p_value=p_value,
            present=bool(present),
            intact=None,
            verdict=verdict,
            n=n,
            null=f"Binomial({n}, {p0:.3g}): a model that never saw the keys hits each target "
            f"with probability at most p0 ({self.config.target} targets)",
        )


# --------------------------------------------------------------------------- analysis helpers


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
