"""``python -m fingerprints``: fingerprint a user's model, or check a suspect against fingerprints.

``generate`` trains (or reuses from the cache) surrogate and reference
families around the given source model and writes its conferrable
adversarial examples as ``.npz``; ``verify`` computes a suspect model's
CAEAcc on them and decides whether it is a surrogate. A
:class:`models.errors.UserError` exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from models.cli import command_parser, run
from models.errors import UserError

log = logging.getLogger("fingerprints")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _generate(args: argparse.Namespace) -> int:
    import numpy as np

    from fingerprints.cae import CAE, CaeConfig
    from fingerprints.families import (
        FamilyConfig,
        build_families,
        describe,
        input_range,
        pick_candidates,
    )
    from models import load_for_model, load_model
    from models.loading import output_path
    from models.training import TrainConfig

    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")

    out = output_path(args.out, ".npz")
    cae = CaeConfig(
        eps=args.eps,
        iterations=args.iterations,
        learning_rate=args.learning_rate,
        min_conferrability=args.min_conferrability,
        exclude_original=args.exclude_original,
        seed=args.seed,
    )
    source = load_model(args.model)
    data = load_for_model(
        args.dataset, source, data_dir=args.data_dir, center=args.center, seed=args.seed
    )
    if source.output_shape[-1] != data.num_classes:
        raise UserError(
            f"model '{args.model}' has {source.output_shape[-1]} outputs but {args.dataset} "
            f"has {data.num_classes} classes"
        )
    family = FamilyConfig(
        architectures=tuple(a.strip() for a in args.architectures.split(",") if a.strip()),
        generation=args.family_size,
        unseen=0,
        train=TrainConfig.cae(
            epochs=args.epochs,
            batch_size=args.batch_size,
            early_stopping_patience=3,
            lr_schedule="constant",
            seed=args.seed,
        ),
        thief_examples=args.thief_examples,
        extraction=args.extraction,
        seed=args.seed,
    )
    families = build_families(data, family, source=source, cache=not args.no_cache)
    log.info("families:\n%s", describe(families))
    chosen = pick_candidates(source, data, args.candidates, args.seed)
    metadata = {
        "source": source.name,
        "dataset": data.name,
        "input_shape": list(data.input_shape),
        "center": bool(args.center),
        "mean": None if data.mean is None else np.asarray(data.mean).tolist(),
        "families": describe(families),
    }
    fingerprints = CAE(cae).generate(
        source,
        families.models("surrogate", "generation"),
        families.models("reference", "generation"),
        data.x_test[chosen],
        clip_values=input_range(data),
        metadata=metadata,
    )
    if len(fingerprints) == 0:
        raise UserError(
            f"none of the {len(chosen)} candidates passed the filter (adversarial to the source, "
            f"conferrability >= {cae.min_conferrability}); try a larger --eps, more --iterations "
            "or more --candidates"
        )
    fingerprints.save(out)
    accs = fingerprints.metadata["generation_caeacc"]
    print(f"fingerprints: {len(fingerprints)} of {len(chosen)} candidates -> {out}")
    print(f"labels:       {np.bincount(fingerprints.labels, minlength=data.num_classes).tolist()}")
    print(
        f"CAEAcc:       surrogates {np.mean(accs['surrogates']):.4f}, references "
        f"{np.mean(accs['references']):.4f} (generation families)"
    )
    print(f"threshold:    {fingerprints.threshold:.4f}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fingerprints.base import Fingerprints, verify
    from models import load_model

    fingerprints = Fingerprints.load(args.fingerprints)
    model = load_model(args.model)
    result = verify(model, fingerprints, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"scheme:    {result.scheme}")
        print(f"CAEAcc:    {result.accuracy:.4f} on {result.fingerprints} fingerprints")
        print(f"threshold: {result.threshold:.4f}")
        print(f"verdict:   {result.verdict}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser("python -m fingerprints", __doc__.split("\n")[0])

    gen = commands.add_parser(
        "generate", help="fingerprint a model with conferrable adversarial examples"
    )
    gen.add_argument("--model", required=True, help="the source model (.keras, safe mode)")
    gen.add_argument(
        "--dataset", required=True, help="the data it was trained on, e.g. fashion_mnist"
    )
    gen.add_argument("--data-dir", help="folder with the dataset files (tried first)")
    gen.add_argument("--center", action="store_true", help="centre pixels by the training mean")
    gen.add_argument("--eps", type=float, default=0.15, help="L-infinity bound (default 0.15)")
    gen.add_argument("--out", required=True, help="the fingerprint file to write (.npz)")
    gen.add_argument(
        "--architectures",
        default="lenet5,zhang_mnist",
        help="zoo models of the surrogate and reference families (default lenet5,zhang_mnist)",
    )
    gen.add_argument(
        "--family-size", type=_positive_int, default=6, help="surrogates, and references (6)"
    )
    gen.add_argument("--epochs", type=_positive_int, default=10, help="training epochs (10)")
    gen.add_argument(
        "--batch-size", type=_positive_int, default=128, help="training batch size (128)"
    )
    gen.add_argument(
        "--thief-examples", type=_positive_int, default=10000, help="thief's images (10000)"
    )
    gen.add_argument(
        "--extraction",
        default="labels",
        help="how surrogates are made: labels (default), soft_labels (the source's probabilities), "
        "copycat or knockoff (ART)",
    )
    gen.add_argument("--candidates", type=_positive_int, default=200, help="test images (200)")
    gen.add_argument("--iterations", type=_positive_int, default=200, help="Adam steps (200)")
    gen.add_argument("--learning-rate", type=float, default=2e-3, help="Adam's rate (2e-3)")
    gen.add_argument(
        "--min-conferrability",
        type=float,
        default=0.95,
        help="the filter's conferrability threshold (default 0.95, the report's)",
    )
    gen.add_argument(
        "--exclude-original",
        action="store_true",
        help="seek conferrability only on labels other than the original one",
    )
    gen.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    gen.add_argument("--no-cache", action="store_true", help="retrain the families")
    gen.set_defaults(handler=_generate)

    ver = commands.add_parser("verify", help="check a suspect model against fingerprints")
    ver.add_argument("--model", required=True, help="the suspect model (.keras, safe mode)")
    ver.add_argument("--fingerprints", required=True, help="the fingerprint file (.npz)")
    ver.add_argument("--batch-size", type=_positive_int, default=256)
    ver.add_argument("--json", action="store_true", help="print the result as JSON")
    ver.set_defaults(handler=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
