"""``python -m watermarks``: mark a user's model or verify a suspect one.

``verify`` is shared by every scheme (the key names its scheme). Each scheme
module may add its own command by defining ``add_command(subparsers)``, which
adds a parser whose ``handler`` default takes the parsed arguments and returns
an exit status. A :class:`models.errors.UserError` exits 2 with one line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys

from models.errors import EXIT_USER_ERROR, UserError

log = logging.getLogger("watermarks")

SCHEME_MODULES = ("watermarks.backdoor", "watermarks.fragile", "watermarks.bilevel")


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
    parser = argparse.ArgumentParser(
        prog="python -m watermarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verify = commands.add_parser("verify", help="verify a suspect model against a saved key")
    verify.add_argument("--model", required=True, help="the suspect model (.keras, safe mode)")
    verify.add_argument("--key", required=True, help="the key (.npz)")
    verify.add_argument("--batch-size", type=int, default=256)
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=_verify)
    for name in SCHEME_MODULES:
        if importlib.util.find_spec(name) is not None:
            module = importlib.import_module(name)
            if hasattr(module, "add_command"):
                module.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)  # a usage error exits 2, as argparse does
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
