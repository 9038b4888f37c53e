"""``python -m fingerprints``: fingerprint a user's model, or check a suspect against fingerprints.

``generate --scheme NAME`` works for every registered fingerprint scheme, with
the scheme's config fields as flags over its ``--preset`` (``--scheme NAME
--help`` lists them; nested ones as ``--families.generation 8``): it trains
(or reuses from the cache) the families the scheme needs around the given
source model and writes the fingerprints as ``.npz``. ``verify`` scores a
suspect model against a fingerprint file with the scheme (and config) that
made it. A :class:`models.errors.UserError` exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

import numpy as np

from fingerprints.base import REGISTRY
from models.cli import (
    add_model_arguments,
    command_parser,
    model_and_data,
    print_verification,
    run,
    unit_command,
    unit_from_args,
)
from models.errors import UserError


def _quiet_tensorflow(args: argparse.Namespace) -> None:
    # Scoring dozens of family models makes TensorFlow warn about retracing on stderr.
    if not getattr(args, "verbose", False):
        logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _generate(args: argparse.Namespace) -> int:
    from models.io import check_output

    scheme = unit_from_args(REGISTRY, args, "scheme")
    out = check_output(args.out, ".npz")
    _quiet_tensorflow(args)
    model, data = model_and_data(args, center=args.center)
    fingerprints = scheme.generate(model, data)
    if len(fingerprints) == 0:
        facts = fingerprints.metadata
        raise UserError(
            f"none of the {facts.get('candidates')} candidates passed the filter (adversarial to "
            f"the source, conferrability >= {facts.get('min_conferrability')}; the highest was "
            f"{facts.get('max_conferrability', 0):.3f}); try --candidates, --iterations, --eps "
            "or --min-conferrability"
        )
    fingerprints.save(out)
    facts = fingerprints.metadata
    generation = facts.get("generation_caeacc", {})
    print(f"scheme:         {scheme.name}")
    print(f"fingerprints:   {len(fingerprints)} of {facts.get('candidates')} candidates -> {out}")
    print(
        f"labels:         {np.bincount(fingerprints.labels, minlength=data.num_classes).tolist()}"
    )
    if generation:
        print(
            f"CAEAcc:         surrogates {np.mean(generation['surrogates']):.4f}, references "
            f"{np.mean(generation['references']):.4f} (generation families)"
        )
    print(f"threshold:      {fingerprints.threshold:.4f}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fingerprints.base import Fingerprints, verify
    from models import load_model

    fingerprints = Fingerprints.load(args.fingerprints)
    _quiet_tensorflow(args)
    model = load_model(args.model)
    result = verify(model, fingerprints)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print_verification(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser("python -m fingerprints", __doc__.split("\n")[0])
    generate = unit_command(
        commands,
        "generate",
        REGISTRY,
        "scheme",
        help="fingerprint a model; writes the fingerprints (.npz)",
        description="Fingerprint a source model (.keras, safe mode) with any registered scheme: "
        "the scheme trains the model families it needs on the dataset (cached), generates, "
        "filters and calibrates the fingerprints.",
    )
    add_model_arguments(generate, model_help="the source model (.keras, loaded in safe mode)")
    generate.add_argument(
        "--center", action="store_true", help="centre pixels by the training mean"
    )
    generate.add_argument("--out", required=True, help="the fingerprint file to write (.npz)")
    generate.set_defaults(handler=_generate)

    verify = commands.add_parser("verify", help="check a suspect model against fingerprints")
    verify.add_argument("--model", required=True, help="the suspect model (.keras, safe mode)")
    verify.add_argument("--fingerprints", required=True, help="the fingerprint file (.npz)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
