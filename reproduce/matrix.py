"""``python -m reproduce matrix``: every piece of ownership evidence against every removal attack.

Rows: every registered watermark scheme and fingerprint; columns: every
registered removal attack, the preset's pruning rates, and ART's extraction
attacks, input transformations and query filter by name. Every cell gives
the evidence's statistic before and after the attack, its threshold,
p-value and verdict, test accuracy before and after and the attack's wall
time; with ``--seeds N`` the mean and a 95% confidence interval over seeds.
Every verdict rests on a measured null distribution (:mod:`reproduce.engine`):
models that never saw the key, whose statistics give the empirical
false-positive rate of each verdict; where they contradict an assumed null
(the bi-level binomial p0, the normal fit of the backdoor schemes), the
measured one decides (the threshold is raised to the largest null value).
For a fingerprint, the extraction surrogates of the source are positives and
the independent models negatives: ROC-AUC and TPR at 5% FPR.

Cells run in this process (``--executor local``) or as Ray tasks
(``--executor ray [--address HOST:PORT]``); both give the same ``matrix.csv``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import models
from models.errors import UserError
from models.training import TrainConfig
from reproduce import executors
from reproduce.cells import column_unit
from reproduce.engine import Plan
from reproduce.matrix_tables import claims, plot, summary, tables
from reproduce.nulls import null_kinds
from reproduce.report import Run

log = logging.getLogger(__name__)

TITLE = "Every scheme against every attack: verdicts on measured nulls"
# Null models per seed: (independent seeds, the adversary's data, CopycatCNN surrogates). A
# verdict raised to the null maximum calls about 1/n of unseen null models positive (the
# held-out rate of null_rates.csv), so M3's 5% needs n >= 20: a fingerprint's negatives
# (its surrogates are positives) are the first two kinds, 20 of them.
NULLS = {"smoke": (2, 1, 1), "quick": (10, 10, 4), "paper": (10, 10, 5)}
# GPUs each Ray task asks for (--executor ray): a paper cell trains a ResNet20v1 on CIFAR-10; the
# smaller presets train LeNet-size models, which a CPU runs as fast as a share of a GPU
GPUS_PER_TASK = {"smoke": 0.0, "quick": 0.0, "paper": 1.0}
PRESET_NOTES = {
    "smoke": "scikit-learn digits (8x8), the zoo's tiny CNN, three rows and five columns, "
    "2 + 1 + 1 null models: exercises the pipeline and both executors, proves nothing.",
    "quick": "Fashion-MNIST, LeNet5 (the zoo's quick recipe, shared with `reproduce models`), "
    "every registered scheme, the CAE fingerprint and every attack at its quick preset, six ART "
    "classes by name, the adversary holding 10% of the training split; 10 + 10 + 4 null models "
    "(independent seeds with a 6-epoch recipe, models of the adversary's data, CopycatCNN "
    "surrogates of the unmarked base model).",
    "paper": "CIFAR-10, ResNet20v1 with the CAE report's recipe, every unit at its paper preset, "
    "10 + 10 + 5 null models; for a GPU (or a Ray cluster).",
}
# KnockoffNets trains on the stolen model's probabilities, as Orekondy et al. do: with labels
# and its random sampling, ART's KnockoffNets draws the same queries as CopycatCNN and trains on
# the same one-hot answers (the quick matrix gave the two columns identical cells in all 7 rows)
ART_COLUMNS = (
    "art:CopycatCNN",
    "art:KnockoffNets:use_probability=True",
    "art:JpegCompression",
    "art:FeatureSqueezing",
    "art:SpatialSmoothing",
    "art:STRIP",
)
_PRUNING = {"smoke": (0.5,), "quick": (0.5, 0.9), "paper": (0.3, 0.5, 0.7, 0.9)}
_SMOKE_ROWS = ("zhang_noise", "bilevel", "fragile")
_SMOKE_COLUMNS = ("identity", "ftal", "magnitude_pruning:rate=0.5", "art:FeatureSqueezing")


@dataclass(frozen=True)
class MatrixConfig:
    plan: Plan
    seeds: tuple[int, ...]
    executor: str
    address: str | None
    cache: bool
    gpus: float = 0.0


def _default_columns(preset: str) -> tuple[str, ...]:
    import attacks

    names = [n for n in attacks.names() if n != "magnitude_pruning"]
    pruning = [f"magnitude_pruning:rate={rate}" for rate in _PRUNING[preset]]
    return ("identity", *[n for n in names if n != "identity"], *pruning, *ART_COLUMNS)


def _split(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(part for part in text.split(",") if part)


def _check_names(rows, columns, preset: str) -> None:
    """Refuse an unknown row, an unknown column and a column option its attack refuses."""
    import attacks
    import fingerprints
    import watermarks

    known = [*watermarks.names(), *fingerprints.names()]
    for row in rows:
        if row not in known:
            raise UserError(f"unknown scheme {row!r}; expected some of: {', '.join(known)}")
    for column in columns:
        name, options = column_unit(column)
        attacks.get(name).from_preset(preset, **options)  # ART parameters are checked here too


def _recipes(preset: str) -> tuple[str, str, TrainConfig, TrainConfig]:
    from reproduce.zoo import recipe

    if preset == "smoke":
        small = TrainConfig(epochs=15, batch_size=32)
        return "digits", "_tiny_cnn", small, dataclasses.replace(small, epochs=8)
    if preset == "quick":
        null = TrainConfig.cae(epochs=6, early_stopping_patience=3)
        return "fashion_mnist", "lenet5", recipe("quick", "lenet5", "fashion_mnist"), null
    return "cifar10", "resnet20v1", recipe("paper", "resnet20v1", "cifar10"), TrainConfig.cae()


def make_config(
    preset: str,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    cache: bool = True,
    schemes: str | None = None,
    attacks: str | None = None,
    seeds: int = 1,
    model: str | None = None,
    input_range: tuple[float, float] = (0.0, 1.0),
    resize: bool = False,
    executor: str = "local",
    address: str | None = None,
) -> MatrixConfig:
    """Resolve the preset and the command line into the plan of the run."""
    import fingerprints
    import watermarks

    models.check_dataset(dataset)
    if seeds < 1:
        raise UserError(f"--seeds {seeds} is not a number of seeds; expected 1 or more")
    executors.check(executor, address)
    name, architecture, base_train, null_train = _recipes(preset)
    rows = _split(schemes) or (
        _SMOKE_ROWS if preset == "smoke" else (*watermarks.names(), *fingerprints.names())
    )
    columns = _split(attacks) or (_SMOKE_COLUMNS if preset == "smoke" else _default_columns(preset))
    _check_names(rows, columns, preset)
    plan = Plan(
        preset=preset,
        dataset=dataset or name,
        architecture="" if model else architecture,
        base_train=base_train,
        null_train=null_train,
        schemes=tuple(r for r in rows if r in watermarks.names()),
        fingerprints=tuple(r for r in rows if r in fingerprints.names()),
        columns=columns,
        nulls=NULLS.get(preset, NULLS["paper"]),
        data_dir=data_dir,
        model_path=str(Path(model).resolve()) if model else None,
        model_digest=_file_digest(model) if model else "",
        input_range=tuple(input_range),
        resize=resize,
        max_train=None,
        max_test=2000 if preset == "quick" else None,
    )
    seeds_run = tuple(range(seed, seed + seeds))
    gpus = GPUS_PER_TASK.get(preset, 0.0)
    return MatrixConfig(plan, seeds_run, executor, address, cache, gpus)


def _file_digest(path: str) -> str:
    import hashlib

    if not Path(path).is_file():
        raise UserError(f"model file '{path}' does not exist")
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def plan(config: MatrixConfig) -> list[dict]:
    """The base model, the null models and the per-cell work (see :mod:`reproduce.plan`)."""
    from reproduce.plan import train_row
    from reproduce.zoo import dataset_size

    p = config.plan
    images, shape, classes = dataset_size(p.dataset)
    arch = p.architecture or "(user model)"
    seeds = len(config.seeds)
    independent, adversary, surrogates = p.nulls
    share = int(images * p.adversary_share)
    rows = [
        train_row("base model", arch, shape, classes, images, p.base_train.epochs, seeds),
        train_row(
            "null: independent",
            arch,
            shape,
            classes,
            images,
            p.null_train.epochs,
            seeds * independent,
        ),
        train_row(
            "null: adversary's data",
            arch,
            shape,
            classes,
            share,
            p.null_train.epochs,
            seeds * adversary,
        ),
        train_row(
            "null: surrogate", arch, shape, classes, share, p.null_train.epochs, seeds * surrogates
        ),
    ]
    cells = len(p.units) * len(p.columns) * seeds
    rows.append(
        {
            "kind": "loop",
            "what": "embeddings (rows x seeds)",
            "steps": 1,
            "count": len(p.units) * seeds,
        }
    )
    rows.append(
        {
            "kind": "loop",
            "what": "attack cells (rows x columns x seeds)",
            "steps": 1,
            "count": cells,
        }
    )
    return rows


def run(config: MatrixConfig, out: Run) -> None:
    """Embed, measure the nulls, attack every cell; stage the tables and claims."""
    plan = config.plan
    if plan.model_path:  # the gate and the fit, before any work
        executors.check_user_model(plan)
    results = executors.run(plan, config.seeds, config.executor, config.address, config.gpus)
    frames = tables(plan, results, null_kinds(plan))
    for name, frame in frames.items():
        out.table(name, frame)
    out.table("matrix_summary", summary(frames["matrix"]))
    claims(out, plan, frames, config)


__all__ = ["PRESET_NOTES", "TITLE", "make_config", "plot", "run"]
