"""Benchmark: the time ``models.train`` adds over a bare ``model.fit``, as a ratio.

Both are measured in the same run, on the same model (same initial weights),
the same data and the same optimizer, alternating in ABBA order so that
neither always gets the warmer machine: ``train`` pays for hashing the cache key, a checkpoint every
epoch and writing the finished model to the cache; ``fit`` pays for nothing
else. The foundation issue sets the limit at 1.10.

    python bench/train_overhead.py [--model lenet5] [--epochs 3] [--repeats 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402

import models  # noqa: E402
from models.training import TrainConfig, compile_for_training  # noqa: E402

LIMIT = 1.10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--max-train", type=int, default=None)
    args = parser.parse_args()

    try:
        data = models.load(args.dataset, max_train=args.max_train)
        models.seed_everything(0)
        reference = models.build(args.model, data.input_shape, data.num_classes)
    except models.UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    initial = reference.get_weights()
    config = TrainConfig(epochs=args.epochs, batch_size=128, seed=0)

    def fresh() -> keras.Model:
        model = keras.models.clone_model(reference)
        model.set_weights(initial)
        return model

    def bare() -> float:
        model = fresh()
        start = time.perf_counter()
        models.seed_everything(config.seed)
        compile_for_training(model, config)
        model.fit(
            data.x_train,
            data.y_train,
            batch_size=config.batch_size,
            epochs=config.epochs,
            shuffle=True,
            verbose=0,
        )
        return time.perf_counter() - start

    def through_train(cache_dir: str) -> float:
        model = fresh()
        start = time.perf_counter()
        models.train(model, data, config, cache=False, cache_dir=cache_dir, verbose=0)
        return time.perf_counter() - start

    fit_times, train_times = [], []
    with tempfile.TemporaryDirectory() as cache_dir:
        bare()  # warm-up: first-call costs of TensorFlow, paid once for both
        for repeat in range(args.repeats):  # ABBA order: neither side always runs first
            if repeat % 2 == 0:
                fit_times.append(bare())
                train_times.append(through_train(cache_dir))
            else:
                train_times.append(through_train(cache_dir))
                fit_times.append(bare())
    fit_s, train_s = sum(fit_times), sum(train_times)
    ratio = train_s / fit_s
    print(
        f"model {args.model}, {len(data.x_train)} images x {args.epochs} epochs x {args.repeats} repeats"
    )
    print(f"bare model.fit : {fit_s:7.2f} s  ({', '.join(f'{t:.2f}' for t in fit_times)})")
    print(f"models.train   : {train_s:7.2f} s  ({', '.join(f'{t:.2f}' for t in train_times)})")
    print(f"ratio train/fit: {ratio:.3f} (limit {LIMIT:.2f}: {'ok' if ratio <= LIMIT else 'OVER'})")
    # state that accumulates across trainings in one process shows as a growing ratio
    first, last = train_times[0] / fit_times[0], train_times[-1] / fit_times[-1]
    print(
        f"first repeat   : {first:.3f}   last repeat: {last:.3f} (a growing ratio means leftovers)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
