"""Benchmark: pruning masks held inside the training step (``KeepMasks``) vs re-applied from Python after every batch.

``attacks.pruning.KeepMasks`` sets each masked variable's Keras constraint,
which the optimizer applies right after its update inside the compiled
step. The peer is what it replaced: a callback that multiplies every masked
kernel by its mask with an eager ``assign`` in ``on_train_batch_end``. Both
fine-tune the same 50%-pruned LeNet5 (Fashion-MNIST, Adam 1e-4, batch 32,
as laundering retrains) for ``--epochs`` epochs from the same weights and
seed; after a warm-up of each, the timings alternate (ours, peer, peer,
ours, ...) and the medians are compared. The bench also says whether the
two give the same weights bit for bit.

    python bench/keep_masks.py [--images 12000] [--epochs 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _common import counts_positive, load  # noqa: E402

import models  # noqa: E402
from attacks.pruning import KeepMasks, magnitude_prune, prunable_layers  # noqa: E402


class EagerMasks(keras.callbacks.Callback):
    """The peer: every masked kernel multiplied by its mask after every batch, from Python."""

    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def on_train_begin(self, logs=None):
        self.pairs = [
            (layer.kernel, keras.ops.convert_to_tensor(self.masks[layer.path]))
            for layer in prunable_layers(self.model)
        ]

    def on_train_batch_end(self, batch, logs=None):
        for kernel, mask in self.pairs:
            kernel.assign(kernel * mask)


def fine_tune(pruned, masks, callback_cls, x, y, epochs: int, seed: int):
    model = keras.models.clone_model(pruned)
    model.set_weights(pruned.get_weights())
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    model.fit(
        x, y, batch_size=32, epochs=epochs, shuffle=True, verbose=0, callbacks=[callback_cls(masks)]
    )
    return time.perf_counter() - start, model.get_weights()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts_positive(images=args.images, epochs=args.epochs, repeats=args.repeats)
    data = load("fashion_mnist", max_train=args.images, seed=args.seed)
    models.seed_everything(args.seed)
    base = models.build("lenet5", data.input_shape, data.num_classes)
    pruned, masks = magnitude_prune(base, 0.5)
    x, y = data.x_train, data.y_train
    steps = args.epochs * -(-len(x) // 32)
    sides = {"ours": KeepMasks, "peer": EagerMasks}
    for cls in sides.values():  # warm-up
        fine_tune(pruned, masks, cls, x[:640], y[:640], 1, args.seed)
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    weights = {}
    for repeat in range(args.repeats):
        for side in ("ours", "peer") if repeat % 2 == 0 else ("peer", "ours"):
            seconds, weights[side] = fine_tune(
                pruned, masks, sides[side], x, y, args.epochs, args.seed
            )
            times[side].append(seconds)
            print(f"  repeat {repeat}: {side} {seconds:6.1f} s", flush=True)
    ours, peer = float(np.median(times["ours"])), float(np.median(times["peer"]))
    same = all(np.array_equal(a, b) for a, b in zip(weights["ours"], weights["peer"], strict=True))
    print(f"{steps} steps: constraint {ours:.1f} s, eager assign {peer:.1f} s (medians)")
    print(
        f"ratio eager / constraint: {peer / ours:.2f}; {(peer - ours) / steps * 1e3:.2f} ms a step saved"
    )
    print(f"same weights bit for bit: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
