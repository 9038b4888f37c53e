"""Plain adversarial examples from ART's evasion attacks, scored by the same conferrability as CAEs.

Section 2.5 of F. A. Uckun's replication report (KTH, 2023) of Lucas, Zhang
and Kerschbaum, "Deep Neural Network Fingerprinting by Conferrable
Adversarial Examples" (ICLR 2021): the same candidate images are attacked
with FGSM, BIM, PGD and Carlini-Wagner (L-infinity) from the Adversarial
Robustness Toolbox (ART) at a range of perturbation bounds, only the
successful examples (adversarial to the source) are kept, and every method's
examples are scored by their conferrability (eq. 2) to *unseen* surrogates
and references. Any other ART evasion attack joins by name (``art:<Name>``).

Deliberate choices:

- The report takes the attacks' parameters from the original paper without
  listing them; here FGSM takes one step of size eps, BIM 10 steps of eps/4,
  PGD 20 steps of eps/8 from a random start (Madry et al.'s recipe, scaled),
  and Carlini-Wagner L-infinity takes 10 Adam steps of rate 0.1 per search
  point, with a coarser search than ART's defaults (tau shrinks by 0.5 per
  round; constants 0.1, 1 and 10) to fit a CPU.
  Carlini-Wagner works on the logits where the model has a layer named
  ``logits`` (every zoo model), as Carlini and Wagner define the attack.
- Every method's examples are projected onto the same eps ball. Attacks
  without an ``eps`` parameter (Carlini-Wagner searches the smallest
  perturbation) run once and are projected onto each bound; an example pushed
  back inside the ball may stop being adversarial, and is then filtered out.
- Each method is filtered the same way: adversarial to the source (the
  report's filter for this comparison). The table also counts, and scores,
  the examples that pass the fingerprint filter of :mod:`fingerprints.cae`
  (conferrability to the generation families at least ``min_conferrability``).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Sequence

import keras
import numpy as np
import pandas as pd

from fingerprints.cae import CaeConfig, optimize, score, transferability
from models import classifier
from models.art import evasion_attack, to_art
from models.errors import UserError
from models.training import limit

log = logging.getLogger(__name__)

__all__ = ["ATTACKS", "COLUMNS", "art_examples", "attack_class", "compare"]

#: Short names of the report's attacks and their ART classes.
ATTACKS = {
    "fgsm": "FastGradientMethod",
    "bim": "BasicIterativeMethod",
    "pgd": "ProjectedGradientDescent",
    "cw": "CarliniLInfMethod",
}
COLUMNS = [
    "method",
    "eps",
    "candidates",
    "adversarial",
    "conferrability",
    "conferrability_std",
    "surrogate_transfer",
    "reference_transfer",
    "filtered",
    "conferrability_filtered",
    "mean_linf",
    "seconds",
]


def attack_class(method: str) -> str:
    """The ART class of ``method``: a short name of :data:`ATTACKS` or ``art:<ClassName>``."""
    if method in ATTACKS:
        return ATTACKS[method]
    if method.startswith("art:") and len(method) > 4:
        return method[4:]
    raise UserError(
        f"unknown attack {method!r}; expected one of: {', '.join(ATTACKS)}, or art:<ClassName>"
    )


def _default_params(art_class: str, eps: float) -> dict:
    """The parameters this comparison gives each of the report's attacks at bound ``eps``."""
    if art_class == "FastGradientMethod":
        return {"norm": np.inf, "eps": eps, "eps_step": eps}
    if art_class == "BasicIterativeMethod":
        return {"eps": eps, "eps_step": eps / 4, "max_iter": 10}
    if art_class == "ProjectedGradientDescent":
        return {
            "norm": np.inf,
            "eps": eps,
            "eps_step": eps / 8,
            "max_iter": 20,
            "num_random_init": 1,
        }
    if art_class == "CarliniLInfMethod":
        return {
            "max_iter": 10,
            "learning_rate": 0.1,
            "decrease_factor": 0.5,
            "initial_const": 0.1,
            "largest_const": 20.0,
            "const_factor": 10.0,
        }
    return {}


def _takes(art_class: str, parameter: str) -> bool:
    import art.attacks.evasion as evasion

    cls = getattr(evasion, art_class, None)
    return cls is not None and parameter in inspect.signature(cls.__init__).parameters


def _logits_model(model: keras.Model) -> keras.Model | None:
    try:
        logits = model.get_layer("logits")
    except ValueError:
        return None
    return keras.Model(model.inputs, logits.output, name=f"{model.name}_logits")


def _project(x_adv: np.ndarray, x: np.ndarray, eps: float, clip_values) -> np.ndarray:
    low, high = (np.asarray(v, np.float32) for v in clip_values)
    projected = np.clip(np.clip(x_adv, x - eps, x + eps), low, high)
    return projected.astype(np.float32)


def art_examples(
    source: keras.Model,
    x: np.ndarray,
    method: str,
    eps_values: Sequence[float],
    *,
    clip_values=(0.0, 1.0),
    labels: np.ndarray | None = None,
    params: dict | None = None,
    batch_size: int = 128,
) -> dict[float, np.ndarray]:
    """Adversarial examples of ``source`` from one ART attack, for each eps bound.

    Args:
        source: the attacked model.
        x: the candidate images.
        method: a short name of :data:`ATTACKS` or ``art:<ClassName>``.
        eps_values: the L-infinity bounds.
        clip_values: the valid input range.
        labels: the source's labels on ``x`` (the untargeted attack moves away
            from them); predicted by ART if None.
        params: the attack's parameters, replacing this module's defaults
            (``eps`` is set per bound for attacks that take it).
        batch_size: ART's batch size.

    Returns:
        ``{eps: examples}``, every example within eps of its original.
    """
    art_class = attack_class(method)
    x = np.asarray(x, dtype=np.float32)
    attacked = source
    if art_class == "CarliniLInfMethod":
        attacked = _logits_model(source) or source
    estimator = to_art(
        attacked, clip_values=clip_values, from_logits=None if attacked is source else True
    )
    y = None
    if labels is not None:
        y = np.eye(int(source.output_shape[-1]), dtype=np.float32)[np.asarray(labels, np.int64)]
    takes_eps = _takes(art_class, "eps")
    extra = {"batch_size": batch_size} if _takes(art_class, "batch_size") else {}
    if _takes(art_class, "verbose"):
        extra["verbose"] = False
    out: dict[float, np.ndarray] = {}
    unbounded = None
    for eps in eps_values:
        eps = float(eps)
        chosen = {**_default_params(art_class, eps), **extra, **(params or {})}
        if "max_iter" in chosen:  # --max-steps caps the attack's iterations
            chosen["max_iter"] = limit(int(chosen["max_iter"]))
        if takes_eps:
            chosen["eps"] = eps
            if "eps_step" in chosen and chosen["eps_step"] > eps:
                chosen["eps_step"] = eps
        elif unbounded is not None:
            out[eps] = _project(unbounded, x, eps, clip_values)
            continue
        attack = evasion_attack(art_class, estimator, **chosen)
        generated = np.asarray(attack.generate(x=x, y=y), dtype=np.float32)
        if not takes_eps:
            unbounded = generated
        out[eps] = _project(generated, x, eps, clip_values)
    return out


def _row(method, eps, unseen_scores, generation_scores, min_conferrability, seconds) -> dict:
    adversarial = unseen_scores.adversarial
    filtered = adversarial & (generation_scores.conferrability >= min_conferrability)
    conf = unseen_scores.conferrability
    return {
        "method": method,
        "eps": eps,
        "candidates": int(len(adversarial)),
        "adversarial": int(adversarial.sum()),
        "conferrability": float(conf[adversarial].mean()) if adversarial.any() else np.nan,
        "conferrability_std": float(conf[adversarial].std()) if adversarial.any() else np.nan,
        "filtered": int(filtered.sum()),
        "conferrability_filtered": float(conf[filtered].mean()) if filtered.any() else np.nan,
        "mean_linf": float(unseen_scores.linf[adversarial].mean()) if adversarial.any() else np.nan,
        "seconds": round(seconds, 1),
    }


def _cae_examples(source, surrogates, references, x, labels, eps_values, cae, clip_values):
    """CAEs at every bound in one batched run (each candidate repeated per bound)."""
    stacked = np.concatenate([x] * len(eps_values))
    budgets = np.repeat(np.asarray(eps_values, np.float32), len(x))
    optimised = optimize(
        source,
        surrogates,
        references,
        stacked,
        config=dataclasses.replace(cae, batch_size=max(cae.batch_size, len(stacked))),
        clip_values=clip_values,
        labels=np.tile(labels, len(eps_values)),
        eps=budgets,
    )
    return {eps: optimised[i * len(x) : (i + 1) * len(x)] for i, eps in enumerate(eps_values)}


def _scored_rows(method, examples, source, generation, unseen, x, labels, level, seconds):
    """One table row per bound: ``method``'s examples scored against both pairs of families."""
    rows = []
    for eps, x_adv in examples.items():
        unseen_scores = score(source, *unseen, x_adv, x, labels)
        generation_scores = score(source, *generation, x_adv, x, labels)
        row = _row(method, eps, unseen_scores, generation_scores, level, seconds)
        adv = unseen_scores.adversarial
        for key, family in (("surrogate_transfer", unseen[0]), ("reference_transfer", unseen[1])):
            row[key] = (
                float(transferability(family, x_adv[adv], unseen_scores.labels[adv]).mean())
                if adv.any()
                else np.nan
            )
        rows.append(row)
        log.info(
            "%s eps=%.3f: %d/%d adversarial, conferrability %.3f on unseen models",
            method,
            eps,
            row["adversarial"],
            row["candidates"],
            row["conferrability"],
        )
    return rows


def compare(
    source: keras.Model,
    generation: tuple[Sequence[keras.Model], Sequence[keras.Model]],
    unseen: tuple[Sequence[keras.Model], Sequence[keras.Model]],
    x: np.ndarray,
    eps_values: Sequence[float],
    *,
    methods: Sequence[str] = tuple(ATTACKS),
    cae: CaeConfig | None = None,
    clip_values=(0.0, 1.0),
    params: dict[str, dict] | None = None,
) -> pd.DataFrame:
    """Conferrability of CAEs and of ART's attacks' examples on unseen models, per eps.

    Args:
        source: the source model.
        generation: ``(surrogates, references)`` the CAEs are generated with
            (and the fingerprint filter uses).
        unseen: ``(surrogates, references)`` the examples are scored on.
        x: candidate images (the source's labels on them are the originals').
        eps_values: the L-infinity bounds.
        methods: ART attacks, short names or ``art:<ClassName>``; ``"cae"``
            is always compared first.
        cae: the CAE settings (``eps`` is replaced by each bound).
        clip_values: the valid input range.
        params: per method, parameters that replace the defaults.

    Returns:
        One row per (method, eps) with the columns of :data:`COLUMNS`.
    """
    if not eps_values:
        raise UserError("compare needs at least one eps value")
    for method in methods:
        attack_class(method)  # fail on a bad name before any work
    cae = cae or CaeConfig()
    x = np.asarray(x, dtype=np.float32)
    labels = classifier.labels(source, x)
    eps_values = [float(e) for e in eps_values]
    started = time.perf_counter()
    examples = _cae_examples(source, generation[0], generation[1], x, labels, eps_values, cae,
                             clip_values)  # fmt: skip
    scoring = (source, generation, unseen, x, labels, cae.min_conferrability)
    rows = _scored_rows("cae", examples, *scoring, time.perf_counter() - started)
    for method in methods:
        started = time.perf_counter()
        options = dict(clip_values=clip_values, labels=labels, params=(params or {}).get(method))
        examples = art_examples(source, x, method, eps_values, **options)
        rows += _scored_rows(method, examples, *scoring, time.perf_counter() - started)
    return pd.DataFrame(rows, columns=COLUMNS)
