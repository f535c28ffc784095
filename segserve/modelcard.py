"""The metadata contract between an exported .onnx file and everything that serves it (no torch, no onnx).

``segserve export`` writes one ``metadata_props`` entry, key :data:`METADATA_KEY`, holding this JSON object;
onnxruntime exposes it as ``session.get_modelmeta().custom_metadata_map``. Everything the serving side needs to
turn the graph's outputs into answers is here: class names and colours, the input contract, what the graph
already does (normalisation, inference scale) and the model's measured figures.

Graph contract (format ``segserve-onnx/1``):

* input ``images``: uint8, N x H x W x 3, RGB, any N, H, W >= 1 (the layout numpy and Pillow give);
* output ``logits``: float32, N x C x H x W, the class scores at the input's full resolution;
* output ``labels``: N x H x W class indices (uint8 up to 256 classes, else uint16), the argmax of ``logits``.

A convolutionalized classifier (``kind="classifier-heatmap"``) keeps both outputs at its heatmap's coarse
resolution, one position per 32 pixels (``outputs_at_input_size=False``); the runtime resizes what it uses.

Normalisation and the inference scale (resize by ``input_scale`` before the network, back to H x W after) run
inside the graph, so a runtime feeds decoded pixels and reads answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import segserve

FORMAT = "segserve-onnx/1"
METADATA_KEY = "segserve"
INPUT = "images"  # the graph's input
LOGITS = "logits"  # its outputs
LABELS = "labels"
OUTPUTS = (LOGITS, LABELS)


def label_dtype(classes: int) -> str:
    """The labels output's element type: uint8 up to 256 classes, else uint16."""
    return "uint8" if classes <= 256 else "uint16"


class ModelFileError(ValueError):
    """A model file that cannot be served: the message names the file and the problem in one line."""


@dataclass(frozen=True)
class ModelMetadata:
    """What an exported model is and how to call it."""

    kind: str  # "segmentation" (an FCN) or "classifier-heatmap" (a convolutionalized ImageNet classifier)
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_scale: float
    backbone: str
    variant: str | None
    output_stride: int
    label_dtype: str
    segserve_version: str
    input_name: str = INPUT
    input_layout: str = "NHWC uint8 RGB"
    outputs: tuple[str, ...] = OUTPUTS
    outputs_at_input_size: bool = True  # False: coarse heatmaps (a convolutionalized classifier)
    precision: str = "float32"  # "float16": the network's weights and compute (input, resizing, outputs stay float32)
    training_data: str | None = None
    # (H, W) of a typical training frame, before input_scale: the scale the model learned objects at. The runtime
    # resamples inputs to its area (segserve.runtime.resample); None: inputs run at their own size.
    image_size: tuple[int, int] | None = None
    tta: str | None = None  # test-time augmentation built into the graph ("flip": image and mirror averaged)
    validation: dict[str, Any] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def __post_init__(self) -> None:
        if len(self.palette) != len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.palette)} palette colours")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> ModelMetadata:
        """Parse and check the metadata JSON; ``source`` names the file in errors."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelFileError(f"{source}: segserve metadata is not valid JSON ({error})") from None
        found = raw.get("format") if isinstance(raw, dict) else None
        if found != FORMAT:
            raise ModelFileError(
                f"{source}: segserve metadata format {found!r} is not one this segserve reads ({FORMAT!r}); "
                "re-export the model with this version or upgrade segserve"
            )
        try:
            return cls(
                **{
                    **raw,
                    "classes": tuple(raw["classes"]),
                    "palette": tuple(tuple(int(v) for v in c) for c in raw["palette"]),
                    "mean": tuple(raw["mean"]),
                    "std": tuple(raw["std"]),
                    "outputs": tuple(raw.get("outputs", OUTPUTS)),
                    "image_size": _size(raw.get("image_size")),
                }
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{source}: segserve metadata is incomplete or malformed ({error})") from None


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    height, width = (int(v) for v in value)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {value}")
    return height, width


def stamp(model: Any, metadata: ModelMetadata) -> None:
    """Write ``metadata`` into an ``onnx.ModelProto`` (replacing any earlier entry) and name segserve its producer."""
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata.to_json()
    model.producer_name, model.producer_version = "segserve", segserve.__version__


def read_stamp(props: Mapping[str, str], source: str) -> ModelMetadata:
    """The metadata among a model's ``metadata_props`` (as a mapping: onnxruntime's ``custom_metadata_map``)."""
    if METADATA_KEY not in props:
        raise ModelFileError(f"{source}: no segserve metadata (export the model with `segserve export`)")
    return ModelMetadata.from_json(props[METADATA_KEY], source=source)
