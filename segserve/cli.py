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
from pathlib import Path

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
    except ImportError as error:  # torch absent (ModuleNotFoundError) or broken (ImportError from inside it)
        missing = error.name if error.name in {"torch", "torchvision"} else None
        if missing is None and "torch" not in str(error):
            raise
        raise UsageError(f"this command needs PyTorch ({error}): pip install 'segserve[train]'") from error
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


def _pair_of(kind: type, separator: str):  # -> argparse type function
    def parse(text: str):
        parts = text.lower().split(separator)
        try:
            values = tuple(kind(p) for p in parts)
        except ValueError:
            values = ()
        if len(values) != 2 or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected two positive numbers like 1{separator}2, got {text!r}")
        return values

    return parse


def cmd_train(args: argparse.Namespace) -> int:
    """Train an FCN on a labelled folder; everything lands in --out."""
    _torch_side()
    from segserve.datasets import DatasetError
    from segserve.models.backbones import WeightsError
    from segserve.training.checkpoint import CheckpointError
    from segserve.training.loop import TrainConfig, TrainingError, train

    config = TrainConfig(
        data=args.data,
        out=args.out,
        layout=args.layout,
        backbone=args.backbone,
        variant=args.fcn,
        weights=args.weights,
        init=args.init,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        class_weights=args.class_weights,
        input_scale=args.input_scale,
        crop=args.crop,
        scale_range=args.scale_range,
        flip=not args.no_flip,
        jitter=args.jitter,
        freeze_upsampling=args.freeze_upsampling,
        seed=args.seed,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        val_every=args.val_every,
        progress=not args.no_progress,
        resume=args.resume,
    )
    try:
        train(config, argv=sys.argv[1:])
    except (DatasetError, WeightsError, CheckpointError, TrainingError, ValueError) as error:
        raise UsageError(str(error)) from error
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The FCN metrics of a checkpoint at full label resolution."""
    from segserve.datasets import DatasetError, open_collection
    from segserve.metrics import format_metrics

    try:
        collection = open_collection(args.data, args.split, args.layout)
        metrics, _ = _evaluate_model(args.model, collection, args.batch_size, not args.no_progress)
    except (DatasetError, ValueError) as error:
        raise UsageError(str(error)) from error
    print(f"{args.model} on {collection.root} ({collection.layout}, {args.split}: {len(collection.samples)} images)")
    print(format_metrics(metrics))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"model": str(args.model), "data": str(collection.root), "split": args.split, **metrics.to_dict()},
                indent=2,
            )
            + "\n"
        )
    return 0


def _evaluate_model(model: str, collection, batch_size: int, progress: bool):
    from segserve.training.evaluate import evaluate

    if model.endswith(".onnx"):  # the serving runtime: no torch needed
        from segserve.runtime import ModelFileError, load_model

        try:
            loaded = load_model(model)
        except ModelFileError as error:
            raise UsageError(str(error)) from error
        _check_classes(model, loaded.metadata.classes, collection)

        def run(images):
            return loaded.session.run(["labels"], {"images": images})[0]

        return evaluate(run, collection, batch_size=batch_size, progress=progress)

    _torch_side()
    from segserve.models.pipeline import pipeline_predictor
    from segserve.training.checkpoint import CheckpointError, load_checkpoint, pipeline_from_checkpoint

    try:
        checkpoint = load_checkpoint(model)
    except CheckpointError as error:
        raise UsageError(str(error)) from error
    _check_classes(model, tuple(checkpoint["model_config"]["classes"]), collection)
    predict = pipeline_predictor(pipeline_from_checkpoint(checkpoint))
    return evaluate(predict, collection, batch_size=batch_size, progress=progress)


def _check_classes(model: str, classes: tuple[str, ...], collection) -> None:
    if tuple(classes) != collection.classes.names:
        raise UsageError(f"{model} predicts classes {tuple(classes)}, but the data has {collection.classes.names}")


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint (or a convolutionalized classifier) to ONNX, optionally checking parity."""
    _torch_side()
    from segserve.export import (
        check_export,
        checkpoint_graph,
        classifier_graph,
        export_onnx,
        format_parity,
        half_precision,
    )
    from segserve.models.backbones import WeightsError
    from segserve.training.checkpoint import CheckpointError, load_checkpoint

    if (args.checkpoint is None) == (args.classifier is None):
        raise UsageError("give either a CHECKPOINT or --classifier BACKBONE")
    try:
        if args.classifier:
            graph, metadata = classifier_graph(args.classifier, args.weights)
        else:
            graph, metadata = checkpoint_graph(load_checkpoint(args.checkpoint))
    except (CheckpointError, WeightsError, ValueError) as error:
        raise UsageError(str(error)) from error

    reference = graph
    if args.fp16 and args.int8:
        raise UsageError("choose one of --fp16 and --int8")
    if args.fp16:
        graph, metadata = half_precision(graph, metadata)
    transform, parity_images = None, []
    if args.int8:
        if not args.calibrate:
            raise UsageError(
                "--int8 needs --calibrate DIR: images like those the model will see (e.g. its train split)"
            )
        from segserve.quantize import calibration_images, quantize_int8

        try:
            images = calibration_images(args.calibrate, args.calibration_count)
        except ValueError as error:
            raise UsageError(str(error)) from error
        print(f"calibrating int8 ranges on {len(images)} images from {args.calibrate}")
        from segserve.runtime.images import read_image

        parity_images = [read_image(p) for p in images[:: max(1, len(images) // 6)][:6]]

        def transform(path: Path) -> None:
            quantize_int8(path, path, images)

    precision = "int8" if args.int8 else metadata.precision
    # fp16 logits differ by ~1e-2 and int8 by more: only their labels are held to a bound (validation mIoU is
    # the real measure of an int8 model: segserve evaluate)
    limit = 0.95 if args.int8 else 0.99 if args.fp16 else 0.999
    lossy = args.fp16 or args.int8
    failures: list[str] = []

    def verify(path: Path) -> None:
        rows = check_export(reference, path, images=parity_images)
        print("onnx.checker (full_check): passed")
        print(f"parity, onnxruntime ({precision}) vs PyTorch (float32):")
        print(format_parity(rows))
        worst = max(r.max_abs_diff for r in rows)
        agreement = min(r.argmax_agreement for r in rows)
        if (not lossy and worst > args.tolerance) or agreement < limit:
            failures.append(
                f"parity check failed: max |logit diff| {worst:.2e}"
                + ("" if lossy else f" (limit {args.tolerance:g})")
                + f", argmax agreement {100 * agreement:.3f}% (limit {100 * limit:g}%)"
            )
            raise RuntimeError(failures[-1])

    try:
        path = export_onnx(graph, args.output, metadata, opset=args.opset, verify=verify if args.check else None,
                           slim=args.simplify, transform=transform)  # fmt: skip
    except RuntimeError as error:
        if failures:
            print(f"segserve: error: {failures[-1]}; {args.output} was not written", file=sys.stderr)
            return 1
        raise UsageError(f"export failed: {error}") from error
    size = path.stat().st_size / 1e6
    print(
        f"wrote {path} ({size:.1f} MB): {metadata.kind}, {metadata.backbone} {metadata.variant or ''}, "
        f"{len(metadata.classes)} classes, {precision}"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print an exported model's metadata (torch-free)."""
    from segserve.runtime import ModelFileError, load_model

    try:
        loaded = load_model(args.model)
    except (ModelFileError, ValueError) as error:
        raise UsageError(str(error)) from error
    card = json.loads(loaded.metadata.to_json())
    card["providers"] = loaded.providers
    print(json.dumps(card, indent=2))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Batch-segment files, folders and globs into OUT_DIR (torch-free)."""
    from segserve.batch import (
        BatchError,
        OutputPlan,
        collect_inputs,
        run_batch,
    )
    from segserve.runtime import ModelFileError, Segmenter
    from segserve.runtime.session import comma_list

    plan = OutputPlan(
        kinds=comma_list(args.outputs),
        classes=comma_list(args.classes) or None,
        overlay_format=args.overlay_format,
        alpha=args.alpha,
        heatmap_format=args.heatmap_format,
    )
    jobs, missing = collect_inputs(args.inputs)
    for source, reason in missing:
        print(f"segserve: {source}: {reason}", file=sys.stderr)
    try:
        segmenter = Segmenter(args.model, args.providers, tile=args.tile, overlap=args.overlap,
                              max_pixels=args.max_pixels, threads=args.threads)  # fmt: skip
    except (ModelFileError, ValueError) as error:
        raise UsageError(str(error)) from error
    if not jobs and not missing:
        raise UsageError("no input images given")
    progress = not args.no_progress and sys.stderr.isatty()

    def report_failure(source: str, reason: str) -> None:
        print(f"segserve: failed: {source}: {reason}", file=sys.stderr, flush=True)

    try:
        report = run_batch(segmenter, jobs, Path(args.output), plan, batch_size=args.batch_size,
                           workers=args.workers, resume=args.resume, progress=progress,
                           report_failure=report_failure if not progress else None)  # fmt: skip
    except BatchError as error:
        raise UsageError(str(error)) from error
    except KeyboardInterrupt:
        print("segserve: interrupted; finished outputs are complete, rerun with --resume", file=sys.stderr)
        return 130
    print(report.line(), file=sys.stderr)
    if report.failed or missing:
        print(f"failed ({len(report.failed) + len(missing)}):", file=sys.stderr)
        for source, reason in [*report.failed, *missing]:
            print(f"  {source}: {reason}", file=sys.stderr)
        return 1
    return 0


def _comma_list(text: str) -> list[str]:
    from segserve.runtime.session import comma_list

    return list(comma_list(text))


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

    train = commands.add_parser(
        "train",
        help="train an FCN on a labelled image folder",
        description="Train an FCN; RUN_DIR receives last.pt, best.pt, metrics.csv, "
        "curves.png, confusion.png and config.json.",
    )
    train.add_argument("--data", required=True, help="dataset folder")
    train.add_argument("--layout", choices=["camvid", "voc", "folder"], help="dataset layout (default: detected)")
    train.add_argument("--backbone", default="resnet18", help="registered backbone (default: resnet18)")
    train.add_argument("--fcn", default="8s", choices=["32s", "16s", "8s"], help="FCN variant (default: 8s)")
    train.add_argument("--weights", default="none", help="trunk initialisation: none, imagenet or a state_dict PATH")
    train.add_argument(
        "--init", metavar="CHECKPOINT", help="fine-tune: start from this checkpoint's weights (fresh optimizer)"
    )
    train.add_argument("--epochs", type=_positive_int, default=30)
    train.add_argument("--batch-size", type=_positive_int, default=8)
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    train.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    train.add_argument("--schedule", choices=["poly", "cosine"], default="poly")
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument(
        "--class-weights",
        choices=["none", "median-freq", "sqrt-median-freq"],
        default="none",
        help="median-freq: SegNet's median-frequency class balancing; sqrt-median-freq: its square root",
    )
    train.add_argument(
        "--input-scale",
        type=float,
        default=1.0,
        help="resolution factor the model works at, applied again at inference (e.g. 0.5)",
    )
    train.add_argument(
        "--crop",
        type=_input_size,
        metavar="HxW",
        help="training crop at network resolution (default: the scaled image, to a multiple of 32)",
    )
    train.add_argument(
        "--scale-range",
        type=_pair_of(float, ","),
        default=(0.75, 1.5),
        metavar="LOW,HIGH",
        help="random scale factor range around --input-scale (default: 0.75,1.5)",
    )
    train.add_argument("--jitter", type=float, default=0.2, help="colour jitter strength, 0 to disable")
    train.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    train.add_argument("--freeze-upsampling", action="store_true", help="keep the bilinear deconvolutions fixed")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: 0)")
    train.add_argument(
        "--checkpoint-every", type=int, default=0, metavar="K", help="also write last.pt every K optimizer steps"
    )
    train.add_argument("--val-every", type=_positive_int, default=1, metavar="N", help="validate every N epochs")
    train.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder")
    train.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from last.pt")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("evaluate", help="FCN metrics of a model on a labelled split")
    evaluate.add_argument("model", help="a checkpoint (.pt) or an exported model (.onnx)")
    evaluate.add_argument("--data", required=True, help="dataset folder")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--layout", choices=["camvid", "voc", "folder"], help="dataset layout (default: detected)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=4)
    evaluate.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=cmd_evaluate)

    export = commands.add_parser(
        "export",
        help="export a checkpoint or a convolutionalized classifier to ONNX",
        description="Write an .onnx file with dynamic batch/height/width and segserve "
        "metadata. Input: uint8 N x H x W x 3 RGB; outputs: logits, labels.",
    )
    export.add_argument("checkpoint", nargs="?", help="training checkpoint (.pt)")
    export.add_argument("--classifier", metavar="BACKBONE", help="export this torchvision classifier as a heatmap net")
    export.add_argument("--weights", default=None, help="with --classifier: none, imagenet or a state_dict PATH")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=_positive_int, default=18)
    export.add_argument(
        "--check",
        action="store_true",
        help="full onnx check and onnxruntime-vs-PyTorch parity; the file is kept only if it passes",
    )
    export.add_argument("--tolerance", type=float, default=1e-3, help="--check: max |logit diff| (default 1e-3)")
    export.add_argument(
        "--fp16",
        action="store_true",
        help="float16 weights and compute inside the network (half the file; for GPUs); --check then requires "
        ">= 99%% argmax agreement with the float32 model",
    )
    export.add_argument("--simplify", action="store_true", help="run onnxslim over the graph before saving")
    export.add_argument(
        "--int8", action="store_true", help="static int8 quantization (QDQ), calibrated on --calibrate images"
    )
    export.add_argument("--calibrate", metavar="DIR", help="--int8: folder of calibration images (e.g. train/)")
    export.add_argument("--calibration-count", type=_positive_int, default=48, help="--int8: images used (48)")
    export.set_defaults(run=cmd_export)

    segment = commands.add_parser(
        "segment",
        help="batch-segment images (files, folders, globs) into a folder",
        description="Segment every input with an exported model. Outputs mirror the inputs' relative paths under "
        "OUT_DIR: NAME.labels.png (palette PNG of class indices), NAME.overlay.png|jpg, NAME.heatmaps.npz (float16 "
        "per class) or NAME.heatmaps/ (8-bit PNGs), NAME.json (summary). Each file appears complete or not at all. "
        "Exit status 1 if any input failed (all are listed), 2 for a bad request.",
    )
    segment.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    segment.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    segment.add_argument("--model", help="an exported .onnx model (default: $SEGSERVE_MODEL or the shipped one)")
    segment.add_argument("--outputs", default="labels", help="comma list of labels,overlay,heatmaps,json")
    segment.add_argument("--classes", help="heatmaps for these classes only (comma list of names)")
    segment.add_argument("--heatmap-format", choices=["npz", "png"], default="npz")
    segment.add_argument("--overlay-format", choices=["png", "jpeg"], default="png")
    segment.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight (default 0.5)")
    segment.add_argument("--batch-size", type=_positive_int, default=1, help="same-size images per model call")
    segment.add_argument("--workers", type=_positive_int, default=2, help="decode and encode threads each")
    segment.add_argument("--threads", type=_positive_int, help="onnxruntime intra-op threads (default: all cores)")
    segment.add_argument("--tile", type=_positive_int, default=1024, help="tile side for large images (px)")
    segment.add_argument("--overlap", type=int, default=256, help="tile overlap (px, default 256)")
    segment.add_argument("--max-pixels", type=_positive_int, help="refuse larger images (default 150M pixels)")
    segment.add_argument("--providers", type=_comma_list,
                         help="comma list of onnxruntime providers (default: best available)")  # fmt: skip
    segment.add_argument("--resume", action="store_true", help="skip inputs whose outputs all exist")
    segment.add_argument("--no-progress", action="store_true", help="no progress bar")
    segment.set_defaults(run=cmd_segment)

    info = commands.add_parser("info", help="show an exported model's metadata and the providers it would run on")
    info.add_argument("model", help="an .onnx file written by segserve export")
    info.set_defaults(run=cmd_info)
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
