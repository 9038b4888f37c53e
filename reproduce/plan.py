"""``python -m reproduce PAPER --plan``: what a preset will do, and roughly how many GPU-hours.

A paper module's ``plan(config)`` lists its work as rows: ``kind="train"``
(architecture, input shape, classes, images per epoch, epochs, how many such
models), ``kind="note"`` (a fact the run depends on, such as pre-trained weights
that are missing) and ``kind="loop"`` (an optimisation loop that is not a training:
its steps and how many). Nothing is built or run: the sizes come from the
config, the parameters and FLOPs from the zoo's architectures built on the
fly (no data is loaded).

The GPU-hour estimate rests on one stated assumption, kept as data here:
NVIDIA's published training throughput of ResNet-50 v1.5 on one A100 80GB
in TF32, 938 images/s at 224x224 (NVIDIA DeepLearningExamples,
PyTorch/Classification/ConvNets/resnet50v1.5, "Training performance: NVIDIA
DGX A100", 1 GPU), scaled by forward FLOPs (4.1 GFLOPs per ResNet-50 image)
and capped at 20,000 images/s, beyond which small models are bound by the
input pipeline and kernel launches rather than arithmetic. Optimisation
loops are counted, not timed. It is an order of magnitude, not a promise.
"""

from __future__ import annotations

import functools

import pandas as pd

__all__ = ["REFERENCE", "describe", "flops", "images_per_second", "train_row"]

#: the throughput assumption: (images/s, forward FLOPs per image, cap, source)
REFERENCE = (
    938.0,
    4.1e9,
    20000.0,
    "NVIDIA DeepLearningExamples ResNet-50 v1.5, 1x A100 80GB, TF32: 938 img/s at 224x224",
)


@functools.cache
def flops(architecture: str, input_shape: tuple[int, int, int], classes: int) -> tuple[int, float]:
    """``(parameters, forward FLOPs per image)`` of a zoo model (2 x multiply-adds of conv/dense)."""
    import keras

    import models

    model = models.build(architecture, input_shape, classes)
    total = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            h, w, c_out = layer.output.shape[1:]
            kh, kw = layer.kernel_size
            groups = getattr(layer, "groups", 1) or 1
            total += 2.0 * h * w * kh * kw * (layer.input.shape[-1] // groups) * c_out
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            h, w, c = layer.output.shape[1:]
            kh, kw = layer.kernel_size
            total += 2.0 * h * w * kh * kw * c
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * layer.input.shape[-1] * layer.units
    return model.count_params(), total


def images_per_second(architecture: str, input_shape, classes: int) -> float:
    """The assumed training throughput of ``architecture`` on one current data-centre GPU."""
    rate, reference_flops, cap, _ = REFERENCE
    _, model_flops = flops(architecture, tuple(input_shape), classes)
    return min(cap, rate * reference_flops / max(model_flops, 1.0))


def train_row(
    what: str,
    architecture: str,
    input_shape,
    classes: int,
    images: int,
    epochs: int,
    count: int = 1,
) -> dict:
    """A ``kind="train"`` row of a plan."""
    return {
        "kind": "train",
        "what": what,
        "architecture": architecture,
        "input_shape": tuple(int(d) for d in input_shape),
        "classes": int(classes),
        "images": int(images),
        "epochs": int(epochs),
        "count": int(count),
    }


def describe(paper: str, preset: str, rows: list[dict]) -> str:
    """The plan as text: a table of trainings with GPU-hours, the loops, the total."""
    trainings = [r for r in rows if r["kind"] == "train"]
    loops = [r for r in rows if r["kind"] == "loop"]
    table = []
    for row in trainings:
        params, forward = flops(row["architecture"], row["input_shape"], row["classes"])
        rate = images_per_second(row["architecture"], row["input_shape"], row["classes"])
        hours = row["count"] * row["images"] * row["epochs"] / rate / 3600
        shape = "x".join(map(str, row["input_shape"]))
        table.append(
            {
                "what": row["what"],
                "architecture": f"{row['architecture']} ({shape})",
                "parameters": params,
                "GFLOPs/image": round(forward / 1e9, 4),
                "images": row["images"],
                "epochs": row["epochs"],
                "models": row["count"],
                "GPU-hours": round(hours, 3),
            }
        )
    frame = pd.DataFrame(table)
    total = float(frame["GPU-hours"].sum()) if len(frame) else 0.0
    lines = [f"# {paper} --preset {preset}", ""]
    lines.append(frame.to_markdown(index=False) if len(frame) else "(no training)")
    for loop in loops:
        lines.append(f"- {loop['what']}: {loop['count']} x {loop['steps']} steps")
    lines += [f"- note: {r['what']}" for r in rows if r["kind"] == "note"]
    lines += ["", f"about {total:.2f} GPU-hours of training; assumption: {REFERENCE[3]}, "
              "scaled by FLOPs, capped at 20,000 img/s"]  # fmt: skip
    return "\n".join(lines)
