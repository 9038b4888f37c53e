"""``python -m watermarks``: mark a user's model with any scheme, or verify a suspect one.

``embed --scheme NAME`` works for every registered scheme, with the scheme's
config fields as flags over its ``--preset`` (``--scheme NAME --help`` lists
them); ``verify`` is shared by every scheme (the key names its scheme). A
:class:`models.errors.UserError` exits 2 with one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from models.cli import (
    add_model_arguments,
    command_parser,
    model_and_data,
    positive_int,
    print_verification,
    run,
    unit_command,
    unit_from_args,
)
from models.errors import UserError
from watermarks.base import REGISTRY


def _embed(args: argparse.Namespace) -> int:
    import models
    from models import classifier
    from models.io import check_output

    scheme = unit_from_args(REGISTRY, args, "scheme")
    out_key = check_output(args.out_key, ".npz", "--out-key")
    out_model = check_output(args.out_model, ".keras", "--out-model") if args.out_model else None
    if out_model is None and scheme.changes_model:
        raise UserError(f"scheme {scheme.name!r} changes the model; give --out-model W.keras")
    model, data = model_and_data(
        args, trained=scheme.uses_weights, max_train=args.max_train, seed=args.data_seed
    )
    marked = scheme.embed(model, data)
    marked.key.save(out_key)
    if out_model is not None:
        try:
            models.save_model(marked.model, out_model)
        except BaseException:
            out_key.unlink(missing_ok=True)  # no key without its model
            raise
    accuracy = classifier.accuracy(marked.model, data.x_test, data.y_test)
    print(f"scheme:         {scheme.name} ({scheme.kind})")
    print(f"test accuracy:  {accuracy:.4f} on {len(data.y_test)} '{data.name}' test images")
    print_verification(scheme.verify(marked.model, marked.key))
    written = [str(p) for p in (out_model, out_key) if p is not None]
    print(f"wrote {' and '.join(written)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from models import load_model
    from watermarks.base import Key, verify

    key = Key.load(args.key)
    model = load_model(args.model)
    result = verify(model, key)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print_verification(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser("python -m watermarks", __doc__.split("\n")[0])
    embed = unit_command(
        commands,
        "embed",
        REGISTRY,
        "scheme",
        help="mark a model with a watermark scheme; writes the marked model and the key",
        description="Mark a model (.keras, safe mode) with any registered scheme. Schemes that "
        "retrain the architecture (Zhang et al., Adi FS) re-initialise it; the others start from "
        "its weights. The key is calibrated (verifiable at once); an embedding that its own "
        "verification does not confirm is an error.",
    )
    add_model_arguments(embed)
    embed.add_argument(
        "--out-model", help="the marked model (.keras); optional where the scheme keeps the model"
    )
    embed.add_argument("--out-key", required=True, help="the key (.npz)")
    embed.add_argument("--max-train", type=positive_int, help="use at most N training images")
    embed.add_argument("--data-seed", type=int, default=0, help="seed of the --max-train sample")
    embed.set_defaults(handler=_embed)
    verify = commands.add_parser("verify", help="verify a suspect model against a saved key")
    verify.add_argument("--model", required=True, help="the suspect model (.keras, safe mode)")
    verify.add_argument("--key", required=True, help="the key (.npz)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
