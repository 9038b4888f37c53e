"""Classifiers: datasets, the model zoo, training, loading and the ART bridge.

Everything else in the suite stands on this package, and it imports none of
the others (``watermarks``, ``attacks``, ``fingerprints``, ``reproduce``).
"""

import os
import sys


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up lines kept off stderr.

    TensorFlow 2.21 prints oneDNN and CUDA notices through absl before it
    reads ``TF_CPP_MIN_LOG_LEVEL``, and "failed call to cuInit" when it first
    looks for devices on a machine without a GPU, so a command-line error
    would not be the one line users are promised. Unless
    ``TF_CPP_MIN_LOG_LEVEL=0`` asks for every message, file descriptor 2
    points at /dev/null for the import and the device discovery only; a
    failure restores it before raising.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    try:
        saved = os.dup(2)
    except OSError:
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                import tensorflow

                tensorflow.config.list_physical_devices()
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


# TensorFlow's C++ runtime logs (E0000 ... lines) are never the suite's message to its
# users; TF_CPP_MIN_LOG_LEVEL=0 in the environment shows them again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_import_tensorflow_quietly()

from models.art import to_art  # noqa: E402
from models.datasets import Dataset, DatasetUnavailable, load, load_for_model  # noqa: E402
from models.datasets import check_name as check_dataset  # noqa: E402
from models.datasets import names as dataset_names  # noqa: E402
from models.errors import UnknownNameError, UserError  # noqa: E402
from models.loading import load_model, save_model  # noqa: E402
from models.training import TrainConfig, TrainResult, seed_everything, train  # noqa: E402
from models.zoo import build, names, register  # noqa: E402

__all__ = [
    "Dataset",
    "DatasetUnavailable",
    "TrainConfig",
    "TrainResult",
    "UnknownNameError",
    "UserError",
    "build",
    "check_dataset",
    "dataset_names",
    "load",
    "load_for_model",
    "load_model",
    "names",
    "register",
    "save_model",
    "seed_everything",
    "to_art",
    "train",
]
