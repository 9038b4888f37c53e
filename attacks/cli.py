"""``python -m attacks``: run any removal attack, or Neural Cleanse's detection, on a user's model.

``remove --attack NAME`` works for every registered attack, with the
attack's config fields as flags over its ``--preset`` (``--attack NAME
--help`` lists them). The adversary holds a share of the dataset's training
split (``--fraction``, ``--per-class`` or ``--max-train``) and its test split.
With ``--key`` the owner's key is verified before and after (the attack
itself never sees it). A :class:`models.errors.UserError` exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys

from attacks.base import REGISTRY
from models.cli import (
    add_model_arguments,
    command_parser,
    model_and_data,
    positive_int,
    run,
    unit_command,
    unit_from_args,
)


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text}")
    return value


def _remove(args: argparse.Namespace) -> int:
    import models
    from models import classifier
    from models.io import check_output, write_text
    from watermarks.base import Key, verify

    attack = unit_from_args(REGISTRY, args, "attack")
    out = check_output(args.out, ".keras")
    key = Key.load(args.key) if args.key else None
    subset = {"fraction": args.fraction, "per_class": args.per_class, "max_train": args.max_train}
    model, data = model_and_data(args, seed=args.data_seed, **subset)
    before = verify(model, key) if key is not None else None
    removal = attack.remove(model, data)
    models.save_model(removal.model, out)
    accuracy = [classifier.accuracy(m, data.x_test, data.y_test) for m in (model, removal.model)]
    print(f"attack:         {attack.name} ({removal.info['seconds']:.1f} s)")
    print(f"adversary data: {len(data.y_train)} labelled '{data.name}' training images")
    print(f"test accuracy:  {accuracy[0]:.4f} -> {accuracy[1]:.4f}")
    if key is not None:
        after = verify(removal.model, key)
        print(f"evidence:       {before.statistic:.4f} ({before.label}) -> ", end="")
        print(f"{after.statistic:.4f} ({after.label}) [{key.scheme}]")
    if args.info:
        write_text(check_output(args.info, ".json", "--info"), json.dumps(removal.info, indent=1))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser(
        "python -m attacks", __doc__.split("\n")[0], ("attacks.neural_cleanse",)
    )
    remove = unit_command(
        commands,
        "remove",
        REGISTRY,
        "attack",
        help="run a removal attack on a model; writes the attacked model",
        description="Attack a (watermarked) model as an adversary holding a share of the "
        "dataset. The attack never reads the key; --key only reports the owner's verification.",
    )
    add_model_arguments(remove)
    remove.add_argument("--out", required=True, help="the attacked model (.keras)")
    share = remove.add_mutually_exclusive_group()
    share.add_argument(
        "--fraction", type=_share, help="the adversary's share of the training split"
    )
    share.add_argument("--per-class", type=positive_int, help="training images per class")
    share.add_argument("--max-train", type=positive_int, help="at most N training images")
    remove.add_argument("--data-seed", type=int, default=0, help="seed of the adversary's sample")
    remove.add_argument("--key", help="the owner's key (.npz): verify before and after")
    remove.add_argument("--info", help="write what the attack found and did (.json)")
    remove.set_defaults(handler=_remove)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
