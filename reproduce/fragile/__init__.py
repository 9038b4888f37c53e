"""``python -m reproduce fragile``: Yin et al. 2022, fragile watermarking with no performance degradation.

Z. Yin, H. Yin, X. Zhang, "Neural network fragile watermarking with no model
performance degradation", ICIP 2022, as a thin script over the library:
:class:`~watermarks.fragile.FragileTrigger` makes the trigger sets (``trigger_set``
also gives the unfit G_var of Table 3), :class:`~watermarks.fragile.FragileFineTune`
is Table 2's fine-tuning embedding ([14]-style), :func:`~watermarks.fragile.fragility_check`
the no-false-alarm check and :class:`~attacks.malicious.MaliciousFineTune` the section
4.2 adversary, followed by an AccTri :class:`~models.training.Hook` per key. The
classifiers are the zoo's base models (:func:`reproduce.zoo.recipe`, trained once for
every paper). Writes table2-4, table4_curves, fig2 (csv and png), verification,
attacks, cifar100 (paper preset) and claims F1-F8 (thresholds: ``published/fragile.csv``).
"""

from reproduce.fragile.config import (
    PAPER_CLASSIFIERS,
    PRESET_NOTES,
    TITLE,
    Classifier,
    make_config,
    plan,
)
from reproduce.fragile.experiment import run
from reproduce.fragile.figures import plot

__all__ = [
    "PAPER_CLASSIFIERS",
    "PRESET_NOTES",
    "TITLE",
    "Classifier",
    "make_config",
    "plan",
    "plot",
    "run",
]
