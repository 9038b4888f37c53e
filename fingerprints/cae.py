"""Conferrable adversarial examples (CAE): generation, filtering, CAEAcc and the surrogate decision.

Implements F. A. Uckun's replication report (KTH, 2023) of Lucas, Zhang and
Kerschbaum, "Deep Neural Network Fingerprinting by Conferrable Adversarial
Examples" (ICLR 2021), equations 1 to 6 and sections 2.3 and 2.4, with the
settings of the report's released code (``constants.py`` and
``conferrable_ensemble_method.py`` of ``ayberkuckun/DNN-Fingerprinting``):

- transferability (eq. 1) of x to a set of models for label t: their mean
  predicted probability of t; conferrability (eq. 2):
  ``Transfer(S, x; t) * (1 - Transfer(R, x; t))``;
- per iteration, every surrogate and reference is dropped with probability
  0.3 (Algorithm 1) and the kept ones are averaged (eq. 3);
  ``Conferr = Surr * (1 - Ref)`` per label (eq. 4);
- the loss (eq. 5, alpha = beta = gamma = 1) with the report's rescaling:
  ``H([1, 0], [Conferr_t, 1 - Conferr_t]) - H(onehot(M(x0)), M(x'))
  + H(M(x'), Surr(x'))``, the conferrability taken at t = the source's
  current label on the candidate, as the code takes it (``target``);
- Adam (``keras.optimizers.Adam``) at the code's rate 5e-4 on the
  perturbation, projected after every step onto the L-infinity ball of radius
  eps 0.15 around the original (eq. 6) and onto the valid input range;
- filtering: keep the examples that are adversarial to the source and whose
  conferrability to the generation families, at the source's label, is at
  least 0.85 (the code's threshold; the report's text says 0.95);
- CAEAcc of a suspect: the share of fingerprints on which it gives the source
  model's label; a suspect at or above a threshold is called a surrogate.
  The code fixes it at 0.75; here it is chosen on the generation families by
  default (``threshold`` fixes it).

The p-value of a verdict is empirical: ``(1 + #{null >= CAEAcc}) / (1 + n)``
over the CAEAcc of the reference models trained at generation, the unseen
(held-out) ones where the families have any, as they never influenced the
fingerprints; else the generation references, whose CAEAcc the filter pushed
down (that p-value is optimistic, and its ``null`` text says so). With n
references it is never below ``1 / (n + 1)``.

Batched: every candidate and every model of both families go through one
``tf.function`` step per iteration; a dropped model is skipped by ``tf.cond``.
The loss is summed over candidates and Adam works element-wise, so each
candidate's path does not depend on the others (``bench/cae_generation.py``
measures how close the batched and one-at-a-time paths stay in floating point).

Deliberate choices where the report leaves room or its code differs:

- The second term uses the source's initial label as a one-hot target (the
  report's text); the code uses the source's initial softmax, which is close
  to one-hot where the source is confident (candidates are ones it gets right).
- The filter's conferrability is taken at the source's label on the final
  example (the label a suspect must give); the code takes the largest over all
  labels, which is never smaller.
- Candidates are test images the source classifies correctly; the code draws
  training images (see :func:`fingerprints.families.pick_candidates`).
- Examples are also clipped to the valid input range; the code clips to the
  eps ball only.
- The code builds a new ``tf.Variable`` for the example at every iteration,
  so (in the TensorFlow 2 optimizers of its time, which keep Adam's moments
  per variable) every step started from zero moments: a step of about
  ``lr * 3.16 * sqrt(1 - 0.999^t)`` times the gradient's sign, t counted over
  all examples. Here Adam keeps its moments for the whole run of a candidate,
  as Adam is meant to, so a pixel moves at most about ``lr`` per step: 300
  iterations at 5e-4 reach eps 0.15.
- One dropout draw per model per iteration, shared by all candidates of a
  batch (Algorithm 1 draws per model; the code draws per example and
  iteration). If every model of a family is dropped, one of them, drawn at
  random, is kept, so that eq. 3's mean is defined (the code divides by zero).
- Probabilities are clipped to [1e-7, 1] inside the logarithms, as Keras'
  cross-entropies do; so the second term is bounded (at log 1e-7).
- The decision threshold chosen on the generation families is the midpoint
  of the widest gap between the surrogates' and references' CAEAcc; if they
  overlap, the midpoint with the best balanced accuracy on them (ties:
  nearest the midpoint of the two means).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from fingerprints.base import Fingerprint, Fingerprints
from fingerprints.families import Families, FamilyConfig, build_families, pick_candidates
from models import classifier
from models.config import as_dict, option, validate
from models.errors import UserError
from models.evidence import Verification, answers, empirical_p_value
from models.training import TrainConfig, limit

log = logging.getLogger(__name__)

__all__ = [
    "CAE",
    "TARGETS",
    "CaeConfig",
    "Scores",
    "assess",
    "caeacc",
    "choose_threshold",
    "conferrability",
    "dropout_masks",
    "optimize",
    "score",
    "separation",
    "transferability",
]

_CLIP = 1e-7  # probabilities inside logarithms, as Keras' cross-entropies clip them
#: The label eq. 5's conferrability term is taken at: the source's current label on
#: the candidate (the report's code), the largest over all labels (its text), or the
#: largest over the labels other than the original one.
TARGETS = ("source", "max", "max_other")
#: Conferrability levels whose counts every generation records.
LEVELS = (0.8, 0.85, 0.9, 0.95)


@dataclass(frozen=True)
class CaeConfig:
    """How conferrable adversarial examples are generated, filtered and decided on.

    Args:
        eps: L-infinity bound of the perturbation (0.025 and 0.15 in the report).
        iterations: Adam steps per candidate (100 to 300 in the report).
        learning_rate: Adam's learning rate (5e-4 in the report's code).
        dropout: probability of dropping each model at each iteration.
        alpha: weight of the conferrability term.
        beta: weight of the adversarial term.
        gamma: weight of the source-to-surrogate transferability term.
        target: the label of the conferrability term (:data:`TARGETS`).
        min_conferrability: the filter's threshold (0.85 in the report's
            code, 0.95 in its text).
        threshold: the CAEAcc at or above which a suspect is called a
            surrogate; None chooses it on the generation families (the
            report's code fixes 0.75).
        candidates: test images the source classifies correctly, optimised.
        batch_size: candidates per compiled step.
        seed: seeds the candidates' draw and the dropout draws.
        families: the surrogate and reference families.
    """

    eps: float = option(0.15, low=0, low_open=True, help="L-infinity bound of the perturbation")
    iterations: int = option(300, low=1, help="Adam steps per candidate")
    learning_rate: float = option(5e-4, low=0, low_open=True, help="Adam's learning rate")
    dropout: float = option(0.3, low=0, high=0.99, help="probability of dropping each model")
    alpha: float = option(1.0, low=0, help="weight of the conferrability term")
    beta: float = option(1.0, low=0, help="weight of the adversarial term")
    gamma: float = option(1.0, low=0, help="weight of the source-to-surrogate term")
    target: str = option("source", choices=TARGETS, help="label of the conferrability term")
    min_conferrability: float = option(0.85, low=0, high=1, help="the filter's threshold")
    threshold: float | None = option(
        None, low=0, high=1, help="CAEAcc decision threshold (None: chosen on the families)"
    )
    candidates: int = option(300, low=1, help="test images optimised into fingerprints")
    batch_size: int = option(512, low=1, help="candidates per compiled step")
    seed: int = option(0, low=0, high=2**31, help="seed of the candidates and dropout")
    families: FamilyConfig = option(factory=FamilyConfig, help="the model families")

    def __post_init__(self):
        validate(self)


# --------------------------------------------------------------------------- scores


def transferability(
    family: Sequence[keras.Model], x: np.ndarray, labels: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Eq. 1 averaged over a family: the models' mean probability of ``labels`` on ``x``."""
    if not family:
        raise ValueError("transferability needs at least one model")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    rows = np.arange(len(labels))
    total = np.zeros(len(labels), np.float64)
    for model in family:
        total += classifier.probabilities(model, x, batch_size)[rows, labels]
    return (total / len(family)).astype(np.float32)


def conferrability(
    surrogates: Sequence[keras.Model],
    references: Sequence[keras.Model],
    x: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 256,
) -> np.ndarray:
    """Eq. 2: ``Transfer(S, x; t) * (1 - Transfer(R, x; t))`` per example, t = ``labels``."""
    return transferability(surrogates, x, labels, batch_size) * (
        1.0 - transferability(references, x, labels, batch_size)
    )


def caeacc(model: keras.Model, fingerprints: Fingerprints, batch_size: int = 256) -> float:
    """The share of fingerprints on which ``model`` gives the source model's label (NaN if none)."""
    if len(fingerprints) == 0:
        return math.nan
    predicted = answers(classifier.predict(model, fingerprints.inputs, batch_size))
    return float(np.mean(predicted == fingerprints.labels))


def choose_threshold(surrogate_accs: Sequence[float], reference_accs: Sequence[float]) -> float:
    """A CAEAcc threshold separating surrogates (at or above) from references (below).

    The midpoint of the widest gap between the two groups when they do not
    overlap; otherwise the midpoint between neighbouring values with the best
    balanced accuracy, ties broken towards the midpoint of the two means.
    """
    s = np.asarray(surrogate_accs, dtype=np.float64)
    r = np.asarray(reference_accs, dtype=np.float64)
    s, r = s[np.isfinite(s)], r[np.isfinite(r)]
    if s.size == 0 or r.size == 0:
        return math.nan
    if s.min() > r.max():
        return float((s.min() + r.max()) / 2)
    values = np.unique(np.concatenate([s, r, [0.0, 1.0]]))
    candidates = np.concatenate([(values[:-1] + values[1:]) / 2, [values[-1] + 1e-9]])
    balanced = np.array([(np.mean(s >= c) + np.mean(r < c)) / 2 for c in candidates])
    centre = (s.mean() + r.mean()) / 2
    best = np.flatnonzero(balanced == balanced.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - centre))]])


def separation(
    surrogate_accs: Sequence[float],
    reference_accs: Sequence[float],
    threshold: float = math.nan,
    max_fpr: float = 0.05,
) -> dict[str, float]:
    """How well CAEAcc tells surrogates from references (scikit-learn's ROC).

    Returns:
        ``roc_auc`` (surrogates positive), ``tpr_at_fpr``: the highest true
        positive rate at a false positive rate of at most ``max_fpr``, and
        ``balanced_accuracy`` of the decision ``CAEAcc >= threshold`` (NaN
        without a threshold or without both groups).
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve

    s = np.asarray(surrogate_accs, dtype=np.float64)
    r = np.asarray(reference_accs, dtype=np.float64)
    out = {"roc_auc": math.nan, "tpr_at_fpr": math.nan, "balanced_accuracy": math.nan}
    if not (s.size and r.size and np.all(np.isfinite(s)) and np.all(np.isfinite(r))):
        return out
    truth = np.concatenate([np.ones(s.size), np.zeros(r.size)])
    values = np.concatenate([s, r])
    out["roc_auc"] = float(roc_auc_score(truth, values))
    fpr, tpr, _ = roc_curve(truth, values)
    out["tpr_at_fpr"] = float(tpr[fpr <= max_fpr].max(initial=0.0))
    if math.isfinite(threshold):
        out["balanced_accuracy"] = float(balanced_accuracy_score(truth, values >= threshold))
    return out


def assess(families: Families, fingerprints: Fingerprints, code_threshold: float = 0.75):
    """Every member's CAEAcc and verdicts, and how well CAEAcc tells the unseen members apart.

    Args:
        families: the source's families (generation and unseen members).
        fingerprints: fingerprints generated with them (any filter).
        code_threshold: a fixed decision threshold reported beside the chosen
            one (0.75: the report's code).

    Returns:
        ``(rows, summary)``: one dict per member (its :meth:`Member.row`,
        ``caeacc``, ``surrogate_chosen`` and ``surrogate_code``: called a
        surrogate at the chosen and at the fixed threshold), and the summary:
        mean CAEAcc per role and split, the unseen difference, the chosen
        threshold, :func:`separation` of the unseen members at both
        thresholds, the labels covered, the largest L-infinity distance as a
        share of eps, and the share of fingerprints adversarial to the source.
    """
    chosen = fingerprints.metadata.get("chosen_threshold")
    chosen = math.nan if chosen is None else float(chosen)
    rows, accs = [], {}
    for member in families.members:
        acc = caeacc(member.model, fingerprints)
        accs.setdefault((member.role, member.split), []).append(acc)
        called = {
            f"surrogate_{name}": bool(acc >= cut) if math.isfinite(acc * cut) else None
            for name, cut in (("chosen", chosen), ("code", code_threshold))
        }
        rows.append({**member.row(), "caeacc": acc, **called})
    summary = {"fingerprints": len(fingerprints)}
    for role in ("surrogate", "reference"):
        for split in ("generation", "unseen"):
            values = accs.get((role, split), [])
            summary[f"caeacc_{split}_{role}s"] = float(np.mean(values)) if values else math.nan
    summary["caeacc_unseen_difference"] = (
        summary["caeacc_unseen_surrogates"] - summary["caeacc_unseen_references"]
    )
    unseen = (accs.get(("surrogate", "unseen"), []), accs.get(("reference", "unseen"), []))
    ours, code = separation(*unseen, chosen), separation(*unseen, code_threshold)
    n = len(fingerprints)
    linf = float(np.abs(fingerprints.inputs - fingerprints.originals).max(initial=0.0))
    summary.update(
        chosen_threshold=chosen,
        balanced_accuracy_unseen=ours["balanced_accuracy"],
        balanced_accuracy_unseen_code=code["balanced_accuracy"],
        roc_auc_unseen=ours["roc_auc"],
        tpr_at_5fpr_unseen=ours["tpr_at_fpr"],
        labels_covered=len(np.unique(fingerprints.labels)) if n else math.nan,
        max_linf_over_eps=linf / fingerprints.eps if n else math.nan,
        adversarial_share=float(np.mean(fingerprints.labels != fingerprints.original_labels))
        if n
        else math.nan,
    )
    return rows, summary


@dataclass(frozen=True)
class Scores:
    """What the filter knows about each optimised candidate.

    Attributes:
        labels: the source's label on the optimised example.
        adversarial: whether it differs from the source's label on the original.
        conferrability: eq. 2 on the given families for ``labels``.
        linf: the L-infinity distance to the original.
    """

    labels: np.ndarray
    adversarial: np.ndarray
    conferrability: np.ndarray
    linf: np.ndarray

    def kept(self, min_conferrability: float) -> np.ndarray:
        """The filter: adversarial to the source and conferrable enough."""
        return self.adversarial & (self.conferrability >= min_conferrability)

    def counts(self) -> dict[str, int]:
        """Adversarial examples at or above each conferrability of :data:`LEVELS`."""
        return {f"{level:g}": int(self.kept(level).sum()) for level in LEVELS}


def score(
    source: keras.Model,
    surrogates: Sequence[keras.Model],
    references: Sequence[keras.Model],
    x_adv: np.ndarray,
    originals: np.ndarray,
    original_labels: np.ndarray,
    batch_size: int = 256,
) -> Scores:
    """Score optimised examples against the source and a pair of families."""
    labels = classifier.labels(source, x_adv, batch_size)
    linf = np.abs(x_adv - originals).reshape(len(x_adv), -1).max(axis=1, initial=0.0)
    return Scores(
        labels=labels,
        adversarial=labels != np.asarray(original_labels).reshape(-1),
        conferrability=conferrability(surrogates, references, x_adv, labels, batch_size),
        linf=linf.astype(np.float32),
    )


# --------------------------------------------------------------------------- optimisation


def dropout_masks(
    config: CaeConfig, n_surrogates: int, n_references: int
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1's keep masks, ``(iterations, n)`` booleans per family, seeded.

    Each model is kept with probability ``1 - dropout`` at each iteration; if
    every model of a family is dropped, one drawn at random is kept.
    """
    rng = np.random.default_rng([config.seed, 7])
    masks = []
    for n in (n_surrogates, n_references):
        keep = rng.random((config.iterations, n)) >= config.dropout
        empty = np.flatnonzero(~keep.any(axis=1))
        keep[empty, rng.integers(0, n, size=len(empty))] = True
        masks.append(keep)
    return masks[0], masks[1]


def _as_probabilities(model: keras.Model):
    if classifier.outputs_probabilities(model):
        return lambda x: model(x, training=False)
    return lambda x: tf.nn.softmax(model(x, training=False), axis=-1)


def _log(p):
    return tf.math.log(tf.clip_by_value(p, _CLIP, 1.0))


class _Generator:
    """The compiled, batched optimisation of eqs. 3 to 6 for a fixed batch shape."""

    def __init__(self, source, surrogates, references, config: CaeConfig, batch_shape):
        self.config = config
        self.num_classes = int(source.output_shape[-1])
        self.source = _as_probabilities(source)
        self.surrogates = [_as_probabilities(m) for m in surrogates]
        self.references = [_as_probabilities(m) for m in references]
        self.batch_shape = tuple(batch_shape)
        self.delta = keras.Variable(
            np.zeros(batch_shape, np.float32), trainable=False, name="cae_delta"
        )
        self.optimizer = keras.optimizers.Adam(config.learning_rate)
        self.optimizer.build([self.delta])
        self.step = tf.function(self._step)

    def reset(self) -> None:
        """Zero the perturbation and Adam's moments and step count for a new batch."""
        self.delta.assign(tf.zeros(self.batch_shape))
        self.optimizer.iterations.assign(0)
        for variable in self.optimizer.variables:
            if tuple(variable.shape) == self.batch_shape:
                variable.assign(tf.zeros(self.batch_shape))

    def _family_mean(self, family, keep, x):
        zeros = tf.zeros((tf.shape(x)[0], self.num_classes), tf.float32)
        total = zeros
        for i, predict in enumerate(family):
            total += tf.cond(keep[i], lambda predict=predict: predict(x), lambda: zeros)
        return total / tf.maximum(tf.reduce_sum(tf.cast(keep, tf.float32)), 1.0)

    def _conferrable(self, confer, p_source, onehot0):
        """Eq. 5's conferrability per candidate, at the label ``config.target`` names."""
        if self.config.target == "source":
            current = tf.one_hot(tf.argmax(p_source, axis=-1), self.num_classes)
            return tf.reduce_sum(confer * current, axis=-1)
        if self.config.target == "max_other":
            confer *= 1.0 - onehot0
        return tf.reduce_max(confer, axis=-1)

    def _loss(self, x, onehot0, keep_s, keep_r):
        config = self.config
        p_source = self.source(x)
        surr = self._family_mean(self.surrogates, keep_s, x)  # eq. 3
        ref = self._family_mean(self.references, keep_r, x)
        confer = self._conferrable(surr * (1.0 - ref), p_source, onehot0)  # eq. 4
        # eq. 5 with the report's rescaling; each term per candidate.
        conferrable = -_log(confer)
        adversarial = tf.reduce_sum(onehot0 * _log(p_source), axis=-1)
        transfer = -tf.reduce_sum(p_source * _log(surr), axis=-1)
        return config.alpha * conferrable + config.beta * adversarial + config.gamma * transfer

    def _step(self, x0, onehot0, eps, low, high, keep_s, keep_r):
        with tf.GradientTape() as tape:
            tape.watch(self.delta.value)
            loss = tf.reduce_sum(self._loss(x0 + self.delta.value, onehot0, keep_s, keep_r))
        grad = tape.gradient(loss, self.delta.value)
        self.optimizer.apply_gradients([(grad, self.delta)])
        delta = tf.clip_by_value(self.delta.value, -eps, eps)  # eq. 6: the L-infinity ball ...
        self.delta.assign(tf.clip_by_value(x0 + delta, low, high) - x0)  # ... and valid inputs
        return loss

    def run(self, x, onehot, budgets, clip_values) -> np.ndarray:
        """Optimise ``x`` (one-hot original labels, per-candidate eps) batch by batch."""
        size, n = self.batch_shape[0], len(x)
        low, high = (np.asarray(v, np.float32) for v in clip_values)
        keep_s, keep_r = dropout_masks(self.config, len(self.surrogates), len(self.references))
        out = np.empty_like(x)
        steps = limit(self.config.iterations)  # --max-steps caps the loop
        started = time.perf_counter()
        for begin in range(0, n, size):
            chunk = slice(begin, min(begin + size, n))
            count = chunk.stop - chunk.start
            args = [
                tf.constant(np.pad(a[chunk], [(0, size - count)] + [(0, 0)] * (a.ndim - 1), "edge"))
                for a in (x, onehot, budgets)
            ]
            self.reset()
            for it in range(steps):
                self.step(*args, low, high, tf.constant(keep_s[it]), tf.constant(keep_r[it]))
            out[chunk] = (args[0] + self.delta.value).numpy()[:count]
            log.info(
                "CAE: %d/%d candidates optimised (%d iterations, %.0f s)",
                chunk.stop,
                n,
                steps,
                time.perf_counter() - started,
            )
        return out


def optimize(
    source: keras.Model,
    surrogates: Sequence[keras.Model],
    references: Sequence[keras.Model],
    x: np.ndarray,
    *,
    config: CaeConfig,
    clip_values=(0.0, 1.0),
    labels: np.ndarray | None = None,
    eps: float | np.ndarray | None = None,
) -> np.ndarray:
    """Optimise candidates ``x`` into conferrable adversarial examples (eqs. 3 to 6).

    Args:
        source: the source model M.
        surrogates: the surrogate family S.
        references: the reference family R.
        x: candidate inputs, NHWC.
        config: the generation settings (its ``families`` are not used here).
        clip_values: the valid input range ``(low, high)``, floats or
            per-channel arrays (:func:`models.classifier.input_range`).
        labels: the source's labels on ``x`` (predicted if None).
        eps: overrides ``config.eps``; one value or one per candidate (several
            budgets then share one compiled run).

    Returns:
        The optimised examples, like ``x``; every one within its eps of ``x``.
    """
    if not surrogates or not references:
        raise UserError("CAE generation needs at least one surrogate and one reference model")
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if n == 0:
        return x.copy()
    num_classes = int(source.output_shape[-1])
    labels = classifier.labels(source, x) if labels is None else labels
    onehot = np.eye(num_classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]
    budgets = np.broadcast_to(np.asarray(config.eps if eps is None else eps, np.float32), (n,))
    budgets = budgets.reshape(n, *([1] * (x.ndim - 1)))
    size = min(config.batch_size, n)
    generator = _Generator(source, surrogates, references, config, (size, *x.shape[1:]))
    return generator.run(x, onehot, budgets, clip_values)


# --------------------------------------------------------------------------- the scheme


def _finite(values) -> list[float | None]:
    """JSON-safe: NaN as None."""
    return [float(v) if math.isfinite(v) else None for v in values]


class CAE(Fingerprint):
    """Fingerprints of a source model made of conferrable adversarial examples."""

    name = "cae"
    Config = CaeConfig
    presets = {
        # scikit-learn's 8x8 digits and tiny CNNs in well under a minute: tiny families
        # trained on the same images are too alike for the 0.85 filter, and 60 steps of
        # Adam at 5e-4 would move a pixel by 0.03 at most.
        "smoke": {
            "eps": 0.25,
            "iterations": 60,
            "learning_rate": 1e-2,
            "min_conferrability": 0.2,
            "candidates": 40,
            "families.generation": 2,
            "families.unseen": 0,
            "families.images": 700,
            "families.train": {"epochs": 10, "batch_size": 32, "learning_rate": 5e-3},
        },
        "quick": {"families.generation": 8, "families.unseen": 5},
        "paper": {
            "candidates": 500,
            "families.generation": 14,
            "families.unseen": 5,
            "families.train": as_dict(TrainConfig.cae(epochs=200)),
        },
    }

    def _why_empty(self, prints: Fingerprints) -> str:
        meta = prints.metadata
        return (f"{meta.get('candidates')} candidates, {meta.get('adversarial')} adversarial, "
                f"the most conferrable at {meta.get('max_conferrability', float('nan')):.3f}, "
                f"the filter at {meta.get('min_conferrability', float('nan')):.2f}")  # fmt: skip

    def _generate(self, model, data) -> Fingerprints:
        families = self.families(model, data)
        return self.fingerprint(model, families, data)

    def families(self, model, data) -> Families:
        """The surrogate and reference families of ``model`` the config describes (cached)."""
        return build_families(model, data, self.config.families)

    def fingerprint(self, source, families: Families, data) -> Fingerprints:
        """Optimise candidates against ``families``' generation members, filter, calibrate.

        Args:
            source: the source model.
            families: its families (:meth:`families`).
            data: the data the candidates come from (test split).

        Returns:
            The fingerprints that pass the filter; the metadata holds the
            thresholds, every member's CAEAcc and the counts.
        """
        config = self.config
        chosen = pick_candidates(source, data, config.candidates, config.seed)
        x = np.asarray(data.x_test[chosen], np.float32)
        generation = (
            families.models("surrogate", "generation"),
            families.models("reference", "generation"),
        )
        original_labels = classifier.labels(source, x)
        started = time.perf_counter()
        x_adv = optimize(
            source,
            *generation,
            x,
            config=config,
            clip_values=classifier.input_range(data),
            labels=original_labels,
        )
        scores = score(source, *generation, x_adv, x, original_labels)
        kept = scores.kept(config.min_conferrability)
        fingerprints = Fingerprints(
            scheme=self.name,
            inputs=x_adv[kept],
            originals=x[kept],
            labels=scores.labels[kept],
            original_labels=original_labels[kept],
            eps=config.eps,
            arrays={
                "conferrability": scores.conferrability[kept],
                "candidate_index": chosen[kept],
            },
        )
        facts = {
            "dataset": data.name,
            "input_range": list(data.input_range),
            "centred": data.mean is not None,
            "candidates": len(x),
            "adversarial": int(scores.adversarial.sum()),
            "counts": scores.counts(),
            "max_conferrability": float(scores.conferrability[scores.adversarial].max(initial=0)),
            "generation_seconds": round(time.perf_counter() - started, 1),
        }
        return self._calibrate(fingerprints, families, config.min_conferrability, facts)

    def filtered(
        self, fingerprints: Fingerprints, families: Families, min_conferrability: float
    ) -> Fingerprints:
        """The fingerprints a stricter filter keeps, with thresholds chosen again on ``families``.

        How one optimisation gives the fingerprints at the code's 0.85 and at
        the report's text's 0.95.
        """
        keep = fingerprints.arrays["conferrability"] >= min_conferrability
        subset = Fingerprints(
            scheme=fingerprints.scheme,
            inputs=fingerprints.inputs[keep],
            originals=fingerprints.originals[keep],
            labels=fingerprints.labels[keep],
            original_labels=fingerprints.original_labels[keep],
            eps=fingerprints.eps,
            arrays={name: values[keep] for name, values in fingerprints.arrays.items()},
        )
        return self._calibrate(subset, families, min_conferrability, fingerprints.metadata)

    def _calibrate(self, fingerprints, families, min_conferrability, facts) -> Fingerprints:
        """The fingerprints with their thresholds, every member's CAEAcc and the null."""
        accs = {
            (role, split): [caeacc(m, fingerprints) for m in families.models(role, split)]
            for role in ("surrogate", "reference")
            for split in ("generation", "unseen")
        }
        chosen = choose_threshold(accs["surrogate", "generation"], accs["reference", "generation"])
        threshold = chosen if self.config.threshold is None else self.config.threshold
        held_out = accs["reference", "unseen"]
        null = held_out or accs["reference", "generation"]
        how = (
            f"empirical over the CAEAcc of {len(null)} held-out reference models"
            if held_out
            else f"empirical over the CAEAcc of {len(null)} generation reference models "
            "(optimistic: the filter chose fingerprints they disagree with)"
        )
        metadata = dict(facts)
        metadata.update(
            config=as_dict(self.config),
            min_conferrability=float(min_conferrability),
            kept=len(fingerprints),
            threshold=threshold if math.isfinite(threshold) else None,
            chosen_threshold=chosen if math.isfinite(chosen) else None,
            generation_caeacc={
                "surrogates": _finite(accs["surrogate", "generation"]),
                "references": _finite(accs["reference", "generation"]),
            },
            unseen_caeacc={
                "surrogates": _finite(accs["surrogate", "unseen"]),
                "references": _finite(held_out),
            },
            null_caeacc=_finite(null),
            null=how,
        )
        log.info(
            "CAE: %d of %d candidates adversarial, %d kept (conferrability >= %.2f); "
            "threshold %.3f",
            metadata.get("adversarial", -1),
            metadata.get("candidates", -1),
            len(fingerprints),
            min_conferrability,
            threshold,
        )
        return dataclasses.replace(fingerprints, metadata=metadata)

    def decide(self, secret: Fingerprints, outputs: np.ndarray) -> Verification:
        """CAEAcc of the suspect's outputs, the surrogate decision and its empirical p-value."""
        if len(secret) == 0:
            raise UserError(
                "the fingerprint file holds no fingerprints; generate them again (more "
                "candidates or a lower min_conferrability)"
            )
        threshold = secret.threshold
        if math.isnan(threshold):
            raise UserError("the fingerprint file has no decision threshold; generate it again")
        statistic = float(np.mean(answers(outputs) == secret.labels))
        null = [v for v in secret.metadata.get("null_caeacc") or [] if v is not None]
        p_value = empirical_p_value(statistic, null) if null else math.nan
        present = statistic >= threshold
        verdict = (
            f"a surrogate: it gives the source's label on {statistic:.1%} of the "
            f"fingerprints (threshold {threshold:.1%})"
            if present
            else f"not a surrogate: CAEAcc {statistic:.1%} is below the threshold {threshold:.1%}"
        )
        return Verification(
            kind="fingerprint",
            scheme=self.name,
            statistic=statistic,
            threshold=threshold,
            p_value=p_value,
            present=bool(present),
            intact=None,
            verdict=verdict,
            n=len(secret),
            null=str(secret.metadata.get("null", "")) if null else "no null models recorded",
        )
