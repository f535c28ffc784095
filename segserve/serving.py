"""What the HTTP service does, without the HTTP: settings from the environment and one handler per endpoint.

``service.py`` (BentoML) only maps requests to these handlers and their results to responses, so the logic is
tested without a server and the server tests cover the wiring. No torch.

Concurrency: decoding and encoding of different requests run in parallel threads (BentoML runs sync endpoints in
a thread pool), while model calls pass through ``inference_slots`` slots (one by default on a CPU host: one call
already uses every core, and more would only thrash the caches; two on a GPU host so that one request's copy and
the next one's compute overlap). Adaptive batching is off: clients send images of every size, and onnxruntime
can only batch equal sizes; on this CPU a batch of four 512x512 images runs no faster per image than one
(see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np

import segserve
from segserve.batch import heatmap_file_name
from segserve.runtime import encode
from segserve.runtime.images import ImageError, ImageTooLarge, max_pixels_from_env, read_image
from segserve.runtime.segmenter import Segmentation, Segmenter
from segserve.runtime.session import comma_list, gpu_present

ENVIRONMENT = {
    "SEGSERVE_MODEL": "the .onnx model to serve (default: the one models/default.json names)",
    "SEGSERVE_PROVIDERS": "comma list of onnxruntime providers (default: TensorRT, CUDA, CPU as available)",
    "SEGSERVE_TRT_CACHE": "folder for TensorRT engines and timings (default ~/.cache/segserve/tensorrt)",
    "SEGSERVE_MAX_PIXELS": "largest image accepted, width x height (default 150000000; larger: HTTP 413)",
    "SEGSERVE_INFERENCE_SLOTS": "model calls at a time (default: 1 on CPU, 2 with a GPU)",
    "SEGSERVE_THREADS": "onnxruntime intra-op threads (default: all cores)",
    "SEGSERVE_TIMEOUT": "seconds a request may take (default 120)",
    "SEGSERVE_MAX_CONCURRENCY": "requests in flight before the server answers 503 (default 64)",
}


class ClientError(ValueError):
    """A request the client must fix: ``status`` (400 or 413) and a message naming the problem."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Settings:
    """Every knob of the service, in one place; see ``ENVIRONMENT`` for the variables that set them."""

    max_pixels: int = 150_000_000
    inference_slots: int = 1
    threads: int | None = None
    timeout: int = 120
    max_concurrency: int = 64

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        gpu = gpu_present()
        return cls(
            max_pixels=max_pixels_from_env(env),
            inference_slots=_positive(env, "SEGSERVE_INFERENCE_SLOTS", 2 if gpu else 1),
            threads=_positive(env, "SEGSERVE_THREADS", 0) or None,
            timeout=_positive(env, "SEGSERVE_TIMEOUT", 120),
            max_concurrency=_positive(env, "SEGSERVE_MAX_CONCURRENCY", 64),
        )


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class SegmentationHandlers:
    """The endpoints' work: bytes in, (payload, media type) or JSON-ready dicts out."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # the model (SEGSERVE_MODEL) and providers (SEGSERVE_PROVIDERS) are resolved by the runtime itself
        self.segmenter = Segmenter(max_pixels=settings.max_pixels, threads=settings.threads)
        self._slots = threading.BoundedSemaphore(settings.inference_slots)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.segmenter.metadata.classes)

    def _segment(self, data: bytes, probabilities: bool) -> tuple[np.ndarray, Segmentation]:
        started = time.perf_counter()
        try:
            pixels = read_image(data, self.settings.max_pixels)
        except ImageTooLarge as error:
            raise ClientError(str(error), HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from error
        except ImageError as error:
            raise ClientError(str(error)) from error
        decoded = time.perf_counter()
        with self._slots:
            waited = time.perf_counter()
            result = self.segmenter.segment_many([pixels], probabilities)[0]
        result.timings = {"decode": decoded - started, "queue": waited - decoded,
                          "inference": time.perf_counter() - waited}  # fmt: skip
        return pixels, result

    def segment(self, data: bytes) -> tuple[bytes, str]:
        _, result = self._segment(data, probabilities=False)
        return encode.label_png(result.labels, self.segmenter.metadata.palette), "image/png"

    def overlay(self, data: bytes, alpha: float = 0.5, fmt: str = "png") -> tuple[bytes, str]:
        if not 0 <= alpha <= 1:
            raise ClientError(f"alpha must be between 0 and 1, got {alpha}")
        fmt = fmt.lower()
        if fmt not in ("png", "jpeg", "jpg"):
            raise ClientError(f"format must be png or jpeg, got {fmt!r}")
        pixels, result = self._segment(data, probabilities=False)
        payload = encode.overlay(pixels, result.labels, self.segmenter.metadata.palette, alpha, fmt)
        return payload, "image/png" if fmt == "png" else "image/jpeg"

    def heatmaps(self, data: bytes, classes: Sequence[str] | None = None, fmt: str = "npz") -> tuple[bytes, str]:
        fmt = fmt.lower()
        if fmt not in ("npz", "png"):
            raise ClientError(f"format must be npz or png, got {fmt!r}")
        chosen = self.choose_classes(classes)
        _, result = self._segment(data, probabilities=True)
        assert result.probabilities is not None
        probabilities = result.probabilities[[self.classes.index(name) for name in chosen]]
        if fmt == "npz":
            return encode.heatmaps_npz(probabilities, chosen), "application/x-npz"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            for name, png in encode.heatmap_pngs(probabilities, chosen).items():
                archive.writestr(heatmap_file_name(self.classes.index(name), name), png)
        return buffer.getvalue(), "application/zip"

    def analyze(self, data: bytes) -> dict:
        _, result = self._segment(data, probabilities=True)
        return encode.summary(result.labels, self.classes, result.probabilities, result.timings)

    def choose_classes(self, classes: Sequence[str] | str | None) -> tuple[str, ...]:
        if classes is None or classes == "" or classes == []:
            return self.classes
        if isinstance(classes, str):
            classes = comma_list(classes)
        unknown = [name for name in classes if name not in self.classes]
        if unknown:
            known = ", ".join(self.classes)
            raise ClientError(f"unknown class(es) {', '.join(unknown)}; the model's classes are {known}")
        return tuple(dict.fromkeys(classes))

    def metadata(self) -> dict:
        card = json.loads(self.segmenter.metadata.to_json())
        card["providers"] = self.segmenter.providers
        card["segserve_version"] = segserve.__version__
        card["service"] = {"max_pixels": self.settings.max_pixels, "inference_slots": self.settings.inference_slots}
        return card
