"""Conferrable adversarial examples (CAE): generation, filtering, CAEAcc and the surrogate decision.

Implements F. A. Uckun's replication report (KTH, 2023) of Lucas, Zhang and
Kerschbaum, "Deep Neural Network Fingerprinting by Conferrable Adversarial
Examples" (ICLR 2021), equations 1 to 6 and sections 2.3 and 2.4:

- transferability (eq. 1) of x to a set of models for label t: their mean
  predicted probability of t; conferrability (eq. 2):
  ``Transfer(S, x; t) * (1 - Transfer(R, x; t))``;
- per iteration, every surrogate and reference is dropped with probability
  0.3 (Algorithm 1) and the kept ones are averaged (eq. 3);
  ``Conferr = Surr * (1 - Ref)`` per label (eq. 4);
- the loss (eq. 5, alpha = beta = gamma = 1) with the report's rescaling:
  ``H([1, 0], [max_t Conferr_t, 1 - max_t Conferr_t])``
  ``- H(onehot(M(x0)), M(x'))`` (the initial prediction's top label set to
  probability 1) ``+ H(M(x'), Surr(x'))``;
- Adam with a small learning rate on the perturbation, projected after every
  step onto the L-infinity ball of radius eps around the original (eq. 6) and
  onto the valid input range;
- filtering: keep the examples that are adversarial to the source and whose
  conferrability to the generation families is at least 0.95;
- CAEAcc of a suspect: the share of fingerprints on which it gives the
  source model's label; a suspect at or above a threshold chosen on the
  generation families is called a surrogate.

Batched: every candidate and every model of both families go through one
``tf.function`` step per iteration; a dropped model is skipped by ``tf.cond``.

Deliberate choices where the report leaves room:

- One dropout draw per model per iteration, shared by all candidates of the
  batch (Algorithm 1 draws per model). If every model of a family is dropped,
  one of them, drawn at random, is kept, so that eq. 3's mean is defined.
- The loss is summed over candidates, never averaged, and Adam is written
  out element-wise (its state is reset for each batch inside the compiled
  step): each candidate's path then does not depend on the others, so
  batched and one-at-a-time generation give the same fingerprints.
- Probabilities are clipped to [1e-7, 1] inside the logarithms, as Keras'
  cross-entropies do; so the second term is bounded (at log 1e-7).
- ``CaeConfig.exclude_original`` (off by default) restricts eq. 5's maximum
  to labels other than the original one, so that the conferrable label is an
  adversarial one; see its description.
- The filter's target label t is the source's label on the final example;
  the filter uses the whole generation families (no dropout).
- The decision threshold is the midpoint of the widest gap between the
  generation surrogates' and references' CAEAcc; if they overlap, the
  midpoint with the best balanced accuracy on them (ties: nearest the
  midpoint of the two means).
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

from fingerprints.base import Fingerprint, Fingerprints, Verification
from models import classifier
from models.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "CAE",
    "CaeConfig",
    "Scores",
    "caeacc",
    "choose_threshold",
    "conferrability",
    "dropout_masks",
    "optimize",
    "predict_probabilities",
    "score",
    "transferability",
]

_CLIP = 1e-7  # probabilities inside logarithms, as Keras' cross-entropies clip them
_ADAM = (0.9, 0.999, 1e-7)  # beta_1, beta_2, epsilon: Keras' Adam defaults


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CaeConfig:
    """How conferrable adversarial examples are generated and filtered.

    Args:
        eps: L-infinity bound of the perturbation (0.025 and 0.15 in the report).
        iterations: optimisation steps (100 to 300 in the report).
        learning_rate: Adam's learning rate (small, so that the method is not
            a sign-gradient method).
        dropout: probability of dropping each model at each iteration.
        alpha: weight of the conferrability term.
        beta: weight of the adversarial term.
        gamma: weight of the source-to-surrogate transferability term.
        min_conferrability: the filter's threshold (0.95 in the report).
        batch_size: candidates per compiled step (all of them, up to this).
        seed: seeds the dropout draws.
        exclude_original: take eq. 5's maximum of the conferrability over the
            labels other than the source's original one. Off, as the report
            has it, the optimisation may settle on fooling the references on
            the original label while the source keeps it (the failure the
            report observes in section 2.3); such examples never pass the
            filter.
    """

    eps: float = 0.15
    iterations: int = 200
    learning_rate: float = 2e-3
    dropout: float = 0.3
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    min_conferrability: float = 0.95
    batch_size: int = 512
    seed: int = 0
    exclude_original: bool = False

    def __post_init__(self):
        for name in ("eps", "learning_rate", "dropout", "alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not _number(value):
                raise UserError(f"{name} must be a finite number, got {value!r}")
        if not self.eps > 0:
            raise UserError(f"eps must be positive, got {self.eps!r}")
        if not self.learning_rate > 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise UserError("the loss weights alpha, beta and gamma must be >= 0")
        if not _number(self.min_conferrability) or not 0 <= self.min_conferrability <= 1:
            raise UserError(
                f"min_conferrability must be in [0, 1], got {self.min_conferrability!r}"
            )
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed must be an integer >= 0, got {self.seed!r}")


# --------------------------------------------------------------------------- scores


def predict_probabilities(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities of ``model`` on ``x`` (softmax applied if the model outputs logits)."""
    if len(x) == 0:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    out = model.predict(x, batch_size=batch_size, verbose=0)
    if not classifier.outputs_probabilities(model):
        out = keras.ops.convert_to_numpy(keras.ops.softmax(out, axis=-1))
    return np.asarray(out, dtype=np.float32)


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
        total += predict_probabilities(model, x, batch_size)[rows, labels]
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
    predicted = np.argmax(predict_probabilities(model, fingerprints.inputs, batch_size), axis=1)
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
    labels = np.argmax(predict_probabilities(source, x_adv, batch_size), axis=1)
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


class _Optimizer:
    """The compiled, batched optimisation of eqs. 3 to 6 for a fixed batch shape."""

    def __init__(
        self,
        source: keras.Model,
        surrogates: Sequence[keras.Model],
        references: Sequence[keras.Model],
        config: CaeConfig,
        batch_shape: tuple[int, ...],
        num_classes: int,
    ):
        self.config = config
        self.num_classes = num_classes
        self.source = _as_probabilities(source)
        self.surrogates = [_as_probabilities(m) for m in surrogates]
        self.references = [_as_probabilities(m) for m in references]
        zeros = tf.zeros(batch_shape, tf.float32)
        self.delta = tf.Variable(zeros, trainable=False, name="cae_delta")
        self.m = tf.Variable(zeros, trainable=False, name="cae_adam_m")
        self.v = tf.Variable(zeros, trainable=False, name="cae_adam_v")
        self.t = tf.Variable(0.0, trainable=False, name="cae_adam_t")
        self.step = tf.function(self._step)

    def reset(self) -> None:
        for variable in (self.delta, self.m, self.v):
            variable.assign(tf.zeros_like(variable))
        self.t.assign(0.0)

    def _family_mean(self, family, keep, x):
        zeros = tf.zeros((tf.shape(x)[0], self.num_classes), tf.float32)
        total = zeros
        for i, predict in enumerate(family):
            total += tf.cond(keep[i], lambda predict=predict: predict(x), lambda: zeros)
        return total / tf.maximum(tf.reduce_sum(tf.cast(keep, tf.float32)), 1.0)

    def _loss(self, x, onehot0, keep_s, keep_r):
        config = self.config
        p_source = self.source(x)
        surr = self._family_mean(self.surrogates, keep_s, x)  # eq. 3
        ref = self._family_mean(self.references, keep_r, x)
        confer = surr * (1.0 - ref)  # eq. 4, per label
        if config.exclude_original:
            confer *= 1.0 - onehot0
        confer = tf.reduce_max(confer, axis=-1)
        # eq. 5 with the report's rescaling; each term per candidate.
        conferrable = -tf.math.log(tf.clip_by_value(confer, _CLIP, 1.0))
        adversarial = -tf.reduce_sum(
            onehot0 * -tf.math.log(tf.clip_by_value(p_source, _CLIP, 1.0)), axis=-1
        )
        transfer = tf.reduce_sum(
            p_source * -tf.math.log(tf.clip_by_value(surr, _CLIP, 1.0)), axis=-1
        )
        return config.alpha * conferrable + config.beta * adversarial + config.gamma * transfer

    def _step(self, x0, onehot0, eps, low, high, keep_s, keep_r):
        beta_1, beta_2, epsilon = _ADAM
        with tf.GradientTape() as tape:
            tape.watch(self.delta)
            loss = tf.reduce_sum(self._loss(x0 + self.delta, onehot0, keep_s, keep_r))
        grad = tape.gradient(loss, self.delta)
        self.t.assign_add(1.0)
        self.m.assign(beta_1 * self.m + (1.0 - beta_1) * grad)
        self.v.assign(beta_2 * self.v + (1.0 - beta_2) * tf.square(grad))
        m_hat = self.m / (1.0 - tf.pow(beta_1, self.t))
        v_hat = self.v / (1.0 - tf.pow(beta_2, self.t))
        delta = self.delta - self.config.learning_rate * m_hat / (tf.sqrt(v_hat) + epsilon)
        delta = tf.clip_by_value(delta, -eps, eps)  # eq. 6: the L-infinity ball ...
        delta = tf.clip_by_value(x0 + delta, low, high) - x0  # ... and the valid inputs
        self.delta.assign(delta)
        return loss


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
        config: the generation settings.
        clip_values: the valid input range ``(low, high)``, floats or
            per-channel arrays.
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
    if labels is None:
        labels = np.argmax(predict_probabilities(source, x), axis=1)
    onehot = np.eye(num_classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]
    budgets = np.broadcast_to(np.asarray(config.eps if eps is None else eps, np.float32), (n,))
    budgets = budgets.reshape(n, *([1] * (x.ndim - 1)))
    low, high = (np.asarray(v, np.float32) for v in clip_values)
    keep_s, keep_r = dropout_masks(config, len(surrogates), len(references))

    size = min(config.batch_size, n)
    optimizer = _Optimizer(
        source, surrogates, references, config, (size, *x.shape[1:]), num_classes
    )
    out = np.empty_like(x)
    started = time.perf_counter()
    for begin in range(0, n, size):
        chunk = slice(begin, min(begin + size, n))
        count = chunk.stop - chunk.start
        args = [
            tf.constant(np.pad(a[chunk], [(0, size - count)] + [(0, 0)] * (a.ndim - 1), "edge"))
            for a in (x, onehot, budgets)
        ]
        optimizer.reset()
        for it in range(config.iterations):
            optimizer.step(*args, low, high, tf.constant(keep_s[it]), tf.constant(keep_r[it]))
        out[chunk] = (args[0] + optimizer.delta).numpy()[:count]
        log.info(
            "CAE: %d/%d candidates optimised (%d iterations, %.0f s)",
            chunk.stop,
            n,
            config.iterations,
            time.perf_counter() - started,
        )
    return out


# --------------------------------------------------------------------------- the scheme


class CAE(Fingerprint):
    """Fingerprints of a source model made of conferrable adversarial examples."""

    name = "cae"
    Config = CaeConfig

    def generate(
        self,
        source: keras.Model,
        surrogates: Sequence[keras.Model],
        references: Sequence[keras.Model],
        x: np.ndarray,
        *,
        clip_values=(0.0, 1.0),
        metadata: dict | None = None,
    ) -> Fingerprints:
        """Optimise candidates ``x``, filter them and choose the decision threshold.

        Args:
            source: the source model.
            surrogates: the generation surrogates.
            references: the generation references.
            x: candidate inputs (ideally ones the source classifies correctly).
            clip_values: the valid input range.
            metadata: facts to keep with the fingerprints (dataset,
                preprocessing, ...).

        Returns:
            The fingerprints that pass the filter; the metadata holds the
            threshold, the generation families' CAEAcc and the counts.
        """
        x = np.asarray(x, dtype=np.float32)
        x_adv, original_labels, scores = self.optimise(
            source, surrogates, references, x, clip_values=clip_values
        )
        return self.select(
            x, x_adv, original_labels, scores, surrogates, references, metadata=metadata
        )

    def optimise(
        self,
        source: keras.Model,
        surrogates: Sequence[keras.Model],
        references: Sequence[keras.Model],
        x: np.ndarray,
        *,
        clip_values=(0.0, 1.0),
    ) -> tuple[np.ndarray, np.ndarray, Scores]:
        """The first half of :meth:`generate`: every candidate optimised and scored.

        Returns:
            ``(examples, original_labels, scores)`` for all candidates, before
            the filter; the scores are against the given (generation) families.
        """
        x = np.asarray(x, dtype=np.float32)
        original_labels = np.argmax(predict_probabilities(source, x), axis=1)
        x_adv = optimize(
            source,
            surrogates,
            references,
            x,
            config=self.config,
            clip_values=clip_values,
            labels=original_labels,
        )
        return (
            x_adv,
            original_labels,
            score(source, surrogates, references, x_adv, x, original_labels),
        )

    def select(
        self,
        x: np.ndarray,
        x_adv: np.ndarray,
        original_labels: np.ndarray,
        scores: Scores,
        surrogates: Sequence[keras.Model],
        references: Sequence[keras.Model],
        *,
        keep: np.ndarray | None = None,
        metadata: dict | None = None,
    ) -> Fingerprints:
        """The second half of :meth:`generate`: filter, and choose the threshold.

        Args:
            x: the candidates.
            x_adv: their optimised examples.
            original_labels: the source's labels on ``x``.
            scores: the examples' scores against the generation families.
            surrogates: the generation surrogates (for the threshold).
            references: the generation references.
            keep: which examples to keep; by default the filter (adversarial
                and conferrability at least ``min_conferrability``).
            metadata: facts to keep with the fingerprints.
        """
        config = self.config
        kept = scores.kept(config.min_conferrability) if keep is None else np.asarray(keep, bool)
        fingerprints = Fingerprints(
            scheme=self.name,
            inputs=x_adv[kept],
            originals=x[kept],
            labels=scores.labels[kept],
            original_labels=original_labels[kept],
            eps=config.eps,
            arrays={
                "conferrability": scores.conferrability[kept],
                "candidate_index": np.flatnonzero(kept),
            },
        )
        surrogate_accs = [caeacc(m, fingerprints) for m in surrogates]
        reference_accs = [caeacc(m, fingerprints) for m in references]
        threshold = choose_threshold(surrogate_accs, reference_accs)
        facts = dict(metadata or {})
        facts.update(
            config=dataclasses.asdict(config),
            threshold=None if math.isnan(threshold) else threshold,
            candidates=int(len(x)),
            adversarial=int(scores.adversarial.sum()),
            kept=int(kept.sum()),
            max_conferrability=float(scores.conferrability.max(initial=0.0)),
            generation_caeacc={"surrogates": surrogate_accs, "references": reference_accs},
        )
        rule = f"conferrability >= {config.min_conferrability:.2f}" if keep is None else "chosen"
        log.info(
            "CAE: %d of %d candidates adversarial, %d kept (%s; highest conferrability %.3f); "
            "threshold %.3f",
            scores.adversarial.sum(),
            len(x),
            kept.sum(),
            rule,
            scores.conferrability.max(initial=0.0),
            threshold,
        )
        return dataclasses.replace(fingerprints, metadata=facts)

    def verify(
        self, model: keras.Model, fingerprints: Fingerprints, *, batch_size: int = 256
    ) -> Verification:
        """CAEAcc of ``model`` and the surrogate decision against the fingerprints' threshold."""
        fingerprints.check_fits(model)
        if len(fingerprints) == 0:
            raise UserError("the fingerprint file holds no fingerprints; generate them again")
        threshold = fingerprints.threshold
        if math.isnan(threshold):
            raise UserError("the fingerprint file has no decision threshold; generate it again")
        accuracy = caeacc(model, fingerprints, batch_size)
        surrogate = accuracy >= threshold
        verdict = (
            f"surrogate: the model agrees with the source on {accuracy:.1%} of the "
            f"fingerprints (threshold {threshold:.1%})"
            if surrogate
            else f"not a surrogate: CAEAcc {accuracy:.1%} is below the threshold {threshold:.1%}"
        )
        return Verification(self.name, accuracy, threshold, len(fingerprints), surrogate, verdict)
