"""Benchmark: what TensorFlow's op determinism costs, on training and on Neural Cleanse, as ratios.

Every command of the suite turns on ``tf.config.experimental.enable_op_determinism``
(the same seed gives the same numbers on the same machine kind). It cannot
be turned off inside a process, so each measurement is a child process,
with determinism on or off, in ABBA order so that neither side always gets
the warmer machine. Printed: wall and CPU seconds of both sides and the
ratio on/off for a ``models.train`` run and a Neural Cleanse run, and
whether the two "on" runs of each gave bit-identical results.

    python bench/determinism.py [--repeats 2] [--epochs 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = """
import hashlib, json, os, sys, tempfile, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
os.environ["WMSUITE_CACHE_DIR"] = tempfile.mkdtemp()
sys.path.insert(0, {repo!r})
import numpy as np
import models
from models.training import TrainConfig, deterministic
if {on}:
    deterministic()
data = models.load("fashion_mnist", max_train=6000, max_test=500)
models.seed_everything(0)
model = models.build("lenet5", data.input_shape, data.num_classes)
wall, cpu = time.perf_counter(), time.process_time()
if {what!r} == "train":
    models.train(model, data, TrainConfig(epochs={epochs}, batch_size=64), cache=False, verbose=0)
    out = np.concatenate([w.ravel() for w in model.get_weights()])
else:
    from attacks.neural_cleanse import NeuralCleanseConfig, reverse_engineer
    models.train(model, data, TrainConfig(epochs=1, batch_size=64), cache=False, verbose=0)
    wall, cpu = time.perf_counter(), time.process_time()
    result = reverse_engineer(model, data.x_train[:320], NeuralCleanseConfig(steps={steps}), y_clean=data.y_train[:320])
    out = np.asarray(result.l1_norms, np.float64)
print(json.dumps({{"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                  "digest": hashlib.sha256(out.tobytes()).hexdigest()[:16]}}))
"""


def _child(what: str, on: bool, args) -> dict:
    code = _CHILD.format(repo=str(REPO), on=on, what=what, epochs=args.epochs, steps=args.steps)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy()
    )
    if done.returncode != 0:
        raise SystemExit(f"bench: the {what} child failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(what: str, args) -> None:
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for repeat in range(args.repeats):
        order = (True, False) if repeat % 2 == 0 else (False, True)
        for on in order:
            runs[on].append(_child(what, on, args))
    for metric in ("wall", "cpu"):
        on = sum(r[metric] for r in runs[True])
        off = sum(r[metric] for r in runs[False])
        print(
            f"{what:14s} {metric}: determinism on {on:7.2f} s, off {off:7.2f} s, ratio {on / off:.3f}"
        )
    same = len({r["digest"] for r in runs[True]}) == 1
    print(f"{what:14s} the {len(runs[True])} runs with determinism on are bit-identical: {same}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="Neural Cleanse epochs")
    args = parser.parse_args()
    _measure("train", args)
    _measure("neural_cleanse", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
