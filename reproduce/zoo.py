"""``python -m reproduce models``: train the zoo's base models and check their test accuracy.

This is the first end-to-end run through the foundation (datasets, zoo,
training with cache and resume, reporting). The other reproductions start
from these models (:func:`recipe` is the recipe they share, so the cache
trains each base model once for all papers). The accuracy each model must
reach at a preset, and the number the papers report where they give one,
are data in ``published/models.csv``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import models
from models import classifier
from models.training import TrainConfig
from reproduce.report import Run, save_figure

TITLE = "Base models of the zoo"
PRESET_NOTES = {
    "smoke": "A few hundred Fashion-MNIST images and one epoch per model: checks the pipeline, "
    "not the accuracy (the claims are reported, not required).",
    "quick": "Fashion-MNIST (the offline dataset here) instead of MNIST and CIFAR-10, at its native "
    "28x28x1; ResNet20v1 trained for a few epochs instead of 200; 10% of the training set held out "
    "for the callbacks. LeNet5, the Table 5 network of Aiken et al. and ResNet20v1 only.",
    "paper": "The papers' datasets and recipes: the CAE report's Adam 1e-3 with the step schedule, "
    "ReduceLROnPlateau and EarlyStopping for 200 epochs (CIFAR models; 50 for the MNIST ones).",
}
#: (model, dataset) per preset; the accuracy each must reach is data in published/models.csv.
MODELS = {
    "smoke": (
        ("lenet5", "fashion_mnist"),
        ("zhang_mnist", "fashion_mnist"),
        ("resnet20v1", "fashion_mnist"),
    ),
    "quick": (
        ("lenet5", "fashion_mnist"),
        ("zhang_mnist", "fashion_mnist"),
        ("resnet20v1", "fashion_mnist"),
    ),
    "paper": (
        ("lenet5", "mnist"),
        ("zhang_mnist", "mnist"),
        ("zhang_cifar", "cifar10"),
        ("resnet20v1", "cifar10"),
        ("densenet121", "cifar10"),
    ),
}
# The training recipe per preset and model; the CAE report's recipe is the default.
_SMOKE = TrainConfig(epochs=1, batch_size=64)
_QUICK = {
    "lenet5": TrainConfig.cae(epochs=30, early_stopping_patience=4),
    "zhang_mnist": TrainConfig.cae(epochs=15, early_stopping_patience=3),
    "resnet20v1": TrainConfig.cae(epochs=6, early_stopping_patience=3),
}
_PAPER_EPOCHS = {"mnist": 50}
# Inputs a model needs that differ from the dataset's native shape.
_INPUT_NEEDS = {"densenet121": (32, 3)}


@dataclass(frozen=True)
class Entry:
    """One base model: which architecture on which data, trained how."""

    model: str
    dataset: str
    train: TrainConfig
    size: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class ZooConfig:
    preset: str
    entries: tuple[Entry, ...]
    max_train: int | None
    max_test: int | None
    seed: int
    cache: bool
    data_dir: str | None = None


def recipe(preset: str, model: str, dataset: str) -> TrainConfig:
    """The base-model recipe of ``model`` on ``dataset`` at ``preset`` (the other papers share it)."""
    if preset == "smoke":
        return _SMOKE
    if preset == "quick":
        return _QUICK.get(model, TrainConfig.cae(epochs=10))
    return TrainConfig.cae(epochs=_PAPER_EPOCHS.get(dataset, 200))


def make_config(
    preset: str,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    cache: bool = True,
) -> ZooConfig:
    """Resolve a preset into the list of base models to train."""
    models.check_dataset(dataset)
    entries = []
    for model, default in MODELS[preset]:
        name = dataset or default
        size, channels = _INPUT_NEEDS.get(model, (None, None))
        train = dataclasses.replace(recipe(preset, model, name), seed=seed)
        entries.append(Entry(model, name, train, size, channels))
    smoke = preset == "smoke"
    return ZooConfig(
        preset,
        tuple(entries),
        512 if smoke else None,
        256 if smoke else None,
        seed,
        cache,
        str(data_dir) if data_dir is not None else None,
    )


_SIZES = {  # (training images, input shape, classes) of each dataset, for --plan
    "fashion_mnist": (60000, (28, 28, 1), 10),
    "mnist": (60000, (28, 28, 1), 10),
    "cifar10": (50000, (32, 32, 3), 10),
    "cifar100": (50000, (32, 32, 3), 100),
    "imagenet32": (1281167, (32, 32, 3), 1000),
    "digits": (1438, (8, 8, 1), 10),
    "emnist": (88800, (28, 28, 1), 27),
}


def dataset_size(name: str, size: int | None = None, channels: int | None = None):
    """(training images, input shape, classes) of dataset ``name`` as a preset shapes it."""
    images, (h, w, c), classes = _SIZES[name]
    side = size or h
    return images, (side, side if size else w, channels or c), classes


def plan(config: ZooConfig) -> list[dict]:
    """Every base model the preset trains (see :mod:`reproduce.plan`)."""
    from reproduce.plan import train_row

    rows = []
    for entry in config.entries:
        images, shape, classes = dataset_size(entry.dataset, entry.size, entry.channels)
        images = min(images, config.max_train or images)
        rows.append(
            train_row("base model", entry.model, shape, classes, images, entry.train.epochs)
        )
    return rows


def _datasets(config: ZooConfig) -> dict[tuple, models.Dataset]:
    """Every dataset of the preset, loaded first, so a missing one stops the run before training."""
    data = {}
    for entry in config.entries:
        key = (entry.dataset, entry.size, entry.channels)
        if key not in data:
            data[key] = models.load(
                entry.dataset,
                data_dir=config.data_dir,
                size=entry.size,
                channels=entry.channels,
                max_train=config.max_train,
                max_test=config.max_test,
                seed=config.seed,
            )
    return data


def run(config: ZooConfig, out: Run) -> None:
    """Train every base model of the preset and stage ``table_models.csv`` and the claims."""
    data = _datasets(config)
    rows = []
    for entry in config.entries:
        dataset = data[(entry.dataset, entry.size, entry.channels)]
        models.seed_everything(config.seed)
        model = models.build(entry.model, dataset.input_shape, dataset.num_classes)
        result = models.train(model, dataset, entry.train)
        accuracy = classifier.accuracy(model, dataset.x_test, dataset.y_test)
        rows.append(
            {
                "model": entry.model,
                "dataset": entry.dataset,
                "input_shape": "x".join(map(str, dataset.input_shape)),
                "parameters": model.count_params(),
                "epochs": result.epochs_run,
                "train_seconds": round(result.seconds, 1),
                "images_per_second": round(result.images_per_second, 1),
                "test_accuracy": round(accuracy, 4),
                "from_cache": result.from_cache,
            }
        )
        out.measure(f"{entry.model}.test_accuracy", round(accuracy, 4))
        out.describe(
            **{f"dataset_{entry.model}": entry.dataset, f"epochs_{entry.model}": result.epochs_run}
        )
    claims = out.published().set_index("metric")
    table = pd.DataFrame(rows)
    table["threshold"] = [
        float(claims.loc[f"{m}.test_accuracy", "threshold"]) for m in table["model"]
    ]
    table["published"] = [claims.loc[f"{m}.test_accuracy", "paper_value"] for m in table["model"]]
    out.table("table_models", table)


def plot(folder: Path) -> list[Path]:
    """Draw ``fig_models.png`` (test accuracy per model, with its threshold) from the CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.read_csv(Path(folder) / "table_models.csv")
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(table), 3.2))
    labels = [f"{m}\n{d}" for m, d in zip(table["model"], table["dataset"], strict=True)]
    # points, not bars: a bar on an axis that does not start at 0 exaggerates the differences
    ax.scatter(labels, table["test_accuracy"], marker="o", s=60, color="#4c72b0",
               label="measured", zorder=4)  # fmt: skip
    for x, value in enumerate(table["test_accuracy"]):
        ax.annotate(f"{value:.4f}", (x, value), xytext=(8, 0), textcoords="offset points",
                    va="center", fontsize=8)  # fmt: skip
    ax.scatter(labels, table["threshold"], marker="_", s=900, linewidths=2.5, color="#c44e52",
               label="claim threshold", zorder=3)  # fmt: skip
    low = min(table["test_accuracy"].min(), table["threshold"].min())
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_xlim(-0.5, len(table) - 0.5)
    ax.set_ylabel("test accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, frameon=False)
    return [save_figure(fig, Path(folder) / "fig_models.png")]
