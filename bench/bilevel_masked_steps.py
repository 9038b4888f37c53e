"""Benchmark: the bi-level embedding's masked steps with ``keras.optimizers`` against the hand-written Adam.

Issue 11 asks that the masked optimisation of :mod:`watermarks.bilevel` run
through ``keras.optimizers`` unless the hand-written loop it had is faster.
Both are timed here in one run, on the same model, the same mask (the top
``--top-fraction`` of every kernel layer's parameters, drawn at random), the
same batches and the same number of steps, in ABBA order so that neither
always gets the warmer machine. Wall time and process CPU time are both
reported (the machine may be shared: CPU time is what the process itself
spent). Each side also checks that every parameter outside the mask is
bit-identical after the steps, and the largest difference between the two
sides' weights is printed (they differ only in where Adam's epsilon sits).

    python bench/bilevel_masked_steps.py [--model lenet5] [--dataset fashion_mnist]
        [--steps 200] [--repeats 6] [--optimizer adam]

Measured on the shared 2-core development machine (load average 7-9, so
wall times scatter; CPU time is the fair measure), medians, keras / hand-written:

| model (parameters, in the mask) | optimizer | repeats | CPU ratio | wall ratio |
|---|---|---|---|---|
| lenet5 (61706, 1537), 200 steps, 20 keys | adam | 10 | 1.004 (1.250 / 1.245 s) | 0.853 |
| lenet5 (61706, 1537), 200 steps, 20 keys | sgd | 6 | 0.958 (1.149 / 1.200 s) | 1.404 |
| _tiny_cnn (1418, 141), 200 steps, 8 keys | adam | 10 | 1.022 (0.234 / 0.229 s) | 1.681 |

The hand-written loop is not faster, so ``keras.optimizers`` is used. Both
sides keep every parameter outside the mask bit-identical; SGD gives the
same weights bit for bit; Adam differs only by where epsilon sits (Keras
adds it to sqrt(v), not to the bias-corrected sqrt(v_hat)): on lenet5 the
masked weights differ by a median 0.0024 after 200 steps (largest 0.19).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import models  # noqa: E402
from watermarks.bilevel import BiLevel  # noqa: E402

_ADAM = (0.9, 0.999, 1e-7)  # Keras' defaults, as the hand-written loop had them


class HandWritten:
    """The masked Adam/SGD loop ``watermarks.bilevel`` had before issue 11, on an embedder's variables."""

    def __init__(self, embedder):
        self.e = embedder
        self.moments = [
            (tf.Variable(tf.zeros(v.shape)), tf.Variable(tf.zeros(v.shape)))
            for v in embedder.variables
        ]
        self.t = tf.Variable(0.0, trainable=False)
        self.steps = tf.function(self._steps)

    def reset(self) -> None:
        for m, v in self.moments:
            m.assign(tf.zeros_like(m))
            v.assign(tf.zeros_like(v))
        self.t.assign(0.0)

    def _steps(self, batches_x, batches_y, exemplars, targets):
        e, config = self.e, self.e.config
        lam = config.trade_off
        beta1, beta2, eps = _ADAM
        for i in tf.range(tf.shape(batches_x)[0]):
            with tf.GradientTape() as tape:
                natural = e._net_loss(batches_x[i], batches_y[i])
                watermark = e._net_loss(exemplars, targets)
                loss = lam * natural + (1.0 - lam) * watermark
            grads = tape.gradient(loss, e.variables)
            self.t.assign_add(1.0)
            for variable, grad, mask, (m, v) in zip(
                e.variables, grads, e.masks, self.moments, strict=True
            ):
                grad = tf.where(mask, grad, tf.zeros_like(grad))
                if config.optimizer == "sgd":
                    step = config.learning_rate * grad
                else:
                    m.assign(beta1 * m + (1.0 - beta1) * grad)
                    v.assign(beta2 * v + (1.0 - beta2) * grad * grad)
                    m_hat = m / (1.0 - tf.pow(beta1, self.t))
                    v_hat = v / (1.0 - tf.pow(beta2, self.t))
                    step = config.learning_rate * m_hat / (tf.sqrt(v_hat) + eps)
                variable.assign(tf.where(mask, variable - step, variable))


def _outside_unchanged(embedder, before) -> bool:
    return all(
        np.array_equal(keras.ops.convert_to_numpy(v)[~m.numpy()], b[~m.numpy()])
        for v, m, b in zip(embedder.variables, embedder.masks, before, strict=True)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-fraction", type=float, default=0.025)
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    try:
        data = models.load(args.dataset, max_train=2000, max_test=500)
    except models.UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    models.seed_everything(0)
    model = models.build(args.model, data.input_shape, data.num_classes)
    scheme = BiLevel(keys=args.keys, optimizer=args.optimizer, batch_size=args.batch_size)
    embedder = scheme._embedder(model)
    rng = np.random.default_rng(0)
    embedder.set_masks(
        {slot: rng.random(v.shape) < args.top_fraction for slot, v in enumerate(embedder.variables)}
    )
    masks = [m.numpy() for m in embedder.masks]
    hand = HandWritten(embedder)
    start = [keras.ops.convert_to_numpy(v) for v in embedder.variables]
    batches = rng.integers(0, len(data.x_train), size=(args.steps, args.batch_size))
    inputs = (
        tf.constant(data.x_train[batches]),
        tf.constant(data.y_train[batches].astype(np.int64)),
        tf.constant(data.x_test[: args.keys]),
        tf.constant(rng.integers(0, data.num_classes, args.keys).astype(np.int64)),
    )

    def run(side: str) -> tuple[float, float, list[np.ndarray]]:
        for variable, value in zip(embedder.variables, start, strict=True):
            variable.assign(value)
        for mask, value in zip(embedder.masks, masks, strict=True):
            mask.assign(value)
        embedder.reset_optimizer()
        hand.reset()
        wall, cpu = time.perf_counter(), time.process_time()
        (embedder.masked_steps if side == "keras" else hand.steps)(*inputs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if not _outside_unchanged(embedder, start):
            raise SystemExit(f"bench: {side} moved a parameter outside the mask")
        return wall, cpu, [keras.ops.convert_to_numpy(v) for v in embedder.variables]

    run("keras"), run("hand")  # warm-up: tracing, paid once for both
    times = {"keras": [], "hand": []}
    for repeat in range(args.repeats):  # ABBA order
        for side in ("keras", "hand") if repeat % 2 == 0 else ("hand", "keras"):
            wall, cpu, weights = run(side)
            times[side].append((wall, cpu))
            if side == "keras":
                keras_weights = weights
            else:
                hand_weights = weights
    gaps = np.concatenate(
        [np.abs(a - b)[m] for a, b, m in zip(keras_weights, hand_weights, masks, strict=True)]
    )
    moved = sum(int(np.count_nonzero(a != b)) for a, b in zip(keras_weights, start, strict=True))
    print(
        f"model {args.model} ({model.count_params()} parameters), {args.optimizer}, "
        f"{args.steps} masked steps of {args.batch_size} + {args.keys} keys, "
        f"{sum(int(m.sum()) for m in masks)} parameters in the mask, {args.repeats} repeats"
    )
    for side, label in (("keras", "keras.optimizers"), ("hand", "hand-written    ")):
        walls = [w for w, _ in times[side]]
        cpus = [c for _, c in times[side]]
        print(
            f"{label}: wall median {statistics.median(walls):.3f} s, "
            f"CPU median {statistics.median(cpus):.3f} s "
            f"(wall {', '.join(f'{w:.2f}' for w in walls)})"
        )
    for what, index in (("wall", 0), ("CPU", 1)):
        k = statistics.median(t[index] for t in times["keras"])
        h = statistics.median(t[index] for t in times["hand"])
        print(f"ratio keras/hand-written ({what}): {k / h:.3f}")
    print(f"parameters outside the mask: bit-identical on both sides; {moved} inside moved")
    print(
        f"weight difference between the two sides, in the mask: median {np.median(gaps):.3g}, "
        f"largest {gaps.max():.3g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
