"""Shared fixtures: a private model cache, quiet TensorFlow, small real data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# ART runs logging.config.dictConfig when first imported, which closes every logging
# handler there is, pytest's capture of the running test included: import it here, once,
# before any test captures anything.
import art  # noqa: E402, F401
import numpy as np  # noqa: E402
import pytest  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR), reason="Debian package dataset-fashion-mnist is not installed"
)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Every test trains into a cache of its session, never the user's."""
    previous = os.environ.get("WMSUITE_CACHE_DIR")
    os.environ["WMSUITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("wmsuite-cache"))
    yield
    if previous is None:
        os.environ.pop("WMSUITE_CACHE_DIR", None)
    else:
        os.environ["WMSUITE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits (real data that ships with scikit-learn)."""
    import models

    return models.load("digits")


@pytest.fixture
def tiny_model(digits):
    """The zoo's private tiny CNN for the digits' input shape, seeded."""
    import models

    models.seed_everything(0)
    return models.build("_tiny_cnn", digits.input_shape, digits.num_classes)


def weights_equal(a, b) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


@pytest.fixture(autouse=True)
def _no_limits_leak():
    """A test that sets --max-steps, --devices or --trainings-per-process cannot reach the next."""
    yield
    from models.isolation import set_trainings_per_process
    from models.training import set_devices, set_max_steps

    set_max_steps(None)
    set_devices(None)
    set_trainings_per_process(None)
