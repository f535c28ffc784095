"""The ``segserve`` command: a thin face that parses, validates and calls the library.

Subcommands import what they need when they run, so ``segserve --help`` and the serving commands never
import torch; the training-side commands say how to install it when it is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from segserve import __version__
from segserve.options import add_options, from_options, input_size, positive_int


class UsageError(Exception):
    """A problem with what the user asked for: printed as ``segserve: error: ...``, exit status 2."""


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


def cmd_train(args: argparse.Namespace) -> int:
    """Train an FCN on a labelled folder; everything lands in --out."""
    _torch_side()
    from segserve.datasets import DatasetError
    from segserve.models.backbones import WeightsError
    from segserve.training.checkpoint import CheckpointError
    from segserve.training.config import TrainConfig
    from segserve.training.loop import TrainingError, train

    try:
        train(from_options(TrainConfig, args), argv=sys.argv[1:])
    except (DatasetError, WeightsError, CheckpointError, TrainingError, ValueError) as error:
        raise UsageError(str(error)) from error
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The FCN metrics of a checkpoint at full label resolution."""
    import numpy as np

    from segserve.datasets import DatasetError, open_collection
    from segserve.metrics import format_metrics, top_confusions

    try:
        collection = open_collection(args.data, args.split, args.layout)
        if args.frames:
            samples = [sample for sample in collection.samples if sample.image.name.startswith(args.frames)]
            if not samples:
                raise ValueError(f"--frames {args.frames!r} matches none of the {args.split} frames")
            collection = dataclasses.replace(collection, split=f"{args.split}[{args.frames}]", samples=samples)
        progress = not args.no_progress
        metrics, confusion = _evaluate_model(args.model, collection, args.batch_size, progress, args.scale)
    except (DatasetError, ValueError) as error:
        raise UsageError(str(error)) from error
    print(
        f"{args.model} on {collection.root} ({collection.layout}, {collection.split}: {len(collection.samples)} images)"
    )
    print(format_metrics(metrics))
    mistakes = top_confusions(confusion, list(metrics.per_class_iou))
    print("most confused (share of the true class's pixels):")
    for m in mistakes:
        print(f"  {m['true']:>12} -> {m['predicted']:<12} {100 * m['share']:5.1f}%")
    if args.json:
        record = {"model": str(args.model), "data": str(collection.root), "split": collection.split,
                  **metrics.to_dict(), "confusion": np.asarray(confusion).tolist(),
                  "top_confusions": mistakes}  # fmt: skip
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _evaluate_model(model: str, collection, batch_size: int, progress: bool, scale: str = "model"):
    from segserve.training.evaluate import evaluate

    if model.endswith(".onnx"):  # the serving runtime, as served: no torch needed
        import numpy as np

        from segserve.runtime import ModelFileError, Segmenter, choose_providers
        from segserve.runtime.engines import EngineError

        try:  # explicit providers: onnxruntime on this very file (never its int8 twin), at the chosen scale
            segmenter = Segmenter(model, choose_providers(None), scale=scale)
        except (ModelFileError, EngineError) as error:
            raise UsageError(str(error)) from error
        _check_classes(model, segmenter.metadata.classes, collection)

        def run(images):
            return np.stack([r.labels for r in segmenter.segment_many(list(images))])

        return evaluate(run, collection, batch_size=batch_size, progress=progress)

    _torch_side()
    from segserve.models.pipeline import pipeline_predictor
    from segserve.training.checkpoint import Checkpoint, CheckpointError

    try:
        checkpoint = Checkpoint.load(model)
    except CheckpointError as error:
        raise UsageError(str(error)) from error
    _check_classes(model, tuple(checkpoint.model_config.classes), collection)
    predict = pipeline_predictor(checkpoint.pipeline())
    return evaluate(predict, collection, batch_size=batch_size, progress=progress)


def _check_classes(model: str, classes: tuple[str, ...], collection) -> None:
    if tuple(classes) != collection.classes.names:
        raise UsageError(f"{model} predicts classes {tuple(classes)}, but the data has {collection.classes.names}")


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint (or a convolutionalized classifier) to ONNX, optionally checking parity."""
    _torch_side()
    from segserve.export import ExportError, ExportRequest, ParityError, export_model

    fields = ExportRequest.__dataclass_fields__
    request = ExportRequest(**{name: getattr(args, name) for name in fields if hasattr(args, name)})
    try:
        path, metadata = export_model(request)
    except ExportError as error:
        raise UsageError(str(error)) from error
    except ParityError as error:
        print(f"segserve: error: {error}; {args.output} was not written", file=sys.stderr)
        return 1
    except RuntimeError as error:
        raise UsageError(f"export failed: {error}") from error
    size = path.stat().st_size / 1e6
    print(
        f"wrote {path} ({size:.1f} MB): {metadata.kind}, {metadata.backbone} {metadata.variant or ''}, "
        f"{len(metadata.classes)} classes, {request.precision}"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print an exported model's metadata, the engine it would run on and why, and the effective settings."""
    from segserve.runtime import ModelFileError, Segmenter
    from segserve.settings import Settings

    try:
        settings = Settings.from_env()
        segmenter = Segmenter(args.model, settings=settings)
    except (ModelFileError, ValueError) as error:
        raise UsageError(str(error)) from error
    card = json.loads(segmenter.metadata.to_json())
    card["file"] = str(segmenter.model_path)
    card["providers"] = segmenter.providers
    card["engine"] = segmenter.describe_engine()
    card["settings"] = settings.described()
    print(json.dumps(card, indent=2))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Batch-segment files, folders, globs or a list of paths/URIs into OUT_DIR (torch-free; Ray only with
    ``--engine ray``)."""
    from segserve.batch import BatchError, run_batch
    from segserve.runtime import ModelFileError, Segmenter
    from segserve.runtime.outputs import OutputError, OutputPlan
    from segserve.runtime.repository import ModelRepository, UnknownModel
    from segserve.settings import Settings, comma_list

    engine, runtime = _execution_engine(args)
    classes = comma_list(args.classes) if args.classes else None
    plan = OutputPlan(kinds=comma_list(args.outputs), classes=classes, overlay_format=args.overlay_format,
                      alpha=args.alpha, heatmap_format=args.heatmap_format, tolerance=args.tolerance,
                      min_area=args.min_area, summary_regions=args.summary_regions)  # fmt: skip
    if not args.inputs and not args.from_list:
        raise UsageError("no inputs: give image files, folders or globs, or --from-list FILE")
    if engine == "local" and ("://" in args.output or any("://" in text for text in args.inputs)):
        raise UsageError("URIs (s3://, gs://, ...) need --engine ray; the local engine reads and writes local paths")
    options = {"providers": list(comma_list(args.providers)) or None, "tile": args.tile, "overlap": args.overlap,
               "max_pixels": args.max_pixels, "threads": args.threads, "engine": runtime,
               "precision": args.precision, "scale": args.scale}  # fmt: skip

    repository = args.models or Settings.from_env().models
    try:
        if repository is not None:  # --model names a model of the repository: NAME or NAME@VERSION
            models = ModelRepository(Path(repository), lambda entry: Segmenter(entry.path, **options))
            entry, segmenter = models.get(args.model)
            model_path: str | None = str(entry.path)
            print(f"segserve: model {entry.label} ({entry.path})", file=sys.stderr)
        else:
            segmenter = Segmenter(args.model, **options)
            model_path = str(segmenter.model_path)
        checked = plan.checked(segmenter.metadata)
    except (ModelFileError, UnknownModel, OutputError, ValueError) as error:
        raise UsageError(str(error)) from error
    progress = not args.no_progress and sys.stderr.isatty()

    def report_failure(source: str, reason: str) -> None:
        print(f"segserve: failed: {source}: {reason}", file=sys.stderr, flush=True)

    try:
        if engine == "ray":
            from segserve.distributed import RayOptions, run_ray_batch

            listed, missing = _listed_inputs(args, uris=True)
            ray_options = RayOptions(
                args.address,
                args.actors,
                args.gpus_per_actor or 0.0,
                batch_size=args.batch_size or RayOptions.batch_size,
            )
            report = run_ray_batch(model_path, options, listed, args.output, checked, ray_options,
                                   max_pixels=segmenter.max_pixels, resume=args.resume, progress=progress,
                                   report_failure=report_failure if not progress else None)  # fmt: skip
        else:
            from segserve.batch import Job

            listed, missing = _listed_inputs(args, uris=False)
            jobs = [Job(Path(source), stem) for source, stem in listed]
            report = run_batch(segmenter, jobs, Path(args.output), plan, batch_size=args.batch_size or 1,
                               workers=args.workers, resume=args.resume, progress=progress,
                               report_failure=report_failure if not progress else None)  # fmt: skip
    except BatchError as error:
        raise UsageError(str(error)) from error
    except KeyboardInterrupt:
        print("segserve: interrupted; finished outputs are complete, rerun with --resume", file=sys.stderr)
        return 130
    except RuntimeError as error:  # RayRunError: the cluster gave up; what finished is complete
        print(f"segserve: {error}; finished outputs are complete, rerun with --resume", file=sys.stderr)
        return 1
    print(report.line(), file=sys.stderr)
    if report.failed or missing:
        print(f"failed ({len(report.failed) + len(missing)}):", file=sys.stderr)
        for source, reason in [*report.failed, *missing]:
            print(f"  {source}: {reason}", file=sys.stderr)
        return 1
    return 0


def _execution_engine(args: argparse.Namespace) -> tuple[str, str | None]:
    """(local or ray, the inference runtime). ``--engine onnxruntime|openvino|auto`` predates ``--runtime``:
    still understood, as the runtime on the local engine."""
    if args.engine in ("auto", "onnxruntime", "openvino"):
        if args.runtime is not None and args.runtime != args.engine:
            raise UsageError(f"--engine {args.engine} (the old spelling of --runtime) contradicts --runtime "
                             f"{args.runtime}")  # fmt: skip
        return "local", args.engine
    ray_only = [flag for flag, value in (("--address", args.address), ("--actors", args.actors),
                                         ("--gpus-per-actor", args.gpus_per_actor)) if value is not None]  # fmt: skip
    if args.engine != "ray" and ray_only:
        raise UsageError(f"{', '.join(ray_only)} only apply with --engine ray")
    return args.engine or "local", args.runtime


def _listed_inputs(args: argparse.Namespace, uris: bool) -> tuple[list[tuple[str, PurePosixPath]], list]:
    """(source, stem) pairs from the command line's files, folders and globs and from ``--from-list``, plus inputs
    that matched nothing. ``uris``: whether the engine reads ``s3://``-style entries (the Ray engine's does)."""
    from segserve.batch import BatchError, collect_inputs
    from segserve.distributed import is_uri, jobs_from_list  # torch- and Ray-free

    jobs, missing = collect_inputs(args.inputs)
    listed = [(str(job.source), job.stem) for job in jobs]
    if args.from_list:
        entries = jobs_from_list(Path(args.from_list))
        found = next((source for source, _ in entries if is_uri(source)), None)
        if found is not None and not uris:
            raise BatchError(f"--from-list holds URIs ({found}, ...): they need --engine ray")
        listed += entries
    return listed, missing


Commands = "argparse._SubParsersAction[argparse.ArgumentParser]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segserve",
        description="Fully convolutional semantic segmentation: convolutionalize, train, export, serve.",
    )
    parser.add_argument("--version", action="version", version=f"segserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_backbones, _add_summary, _add_train, _add_evaluate, _add_export, _add_segment, _add_info):
        add(commands)
    return parser


def _command(commands: Commands, run: Callable[[argparse.Namespace], int], help: str,
             description: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """The subcommand ``run`` answers to, named after it (``cmd_train`` -> ``train``)."""
    name = run.__name__.removeprefix("cmd_")
    parser = commands.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")
    parser.set_defaults(run=run)
    return parser


def _add_backbones(commands: Commands) -> None:
    backbones = _command(commands, cmd_backbones, "list the registered backbones and their feature taps")
    backbones.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_summary(commands: Commands) -> None:
    about = (
        "Without --fcn: the classifier and its convolutionalized twin side by side (equal totals). With --fcn: the FCN."
    )
    summary = _command(commands, cmd_summary, "per-layer parameter counts and output shapes", about)
    summary.add_argument("backbone", help="registered backbone name (see `segserve backbones`)")
    summary.add_argument("--fcn", choices=["32s", "16s", "8s"], help="summarize FCN-32s/16s/8s instead")
    summary.add_argument("--classes", type=positive_int, default=21, help="FCN classes (default: 21)")
    summary.add_argument("--input", type=input_size, default=(224, 224), metavar="HxW",
                         help="input size (default: 224x224)")  # fmt: skip
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_train(commands: Commands) -> None:
    from segserve.training.config import TrainConfig

    about = "Train an FCN; RUN_DIR receives last.pt, best.pt, metrics.csv, curves.png, confusion.png, config.json."
    add_options(_command(commands, cmd_train, "train an FCN on a labelled image folder", about), TrainConfig)


def _add_evaluate(commands: Commands) -> None:
    evaluate = _command(commands, cmd_evaluate, "FCN metrics of a model on a labelled split")
    evaluate.add_argument("model", help="a checkpoint (.pt) or an exported model (.onnx)")
    evaluate.add_argument("--data", required=True, help="dataset folder")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--frames", metavar="PREFIX",
                          help="only the frames whose names start with PREFIX: a drive held out by "
                               "`train --holdout`, e.g. --split train --frames 0006R0")  # fmt: skip
    evaluate.add_argument("--layout", choices=["camvid", "voc", "folder"], help="dataset layout (default: detected)")
    evaluate.add_argument("--batch-size", type=positive_int, default=4)
    evaluate.add_argument("--scale", choices=["model", "native"], default="model",
                          help=".onnx: model (default): as served, each image resampled to the model's "
                               "training scale; native: the network on the image as it is")  # fmt: skip
    evaluate.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    evaluate.add_argument("--no-progress", action="store_true")


def _add_export(commands: Commands) -> None:
    about = "Write an .onnx file with dynamic batch/height/width and segserve metadata. Input: uint8 N x H x W x 3 RGB."
    export = _command(commands, cmd_export, "export a checkpoint or a convolutionalized classifier to ONNX", about)
    export.add_argument("checkpoint", nargs="?", help="training checkpoint (.pt)")
    export.add_argument("--classifier", metavar="BACKBONE", help="export this torchvision classifier as a heatmap net")
    export.add_argument("--weights", default=None, help="with --classifier: none, imagenet or a state_dict PATH")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=positive_int, default=18)
    export.add_argument(
        "--check",
        action="store_true",
        help="full onnx check and onnxruntime-vs-PyTorch parity; the file is kept only if it passes",
    )
    export.add_argument("--tolerance", type=float, default=1e-3, help="--check: max |logit diff| (default 1e-3)")
    export.add_argument(
        "--fp16",
        action="store_true",
        help="float16 weights and compute inside the network (half the file; for GPUs); --check then "
        "requires >= 99%% argmax agreement with the float32 model",
    )
    export.add_argument("--simplify", action="store_true", help="run onnxslim over the graph before saving")
    export.add_argument(
        "--int8", action="store_true", help="static int8 quantization (QDQ), calibrated on --calibrate images"
    )
    export.add_argument("--calibrate", metavar="DIR", help="--int8: folder of calibration images (e.g. train/)")
    export.add_argument("--calibration-count", type=positive_int, default=48, help="--int8: images used (48)")
    export.add_argument("--tta", choices=["flip"],
                        help="test-time augmentation in the graph: flip averages the scores of the image and its "
                        "mirror (two network passes per image)")  # fmt: skip
    export.add_argument("--image-size", type=input_size, metavar="HxW",
                        help="typical training frame size, recorded for scale-aware inference (default: what the "
                        "checkpoint recorded)")  # fmt: skip


def _add_segment(commands: Commands) -> None:
    about = (
        "Segment every input with an exported model. Outputs mirror the inputs' relative paths under OUT_DIR: "
        "NAME.labels.png (palette PNG of class indices), NAME.overlay.png|jpg, NAME.heatmaps.npz (float16 per class) "
        "or NAME.heatmaps/ (8-bit PNGs), NAME.json (summary), NAME.rle.json (COCO RLE per class), NAME.polygons.json, "
        "NAME.geojson (regions as vectors). Each file appears complete or not at all. "
        "Exit status 1 if any input failed (all are listed), 2 for a bad request."
    )
    segment = _command(commands, cmd_segment, "batch-segment images (files, folders, globs) into a folder", about)
    add = segment.add_argument
    add("inputs", nargs="*", metavar="INPUT", help="image files, folders (recursive) or globs")
    add("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    add("--model", help="an exported .onnx model (default: $SEGSERVE_MODEL or the shipped one); with --models, "
        "a model of the repository: NAME or NAME@VERSION")  # fmt: skip
    add("--models", metavar="DIR", help="a model repository folder (default: $SEGSERVE_MODELS; README: Several models)")
    add("--outputs", default="labels", help="comma list of labels,overlay,heatmaps,json,rle,polygons,geojson")
    add("--classes", help="heatmaps for these classes only (comma list of names)")
    add("--heatmap-format", choices=["npz", "png"], default="npz")
    add("--overlay-format", choices=["png", "jpeg", "jpg"], default="png")
    add("--alpha", type=float, default=0.5, help="overlay colour weight (default 0.5)")
    add("--tolerance", type=float, default=1.0, help="polygon simplification in pixels (default 1; 0: exact edges)")
    add("--min-area", type=int, default=0, help="drop polygon/GeoJSON regions under this many pixels")
    add("--summary-regions", action="store_true", help="the json summary lists each class's regions and boxes")
    add("--batch-size", type=positive_int, help="images per model call (same-size ones share it; default 1); "
        "with --engine ray the images per read task and actor call (default 16; lower it for huge images)")  # fmt: skip
    add("--workers", type=positive_int, default=2, help="decode and encode threads each (local engine)")
    add("--threads", type=positive_int, help="onnxruntime intra-op threads (default: $SEGSERVE_THREADS or all cores)")
    add("--tile", type=positive_int, default=1024, help="tile side for large images (px)")
    add("--overlap", type=int, default=256, help="tile overlap (px, default 256)")
    add("--max-pixels", type=positive_int, help="refuse larger images (default: $SEGSERVE_MAX_PIXELS)")
    add("--providers", help="comma list of onnxruntime providers: onnxruntime on the model as given")
    add("--engine", choices=["local", "ray", "auto", "onnxruntime", "openvino"],
        help="where the batch runs: local (this process, default) or ray (a Ray cluster: README, Scaling out); "
        "auto, onnxruntime and openvino are the old spelling of --runtime")  # fmt: skip
    add("--runtime", choices=["auto", "onnxruntime", "openvino"],
        help="inference runtime (default: $SEGSERVE_ENGINE, auto: the fastest measured here)")  # fmt: skip
    add("--precision", choices=["auto", "fp32", "int8", "bf16", "fp16"],
        help="inference precision (default: $SEGSERVE_PRECISION, auto: the fastest that keeps the labels)")  # fmt: skip
    add("--scale", choices=["model", "native"],
        help="model: resample each image to the model's training scale, answer at full size; native: run at its "
        "own size, tiled when large (default: $SEGSERVE_SCALE, model)")  # fmt: skip
    add("--from-list", metavar="FILE", help="also segment the paths (or, with --engine ray, URIs such as "
        "s3://bucket/x.jpg) listed in FILE, one per line; nothing is listed or opened on the driver")  # fmt: skip
    ray = segment.add_argument_group("Ray engine (pip install 'segserve[ray]')")
    ray.add_argument("--address", help="the cluster: auto (the one `ray start` made on this machine) or "
                     "ray://HOST:10001 (default: a Ray instance started for this run on this machine)")  # fmt: skip
    ray.add_argument("--actors", type=positive_int, help="model-holding actors (default: one per cluster CPU beyond "
                     "one, or one per GPU's worth with --gpus-per-actor)")  # fmt: skip
    ray.add_argument("--gpus-per-actor", type=float, help="GPUs each actor reserves (e.g. 1, or 0.5 to share)")
    add("--resume", action="store_true", help="skip inputs whose outputs all exist")
    add("--no-progress", action="store_true", help="no progress bar")


def _add_info(commands: Commands) -> None:
    info = _command(commands, cmd_info, "an exported model's metadata, the providers it would run on, and the settings")
    info.add_argument("model", nargs="?", help="an .onnx file written by segserve export (default: the default model)")


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
