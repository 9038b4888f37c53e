"""Benchmark: two trainings side by side against the same two one after the other, as a ratio.

Why ``reproduce all --jobs 2`` (``make reproduce``) runs two papers at a time
on a 2-core machine: one TensorFlow process does not keep both cores busy.
Each training here is a fresh process (as each paper of ``--jobs`` is) that
loads the data, builds the model and trains it; the serial time is two such
processes one after the other, the side-by-side time the two started
together, each measured from the first start to the last exit (the same work
either way, start-up included). A ratio above 1 is the speed-up of running
two at once.

    python bench/side_by_side.py [--models lenet5,resnet20v1] [--images 20000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One training in a child process.
CHILD = """
import sys
sys.path.insert(0, {root!r})
import models
from models.training import TrainConfig, compile_for_training
data = models.load("fashion_mnist", max_train={images})
models.seed_everything(0)
model = models.build({model!r}, data.input_shape, data.num_classes)
compile_for_training(model, TrainConfig(epochs={epochs}, batch_size=128, seed=0))
model.fit(data.x_train, data.y_train, epochs={epochs}, batch_size=128, verbose=0)
"""


def _start(model: str, images: int, epochs: int) -> subprocess.Popen:
    code = CHILD.format(root=str(ROOT), model=model, images=images, epochs=epochs)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True
    )


def _wall(model: str, images: int, epochs: int, count: int) -> float:
    """Seconds from starting ``count`` trainings at once to the last one's exit."""
    start = time.perf_counter()
    processes = [_start(model, images, epochs) for _ in range(count)]
    for process in processes:
        if process.wait():
            raise SystemExit(f"bench: a training process failed (exit {process.returncode})")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,resnet20v1")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.images} Fashion-MNIST images x {args.epochs} epoch(s), {os.cpu_count()} cores")
    for model in args.models.split(","):
        alone = [_wall(model, args.images, args.epochs, 1) for _ in range(2)]
        side = _wall(model, args.images, args.epochs, 2)
        serial = sum(alone)
        print(
            f"{model:<12} one after the other {serial:6.1f} s ({alone[0]:.1f} + {alone[1]:.1f}), "
            f"side by side {side:6.1f} s: ratio {serial / side:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
