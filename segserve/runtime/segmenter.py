"""The Segmenter: any image in, per-pixel labels (and on request class probabilities) out. No torch.

Large images are segmented in overlapping tiles whose logits are blended with linear ramps over the overlap, one
band of tile rows at a time: the accumulator holds ``classes x tile x width`` floats, so peak memory grows with
the image's width and the tile size, not with its area (labels, one byte per pixel, are the only full-size
output unless probabilities are requested).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from segserve.modelcard import ModelFileError, ModelMetadata
from segserve.runtime.encode import softmax
from segserve.runtime.images import ImageSource, read_image
from segserve.runtime.session import load_model

MODEL_ENV = "SEGSERVE_MODEL"
MODELS_DIR = Path(__file__).resolve().parent.parent.parent / "models"


def default_model_path() -> Path:
    """``SEGSERVE_MODEL`` if set, else the file named by ``models/default.json`` in the source tree."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    pointer = MODELS_DIR / "default.json"
    if not pointer.is_file():
        raise ModelFileError(f"no model given, {MODEL_ENV} is not set and {pointer} does not exist")
    return MODELS_DIR / json.loads(pointer.read_text())["model"]


@dataclass
class Segmentation:
    """``labels``: H x W class indices; ``probabilities``: C x H x W float32 when asked for."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Settings for a model whose input size changes from call to call."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False  # memory patterns only pay off for a fixed input shape
    if threads:
        options.intra_op_num_threads = threads
    return options


def _ramp(length: int, overlap: int) -> np.ndarray:
    """Blend weights along one tile side: rising over the first ``overlap`` pixels, falling over the last."""
    index = np.arange(length, dtype=np.float32)
    if overlap <= 0:
        return np.ones(length, np.float32)
    return np.minimum(1.0, np.minimum(index + 1, length - index) / (overlap + 1)).astype(np.float32)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


class Segmenter:
    """Segments images with an exported segserve model (``model_path=None``: the default model)."""

    def __init__(self, model_path: str | os.PathLike[str] | None = None, providers: list[str] | None = None, *,
                 tile: int = 1024, overlap: int = 128, tile_above: int | None = None,
                 max_pixels: int | None = None, threads: int | None = None) -> None:  # fmt: skip
        if tile < 64 or not 0 <= overlap < tile // 2:
            raise ValueError(f"tile must be >= 64 and overlap in [0, tile/2), got tile={tile}, overlap={overlap}")
        path = Path(model_path) if model_path is not None else default_model_path()
        self.model = load_model(path, providers, session_options(threads))
        self.tile, self.overlap = tile, overlap
        self.tile_above = tile_above if tile_above is not None else 2 * tile * tile
        self.max_pixels = max_pixels

    @property
    def metadata(self) -> ModelMetadata:
        return self.model.metadata

    @property
    def providers(self) -> list[str]:
        return self.model.providers

    def _run(self, batch: np.ndarray, want_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
        names = ["logits", "labels"] if want_logits else ["labels"]
        outputs = self.model.session.run(names, {"images": batch})
        return (outputs[0], outputs[1]) if want_logits else (None, outputs[0])

    def segment(self, image: ImageSource, probabilities: bool = False) -> Segmentation:
        """Labels (and probabilities) for one image at its full size."""
        started = time.perf_counter()
        pixels = read_image(image, self.max_pixels)
        decoded = time.perf_counter()
        height, width = pixels.shape[:2]
        if height * width > self.tile_above and self.metadata.outputs_at_input_size:
            labels, probs = self._tiled(pixels, probabilities)
        else:
            logits, labels = self._run(pixels[None], probabilities)
            labels = labels[0]
            probs = softmax(logits[0]) if logits is not None else None
            if not self.metadata.outputs_at_input_size:
                labels, probs = _to_input_size(labels, probs, height, width)
        done = time.perf_counter()
        return Segmentation(labels, probs, {"decode": decoded - started, "inference": done - decoded})

    def _tiled(self, pixels: np.ndarray, want_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        height, width = pixels.shape[:2]
        tile, stride = self.tile, self.tile - self.overlap
        classes = len(self.metadata.classes)
        labels = np.empty((height, width), dtype=np.uint8 if classes <= 256 else np.uint16)
        probabilities = np.empty((classes, height, width), np.float32) if want_probabilities else None
        ys, xs = _starts(height, tile, stride), _starts(width, tile, stride)
        band_rows = min(tile, height)
        accumulator = np.zeros((classes, band_rows, width), np.float32)
        weights = np.zeros((band_rows, width), np.float32)
        for k, y in enumerate(ys):
            rows = min(tile, height - y)
            for x in xs:
                cols = min(tile, width - x)
                logits, _ = self._run(np.ascontiguousarray(pixels[None, y : y + rows, x : x + cols]), True)
                weight = np.outer(_ramp(rows, self.overlap), _ramp(cols, self.overlap))
                accumulator[:, :rows, x : x + cols] += logits[0] * weight
                weights[:rows, x : x + cols] += weight
            final = (ys[k + 1] - y) if k + 1 < len(ys) else rows  # rows no later band will touch
            blended = accumulator[:, :final] / weights[:final]
            labels[y : y + final] = blended.argmax(axis=0)
            if probabilities is not None:
                probabilities[:, y : y + final] = softmax(blended)
            keep = rows - final  # overlap rows carried into the next band
            accumulator[:, :keep] = accumulator[:, final:rows]
            accumulator[:, keep:] = 0
            weights[:keep] = weights[final:rows]
            weights[keep:] = 0
        return labels, probabilities


def _to_input_size(labels: np.ndarray, probabilities: np.ndarray | None, height: int,
                   width: int) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """Coarse (classifier heatmap) outputs resized to the image: labels by nearest, probabilities bilinearly."""
    rows = (np.arange(height) * labels.shape[0] // height).clip(0, labels.shape[0] - 1)
    cols = (np.arange(width) * labels.shape[1] // width).clip(0, labels.shape[1] - 1)
    labels = labels[rows[:, None], cols[None, :]]
    if probabilities is not None:
        probabilities = np.stack([np.asarray(Image.fromarray(p).resize((width, height), Image.BILINEAR))
                                  for p in probabilities])  # fmt: skip
    return labels, probabilities
