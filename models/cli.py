"""What the suite's command lines share: one-line errors, flags generated from configs, the model gate.

``python -m watermarks``, ``python -m attacks``, ``python -m fingerprints``
and ``python -m reproduce`` are each a parser whose commands come from
modules that define ``add_command(subparsers)`` (adding a parser whose
``handler`` default takes the parsed arguments and returns an exit status).

The promises every command keeps:

* a :class:`models.errors.UserError` (raised while parsing or by a handler)
  and any usage error print one line on stderr and exit 2, with nothing
  written; ``-v``/``--verbose`` anywhere on the line turns on log lines;
* every ``--help`` shows the defaults;
* a unit's options are flags generated from its config
  (:func:`add_config_arguments`): ``--epochs 5``, ``--train.epochs 5`` for a
  nested config, ``--flag/--no-flag`` for booleans, ``a,b`` for lists, over
  the values of ``--preset``; a command that takes ``--scheme NAME`` or
  ``--attack NAME`` gets the flags of that unit (:class:`UnitParser`), so a
  new unit gets its command for free;
* a model comes in through :func:`model_and_data`: loaded in safe mode, the
  dataset shaped for it (``--resize`` to fit different images, refused
  otherwise), scaled to ``--input-range``, and passed through the gate of
  :mod:`models.sanity`;
* TensorFlow's op determinism is on (:func:`models.training.deterministic`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import typing
import warnings
from collections.abc import Sequence
from typing import Any

from models.config import fields
from models.errors import EXIT_USER_ERROR, UserError
from models.registry import PRESETS, Registry

__all__ = [
    "OneLineParser",
    "UnitParser",
    "add_config_arguments",
    "add_model_arguments",
    "command_parser",
    "config_overrides",
    "model_and_data",
    "parse_range",
    "positive_int",
    "print_verification",
    "run",
    "unit_command",
    "unit_from_args",
]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every help line; descriptions keep their line breaks."""


def _verbose_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="log progress on stderr",
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2, and shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see --help\n")


class UnitParser(OneLineParser):
    """A sub-command parser that adds the flags of the unit named by ``--<option> NAME``.

    ``unit_registry`` and ``unit_option`` (e.g. the watermark registry and
    ``"scheme"``) are set by :func:`unit_command`; other sub-commands behave
    as :class:`OneLineParser`.
    """

    def __init__(self, *args, unit_registry: Registry | None = None, unit_option: str = "", **kw):
        super().__init__(*args, **kw)
        self.unit_registry = unit_registry
        self.unit_option = unit_option
        self._configured = False
        _verbose_flags(self, top=False)

    def parse_known_args(self, args=None, namespace=None):
        if self.unit_registry is not None and not self._configured:
            self._configured = True
            probe = argparse.ArgumentParser(add_help=False)
            probe.add_argument(f"--{self.unit_option}")
            probe.add_argument("--preset", default="quick")
            known = probe.parse_known_args(args)[0]
            name = getattr(known, self.unit_option)
            if name is not None:
                try:
                    cls = self.unit_registry.get(name)
                    defaults = cls.preset_config(known.preset)
                except UserError as exc:
                    self.error(str(exc))
                group = self.add_argument_group(
                    f"options of {name} (defaults: its '{known.preset}' preset)"
                )
                add_config_arguments(group, cls.Config, defaults=defaults)
        return super().parse_known_args(args, namespace)


def command_parser(
    prog: str, description: str, modules: Sequence[str] = ()
) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A parser with ``-v`` and one sub-command per ``add_command`` of ``modules``.

    Returns:
        ``(parser, commands)``; add further commands to ``commands``.
    """
    parser = OneLineParser(prog=prog, description=description)
    _verbose_flags(parser, top=True)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=UnitParser
    )
    for name in modules:
        module = importlib.import_module(name)
        if hasattr(module, "add_command"):
            module.add_command(commands)
    return parser, commands


def unit_command(
    commands, name: str, registry: Registry, option: str, help: str, description: str = ""
) -> UnitParser:
    """A sub-command that runs one unit of ``registry``, named by ``--<option>``, with its flags."""
    parser = commands.add_parser(
        name,
        help=help,
        description=(description or help)
        + f"\n\nAdd --{option} NAME to --help to see the options of that unit.",
        unit_registry=registry,
        unit_option=option,
    )
    parser.add_argument(f"--{option}", required=True, help=f"one of: {', '.join(registry.names())}")
    parser.add_argument(
        "--preset", default="quick", choices=PRESETS, help="the unit's preset, before any flag"
    )
    return parser


# --------------------------------------------------------------------------- config flags


def _int_from(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_from(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_from(text, 0, "a non-negative integer")


def parse_range(text: str) -> tuple[float, float]:
    """argparse type: ``LOW,HIGH`` with LOW < HIGH."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0,255), got {text!r}") from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"expected LOW < HIGH, got {text!r}")
    return low, high


def _scalar(tp: Any):
    """An argparse ``type`` for one value of type ``tp`` ("none" for None where allowed)."""

    def convert(text: str):
        if text.lower() == "none":
            return None
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        return text

    convert.__name__ = getattr(tp, "__name__", "value")
    return convert


def add_config_arguments(parser, config_cls: type, prefix: str = "", defaults=None) -> None:
    """Add a flag per field of ``config_cls`` (nested configs as ``--outer.inner``).

    Flags default to ``argparse.SUPPRESS``: only the options given on the
    line override the preset (:func:`config_overrides` collects them). A
    field whose flag the command already has (``--seed``) is set by that flag.
    """
    from models.config import _optional, field_help

    for f, tp in fields(config_cls):
        if not f.metadata.get("cli", True):
            continue
        inner, _ = _optional(tp)
        flag = f"--{prefix}{f.name}".replace("_", "-")
        alias = f"--{prefix}{f.name}"  # the field's own spelling is accepted too
        flags = [flag] if alias == flag else [flag, alias]
        if any(f_ in parser._option_string_actions for f_ in flags):
            continue  # the command's own flag sets it
        current = getattr(defaults, f.name) if defaults is not None else f.default
        if dataclasses.is_dataclass(inner):
            nested = current if dataclasses.is_dataclass(current) else None
            add_config_arguments(parser, inner, prefix=f"{prefix}{f.name}.", defaults=nested)
            continue
        default = current if current is not dataclasses.MISSING else "(computed)"
        help_text = f"{field_help(f)} (default: {default!r})".strip()
        common = {"dest": f"{prefix}{f.name}", "default": argparse.SUPPRESS, "help": help_text}
        if inner is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(inner) is tuple:
            item = typing.get_args(inner)[0]
            parser.add_argument(*flags, type=_list_of(item), metavar="A,B", **common)
        else:
            choices = f.metadata.get("choices")
            metavar = getattr(inner, "__name__", "VALUE").upper()
            parser.add_argument(
                *flags, type=_scalar(inner), choices=choices, metavar=metavar, **common
            )


def _list_of(tp: Any):
    scalar = _scalar(tp)

    def convert(text: str):
        return tuple(scalar(part) for part in text.split(",") if part != "")

    return convert


def config_overrides(args: argparse.Namespace, config_cls: type) -> dict[str, Any]:
    """The config options given on the command line, by (dotted) field name."""
    names = set()

    def walk(cls, prefix):
        for f, tp in fields(cls):
            from models.config import _optional

            inner, _ = _optional(tp)
            if dataclasses.is_dataclass(inner):
                walk(inner, f"{prefix}{f.name}.")
            else:
                names.add(f"{prefix}{f.name}")

    walk(config_cls, "")
    return {name: value for name, value in vars(args).items() if name in names}


def unit_from_args(registry: Registry, args: argparse.Namespace, option: str):
    """The unit named by ``args.<option>``, configured by ``--preset`` and the given flags."""
    cls = registry.get(getattr(args, option))
    return cls.from_preset(args.preset, **config_overrides(args, cls.Config))


# --------------------------------------------------------------------------- models and data


def add_model_arguments(parser, *, dataset: bool = True, model_help: str = "") -> None:
    """``--model``, ``--input-range`` and, with ``dataset``, ``--dataset``, ``--data-dir``, ``--resize``."""
    parser.add_argument(
        "--model", required=True, help=model_help or "the model (.keras, loaded in safe mode)"
    )
    parser.add_argument(
        "--input-range",
        type=parse_range,
        default=(0.0, 1.0),
        metavar="LOW,HIGH",
        help="the pixel range the model expects (0,255 for a model that rescales inside)",
    )
    if dataset:
        parser.add_argument("--dataset", required=True, help="the dataset (e.g. fashion_mnist)")
        parser.add_argument("--data-dir", help="folder holding the dataset files (see README)")
        parser.add_argument(
            "--resize",
            action="store_true",
            help="resize the dataset's images (and repeat grey channels) to the model's input",
        )


def model_and_data(args: argparse.Namespace, *, trained: bool = True, **load_options):
    """``(model, data)`` from the model arguments: safe-mode load, data shaped, gate passed.

    Args:
        args: parsed :func:`add_model_arguments`.
        trained: the model's weights matter (see :func:`models.sanity.check_model`).
        **load_options: further :func:`models.load` options (subsets, ``seed``).
    """
    import models
    from models.sanity import check_model

    models.check_dataset(args.dataset)  # before TensorFlow starts on the model
    model = models.load_model(args.model)
    data = models.load_for_model(
        args.dataset, model, resize=args.resize, data_dir=args.data_dir, **load_options
    )
    data = data.with_input_range(*args.input_range)
    check_model(model, data, trained=trained)
    return model, data


def print_verification(result) -> None:
    """Print a :class:`models.evidence.Verification` for people, one fact a line."""
    p = "n/a" if result.p_value != result.p_value else f"{result.p_value:.3g}"
    print(f"statistic:      {result.statistic:.4f} on {result.n} inputs ({result.kind})")
    print(f"threshold:      {result.threshold:.4f}")
    print(f"p-value:        {p}" + (f" ({result.null})" if result.null else ""))
    print(f"verdict:        {result.label}: {result.verdict}")


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is now (tests swap it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(verbose: bool, fmt: str = "%(name)s: %(message)s") -> None:
    """Log lines on stderr only with ``-v``: without it, nothing but a user error's one line.

    One handler per process, on the root logger, whose level decides (records
    propagated from TensorFlow's own logger included); ``-v`` shows INFO and up.
    """
    level = logging.INFO if verbose else logging.CRITICAL + 1
    root = logging.getLogger()
    root.setLevel(min(root.level or logging.WARNING, logging.INFO) if verbose else logging.WARNING)
    handler = next((h for h in root.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    handler.setLevel(level)
    for other in root.handlers:  # e.g. a basicConfig of an embedding program
        if not isinstance(other, _Stderr) and not verbose and _writes_stderr(other):
            other.setLevel(logging.CRITICAL + 1)
    # TensorFlow's logger has a handler of its own, bound to the stderr of its import (and it
    # propagates too): its records go through the root handler above, like everyone's.
    tf_logger = logging.getLogger("tensorflow")
    for other in list(tf_logger.handlers):
        if isinstance(other, logging.StreamHandler):
            tf_logger.removeHandler(other)
    if not verbose:  # warnings (ART's "PyTorch not found") are not the one line either
        warnings.simplefilter("ignore")


def _writes_stderr(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
        sys.stderr,
        sys.__stderr__,
    )


def quiet_keras() -> None:
    """Route Keras' progress lines to logging (stderr with ``-v``), never to stdout."""
    import keras

    keras.config.disable_interactive_logging()


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command's handler; a ``UserError`` is one line and exit 2."""
    from models.training import deterministic

    args = parser.parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    quiet_keras()
    deterministic()
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
