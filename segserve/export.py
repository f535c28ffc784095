"""ONNX export: a trained checkpoint or a convolutionalized classifier -> one self-describing .onnx file.

The graph follows the contract in :mod:`segserve.modelcard` (uint8 NHWC RGB in; full-resolution logits and
labels out; normalisation and inference scale inside), with dynamic batch, height and width. The file is written
atomically, with an IR version onnxruntime loads (onnx 1.23 writes IR 14 by default, onnxruntime 1.31 reads at
most 13), and ``check_export`` measures its parity against PyTorch.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

import segserve
from segserve.datasets import voc_palette
from segserve.files import publish
from segserve.modelcard import INPUT, LABELS, LOGITS, ModelMetadata, label_dtype, stamp
from segserve.models.backbones import WeightsArg, WeightsError, get_backbone, load_classifier
from segserve.models.convolutionalize import convolutionalize
from segserve.models.pipeline import IMAGENET_MEAN, IMAGENET_STD, SegmentationPipeline
from segserve.models.upsample import subpixel_deconvolutions
from segserve.training.checkpoint import Checkpoint, CheckpointError

#: IR version written into every file: IR 10 (onnx 1.16) is read by onnxruntime >= 1.17.
IR_VERSION = 10
DEFAULT_OPSET = 18
PARITY_SIZES = ((1, 1), (7, 13), (224, 224), (333, 517))


class ExportGraph(nn.Module):
    """uint8 N x H x W x 3 -> (float32 logits N x C x h x w, labels N x h x w); h, w = H, W for FCNs."""

    def __init__(self, pipeline: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.label_dtype = getattr(torch, label_dtype(num_classes))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.pipeline(images.permute(0, 3, 1, 2))
        return logits, logits.argmax(1).to(self.label_dtype)


class HalfPrecision(nn.Module):
    """A network in float16 (weights and compute) between float32 neighbours: input cast down, scores cast up.

    Normalisation, the inference-scale resizing and the argmax stay float32, so the file takes float32 logits'
    place in the contract. Halves the weights; pays off on GPUs (tensor cores), not on CPUs without fp16 kernels.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.half()

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x.half()).float()


def half_precision(graph: ExportGraph, metadata: ModelMetadata) -> tuple[ExportGraph, ModelMetadata]:
    """A float16 copy of ``graph`` (the original stays float32: the parity reference)."""
    twin = copy.deepcopy(graph)
    twin.pipeline.fcn = HalfPrecision(twin.pipeline.fcn)
    return twin, dataclasses.replace(metadata, precision="float16")


def with_tta(graph: ExportGraph, metadata: ModelMetadata, mode: str) -> tuple[ExportGraph, ModelMetadata]:
    """``graph`` with test-time augmentation ``mode`` (segserve.models.tta) around its network; it is then also the
    parity reference, so the check compares like with like."""
    from segserve.models.tta import TTA_MODES, FlipAveraged

    if mode not in TTA_MODES:
        raise ExportError(f"unknown --tta {mode!r}; choose {', '.join(TTA_MODES)}")
    graph.pipeline.fcn = FlipAveraged(graph.pipeline.fcn)
    return graph, dataclasses.replace(metadata, tta=mode)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's constant folding and pattern fusion (measured: a few nodes fewer; README "Export")."""
    import onnxslim

    return onnxslim.slim(model)


def graph_stats(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(node count, file size in bytes) of an ONNX file."""
    return len(onnx.load(str(path), load_external_data=False).graph.node), Path(path).stat().st_size


def export_onnx(
    graph: ExportGraph,
    path: str | os.PathLike[str],
    metadata: ModelMetadata,
    opset: int = DEFAULT_OPSET,
    verify: Callable[[Path], None] | None = None,
    slim: bool = False,
    transform: Callable[[Path], None] | None = None,
) -> Path:
    """Export ``graph`` with dynamic batch/height/width and ``metadata`` to ``path``.

    The file appears at ``path`` only once complete and, with ``verify``, only if ``verify(temporary_path)``
    returns without raising: a failed check leaves no file behind. ``transform`` rewrites the saved file in place
    before the check (int8 quantization). Transposed convolutions are exported in their sub-pixel form
    (:class:`segserve.models.upsample.SubPixelDeconvolution`: the same function as one Conv and a DepthToSpace).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Deconvolutions in sub-pixel form (same function, quantizable); the caller's graph stays as trained.
    graph = subpixel_deconvolutions(copy.deepcopy(graph).eval())
    example = torch.zeros(2, 64, 96, 3, dtype=torch.uint8)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("height"), 2: torch.export.Dim("width")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, (example,), None, input_names=[INPUT], output_names=[LOGITS, LABELS],
            dynamic_shapes={INPUT: dims}, opset_version=opset, dynamo=True, verbose=False,
        )  # fmt: skip
    model = program.model_proto
    if slim:
        model = simplify(model)
    model.ir_version = IR_VERSION
    stamp(model, metadata)
    with publish(path) as temporary:
        onnx.save_model(model, str(temporary))
        if transform is not None:
            transform(temporary)
        if verify is not None:
            verify(temporary)
    return path


def checkpoint_graph(checkpoint: Checkpoint,
                     image_size: tuple[int, int] | None = None) -> tuple[ExportGraph, ModelMetadata]:  # fmt: skip
    """The export graph and metadata of a training checkpoint; ``image_size`` overrides the typical training
    frame size the checkpoint recorded (runs from before segserve recorded it have none)."""
    config = checkpoint.model_config
    recorded = tuple(config.image_size) if config.image_size else None
    strides = {"32s": 32, "16s": 16, "8s": 8}
    metadata = ModelMetadata(
        kind="segmentation", classes=tuple(config.classes), palette=tuple(tuple(c) for c in config.palette),
        mean=tuple(config.mean), std=tuple(config.std), input_scale=float(config.input_scale),
        backbone=config.backbone, variant=config.variant, output_stride=strides[config.variant],
        label_dtype=label_dtype(len(config.classes)), segserve_version=segserve.__version__,
        training_data=config.training_data, validation=config.validation, image_size=image_size or recorded,
    )  # fmt: skip
    return ExportGraph(checkpoint.pipeline(), len(config.classes)), metadata


def classifier_graph(backbone: str, weights: WeightsArg = None) -> tuple[ExportGraph, ModelMetadata]:
    """A convolutionalized ImageNet classifier as a heatmap model.

    Its outputs stay at the heatmap's own coarse resolution (1000 full-resolution class maps of a 1024x768
    image would be 3 GB); ``outputs_at_input_size=False`` tells the runtime to resize what it needs.
    """
    spec = get_backbone(backbone)
    twin = convolutionalize(load_classifier(backbone, weights), copy_weights=False)
    pipeline = SegmentationPipeline(twin, IMAGENET_MEAN, IMAGENET_STD, 1.0)
    categories = tuple(spec.imagenet_weights().meta["categories"])
    metadata = ModelMetadata(
        kind="classifier-heatmap", classes=categories, palette=voc_palette(len(categories)), mean=IMAGENET_MEAN,
        std=IMAGENET_STD, input_scale=1.0, backbone=backbone, variant=None, output_stride=32,
        label_dtype=label_dtype(len(categories)),
        segserve_version=segserve.__version__, outputs_at_input_size=False,
        training_data="ImageNet (torchvision DEFAULT weights)" if weights == "imagenet" else None,
        notes={"weights": str(weights) if weights is not None else "random",
               "heatmap": "convolutionalized classifier scores, one position per 32 input pixels"},
    )  # fmt: skip
    return ExportGraph(pipeline, len(categories)), metadata


@dataclass
class ParityRow:
    batch: int
    height: int
    width: int
    max_abs_diff: float
    argmax_agreement: float


def check_export(graph: ExportGraph, path: str | os.PathLike[str],
                 sizes: tuple[tuple[int, int], ...] = PARITY_SIZES, batches: tuple[int, ...] = (1, 3),
                 seed: int = 0, images: Sequence[np.ndarray] = ()) -> list[ParityRow]:  # fmt: skip
    """onnx's full checker, then onnxruntime (CPU) against PyTorch on random images of several sizes (or on
    ``images``, H x W x 3 uint8 each, one at a time: quantized models are judged on real pictures)."""
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = np.random.default_rng(seed)
    batches_to_run = [image[None] for image in images] or [
        generator.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)
        for batch in batches
        for height, width in sizes
    ]
    rows = []
    graph = graph.eval()
    for batch in batches_to_run:
        logits, labels = session.run([LOGITS, LABELS], {INPUT: batch})
        with torch.no_grad():
            reference = graph.pipeline(torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy()
        rows.append(ParityRow(batch.shape[0], batch.shape[1], batch.shape[2], float(np.abs(logits - reference).max()),
                              float((labels == reference.argmax(1)).mean())))  # fmt: skip
    return rows


def format_parity(rows: list[ParityRow]) -> str:
    lines = ["batch  size        max |logit diff|  argmax agreement"]
    for r in rows:
        lines.append(
            f"{r.batch:>5}  {f'{r.height}x{r.width}':<10}  {r.max_abs_diff:>16.2e}  {100 * r.argmax_agreement:>15.3f}%"
        )
    return "\n".join(lines)


class ExportError(ValueError):
    """An export request that cannot go ahead as asked (the message says why)."""


class ParityError(RuntimeError):
    """The exported file failed its parity check and was not written."""


@dataclass(frozen=True)
class ExportRequest:
    """What ``segserve export`` asks for: one source (checkpoint or classifier), the precision, the checks."""

    output: str
    checkpoint: str | None = None
    classifier: str | None = None
    weights: str | None = None
    opset: int = DEFAULT_OPSET
    check: bool = False
    tolerance: float = 1e-3
    fp16: bool = False
    int8: bool = False
    calibrate: str | None = None
    calibration_count: int = 48
    simplify: bool = False
    image_size: tuple[int, int] | None = None
    tta: str | None = None

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "float16" if self.fp16 else "float32"

    @property
    def agreement_limit(self) -> float:
        """Lowest argmax agreement with PyTorch that passes. fp16 logits differ by ~1e-2 and int8 by more: only
        their labels are held to a bound (validation mIoU is the real measure of an int8 model)."""
        return 0.95 if self.int8 else 0.99 if self.fp16 else 0.999


def export_model(request: ExportRequest, say: Callable[[str], None] = print) -> tuple[Path, ModelMetadata]:
    """Export as ``request`` says; with ``check`` the file is kept only if it passes (else ParityError)."""
    if (request.checkpoint is None) == (request.classifier is None):
        raise ExportError("give either a CHECKPOINT or --classifier BACKBONE")
    if request.fp16 and request.int8:
        raise ExportError("choose one of --fp16 and --int8")
    if request.int8 and not request.calibrate:
        raise ExportError("--int8 needs --calibrate DIR: images like those the model will see (e.g. its train split)")
    try:
        if request.classifier:
            reference, metadata = classifier_graph(request.classifier, request.weights)
        else:
            reference, metadata = checkpoint_graph(Checkpoint.load(request.checkpoint), request.image_size)
    except (CheckpointError, WeightsError, ValueError) as error:
        raise ExportError(str(error)) from error
    if request.tta and request.classifier:
        raise ExportError("--tta is for segmentation checkpoints (a classifier's coarse heatmap grid is not mirror-"
                          "symmetric)")  # fmt: skip
    if request.tta:
        reference, metadata = with_tta(reference, metadata, request.tta)
    graph, metadata = half_precision(reference, metadata) if request.fp16 else (reference, metadata)
    transform, parity_images = _int8_transform(request, say) if request.int8 else (None, [])

    def verify(path: Path) -> None:
        rows = check_export(reference, path, images=parity_images)
        say("onnx.checker (full_check): passed")
        say(f"parity, onnxruntime ({request.precision}) vs PyTorch (float32):\n{format_parity(rows)}")
        worst = max(r.max_abs_diff for r in rows)
        agreement = min(r.argmax_agreement for r in rows)
        lossy = request.fp16 or request.int8
        if (not lossy and worst > request.tolerance) or agreement < request.agreement_limit:
            raise ParityError(
                f"parity check failed: max |logit diff| {worst:.2e}"
                + ("" if lossy else f" (limit {request.tolerance:g})")
                + f", argmax agreement {100 * agreement:.3f}% (limit {100 * request.agreement_limit:g}%)"
            )

    path = export_onnx(graph, request.output, metadata, opset=request.opset, verify=verify if request.check else None,
                       slim=request.simplify, transform=transform)  # fmt: skip
    return path, metadata


def _int8_transform(request: ExportRequest, say: Callable[[str], None]) -> tuple[Callable[[Path], None], list]:
    """The in-place quantization of a saved file, and the real images its parity is judged on."""
    from segserve.images import read_image
    from segserve.quantize import calibration_images, quantize_int8

    try:
        images = calibration_images(request.calibrate, request.calibration_count)
    except ValueError as error:
        raise ExportError(str(error)) from error
    say(f"calibrating int8 ranges on {len(images)} images from {request.calibrate}")
    parity_images = [read_image(p) for p in images[:: max(1, len(images) // 6)][:6]]

    def transform(path: Path) -> None:
        quantize_int8(path, path, images)

    return transform, parity_images
