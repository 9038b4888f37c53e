"""``python -m reproduce laundering``: Aiken et al.'s Table 2 and Figures 3, 4, 5 and 8.

Paper: Aiken, Kim, Woo, "Neural Network Laundering: Removing Black-Box
Backdoor Watermarks from Deep Neural Networks", Computers & Security 2021.
The run marks models with the library's Zhang et al. (content, noise,
unrelated) and Adi et al. (FS; PT into the vanilla model) schemes, whose
keys come back calibrated on the clean twin (its per-epoch curve is Fig. 5),
launders them (one round for Table 2, several for Figs. 3 and 4; DT and CT
chosen by the adversary from its own data, the preset's earlier fixed
values as a variant row) and compares with Zhang et al.'s 90% pruning,
fine-pruning and Adi et al.'s RTAL. Table 2's published values and the
claims are data in ``published/laundering.csv``. The attacker never reads a
key: keys only score the models (hooks).

The ``Adi et al. (RTAL)`` row scores the model as the adversary deploys it,
with its re-trained output layer. Adi et al.'s own RTAL numbers (which the
paper quotes) were measured otherwise: their released ``fine-tune.py`` puts
the original output layer back to test the trigger set. ``reproduce
matrix`` reports both verifications of its RTLL/RTAL cells.
"""

from reproduce.laundering.config import PRESET_NOTES, TITLE, make_config, plan
from reproduce.laundering.experiment import run
from reproduce.laundering.figures import plot

__all__ = [
    "PRESET_NOTES",
    "TITLE",
    "make_config",
    "plan",
    "plot",
    "run",
]
