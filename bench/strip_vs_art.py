"""Benchmark: the suite's vectorised STRIP against ART 1.20's ``STRIPMixin``: time ratio and what each refuses.

Both calibrate on the same clean images (``--n-calibration`` training
images, ``num_samples`` 20 blends per query, ART's default false acceptance
rate 0.01) and then judge the same queries: ``--n-queries`` clean test
images of classes other than the watermark's target, and the same images
with the trigger stamped on. ART's side is its STRIP transformer on the
ART wrapper of the model (``STRIP(classifier)()``, ``mitigate``,
``predict``; a refused query is an all-zero row), which loops over the
queries in Python and takes the entropy along the blends
(``scipy.stats.entropy(..., axis=0)``); ours (:mod:`attacks.strip`) blends
and predicts all queries in batches and takes Gao et al.'s entropy over the
classes of every blend. Each side runs once as a warm-up, then the timings
alternate (ours, ART, ART, ours, ...); medians are compared.

The model: the watermarked Table 5 network of ``bench/neural_cleanse_vs_art.py``
(Zhang et al.'s content trigger on Fashion-MNIST, cached by ``models.train``).
The bench also prints, for both sides, the share of triggered and of clean
queries refused: a detector that works refuses the first and answers the
second.

    python bench/strip_vs_art.py [--n-calibration 1000] [--n-queries 500] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TQDM_DISABLE", "1")  # ART's calibration progress bar
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import counts_positive, load  # noqa: E402
from neural_cleanse_vs_art import TARGET, stamp, watermarked_model  # noqa: E402

from attacks import strip  # noqa: E402
from models.art import to_art  # noqa: E402

NUM_SAMPLES = 20
FALSE_ACCEPTANCE_RATE = 0.01


def run_ours(model, calibration, queries, seed: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    entropy = lambda x: strip.normalised_entropy(model, x, calibration, NUM_SAMPLES, seed)  # noqa: E731
    threshold = strip.boundary(entropy(calibration), FALSE_ACCEPTANCE_RATE)
    refused = entropy(queries) <= threshold
    return time.perf_counter() - start, refused


def run_art(model, calibration, queries, seed: int) -> tuple[float, np.ndarray]:
    from art.defences.transformer.poisoning import STRIP

    np.random.seed(seed)  # ART draws its blend partners from numpy's global generator
    start = time.perf_counter()
    defended = STRIP(to_art(model, clip_values=(0.0, 1.0)))(
        num_samples=NUM_SAMPLES, false_acceptance_rate=FALSE_ACCEPTANCE_RATE
    )
    defended.mitigate(calibration)
    refused = ~np.any(defended.predict(queries) != 0, axis=1)
    return time.perf_counter() - start, refused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-calibration", type=int, default=1000)
    parser.add_argument(
        "--n-queries", type=int, default=500, help="clean queries (as many triggered)"
    )
    parser.add_argument("--train-epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="timings per side (2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts_positive(
        n_calibration=args.n_calibration,
        n_queries=args.n_queries,
        train_epochs=args.train_epochs,
        repeats=args.repeats,
    )
    data = load("fashion_mnist", seed=args.seed)
    model, cached = watermarked_model(data, args.train_epochs, args.seed)
    calibration = data.x_train[: args.n_calibration]
    clean = data.x_test[data.y_test != TARGET][: args.n_queries]
    queries = np.concatenate([stamp(clean), clean])
    triggered = np.arange(len(queries)) < len(clean)
    print(
        f"model: zhang_mnist with a content watermark -> class {TARGET} "
        f"({'cached' if cached else 'trained'}); {len(calibration)} calibration images, "
        f"{len(clean)} triggered + {len(clean)} clean queries, {NUM_SAMPLES} blends each"
    )
    small = slice(0, 20)
    run_ours(model, calibration[small], queries[small], args.seed)  # warm-up
    run_art(model, calibration[small], queries[small], args.seed)
    times: dict[str, list[float]] = {"ours": [], "art": []}
    refusals: dict[str, np.ndarray] = {}
    runners = {"ours": run_ours, "art": run_art}
    for repeat in range(args.repeats):
        for side in ("ours", "art") if repeat % 2 == 0 else ("art", "ours"):
            seconds, refusals[side] = runners[side](model, calibration, queries, args.seed)
            times[side].append(seconds)
            print(f"  repeat {repeat}: {side:>4} {seconds:7.1f} s", flush=True)
    ours, art = float(np.median(times["ours"])), float(np.median(times["art"]))
    for side, label in (("ours", "ours (Gao et al.'s entropy)"), ("art", "ART STRIPMixin")):
        refused = refusals[side]
        print(
            f"{label}: refuses {refused[triggered].mean():.3f} of triggered queries, "
            f"{refused[~triggered].mean():.3f} of clean ones"
        )
    print(f"ART: {art:.1f} s, ours: {ours:.1f} s (medians); ratio ART / ours: {art / ours:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
