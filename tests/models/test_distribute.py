"""Training one model on several devices (MirroredStrategy), on two logical CPU devices."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import os, sys, tempfile
    os.environ["WMSUITE_CACHE_DIR"] = tempfile.mkdtemp()
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    import numpy as np
    import models
    from models import classifier
    from models.training import TrainConfig, cache_key, set_devices, strategy, train

    data = models.load("digits")
    recipe = TrainConfig(epochs=12, batch_size=32)
    models.seed_everything(0)
    model = models.build("_tiny_cnn", data.input_shape, data.num_classes)
    key_before = cache_key(model, data, recipe)
    set_devices(2)
    assert strategy().num_replicas_in_sync == 2
    result = train(model, data, recipe, verbose=0)
    assert result.key == key_before, "the cache key names the recipe, not the devices"
    accuracy = classifier.accuracy(model, data.x_test, data.y_test)
    path = os.path.join(tempfile.mkdtemp(), "m.keras")
    models.save_model(model, path)
    again = models.load_model(path)
    same = np.allclose(classifier.predict(again, data.x_test), classifier.predict(model, data.x_test))
    print(f"accuracy={accuracy:.3f} roundtrip={same}")
    """
)


def test_a_model_trains_on_two_devices_and_round_trips():
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    accuracy = float(line.split()[0].split("=")[1])
    assert accuracy > 0.5 and line.endswith("roundtrip=True"), line
