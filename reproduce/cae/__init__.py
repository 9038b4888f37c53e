"""``python -m reproduce cae``: fingerprinting by conferrable adversarial examples, and ART's attacks.

Reproduces F. A. Uckun's replication report (KTH, 2023) of Lucas, Zhang and
Kerschbaum, "Deep Neural Network Fingerprinting by Conferrable Adversarial
Examples" (ICLR 2021) with the library: a source model, its families as the
report's code builds them (:mod:`fingerprints.families`), fingerprints
generated, filtered at the code's 0.85 and the text's 0.95 and calibrated
(:mod:`fingerprints.cae`), their CAEAcc on unseen surrogates and references
(ROC-AUC, the chosen threshold and the code's 0.75), and the comparison with
ART's FGSM, BIM, PGD and Carlini-Wagner by conferrability on unseen models
(:mod:`fingerprints.compare`). Published numbers and claims are data in
``published/cae.csv``.

Outputs: ``table_caeacc.csv`` (CAEAcc of the generation and unseen models at
both filters, the report's beside), ``table_models.csv`` (every model: role,
split, test accuracy, CAEAcc, decisions; Fig. 4), ``table_fig2.csv``
(fingerprint labels by original label), ``table_fig3.csv`` (conferrability per
method and eps), ``claims.csv`` and ``REPORT.md``.
"""

from reproduce.cae.config import (
    CODE_THRESHOLD,
    PRESET_NOTES,
    STRICT_FILTER,
    TITLE,
    make_config,
    plan,
)
from reproduce.cae.experiment import run
from reproduce.cae.figures import plot

__all__ = [
    "CODE_THRESHOLD",
    "PRESET_NOTES",
    "STRICT_FILTER",
    "TITLE",
    "make_config",
    "plan",
    "plot",
    "run",
]
