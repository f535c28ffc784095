"""The ``segserve`` command: a thin face that parses, validates and calls the library.

Subcommands import what they need when they run, so ``segserve --help`` and the serving commands never
import torch; the training-side commands say how to install it when it is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from segserve import __version__


class UsageError(Exception):
    """A problem with what the user asked for: printed as ``segserve: error: ...``, exit status 2."""


def _input_size(text: str) -> tuple[int, int]:
    """``HxW`` or a single side ``S`` (square) as (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 224x224) or a single side, got {text!r}")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"input sides must be at least 1, got {text!r}")
    return height, width


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _torch_side():  # -> module segserve.models
    """``segserve.models``, or a UsageError saying how to install the training extra."""
    try:
        import segserve.models as models
    except ModuleNotFoundError as error:
        if error.name in {"torch", "torchvision"}:
            raise UsageError(f"this command needs {error.name}: pip install 'segserve[train]'") from error
        raise
    return models


def cmd_backbones(args: argparse.Namespace) -> int:
    """List the registry: name, family, parameter count, and the three taps."""
    _torch_side()
    from segserve.models.backbones import BACKBONES
    from segserve.models.summary import classifier_parameters

    entries = []
    for name, backbone in BACKBONES.items():
        taps = {f"stride{tap.stride}": {"module": tap.path, "channels": tap.channels} for tap in backbone.taps}
        entries.append(
            {"name": name, "family": backbone.family.name, "params": classifier_parameters(name), "taps": taps}
        )
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    header = ("backbone", "family", "parameters", "stride 8", "stride 16", "stride 32")
    rows = [
        (e["name"], e["family"], f"{e['params']:,}", *(f"{t['module']} ({t['channels']})" for t in e["taps"].values()))
        for e in entries
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        cells = (c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("  ".join(cells).rstrip())
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Per-layer parameter accounting of a classifier and its convolutionalized twin, or of an FCN."""
    _torch_side()
    from segserve.models.summary import classifier_summaries, fcn_summary, render, render_side_by_side

    try:
        if args.fcn:
            summaries = [fcn_summary(args.backbone, args.fcn, args.classes, args.input)]
        else:
            summaries = list(classifier_summaries(args.backbone, args.input))
    except ValueError as error:
        raise UsageError(str(error)) from error
    if args.json:
        print(json.dumps({"backbone": args.backbone, "models": [s.to_dict() for s in summaries]}, indent=2))
    elif len(summaries) == 1:
        print(render(summaries[0]))
    else:
        print(render_side_by_side(*summaries))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segserve",
        description="Fully convolutional semantic segmentation: convolutionalize, train, export, serve.",
    )
    parser.add_argument("--version", action="version", version=f"segserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backbones = commands.add_parser("backbones", help="list the registered backbones and their feature taps")
    backbones.add_argument("--json", action="store_true", help="print JSON instead of a table")
    backbones.set_defaults(run=cmd_backbones)

    summary = commands.add_parser(
        "summary",
        help="per-layer parameter counts and output shapes",
        description="Without --fcn: the torchvision classifier and its convolutionalized twin side by side "
        "(equal totals). With --fcn: the FCN on that backbone.",
    )
    summary.add_argument("backbone", help="registered backbone name (see `segserve backbones`)")
    summary.add_argument("--fcn", choices=["32s", "16s", "8s"], help="summarize FCN-32s/16s/8s instead")
    summary.add_argument("--classes", type=_positive_int, default=21, help="FCN classes (default: 21)")
    summary.add_argument(
        "--input", type=_input_size, default=(224, 224), metavar="HxW", help="input size (default: 224x224)"
    )
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(run=cmd_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"segserve: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `segserve summary vgg16 | head`
        return 0
