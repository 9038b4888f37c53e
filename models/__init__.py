"""Classifiers: datasets, the model zoo, training, loading and the ART bridge.

Everything else in the suite stands on this package, and it imports none of
the others (``watermarks``, ``attacks``, ``fingerprints``, ``reproduce``).
"""

from models.art import to_art
from models.datasets import Dataset, DatasetUnavailable, load
from models.datasets import names as dataset_names
from models.errors import UnknownNameError, UserError
from models.loading import load_model
from models.training import TrainConfig, TrainResult, seed_everything, train
from models.zoo import build, names, register

__all__ = [
    "Dataset",
    "DatasetUnavailable",
    "TrainConfig",
    "TrainResult",
    "UnknownNameError",
    "UserError",
    "build",
    "dataset_names",
    "load",
    "load_model",
    "names",
    "register",
    "seed_everything",
    "to_art",
    "train",
]
