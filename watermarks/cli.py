"""``python -m watermarks``: mark a user's model or verify a suspect one.

``verify`` is shared by every scheme (the key names its scheme). Each scheme
module may add its own command by defining ``add_command(subparsers)``, which
adds a parser whose ``handler`` default takes the parsed arguments and returns
an exit status. A :class:`models.errors.UserError` exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys

from models.cli import command_parser, run
from watermarks.base import REGISTRY


def _verify(args: argparse.Namespace) -> int:
    from models import load_model
    from watermarks.base import Key, verify

    key = Key.load(args.key)
    model = load_model(args.model)
    result = verify(model, key, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        p = "n/a" if result.p_value != result.p_value else f"{result.p_value:.3g}"
        print(f"scheme:    {result.scheme}")
        print(f"accuracy:  {result.accuracy:.4f} on {len(key)} key inputs")
        print(f"threshold: {result.threshold:.4f}")
        print(f"p-value:   {p}")
        print(f"verdict:   {result.verdict}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser(
        "python -m watermarks", __doc__.split("\n")[0], REGISTRY.modules
    )
    verify = commands.add_parser("verify", help="verify a suspect model against a saved key")
    verify.add_argument("--model", required=True, help="the suspect model (.keras, safe mode)")
    verify.add_argument("--key", required=True, help="the key (.npz)")
    verify.add_argument("--batch-size", type=int, default=256)
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
