"""Neural Cleanse: reverse-engineer a trigger per class, flag outliers by MAD, unlearn the trigger.

Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019, and the
authors' code (github.com/bolunwang/backdoor, ``visualizer.py`` and
``mad_outlier_detection.py``).

**Detection** (section IV; :func:`reverse_engineer`, :func:`detect`). For
every class ``k`` it looks for the smallest mask ``m`` and a pattern ``p``
such that ``x * (1 - m) + m * p`` sends clean images ``x`` to ``k``:

* ``m`` (H x W, shared by the channels) and ``p`` (H x W x C) are optimised in
  tanh space, ``m = tanh(m') / (2 - eps) + 0.5`` and likewise ``p``, from
  uniform random starts, with Adam (lr 0.1, betas 0.5 and 0.9, epsilon 1e-7);
* loss = cross-entropy to ``k`` + ``cost * |m|_1``; the cost starts at 0 and
  is set to ``init_cost`` (1e-3) once the attack succeeds (success rate
  >= 0.99) for ``patience`` consecutive epochs; then it goes up by x1.5
  after ``patience`` successful epochs and down by /1.5**1.5 after
  ``patience`` failed ones;
* the best mask is the smallest-L1 one among epochs whose success rate is
  at least 0.99; a class stops early once its cost has gone both up and down
  and the best L1 has not improved by 1% for ``early_stop_patience`` epochs;
* anomaly index = |L1 - median| / MAD over the classes' mask L1 norms, the
  MAD scaled to a normal's standard deviation (x 1.4826,
  ``scipy.stats.median_abs_deviation(scale="normal")``); a class is flagged
  when its index exceeds 2 and its norm is below the median.

An "epoch" here is the original's "step": ``mini_batches`` mini-batches of
``batch_size`` clean images, after which the success rate and the mask norm,
averaged over those mini-batches, drive the schedule. Triggers live in
pixel space [0, 1]; a model that expects another input range or centred
images gets the stamped images mapped into its range
(:meth:`models.Dataset.from_unit`) before every forward pass.

**Removal** (section VI.C, "Patching DNN via Unlearning"; the attack
``neural_cleanse``, :class:`NeuralCleanse`). The defender fine-tunes the
model on clean images of which a share carries the reversed trigger of the
infected class, with their correct labels, so that the model unlearns the
trigger; the paper takes a 10% sample of the training data, stamps 20% of it
and fine-tunes for one epoch. Followed here, with these differences:

* the adversary's own labelled set (the dataset's training split) is both
  the clean images of the detection and the unlearning set (the paper
  detects on test images and unlearns on a 10% training sample);
  ``trigger_share`` (0.2) of it, drawn at random with the fine-tuning's
  seed, carries the trigger; all layers are fine-tuned
  (:func:`attacks.finetune.fine_tune`, FTAL) for ``fine_tune.epochs`` (1);
* the optimiser: the section names none; the default is SGD at 1e-3 with
  momentum 0.9 in batches of 32. Measured on the tiny test CNN with a
  planted 2 x 2 trigger (digits; 287 adversary images, 58 stamped, one
  epoch): trigger success 0.93 -> 0.14 for test accuracy 0.91 -> 0.88;
  Adam at 1e-4 left the trigger at 0.90, Adam at 1e-3 at 0.35, SGD at 1e-2
  with momentum 0.9 at 0.00 but for 12 points of accuracy;
* which trigger: ``unlearn="suspect"`` (default) the most suspicious class,
  flagged or not, because a watermark remover assumes a mark is there (as
  Aiken et al. argue); ``unlearn="flagged"`` is the paper's defender: the
  triggers of every flagged class, in turn over the stamped images, and no
  fine-tuning at all when no class is flagged.

The detection (norms, anomaly indices, flagged classes, suspect) is in
``info["detection"]``.

Deliberate deviations from the original code:

* All classes are optimised at once, in one ``tf.function`` per epoch: every
  mini-batch applies each class's trigger to the same clean images and runs
  the model on the K x B stack. Each class keeps its own Adam moments and
  step count, cost, schedule counters and early stopping as (K,) tensors, so
  a class gets exactly the updates it would get alone (the tests check it);
  a class that has stopped leaves the stack. ``class_chunk`` splits the
  classes into independent groups when memory requires. Adam is therefore
  written out (ten lines in :meth:`_ClassGroup._adam`): a Keras optimizer
  updates whole variables, so it would keep moving the stopped classes'
  rows (their moments decay but do not vanish), and gathering the active
  rows into tensors is what makes stopped classes cost nothing
  (``bench/neural_cleanse_vs_art.py``: 3 to 5 times faster than ART's
  class-by-class ``KerasNeuralCleanse``).
* When labels are given, the images of class ``k`` are left out of class
  ``k``'s loss and success rate, as the paper defines the attack ("samples
  from other labels"); the original code counts them (pass no labels to
  match it).
* The cross-entropy is taken on the logits where the model's softmax can be
  cut off (:func:`models.classifier.logit_function`): the same loss without
  Keras' clipping of probabilities at 1e-7, which zeroes the gradient of a
  hopeless class.
* Defaults: the authors' GTSRB example uses ``patience`` 5 (the Visualizer
  class defaults to 10) with a cost multiplier of 2 and an early-stop
  patience of 25 at threshold 1.0; here ``patience`` 5, multiplier 1.5 (the
  Visualizer's default) and an early-stop patience of 2 x patience = 10 at
  threshold 0.99 (the Visualizer's rule). One epoch is one pass over the
  clean images (the original: 1000 images in mini-batches of 32).
* Masks are clipped to [0, 1] on output: ``tanh / (2 - eps) + 0.5`` can
  overshoot the interval by eps/4.
* When the MAD is 0 the anomaly index is infinite for any class off the
  median and 0 on it (the original divides by zero).

A result is cached by (model digest, images digest, configuration) under
``<cache>/neural_cleanse/`` (:func:`models.training.default_cache_dir`,
switched off with :func:`models.training.set_caching`), so the same Neural
Cleanse on the same model is never run twice, in one run or across reruns
(laundering's first round and a paper script's trigger figure share it).
Under ``--max-steps N`` (:func:`models.training.limit`) at most N epochs
run, and the result is cached apart from a full one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attacks.base import Removal, RemovalAttack, Requirements, clone
from attacks.finetune import FineTuneConfig, fine_tune
from models import classifier
from models.config import as_dict, option, validate
from models.errors import UserError
from models.training import hook_curves, limit, max_steps

log = logging.getLogger(__name__)

__all__ = [
    "FLAG_THRESHOLD",
    "NeuralCleanse",
    "NeuralCleanseConfig",
    "NeuralCleanseResult",
    "UnlearningConfig",
    "add_command",
    "anomaly_indices",
    "detect",
    "draw_triggers",
    "reverse_engineer",
]

#: A class whose anomaly index exceeds this (and whose norm is below the median) is flagged.
FLAG_THRESHOLD = 2.0
#: Keras' epsilon, used by the original in the tanh reparametrisation and by Adam.
_EPSILON = 1e-7
REGULARIZATIONS = ("l1", "l2")
_CACHE_VERSION = 1


@dataclass(frozen=True)
class NeuralCleanseConfig:
    """How the triggers are reverse-engineered (defaults: the authors' code, see the module doc).

    Args:
        steps: maximum number of epochs (the original's "steps"; 1000 there).
        batch_size: clean images per mini-batch (32), capped at the number of images.
        mini_batches: mini-batches per epoch; ``None``: one pass over the
            clean images (``n // batch_size``, at least 1).
        learning_rate: Adam's learning rate (0.1).
        beta_1: Adam's first-moment decay (0.5).
        beta_2: Adam's second-moment decay (0.9).
        init_cost: weight of the mask norm once the attack first succeeds (1e-3).
        regularization: ``"l1"`` (the paper's) or ``"l2"`` norm of the mask in the loss.
        attack_success_threshold: success rate that counts as a working trigger (0.99).
        patience: epochs of success (failure) before the cost goes up (down).
        cost_multiplier: the cost goes up by this and down by its 1.5th power.
        reset_cost_to_zero: start with cost 0 and set it to ``init_cost`` after
            ``patience`` successful epochs (the original's default); ``False``
            starts at ``init_cost``.
        early_stop: stop a class whose best norm has stalled (see the module doc).
        early_stop_threshold: the best norm must fall below this share of its
            previous best to count as progress (0.99).
        early_stop_patience: epochs without progress before a class stops (10).
        class_chunk: optimise at most this many classes together (``None``: all).
        seed: seeds the random starts and the order of the clean images.
    """

    steps: int = option(1000, low=1, help="maximum epochs")
    batch_size: int = option(32, low=1, help="clean images per mini-batch")
    mini_batches: int | None = option(None, low=1, help="mini-batches per epoch (none: one pass)")
    learning_rate: float = option(0.1, low=0, low_open=True, help="Adam's learning rate")
    beta_1: float = option(0.5, low=0, high=0.999999, help="Adam's first-moment decay")
    beta_2: float = option(0.9, low=0, high=0.999999, help="Adam's second-moment decay")
    init_cost: float = option(1e-3, low=0, low_open=True, help="weight of the mask norm")
    regularization: str = option("l1", choices=REGULARIZATIONS, help="norm of the mask")
    attack_success_threshold: float = option(
        0.99, low=0, low_open=True, high=1, help="success rate of a working trigger"
    )
    patience: int = option(5, low=1, help="epochs before the cost goes up or down")
    cost_multiplier: float = option(1.5, low=1, low_open=True, help="cost step up")
    reset_cost_to_zero: bool = option(True, help="start at cost 0 (the original)")
    early_stop: bool = option(True, help="stop a class whose best norm stalls")
    early_stop_threshold: float = option(
        0.99, low=0, low_open=True, high=1, help="share of the best norm that counts as progress"
    )
    early_stop_patience: int = option(10, low=1, help="epochs without progress before stopping")
    class_chunk: int | None = option(None, low=1, help="classes optimised together (none: all)")
    seed: int = option(0, low=0, high=2**32 - 1, help="random starts and image order")

    def __post_init__(self):
        validate(self)

    @property
    def cost_multiplier_up(self) -> float:
        return float(self.cost_multiplier)

    @property
    def cost_multiplier_down(self) -> float:
        return float(self.cost_multiplier) ** 1.5


# --------------------------------------------------------------------------- outlier detection


def anomaly_indices(l1_norms) -> np.ndarray:
    """Anomaly index of every class: ``|L1 - median| / MAD``, the MAD scaled by 1.4826.

    Args:
        l1_norms: the (K,) mask L1 norms.

    Returns:
        (K,) float64. Where the MAD is 0, classes on the median get 0 and the
        others infinity.
    """
    from scipy import stats

    norms = np.asarray(l1_norms, dtype=np.float64).reshape(-1)
    if norms.size == 0:
        return norms
    deviation = np.abs(norms - np.median(norms))
    mad = stats.median_abs_deviation(norms, scale="normal")
    if mad == 0:
        return np.where(deviation > 0, np.inf, 0.0)
    return deviation / mad


def _flagged(l1_norms: np.ndarray, indices: np.ndarray) -> tuple[int, ...]:
    below = l1_norms < np.median(l1_norms)
    ids = np.flatnonzero(below & (indices > FLAG_THRESHOLD))
    return tuple(int(k) for k in ids[np.argsort(l1_norms[ids], kind="stable")])


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class NeuralCleanseResult:
    """The reversed triggers of every class and the outlier analysis.

    Attributes:
        masks: (K, H, W) float32 in [0, 1], the best mask of each class.
        patterns: (K, H, W, C) float32 in [0, 1] (pixel space).
        l1_norms: (K,) L1 norm of each mask.
        anomaly_indices: (K,) ``|L1 - median| / (1.4826 * MAD)``.
        flagged: classes with an index above 2 and a norm below the median,
            smallest norm first.
        attack_success: (K,) share of the clean images (of other classes, when
            labels were given) that the class's reversed trigger sends to it.
        steps: epochs run (the most any class ran).
        seconds: wall time of the optimisation (for a cached result, of the
            run that made it).
        class_steps: (K,) epochs each class ran before it stopped.
        found: (K,) whether the class reached the success threshold at some
            epoch (else its mask is the last one, as in the original).
        config: the configuration, as a dict.
    """

    masks: np.ndarray
    patterns: np.ndarray
    l1_norms: np.ndarray
    anomaly_indices: np.ndarray
    flagged: tuple[int, ...]
    attack_success: np.ndarray
    steps: int
    seconds: float
    class_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    found: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.masks.shape[0])

    def apply(self, x: np.ndarray, target, *, data=None) -> np.ndarray:
        """Stamp the reversed trigger of ``target`` on ``x``: ``x * (1 - m) + m * p``.

        Args:
            x: (N, H, W, C) images in [0, 1], or, with ``data``, images
                prepared as ``data``'s are (its input range and centring).
            target: a class id, or (N,) class ids (one per image).
            data: the :class:`models.Dataset` ``x`` comes from; the result is
                then prepared the same way.

        Returns:
            (N, H, W, C) float32.
        """
        if data is not None:
            return data.from_unit(self.apply(data.to_unit(x), target))
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.patterns.shape[1:]:
            raise UserError(
                f"images of shape {x.shape[1:]} do not fit triggers of shape {self.patterns.shape[1:]}"
            )
        target = np.asarray(target)
        if target.ndim == 0:
            target = np.full(len(x), int(target))
        if target.shape != (len(x),):
            raise UserError(f"expected one target or {len(x)} targets, got shape {target.shape}")
        if len(target) and (target.min() < 0 or target.max() >= self.num_classes):
            raise UserError(f"target classes must be in 0..{self.num_classes - 1}")
        mask = self.masks[target][..., None]
        return (x * (1.0 - mask) + mask * self.patterns[target]).astype(np.float32)

    def trigger_images(self) -> np.ndarray:
        """The reversed triggers as images, ``mask * pattern`` (K, H, W, C), in [0, 1]."""
        return (self.masks[..., None] * self.patterns).astype(np.float32)

    def most_suspicious(self) -> int:
        """The likely infected class: the highest anomaly index among norms at or below the median.

        That is the class with the smallest mask norm, flagged or not.
        """
        below = self.l1_norms <= np.median(self.l1_norms)
        scores = np.where(below, self.anomaly_indices, -np.inf)
        best = np.flatnonzero(scores == scores.max())
        return int(best[np.argmin(self.l1_norms[best])])

    def least_suspicious(self) -> int:
        """The class least likely to be infected: the largest mask norm (highest signed deviation)."""
        return int(np.argmax(self.l1_norms))

    def per_class(self) -> list[dict[str, Any]]:
        """One row per class: its mask norm, anomaly index, verdicts and attack success."""
        suspect, least = self.most_suspicious(), self.least_suspicious()
        return [
            {
                "class": k,
                "l1_norm": float(self.l1_norms[k]),
                "anomaly_index": float(self.anomaly_indices[k]),
                "flagged": k in self.flagged,
                "suspect": k == suspect,
                "least_likely": k == least,
                "attack_success": float(self.attack_success[k]),
            }
            for k in range(self.num_classes)
        ]

    def to_dict(self, *, arrays: bool = True) -> dict[str, Any]:
        """A JSON-able dict (non-finite indices as ``null``); ``arrays`` adds masks and patterns."""
        out: dict[str, Any] = {
            "method": "neural_cleanse",
            "paper": "Wang et al., Neural Cleanse, IEEE S&P 2019",
            "num_classes": self.num_classes,
            "l1_norms": [float(v) for v in self.l1_norms],
            "anomaly_indices": [
                float(v) if math.isfinite(v) else None for v in self.anomaly_indices
            ],
            "flagged": list(self.flagged),
            "most_suspicious": self.most_suspicious(),
            "least_suspicious": self.least_suspicious(),
            "attack_success": [float(v) for v in self.attack_success],
            "steps": int(self.steps),
            "class_steps": [int(v) for v in self.class_steps],
            "found": [bool(v) for v in self.found],
            "seconds": float(self.seconds),
            "config": dict(self.config),
        }
        if arrays:
            out["masks"] = np.asarray(self.masks, np.float32).tolist()
            out["patterns"] = np.asarray(self.patterns, np.float32).tolist()
        return out

    def to_json(self, *, arrays: bool = True) -> str:
        """The result as JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(arrays=arrays), allow_nan=False)

    def save_json(self, path: str | os.PathLike, *, arrays: bool = True) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (:func:`models.io.write_text`)."""
        from models.io import write_text

        return write_text(path, self.to_json(arrays=arrays))

    @classmethod
    def from_json(cls, text: str) -> NeuralCleanseResult:
        """Rebuild a result written by :meth:`to_json` (with its arrays)."""
        try:
            data = json.loads(text)
            indices = np.array(
                [np.inf if v is None else v for v in data["anomaly_indices"]], np.float64
            )
            return cls(
                masks=np.asarray(data["masks"], np.float32),
                patterns=np.asarray(data["patterns"], np.float32),
                l1_norms=np.asarray(data["l1_norms"], np.float64),
                anomaly_indices=indices,
                flagged=tuple(int(k) for k in data["flagged"]),
                attack_success=np.asarray(data["attack_success"], np.float64),
                steps=int(data["steps"]),
                seconds=float(data["seconds"]),
                class_steps=np.asarray(data.get("class_steps", []), np.int64),
                found=np.asarray(data.get("found", []), bool),
                config=dict(data.get("config", {})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"not a Neural Cleanse result with arrays ({type(exc).__name__}: {exc})"
            ) from None

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> NeuralCleanseResult:
        """Read a result written by :meth:`save_json`."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Neural Cleanse result '{path}' does not exist")
        return cls.from_json(path.read_text())


# --------------------------------------------------------------------------- optimisation


def _input_map(input_range, mean) -> tuple[float, np.ndarray] | None:
    """``(scale, offset)`` taking [0, 1] pixels to the model's inputs, or None for the identity.

    The affine map of :meth:`models.Dataset.from_unit`: ``x * (high - low) + low - mean``.
    """
    low, high = (float(v) for v in input_range)
    offset = np.full(1, low, np.float32)
    if mean is not None:
        offset = (low - np.asarray(mean, np.float32).reshape(-1)).astype(np.float32)
    if (low, high) == (0.0, 1.0) and not np.any(offset):
        return None
    return float(high - low), offset


class _ClassGroup:
    """The variables and the per-epoch ``tf.function`` of a group of classes optimised together."""

    def __init__(self, forward, from_logits: bool, x, y, size: int, config, input_map=None):
        import tensorflow as tf

        self.tf = tf
        self.config = config
        self.forward = forward
        self.from_logits = from_logits
        self.input_map = input_map
        self.size = size
        h, w, c = x.shape[1:]
        self.image_shape = (h, w, c)
        self.x = tf.constant(x, tf.float32)
        self.y = tf.constant(y, tf.int32)
        f32 = tf.float32

        def var(shape, dtype=f32, value=0):
            return tf.Variable(tf.fill(shape, tf.cast(value, dtype)), trainable=False)

        self.classes = var([size], tf.int32)
        self.mask_raw = var([size, h, w, 1])
        self.pattern_raw = var([size, h, w, c])
        self.m_mask, self.v_mask = var([size, h, w, 1]), var([size, h, w, 1])
        self.m_pattern, self.v_pattern = var([size, h, w, c]), var([size, h, w, c])
        self.adam_t = var([size])
        self.best_mask = var([size, h, w, 1])
        self.best_pattern = var([size, h, w, c])
        self.cost = var([size])
        self.reg_best = var([size], value=np.inf)
        self.es_reg_best = var([size], value=np.inf)
        self.set_counter = var([size], tf.int32)
        self.up_counter = var([size], tf.int32)
        self.down_counter = var([size], tf.int32)
        self.es_counter = var([size], tf.int32)
        self.up_flag = var([size], tf.bool, False)
        self.down_flag = var([size], tf.bool, False)
        self.active = var([size], tf.bool, True)
        self.steps_run = var([size], tf.int32)
        self.epoch = tf.function(self._epoch, reduce_retracing=True)

    def reset(self, class_ids: np.ndarray, mask0: np.ndarray, pattern0: np.ndarray) -> None:
        """Start the optimisation of ``class_ids`` from masks and patterns in [0, 1]."""
        config = self.config

        def to_tanh(v):
            return np.arctanh((np.clip(v, 0.0, 1.0) - 0.5) * (2 - _EPSILON)).astype(np.float32)

        self.classes.assign(class_ids.astype(np.int32))
        self.mask_raw.assign(to_tanh(mask0))
        self.pattern_raw.assign(to_tanh(pattern0))
        for variable in (
            self.m_mask,
            self.v_mask,
            self.m_pattern,
            self.v_pattern,
            self.adam_t,
            self.best_mask,
            self.best_pattern,
            self.set_counter,
            self.up_counter,
            self.down_counter,
            self.es_counter,
            self.steps_run,
        ):
            variable.assign(self.tf.zeros_like(variable))
        start_cost = 0.0 if config.reset_cost_to_zero else config.init_cost
        self.cost.assign(np.full(self.size, start_cost, np.float32))
        self.reg_best.assign(np.full(self.size, np.inf, np.float32))
        self.es_reg_best.assign(np.full(self.size, np.inf, np.float32))
        self.up_flag.assign(np.zeros(self.size, bool))
        self.down_flag.assign(np.zeros(self.size, bool))
        self.active.assign(np.ones(self.size, bool))

    # -- pieces of the epoch (traced inside tf.function)

    def _squash(self, raw):
        return self.tf.tanh(raw) / (2 - _EPSILON) + 0.5

    def _mask_norm(self, mask):
        tf = self.tf
        if self.config.regularization == "l2":
            return tf.sqrt(tf.reduce_sum(tf.square(mask), axis=[1, 2, 3]))
        return tf.reduce_sum(tf.abs(mask), axis=[1, 2, 3])

    def _cross_entropy(self, scores, targets):
        """(A, B) cross-entropy of scores (A, B, K) to each row's target."""
        tf = self.tf
        labels = tf.broadcast_to(targets[:, None], tf.shape(scores)[:2])
        if self.from_logits:
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=scores)
        probs = tf.clip_by_value(scores, _EPSILON, 1.0 - _EPSILON)
        probs = probs / tf.reduce_sum(probs, axis=-1, keepdims=True)
        return -tf.math.log(tf.gather(probs, labels, batch_dims=2))

    def _adam(self, raw, grad, m, v, t):
        """One Adam step of (A, ...) parameters with per-row step counts ``t`` (A,)."""
        tf = self.tf
        c = self.config
        m = c.beta_1 * m + (1 - c.beta_1) * grad
        v = c.beta_2 * v + (1 - c.beta_2) * tf.square(grad)
        rate = c.learning_rate * tf.sqrt(1 - c.beta_2**t) / (1 - c.beta_1**t)
        return raw - rate[:, None, None, None] * m / (tf.sqrt(v) + _EPSILON), m, v

    def _scores(self, stamped, count):
        """(A, B, K) scores of the (A, B, H, W, C) stamped pixels, mapped to the model's inputs."""
        tf = self.tf
        flat = tf.reshape(stamped, [-1, *self.image_shape])
        if self.input_map is not None:
            scale, offset = self.input_map
            flat = flat * scale + tf.constant(offset)
        scores = tf.cast(self.forward(flat), tf.float32)
        return tf.reshape(scores, [count, -1, tf.shape(scores)[-1]])

    def _descend(self, batches, ids, targets):
        """The mini-batches of one epoch for the active rows ``ids``: (hits, seen, summed norms)."""
        tf = self.tf
        count = tf.shape(ids)[0]
        hits, seen, reg_sum = tf.zeros([count]), tf.zeros([count]), tf.zeros([count])
        cost = tf.gather(self.cost, ids)  # fixed during an epoch, as in the original
        # the active rows' parameters and Adam state travel through the loop as tensors
        state = [
            tf.gather(v, ids)
            for v in (self.adam_t, self.mask_raw, self.pattern_raw, self.m_mask, self.v_mask)
        ]
        t, mask_raw, pattern_raw, m_mask, v_mask = state
        m_pattern, v_pattern = tf.gather(self.m_pattern, ids), tf.gather(self.v_pattern, ids)
        for i in tf.range(tf.shape(batches)[0]):
            x = tf.gather(self.x, batches[i])
            weight = tf.cast(tf.gather(self.y, batches[i])[None, :] != targets[:, None], tf.float32)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch([mask_raw, pattern_raw])
                mask = self._squash(mask_raw)  # (A, H, W, 1)
                pattern = self._squash(pattern_raw)  # (A, H, W, C)
                scores = self._scores(
                    x[None] * (1 - mask[:, None]) + (mask * pattern)[:, None], count
                )
                ce = self._cross_entropy(scores, targets)
                share = tf.maximum(tf.reduce_sum(weight, axis=1), 1.0)
                reg = self._mask_norm(mask)
                loss = tf.reduce_sum(tf.reduce_sum(weight * ce, axis=1) / share + cost * reg)
            grad_mask, grad_pattern = tape.gradient(loss, [mask_raw, pattern_raw])
            correct = tf.cast(
                tf.argmax(scores, axis=-1, output_type=tf.int32) == targets[:, None], tf.float32
            )
            hits += tf.reduce_sum(weight * correct, axis=1)
            seen += tf.reduce_sum(weight, axis=1)
            reg_sum += reg
            t += 1.0
            mask_raw, m_mask, v_mask = self._adam(mask_raw, grad_mask, m_mask, v_mask, t)
            pattern_raw, m_pattern, v_pattern = self._adam(
                pattern_raw, grad_pattern, m_pattern, v_pattern, t
            )
        rows = ids[:, None]
        for variable, value in (
            (self.adam_t, t),
            (self.mask_raw, mask_raw),
            (self.pattern_raw, pattern_raw),
            (self.m_mask, m_mask),
            (self.v_mask, v_mask),
            (self.m_pattern, m_pattern),
            (self.v_pattern, v_pattern),
        ):
            variable.scatter_nd_update(rows, value)
        return hits, seen, reg_sum

    def _epoch(self, batches):
        """One epoch: ``batches`` (M, B) image indices, then the schedule of every active class."""
        tf = self.tf
        ids = tf.cast(tf.where(self.active)[:, 0], tf.int32)  # active rows of this group
        hits, seen, reg_sum = self._descend(batches, ids, tf.gather(self.classes, ids))

        def full(values, fill=0.0):  # (A,) -> (size,), rows not active get ``fill``
            base = tf.fill([self.size], tf.cast(fill, values.dtype))
            return tf.tensor_scatter_nd_update(base, ids[:, None], values)

        acc = full(hits / tf.maximum(seen, 1.0))
        reg = full(reg_sum / tf.cast(tf.shape(batches)[0], tf.float32))
        active = self.active.value()
        success = acc >= self.config.attack_success_threshold
        reg_best = self._track_best(active, success, reg)
        moving = active & ~self._early_stop(active, reg_best)
        self._update_cost(moving, success)
        self.steps_run.assign_add(tf.cast(active, tf.int32))
        self.active.assign(moving)
        return tf.reduce_sum(tf.cast(moving, tf.int32)), acc, reg

    def _track_best(self, active, success, reg):
        """Keep the smallest-norm trigger among successful epochs; returns the best norms."""
        tf = self.tf
        improved = active & success & (reg < self.reg_best)
        mask_now = self._squash(self.mask_raw)
        pattern_now = self._squash(self.pattern_raw)
        self.best_mask.assign(tf.where(improved[:, None, None, None], mask_now, self.best_mask))
        self.best_pattern.assign(
            tf.where(improved[:, None, None, None], pattern_now, self.best_pattern)
        )
        reg_best = tf.where(improved, reg, self.reg_best)
        self.reg_best.assign(reg_best)
        return reg_best

    def _early_stop(self, active, reg_best):
        """The rows that stop now: the cost went up and down, and the best norm stalled."""
        tf = self.tf
        c = self.config
        if not c.early_stop:
            return tf.zeros_like(active)
        stalled = reg_best >= c.early_stop_threshold * self.es_reg_best
        found = reg_best < np.inf
        es_counter = tf.where(
            active & found, tf.where(stalled, self.es_counter + 1, 0), self.es_counter
        )
        self.es_counter.assign(es_counter)
        self.es_reg_best.assign(
            tf.where(active, tf.minimum(reg_best, self.es_reg_best), self.es_reg_best)
        )
        return active & self.up_flag & self.down_flag & (es_counter >= c.early_stop_patience)

    def _update_cost(self, moving, success):
        """The adaptive cost of the rows still ``moving``, as in the original: set, then up or down."""
        tf = self.tf
        c = self.config
        cost = self.cost.value()
        up_counter, down_counter = self.up_counter.value(), self.down_counter.value()
        up_flag, down_flag = self.up_flag.value(), self.down_flag.value()
        waiting = (cost == 0.0) & success
        set_counter = tf.where(waiting, self.set_counter + 1, 0)
        do_set = waiting & (set_counter >= c.patience)
        cost = tf.where(do_set, tf.cast(c.init_cost, tf.float32), cost)
        up_counter = tf.where(do_set, 0, up_counter)
        down_counter = tf.where(do_set, 0, down_counter)
        up_flag = up_flag & ~do_set
        down_flag = down_flag & ~do_set
        up_counter = tf.where(success, up_counter + 1, 0)
        down_counter = tf.where(success, 0, down_counter + 1)
        go_up = up_counter >= c.patience
        go_down = ~go_up & (down_counter >= c.patience)
        up_counter = tf.where(go_up, 0, up_counter)
        down_counter = tf.where(go_down, 0, down_counter)
        cost = tf.where(go_up, cost * c.cost_multiplier_up, cost)
        cost = tf.where(go_down, cost / c.cost_multiplier_down, cost)
        for variable, value in (
            (self.cost, cost),
            (self.set_counter, set_counter),
            (self.up_counter, up_counter),
            (self.down_counter, down_counter),
            (self.up_flag, up_flag | go_up),
            (self.down_flag, down_flag | go_down),
        ):
            variable.assign(tf.where(moving, value, variable))

    def results(self) -> tuple[np.ndarray, ...]:
        """(masks (size, H, W), patterns, found, steps run) after the optimisation."""
        found = self.reg_best.numpy() < np.inf
        keep = found[:, None, None, None]
        masks = np.where(keep, self.best_mask.numpy(), self._squash(self.mask_raw).numpy())
        patterns = np.where(keep, self.best_pattern.numpy(), self._squash(self.pattern_raw).numpy())
        return (
            np.clip(masks[..., 0], 0.0, 1.0).astype(np.float32),
            np.clip(patterns, 0.0, 1.0).astype(np.float32),
            found,
            self.steps_run.numpy().astype(np.int64),
        )


def _batch_schedule(n: int, batch: int, mini_batches: int, steps: int, seed: int):
    """Yields (mini_batches, batch) image indices per epoch: shuffled passes over the images."""
    rng = np.random.default_rng([seed, 0])
    pending = np.zeros(0, np.int64)
    need = mini_batches * batch
    for _ in range(steps):
        while len(pending) < need:
            pending = np.concatenate([pending, rng.permutation(n)])
        yield pending[:need].reshape(mini_batches, batch).astype(np.int32)
        pending = pending[need:]


def _initial_triggers(classes: np.ndarray, shape: tuple[int, int, int], seed: int):
    """Uniform random starts as the original draws them, one generator per class."""
    h, w, c = shape
    masks, patterns = [], []
    for k in classes:  # host-side set-up, once per class; not in the optimisation
        rng = np.random.default_rng([seed, 1, int(k)])
        masks.append(rng.random((h, w, 1)))
        patterns.append(rng.random((h, w, c)))
    return np.stack(masks).astype(np.float32), np.stack(patterns).astype(np.float32)


def _attack_success(forward, masks, patterns, x, y, input_map, batch: int = 256) -> np.ndarray:
    """(K,) share of ``x`` (without class k's own images if labelled) each trigger sends to k."""
    import tensorflow as tf

    k = len(masks)
    m = tf.constant(masks[..., None])
    p = tf.constant(patterns)
    targets = tf.range(k, dtype=tf.int32)

    @tf.function(reduce_retracing=True)
    def count(xb, yb):
        stamped = tf.reshape(xb[None] * (1 - m[:, None]) + (m * p)[:, None], [-1, *xb.shape[1:]])
        if input_map is not None:
            stamped = stamped * input_map[0] + tf.constant(input_map[1])
        scores = forward(stamped)
        labels = tf.reshape(tf.argmax(scores, axis=-1, output_type=tf.int32), [k, -1])
        weight = tf.cast(yb[None, :] != targets[:, None], tf.float32)
        hits = tf.cast(labels == targets[:, None], tf.float32) * weight
        return tf.reduce_sum(hits, axis=1), tf.reduce_sum(weight, axis=1)

    hits, seen = np.zeros(k), np.zeros(k)
    for start in range(0, len(x), batch):
        h, s = count(tf.constant(x[start : start + batch]), tf.constant(y[start : start + batch]))
        hits += h.numpy()
        seen += s.numpy()
    return hits / np.maximum(seen, 1.0)


def _checked_inputs(model, x_clean, y_clean) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as float32 images and int32 labels (-1: unlabelled), checked against ``model``."""
    x = np.asarray(x_clean, dtype=np.float32)
    input_shape = tuple(model.input_shape[1:])
    if x.ndim != 4 or len(x) == 0 or tuple(x.shape[1:]) != input_shape:
        raise UserError(
            f"clean images of shape {x.shape} do not fit the model's input {input_shape}; "
            "expected (N, H, W, C) with N >= 1"
        )
    num_classes = int(model.output_shape[-1])
    if y_clean is None:
        return x, np.full(len(x), -1, np.int32)
    y = np.asarray(y_clean).reshape(-1)
    if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise UserError(
            f"y_clean must hold {len(x)} labels in 0..{num_classes - 1}, got shape {y.shape}"
        )
    return x, y.astype(np.int32)


def _cache_file(model, x, y, input_map, config: NeuralCleanseConfig) -> Path:
    """Where the result of this Neural Cleanse is cached: by model, images and configuration."""
    import keras

    from models.io import array_digest
    from models.training import default_cache_dir

    scale, offset = input_map if input_map is not None else (1.0, np.zeros(1, np.float32))
    parts = {
        "version": _CACHE_VERSION,
        "keras": keras.__version__,
        "model": classifier.digest(model, length=32),
        "images": array_digest(x, y, np.asarray([scale], np.float64), offset, length=32),
        "config": as_dict(config),
    }
    if max_steps() is not None:  # a truncated run never stands in for a full one
        parts["max_steps"] = max_steps()
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return default_cache_dir() / "neural_cleanse" / f"{key}.json"


def _cached(path: Path) -> NeuralCleanseResult | None:
    from models.training import caching

    if not caching() or not path.is_file():
        return None
    try:
        result = NeuralCleanseResult.load_json(path)
    except UserError as exc:  # a damaged entry is recomputed and replaced
        log.warning("ignoring the cached Neural Cleanse result %s: %s", path, exc)
        return None
    log.info("Neural Cleanse: reused %s (%.1f s originally)", path.name, result.seconds)
    return result


def _store(path: Path, result: NeuralCleanseResult) -> None:
    from models.training import caching

    if caching():
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save_json(path)


def _optimise(forward, from_logits, x, y, num_classes, config, input_map):
    """Every class's trigger, group by group: (masks, patterns, found, steps per class)."""
    import tensorflow as tf

    batch = min(config.batch_size, len(x))
    mini_batches = config.mini_batches or max(1, len(x) // batch)
    chunk = min(config.class_chunk or num_classes, num_classes)
    steps = limit(config.steps)  # --max-steps
    log.info(
        "Neural Cleanse: %d classes in groups of %d, %d images, %d epochs of %d x %d, %s",
        num_classes, chunk, len(x), steps, mini_batches, batch,
        "logits" if from_logits else "probabilities",
    )  # fmt: skip
    parts: list[tuple[np.ndarray, ...]] = []
    groups: dict[int, _ClassGroup] = {}
    for first in range(0, num_classes, chunk):  # independent groups of classes
        ids = np.arange(first, min(first + chunk, num_classes))
        if len(ids) not in groups:
            groups[len(ids)] = _ClassGroup(forward, from_logits, x, y, len(ids), config, input_map)
        group = groups[len(ids)]
        group.reset(ids, *_initial_triggers(ids, x.shape[1:], config.seed))
        schedule = _batch_schedule(len(x), batch, mini_batches, steps, config.seed)
        for step, batches in enumerate(schedule):
            remaining, acc, reg = group.epoch(tf.constant(batches))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("epoch %d: success %s, norm %s", step, acc.numpy(), reg.numpy())
            if step % 10 == 0:
                log.info("classes %d-%d, epoch %d: %d active", ids[0], ids[-1], step, remaining)
            if int(remaining) == 0:
                break
        parts.append(group.results())
    return tuple(np.concatenate(values) for values in zip(*parts, strict=True))


def reverse_engineer(
    model,
    x_clean,
    config: NeuralCleanseConfig | None = None,
    *,
    y_clean=None,
    input_range: tuple[float, float] = (0.0, 1.0),
    mean=None,
) -> NeuralCleanseResult:
    """Reverse-engineer a trigger for every class of ``model`` and run the MAD outlier test.

    Cached (see the module docstring): the same model, images and config give
    the stored result without running again.

    Args:
        model: a Keras classifier on (H, W, C) inputs, ending in a softmax or
            giving logits (detected).
        x_clean: (N, H, W, C) clean images in [0, 1] (pixel space, where
            triggers live; :meth:`models.Dataset.to_unit` gives them).
        config: the optimisation (default :class:`NeuralCleanseConfig`).
        y_clean: (N,) labels of ``x_clean``; when given, class k's own
            images are left out of its loss and success rate.
        input_range: the pixel range the model expects (``Dataset.input_range``).
        mean: the per-channel mean the model's inputs are centred by, in that
            range (``Dataset.mean``), or None.

    Returns:
        A :class:`NeuralCleanseResult`.

    Raises:
        UserError: images that do not fit the model, bad labels, or a model
            whose outputs are not finite.
    """
    from models.sanity import check_finite

    config = config or NeuralCleanseConfig()
    if not isinstance(config, NeuralCleanseConfig):
        raise TypeError("config must be a NeuralCleanseConfig")
    x, y = _checked_inputs(model, x_clean, y_clean)
    input_map = _input_map(input_range, mean)
    path = _cache_file(model, x, y, input_map, config)
    cached = _cached(path)
    if cached is not None:
        return cached
    sample = x[:300] if input_map is None else x[:300] * input_map[0] + input_map[1]
    check_finite(model, sample, f"{len(sample)} clean images")
    forward, from_logits = classifier.logit_function(model)
    num_classes = int(model.output_shape[-1])
    started = time.perf_counter()
    masks, patterns, found, steps = _optimise(
        forward, from_logits, x, y, num_classes, config, input_map
    )
    seconds = time.perf_counter() - started
    l1 = masks.reshape(num_classes, -1).astype(np.float64).sum(axis=1)
    indices = anomaly_indices(l1)
    result = NeuralCleanseResult(
        masks=masks,
        patterns=patterns,
        l1_norms=l1,
        anomaly_indices=indices,
        flagged=_flagged(l1, indices),
        attack_success=_attack_success(forward, masks, patterns, x, y, input_map),
        steps=int(steps.max()),
        seconds=seconds,
        class_steps=steps,
        found=found,
        config=as_dict(config),
    )
    log.info(
        "Neural Cleanse: %.1f s, flagged %s, most suspicious %d",
        seconds, list(result.flagged), result.most_suspicious(),
    )  # fmt: skip
    _store(path, result)
    return result


def detect(
    model, data, config: NeuralCleanseConfig | None = None, *, split: str = "train"
) -> NeuralCleanseResult:
    """Neural Cleanse on the clean, labelled images of ``data`` (its ``train`` or ``test`` split).

    The images are taken back to pixel space and the triggers mapped into the
    model's input range and centring (``data.input_range``, ``data.mean``).
    """
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; expected one of: train, test")
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    return reverse_engineer(
        model,
        data.to_unit(x),
        config,
        y_clean=y,
        input_range=data.input_range,
        mean=data.mean,
    )


# --------------------------------------------------------------------------- removal by unlearning

UNLEARN = ("suspect", "flagged")


@dataclass(frozen=True)
class UnlearningConfig:
    """Neural Cleanse's mitigation by unlearning (see the module docstring).

    Args:
        detection: the trigger reverse-engineering.
        unlearn: ``suspect``: the most suspicious class's trigger, flagged or
            not; ``flagged``: the triggers of the flagged classes (none
            flagged: no fine-tuning, as the paper's defender).
        trigger_share: share of the adversary's images that carry a trigger
            (their labels unchanged); the paper: 0.2.
        fine_tune: the fine-tuning of all layers (the paper: one epoch).
    """

    detection: NeuralCleanseConfig = option(factory=NeuralCleanseConfig, help="the detection")
    unlearn: str = option("suspect", choices=UNLEARN, help="whose triggers are unlearned")
    trigger_share: float = option(0.2, low=0, high=1, help="share of images stamped")
    fine_tune: FineTuneConfig = option(
        factory=lambda: FineTuneConfig(
            epochs=1, batch_size=32, optimizer="sgd", learning_rate=1e-3, momentum=0.9
        ),
        help="the fine-tuning of all layers",
    )

    def __post_init__(self):
        validate(self)


class NeuralCleanse(RemovalAttack):
    """Wang et al.'s detection, then unlearning of the reversed trigger by fine-tuning."""

    name = "neural_cleanse"
    Config = UnlearningConfig
    presets = {
        # the detection budgets of laundering's presets: the matrix runs one for both columns
        "smoke": {"detection.steps": 3, "fine_tune.epochs": 1},
        # the laundering reproduction's Neural Cleanse budget for the Table 5 network
        "quick": {"detection.steps": 60, "detection.mini_batches": 11, "fine_tune.epochs": 1},
        "paper": {},
    }
    requires = Requirements(min_examples=10)
    zero_strength = {"fine_tune.epochs": 0, "detection.steps": 1}

    def _remove(self, model, data, *, hooks):
        config = self.config
        found = detect(model, data, config.detection)
        suspect = config.unlearn == "suspect"
        targets = [found.most_suspicious()] if suspect else list(found.flagged)
        info: dict[str, Any] = {
            "detection": found.to_dict(arrays=False),
            "unlearned_classes": targets,
            "stamped": 0,
            "epochs_run": 0,
            "curves": {},
        }
        if not targets or config.fine_tune.epochs == 0:
            return Removal(clone(model), info)
        unlearning, stamped = _unlearning_data(data, found, targets, config)
        tag = f"neural_cleanse/unlearn/{','.join(map(str, targets))}"
        result = fine_tune(model, unlearning, config.fine_tune, hooks=hooks, cache_tag=tag)
        info.update(
            stamped=stamped,
            epochs_run=result.epochs_run,
            from_cache=result.from_cache,
            curves=hook_curves(result.history, hooks),
        )
        return Removal(result.model, info)


def _unlearning_data(data, found: NeuralCleanseResult, targets, config: UnlearningConfig):
    """``data`` with ``trigger_share`` of its training images stamped (targets in turn), labels kept."""
    n = len(data.y_train)
    count = int(round(config.trigger_share * n))
    rng = np.random.default_rng([config.fine_tune.seed, 2])
    chosen = np.sort(rng.choice(n, size=count, replace=False))
    x = np.array(data.x_train, dtype=np.float32, copy=True)
    if count:
        x[chosen] = found.apply(x[chosen], np.resize(np.asarray(targets), count), data=data)
    x.flags.writeable = False
    return dataclasses.replace(data, x_train=x), count


# --------------------------------------------------------------------------- command line


def draw_triggers(axes, images, l1_norms, anomaly_indices, flagged) -> None:
    """Draw reversed triggers into ``axes`` (one per class): image, L1 norm, anomaly index.

    ``images`` are (K, H, W, C) in [0, 1] (:meth:`NeuralCleanseResult.trigger_images`);
    flagged classes are titled in red with a star. Shared by
    :func:`save_trigger_figure` and the reproductions' trigger figures.
    """
    flagged = {int(k) for k in flagged}
    for cls, ax in zip(range(len(images)), axes, strict=False):
        image = np.clip(images[cls], 0, 1)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        mark = " *" if cls in flagged else ""
        ax.set_title(
            f"class {cls}{mark}\nL1 {l1_norms[cls]:.1f}, AI {anomaly_indices[cls]:.2f}",
            fontsize=7,
            color="red" if mark else "black",
        )


def save_trigger_figure(result: NeuralCleanseResult, path: str | os.PathLike) -> Path:
    """A PNG grid of every class's reversed trigger (mask x pattern), its L1 norm and anomaly index.

    Flagged classes are titled in red with a star.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.io import atomic_write

    k = result.num_classes
    cols = min(k, 10)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 2.0 * rows), squeeze=False)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    draw_triggers(
        axes.flat, result.trigger_images(), result.l1_norms, result.anomaly_indices, result.flagged
    )
    fig.suptitle(
        f"Neural Cleanse reversed triggers (mask x pattern); * flagged (AI > {FLAG_THRESHOLD:g}, "
        "norm below the median)",
        fontsize=9,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def add_command(subparsers) -> None:
    """Add ``neural-cleanse`` (detection only) to ``python -m attacks``."""
    from models.cli import add_config_arguments, add_model_arguments, positive_int

    parser = subparsers.add_parser(
        "neural-cleanse",
        help="reverse-engineer a trigger per class and flag backdoored classes (Wang et al. 2019)",
        description="Neural Cleanse's detection (Wang et al., IEEE S&P 2019) on a user's .keras "
        "model: prints the mask L1 norms, anomaly indices and flagged classes; --out writes them "
        "as JSON and a PNG of the reversed triggers beside it. The removal by unlearning is "
        "'remove --attack neural_cleanse'.",
    )
    add_model_arguments(parser, model_help="the suspect model (.keras, loaded in safe mode)")
    parser.add_argument("--n-clean", type=positive_int, default=1000, help="clean test images")
    parser.add_argument("--out", default=None, help="result JSON (the PNG goes beside it)")
    group = parser.add_argument_group("options of the reverse engineering")
    add_config_arguments(group, NeuralCleanseConfig)
    parser.set_defaults(handler=_command)


def _command(args) -> int:
    from models.cli import config_overrides, model_and_data
    from models.config import build_config
    from models.io import check_output

    config = build_config(NeuralCleanseConfig, config_overrides(args, NeuralCleanseConfig))
    out = figure = None
    if args.out:
        out = check_output(args.out, ".json")
        figure = check_output(out.with_suffix(".png"), ".png", "--out (its PNG)")
    model, data = model_and_data(args, max_test=args.n_clean, max_train=100, seed=config.seed)
    result = detect(model, data, config, split="test")
    print(f"Neural Cleanse on {args.model}: {len(data.y_test)} clean {args.dataset} test images")
    print(f"  {'class':>5} {'L1 norm':>9} {'anomaly':>8} {'success':>8}")
    for k in range(result.num_classes):
        mark = "  flagged" if k in result.flagged else ""
        print(
            f"  {k:>5} {result.l1_norms[k]:9.2f} {result.anomaly_indices[k]:8.2f} "
            f"{result.attack_success[k]:8.3f}{mark}"
        )
    flagged = ", ".join(map(str, result.flagged)) or "none"
    print(
        f"  median L1 {np.median(result.l1_norms):.2f}; flagged (index > {FLAG_THRESHOLD:g}, "
        f"below the median): {flagged}; most suspicious: {result.most_suspicious()}; "
        f"{result.steps} epochs in {result.seconds:.1f} s"
    )
    if out is not None:
        result.save_json(out)
        save_trigger_figure(result, figure)
        print(f"  wrote {out} and {figure}")
    return 0
