"""What the HTTP service does, without the HTTP: one handler per endpoint, bytes in, payloads out.

``service.py`` (BentoML) only maps requests to these handlers and their results to responses, so the logic is
tested without a server and the server tests cover the wiring. What each endpoint produces comes from the shared
outputs module (:mod:`segserve.runtime.outputs`), as in the batch command. No torch.

Concurrency: decoding and encoding of different requests run in parallel threads (BentoML runs sync endpoints in
a thread pool), while model calls pass through ``inference_slots`` slots (one by default on a CPU host: one call
already uses every core, and more would only thrash the caches; two on a GPU host so that one request's copy and
the next one's compute overlap). Adaptive batching is off: clients send images of every size, and onnxruntime
can only batch equal sizes; on this CPU a batch of four 512x512 images runs no faster per image than one
(see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import threading
import time
from http import HTTPStatus

import numpy as np

import segserve
from segserve.images import ImageError, ImageTooLarge, read_image
from segserve.runtime import vectors
from segserve.runtime.outputs import OutputError, OutputPlan, output_format, render, summary_record, zipped
from segserve.runtime.segmenter import SegmentationResult, Segmenter
from segserve.runtime.vectors import georeference
from segserve.settings import Settings, comma_list


class ClientError(ValueError):
    """A request the client must fix: ``status`` (400 or 413) and a message naming the problem."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


#: (body, media type) of a binary answer.
Answer = tuple[bytes, str]


class SegmentationHandlers:
    """The endpoints' work: bytes in, (payload, media type) or JSON-ready dicts out."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.segmenter = Segmenter(settings=settings)
        self._slots = threading.BoundedSemaphore(settings.inference_slots)

    def _plan(self, plan: OutputPlan) -> OutputPlan:
        try:
            return plan.checked(self.segmenter.metadata)
        except OutputError as error:
            raise ClientError(str(error)) from None

    def _segment(self, data: bytes, probabilities: bool) -> tuple[np.ndarray, SegmentationResult]:
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

    def _produce(self, data: bytes, plan: OutputPlan) -> Answer:
        """The one output of ``plan`` for the image in ``data``."""
        plan = self._plan(plan)
        pixels, result = self._segment(data, plan.needs_probabilities)
        ((kind, payload),) = render(plan, result, pixels, self.segmenter.metadata).items()
        return (zipped(payload) if isinstance(payload, dict) else payload), plan.media_type(kind)

    def segment(self, data: bytes) -> Answer:
        return self._produce(data, OutputPlan(kinds=("labels",)))

    def overlay(self, data: bytes, alpha: float = 0.5, fmt: str = "png") -> Answer:
        return self._produce(data, OutputPlan(kinds=("overlay",), alpha=alpha, overlay_format=fmt))

    def heatmaps(self, data: bytes, classes: str | None = None, fmt: str = "npz") -> Answer:
        chosen = comma_list(classes) if classes else None
        return self._produce(data, OutputPlan(kinds=("heatmaps",), classes=chosen, heatmap_format=fmt))

    def regions(self, data: bytes, fmt: str = "geojson", tolerance: float = 1.0, min_area: int = 0) -> Answer:
        """The label map as vectors: COCO RLE, polygons or GeoJSON (map coordinates for a georeferenced GeoTIFF)."""
        try:
            kind = output_format("regions", fmt)
        except OutputError as error:
            raise ClientError(str(error)) from None
        plan = self._plan(OutputPlan(kinds=(kind,), tolerance=tolerance, min_area=min_area))
        pixels, result = self._segment(data, plan.needs_probabilities)
        reference = georeference(data) if kind == "geojson" else None
        (payload,) = render(plan, result, pixels, self.segmenter.metadata, reference=reference).values()
        return payload, plan.media_type(kind)

    def analyze(self, data: bytes, regions: bool = False) -> dict:
        _, result = self._segment(data, probabilities=True)
        record = summary_record(result, self.segmenter.metadata)
        if regions:
            found = vectors.regions(result.labels, 0.0, 0, None)
            record["regions"] = vectors.region_summary(found, self.segmenter.metadata.classes)
        return {**record, "engine": self.segmenter.choice.candidate.label}

    def metadata(self) -> dict:
        card = json.loads(self.segmenter.metadata.to_json())
        card["providers"] = self.segmenter.providers
        card["engine"] = self.segmenter.describe_engine()
        card["segserve_version"] = segserve.__version__
        card["service"] = {"max_pixels": self.settings.max_pixels, "inference_slots": self.settings.inference_slots}
        return card
