"""Static int8 quantization of an exported model (onnxruntime, QDQ format), calibrated on real images.

Weights are quantized per output channel to int8, activations per tensor to uint8 with ranges observed on
calibration images (the model's own training images, decoded exactly as the runtime decodes them). The graph keeps
its contract (uint8 images in, float32 logits and labels out) and its metadata, with ``precision`` set to
``int8``. On CPUs with VNNI, onnxruntime runs the quantized convolutions as integer kernels; benchmarks/RESULTS.md
has the speed and the validation mIoU against the float32 model.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from segserve.files import publish
from segserve.images import is_image_name, read_image
from segserve.modelcard import INPUT, read_stamp, stamp

#: Operators quantized; Resize, Softmax and ArgMax stay float (they are cheap, and the final resize of the scores
#: decides the labels at full resolution).
#: DepthToSpace (the sub-pixel deconvolutions' shuffle) then moves uint8 instead of float: a 1 ms saving at 512x512.
QUANTIZED_OPS = ("Conv", "ConvTranspose", "DepthToSpace", "Add", "Relu", "MaxPool", "GlobalAveragePool", "Mul",
                 "Concat")  # fmt: skip


def calibration_images(folder: str | os.PathLike[str], count: int = 48) -> list[Path]:
    """``count`` images spread evenly over a folder (sorted), for calibration."""
    files = sorted(p for p in Path(folder).rglob("*") if is_image_name(p))
    if not files:
        raise ValueError(f"{folder}: no images to calibrate on")
    step = max(1, len(files) // count)
    return files[::step][:count]


def quantize_int8(source: str | os.PathLike[str], target: str | os.PathLike[str], images: Sequence[Path]) -> Path:
    """Quantize the model at ``source`` into ``target`` (written atomically), calibrated on ``images``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feed: Iterator[Path] = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            path = next(self.feed, None)
            return None if path is None else {INPUT: read_image(path)[None]}

    original = onnx.load(str(source))
    found = read_stamp({p.key: p.value for p in original.metadata_props}, str(source))
    metadata = dataclasses.replace(found, precision="int8")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        prepared, quantized = Path(scratch) / "prepared.onnx", Path(scratch) / "quantized.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
        )  # fmt: skip
        model = onnx.load(str(quantized))
        model.ir_version = original.ir_version
        stamp(model, metadata)
        with publish(target) as temporary:
            onnx.save_model(model, str(temporary))
    return target
