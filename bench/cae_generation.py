"""Benchmark: conferrable adversarial examples generated per second, batched vs one at a time.

Both ways run in the same process on the same source and families (trained
briefly through the cache on Fashion-MNIST at 32x32), with the same
iterations and dropout draws: ``batched`` optimises every candidate in one
compiled step per iteration; ``single`` calls the same code with one
candidate per step, as a per-example loop would. Each is warmed up once (the
first call compiles), then timed. The loss is summed per candidate and Adam works
element-wise, so the two ways compute the same thing; their examples still
differ slightly, because floating-point sums in a batch run in another order
and Adam's normalisation turns tiny gradient differences into full steps (the
largest difference is printed). The issue sets the aim at a ratio of 10.

    python bench/cae_generation.py [--candidates 128] [--single 8] [--iterations 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import models  # noqa: E402
from fingerprints.cae import CaeConfig, optimize  # noqa: E402
from fingerprints.families import FamilyConfig, build_families, input_range  # noqa: E402
from models.training import TrainConfig  # noqa: E402

AIM = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=128, help="batched candidates")
    parser.add_argument("--single", type=int, default=8, help="candidates run one at a time")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--family-size", type=int, default=6, help="surrogates (and references)")
    args = parser.parse_args()
    if min(args.candidates, args.single, args.iterations, args.family_size) < 1:
        print("bench: error: every count must be positive", file=sys.stderr)
        return 2

    try:
        data = models.load(
            "fashion_mnist", size=32, channels=1, center=True, max_train=6000, max_test=1000
        )
    except models.UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    recipe = TrainConfig(epochs=1, batch_size=128)
    family = FamilyConfig(
        architectures=("lenet5", "zhang_mnist"),
        generation=args.family_size,
        unseen=0,
        train=recipe,
        source_train=recipe,
        source_examples=3000,
        thief_examples=3000,
    )
    families = build_families(data, family)
    source = families.source.model
    surrogates = families.models("surrogate", "generation")
    references = families.models("reference", "generation")
    x = data.x_test[: max(args.candidates, args.single)]
    config = CaeConfig(iterations=args.iterations)
    clip = input_range(data)

    def batched(inputs):
        run = dataclasses.replace(config, batch_size=len(inputs))
        return optimize(source, surrogates, references, inputs, config=run, clip_values=clip)

    def single(inputs):
        run = dataclasses.replace(config, batch_size=1)
        return optimize(source, surrogates, references, inputs, config=run, clip_values=clip)

    batched(x[:2])  # compile both shapes once, outside the timings
    single(x[:1])
    start = time.perf_counter()
    out_batched = batched(x[: args.candidates])
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    out_single = single(x[: args.single])
    t_single = time.perf_counter() - start

    rate_batched = args.candidates / t_batched
    rate_single = args.single / t_single
    difference = float(np.abs(out_batched[: args.single] - out_single).max())
    print(
        f"models: source + {len(surrogates)} surrogates + {len(references)} references "
        f"(lenet5/zhang_mnist, 32x32); {args.iterations} iterations per fingerprint"
    )
    print(f"batched: {args.candidates} fingerprints in {t_batched:.2f} s = {rate_batched:.2f}/s")
    print(f"single:  {args.single} fingerprints in {t_single:.2f} s = {rate_single:.2f}/s")
    print(f"largest difference between the two ways' examples: {difference:.2e}")
    ratio = rate_batched / rate_single
    print(f"ratio batched/single: {ratio:.1f} (aim >= {AIM:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
