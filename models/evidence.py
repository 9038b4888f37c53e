"""Ownership evidence: the one ``Verification`` every scheme and fingerprint returns, and its statistics.

Watermark schemes and fingerprints answer the same question about a suspect
model: is the owner's evidence in it? Robust watermarks and fingerprints
say whether the evidence is *present*; a fragile watermark says whether the
model is *intact* (unmodified). Each answers with a :class:`Verification`:
the statistic it measured (watermark accuracy, R_auth, AccTri, CAEAcc),
the threshold of its decision, a p-value under the null hypothesis "this
model never saw the owner's secret" where the scheme has one, and the
verdict.

The null distributions are measured, never assumed where a measurement is
possible: :func:`null_p_value` fits a normal distribution to a sample of
null statistics (the robustness SoK's test) and falls back to the exact
empirical p-value when the sample has no spread, so a degenerate null never
yields "p = 0". :func:`binomial_p_value` and :func:`binomial_threshold` are
the one-sided binomial test of a scheme whose null rate is known. All
through scipy.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import stats

from models import classifier
from models.errors import UserError
from models.registry import Configured

__all__ = [
    "KINDS",
    "answers",
    "Evidence",
    "Verification",
    "binomial_p_value",
    "binomial_threshold",
    "empirical_p_value",
    "null_p_value",
]

#: robust: a watermark meant to survive removal; fragile: one meant to break at any
#: change; fingerprint: evidence extracted from the model, never embedded.
KINDS = ("robust", "fragile", "fingerprint")
_TINY = float(np.finfo(float).tiny)


@dataclass(frozen=True)
class Verification:
    """The outcome of checking a suspect model against the owner's key or fingerprints.

    Attributes:
        kind: ``robust``, ``fragile`` or ``fingerprint``.
        scheme: the registered name of the scheme.
        statistic: what was measured (watermark accuracy, R_auth, AccTri, CAEAcc).
        threshold: the decision threshold on ``statistic``.
        p_value: P(a statistic at least this high | the model never saw the
            secret), NaN where the scheme's decision has no null model.
        present: robust and fingerprint: the owner's evidence is in the model
            (None for a fragile scheme).
        intact: fragile: the model is unmodified (None otherwise).
        verdict: the decision in words, for people.
        n: how many inputs the statistic was measured on.
        null: how the threshold and p-value were obtained.
    """

    kind: str
    scheme: str
    statistic: float
    threshold: float
    p_value: float
    present: bool | None
    intact: bool | None
    verdict: str
    n: int
    null: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown evidence kind {self.kind!r}; expected one of {KINDS}")
        fragile = self.kind == "fragile"
        if (self.intact is None) == fragile or (self.present is None) != fragile:
            raise ValueError("a fragile verification sets intact; the others set present")

    @property
    def positive(self) -> bool:
        """The verdict as a bool: present, or (fragile) intact."""
        return bool(self.intact if self.kind == "fragile" else self.present)

    @property
    def label(self) -> str:
        """``present``/``absent`` or ``intact``/``modified``."""
        if self.kind == "fragile":
            return "intact" if self.intact else "modified"
        return "present" if self.present else "absent"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Evidence(Configured, abc.ABC):
    """What watermark schemes and fingerprints share: a ``kind`` and ``verify``.

    Subclasses set ``kind`` (one of :data:`KINDS`), ``name``, ``Config`` and
    ``presets``, and implement :meth:`decide`. Verification only queries the
    suspect on the secret's inputs, so it works on any model that answers
    ``predict`` (a black box behind an input transformation or a query
    filter included).
    """

    kind: ClassVar[str] = "robust"

    def verify(self, model, secret) -> Verification:
        """Score a suspect ``model`` against the owner's ``secret`` (a key or fingerprints).

        Raises:
            UserError: the secret belongs to another scheme or does not fit
                the model, or the model's outputs are not finite (broken weights).
        """
        if secret.scheme != self.name:
            raise UserError(f"this is a key of scheme {secret.scheme!r}, not {self.name!r}")
        secret.check_fits(model)
        outputs = classifier.predict(model, secret.inputs)
        refused = ~np.all(np.isfinite(outputs), axis=1)
        if refused.any() and not getattr(model, "refuses_queries", False):
            raise UserError(
                f"the model's outputs are not finite on {int(refused.sum())} of {len(outputs)} "
                "key inputs: its weights are broken; no verdict can rest on it"
            )
        return self.decide(secret, outputs)

    @abc.abstractmethod
    def decide(self, secret, outputs: np.ndarray) -> Verification:
        """The verdict from the suspect's outputs on ``secret.inputs``.

        Rows of NaN are queries a filtering suspect refused to answer
        (:func:`answers` gives them the label -1, never a match).
        """


def answers(outputs: np.ndarray) -> np.ndarray:
    """Arg-max labels of ``outputs``; -1 for a refused query (a row that is not finite)."""
    outputs = np.asarray(outputs)
    refused = ~np.all(np.isfinite(outputs), axis=1)
    labels = np.argmax(np.where(refused[:, None], 0.0, outputs), axis=1).astype(np.int64)
    labels[refused] = -1
    return labels


# --------------------------------------------------------------------------- statistics


def _sample(null) -> np.ndarray:
    values = np.asarray(null, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise UserError("a null sample must hold at least one finite value")
    return values


def empirical_p_value(statistic: float, null) -> float:
    """The exact empirical p-value ``(1 + #{null >= statistic}) / (1 + n)``; never 0."""
    values = _sample(null)
    return float((1 + np.count_nonzero(values >= statistic)) / (1 + values.size))


def null_p_value(statistic: float, null) -> tuple[float, str]:
    """P(A >= statistic) for A drawn like the null sample: ``(p, method)``.

    A normal distribution fitted to the sample (Lukas et al.'s SoK) where it
    has spread; the exact empirical p-value where it has none (a clean model
    that scores 0 at every epoch), which is never 0.
    """
    values = _sample(null)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    if std == 0.0 or not math.isfinite(std):
        return empirical_p_value(statistic, values), f"empirical over {values.size} null values"
    p = float(stats.norm.sf(statistic, loc=float(values.mean()), scale=std))
    # far in the fitted tail the float underflows; the p-value is tiny, never exactly 0
    return max(p, _TINY), f"normal fit to {values.size} null values"


def binomial_p_value(hits: int, n: int, p0: float) -> float:
    """One-sided binomial test: P(X >= hits) for X ~ Binomial(n, p0)."""
    if n <= 0:
        return math.nan
    return float(stats.binomtest(int(hits), int(n), float(p0), alternative="greater").pvalue)


def binomial_threshold(n: int, p0: float, alpha: float) -> float:
    """The smallest share ``k / n`` whose one-sided binomial p-value is at most ``alpha``.

    Returns ``inf`` when even ``n`` of ``n`` is not significant (too few trials).
    """
    k = np.arange(n + 1)
    significant = k[stats.binom.sf(k - 1, n, p0) <= alpha]
    return float(significant[0] / n) if significant.size else math.inf
