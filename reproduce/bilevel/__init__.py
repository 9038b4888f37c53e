"""``python -m reproduce bilevel``: Yang et al.'s bi-level robust watermark, Tables 1-2 and Figs. 3-8.

P. Yang, Y. Lao, P. Li, "Robust Watermarking for Deep Neural Networks via
Bi-level Optimization", ICCV 2021. The units: :class:`watermarks.bilevel.BiLevel`
(the scheme and its binomial verification), the attacks ``ftal``,
``magnitude_pruning`` and ``overwrite`` (a second bi-level watermark at once or
key by key; for Table 2, Adi et al.'s PT watermark overwritten with Adi et
al.'s method). Published numbers and claim thresholds are data in
``published/bilevel.csv``.

Data: the base model is the zoo's (:func:`reproduce.zoo.recipe`, full training
split), trained once for ``reproduce models`` and this paper. Its recipe holds
out the last ``validation_split`` of the training split, never trained on: the
paper's validation data D_v, which :meth:`models.Dataset.split` (stratified)
divides into the owner's key pool and the adversary's data. D_tr is the rest;
the test split only measures accuracy.

Every embedding is ``mark`` then ``verify``, not ``embed``: Table 1's 5 keys can
never be significant under the binomial test (5 of 5 is p = 1/32 > 0.01), and
nothing is significant under ``--max-steps``; a verification that fails is a
measured result. Under ``--max-steps`` the attacks are also called past the
model gate (:func:`_remove`).
"""

from reproduce.bilevel.config import PRESET_NOTES, TITLE, VARIANTS, make_config, plan
from reproduce.bilevel.experiment import run
from reproduce.bilevel.figures import plot

__all__ = [
    "PRESET_NOTES",
    "TITLE",
    "VARIANTS",
    "make_config",
    "plan",
    "plot",
    "run",
]
