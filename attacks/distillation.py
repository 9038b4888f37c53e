"""Removal by distillation: a fresh model trained on the stolen model's soft labels.

G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural
Network", NIPS Deep Learning Workshop 2014; as a watermark removal attack in
Lukas et al., "SoK: How Robust is Image Classification Deep Neural Network
Watermarking?", IEEE S&P 2022 (their "transfer learning / retraining"
family). The adversary queries the stolen model on its own images and
trains a model of the same architecture, from a fresh initialisation, on
the answers: the probabilities softened by ``temperature`` (1: the softmax
itself), with categorical cross-entropy. Whatever the stolen model does
only on inputs the adversary never queries (a backdoor's triggers) has no
reason to be copied.

Deviation: Hinton et al. train the student at the same temperature and mix
in the hard labels; here the student trains at temperature 1 on the
softened targets alone (the adversary has no labels of its own in this
threat model, and the suite's training takes probability targets as they
are). ART's ``CopycatCNN`` with ``use_probability=True``
(``art:CopycatCNN``) is the same idea through ART.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from attacks.base import Removal, RemovalAttack, Requirements
from models import classifier
from models.config import option, validate
from models.training import TrainConfig, hook_curves, seed_everything, train


@dataclass(frozen=True)
class DistillationConfig:
    """How the adversary distils.

    Args:
        temperature: softening of the stolen model's probabilities (p ** (1/T), renormalised).
        epochs: the student's training epochs (0: the fresh student is returned untrained).
        batch_size: examples per step.
        learning_rate: Adam's learning rate.
        seed: the student's initialisation and training.
    """

    temperature: float = option(1.0, low=0, low_open=True, help="softening temperature")
    epochs: int = option(10, low=0, help="the student's epochs")
    batch_size: int = option(64, low=1, help="examples per step")
    learning_rate: float = option(1e-3, low=0, low_open=True, help="Adam learning rate")
    seed: int = option(0, low=0, help="seed of the student")

    def __post_init__(self):
        validate(self)


def soften(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities at ``temperature``: ``softmax(log p / T)``, computed stably."""
    logits = np.log(np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


class Distillation(RemovalAttack):
    """A fresh student of the stolen model's architecture, trained on its soft labels."""

    name = "distillation"
    Config = DistillationConfig
    presets = {
        "smoke": {"epochs": 3},
        "quick": {"epochs": 10},
        "paper": {"epochs": 30, "temperature": 3.0},
    }
    requires = Requirements(min_examples=10, white_box=False)
    zero_strength = None  # a student always starts afresh: there is no strength that is a no-op

    def _remove(self, model, data, *, hooks):
        cfg = self.config
        x = np.asarray(data.x_train, np.float32)
        targets = soften(classifier.probabilities(model, x), cfg.temperature)
        seed_everything(cfg.seed)
        student = keras.models.clone_model(model.model if hasattr(model, "model") else model)
        recipe = TrainConfig(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            seed=cfg.seed,
        )
        tag = f"distillation/T={cfg.temperature:g}"
        result = train(student, (x, targets), recipe, cache_tag=tag, hooks=hooks, verbose=0)
        info = {"queries": int(len(x)), "epochs": result.epochs_run}
        info["curves"] = hook_curves(result.history, hooks)
        return Removal(student, info)
