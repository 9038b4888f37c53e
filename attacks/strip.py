"""STRIP's entropy test (Gao et al., ACSAC 2019), vectorised, for the ``art:STRIP`` query filter.

STRIP superimposes each query on ``num_samples`` clean images and measures
how much the model's answers vary: a trigger dominates whatever it is
blended with, so a trojaned query's blends all get the trigger's label with
confidence, and their entropy is low. Gao et al.'s Eq. 2-3 (and their
released notebook, garrisongys/STRIP) take, per blend, the entropy of its
class probabilities, ``H_n = -sum_i y_i log2 y_i``, and average it over the
blends; a query whose average is at or below the detection boundary is
flagged. The boundary is a low percentile (the false rejection rate, ART's
``false_acceptance_rate``) of a normal distribution fitted to the entropies
of clean images.

Why not ART's ``STRIPMixin`` itself (ART 1.20.1, the latest release):

* It computes ``scipy.stats.entropy(predictions, base=2, axis=0)``: along
  the blends, per class, each class's column normalised to sum to one. That
  is not Gao et al.'s entropy and ranks queries the other way: 20 blends
  answered with the same class at 0.999 give 2.16 bits in ART's measure and
  0.013 in Gao et al.'s; 20 blends with varied answers (Dirichlet 0.3
  draws) give 1.64 and 2.24. A trigger then looks *less* suspicious than a
  clean image, and STRIP refuses clean queries instead of triggers.
* It predicts each query's blends in a Python loop over the queries (one
  ``predict`` call of 20 images per query; 10,000 test queries per cell).

``bench/strip_vs_art.py`` (quiet machine, 2026-12-01): on the Table 5
network with Zhang et al.'s content trigger, calibrated on 1,000 clean
images, ART's STRIP refuses 5.0% of 500 triggered queries and 1.2% of 500
clean ones; this one 52.6% and 2.2%, 3.3 times faster (2.6 s against 8.6 s).
In the quick matrix, STRIP's 5 cells took 51 s in all, against 141 s.

What is kept from ART: the class that names the filter (``art:STRIP``), its
parameters and their defaults (``num_samples`` 20, ``false_acceptance_rate``
0.01, read from ART's signature), its blend (the two images averaged; Gao
et al.'s code adds them and saturates, which for images in [0, 1] is not the
same), the normal fit of the clean entropies and the rule "flag at or below
the boundary".

Blend partners are drawn from a generator seeded by the caller for every
call, so a query gets the same verdict however often it is asked.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
from scipy import special, stats

from models import classifier
from models.errors import UserError

__all__ = ["boundary", "normalised_entropy", "strip_parameters"]

#: queries blended and predicted together (20 blends each: 10,240 images a batch)
CHUNK = 512


def strip_parameters(art_cls: type, params: dict) -> dict:
    """ART's STRIP parameters (``num_samples``, ``false_acceptance_rate``) with ``params`` over its defaults."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(art_cls.__call__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise UserError(
            f"bad parameters for art:STRIP: {', '.join(unknown)}; it takes {', '.join(defaults)}"
        )
    merged = {**defaults, **params}
    if int(merged["num_samples"]) < 1 or not 0 < float(merged["false_acceptance_rate"]) < 1:
        raise UserError("art:STRIP needs num_samples >= 1 and 0 < false_acceptance_rate < 1")
    return merged


def normalised_entropy(
    model, x: np.ndarray, background: np.ndarray, num_samples: int, seed: int
) -> np.ndarray:
    """Gao et al.'s H of every query of ``x``: the blends' mean entropy (bits) over ``num_samples`` partners.

    Partners come from ``background``, drawn with replacement by a generator
    seeded with ``seed``; each blend is the average of the query and its
    partner (ART's blend).
    """
    x = np.asarray(x, np.float32)
    partners = np.random.default_rng(seed).integers(0, len(background), (len(x), num_samples))
    out = np.empty(len(x), np.float64)
    for start in range(0, len(x), CHUNK):
        stop = start + CHUNK
        blends = 0.5 * x[start:stop, None] + 0.5 * background[partners[start:stop]]
        p = classifier.probabilities(model, blends.reshape(-1, *x.shape[1:])).astype(np.float64)
        per_blend = special.entr(p).sum(axis=1) / math.log(2)
        out[start:stop] = per_blend.reshape(-1, num_samples).mean(axis=1)
    return out


def boundary(clean_entropies: np.ndarray, false_acceptance_rate: float) -> float:
    """The detection boundary: that percentile of a normal fitted to the clean entropies."""
    mean, std = stats.norm.fit(clean_entropies)
    return float(stats.norm.ppf(false_acceptance_rate, loc=mean, scale=std))
