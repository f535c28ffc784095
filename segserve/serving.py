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

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import numpy as np

import segserve
from segserve.images import ImageError, ImageTooLarge, read_image
from segserve.runtime import vectors
from segserve.runtime.outputs import OutputError, OutputPlan, output_format, render, summary_record, zipped
from segserve.runtime.repository import ModelRepository, ModelVersion, UnknownModel, open_repository
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
    """The endpoints' work: bytes in, (payload, media type) or JSON-ready dicts out.

    Every image endpoint takes ``model`` (``NAME`` or ``NAME@VERSION``, default: the repository's default); a
    request keeps the model version it resolved to until it is answered, whatever a reload does meanwhile.
    ``metrics``: Prometheus-style ``requests`` (counter), ``latency`` and ``inference`` (histograms) labelled by
    model and version, or None."""

    def __init__(self, settings: Settings, metrics: dict[str, Any] | None = None,
                 models: ModelRepository | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.models = models or open_repository(settings)
        self.metrics = metrics or {}
        self._slots = threading.BoundedSemaphore(settings.inference_slots)
        if self.models.has_default():
            self.models.get(None)  # /readyz turns ready once the default model is in memory
        self.models.start()

    @contextlib.contextmanager
    def _serving(self, endpoint: str, spec: str | None) -> Iterator[tuple[ModelVersion, Segmenter]]:
        """The model version for this request, and its per-model request count and latency."""
        started = time.perf_counter()
        try:
            entry, segmenter = self.models.get(spec or None)
        except UnknownModel as error:
            raise ClientError(str(error), HTTPStatus.NOT_FOUND) from None
        outcome = "error"
        try:
            yield entry, segmenter
            outcome = "ok"
        except ClientError:
            outcome = "client_error"
            raise
        finally:
            labels = {"model": entry.name, "version": str(entry.version)}
            if "requests" in self.metrics:
                self.metrics["requests"].labels(**labels, endpoint=endpoint, outcome=outcome).inc()
            if "latency" in self.metrics:
                self.metrics["latency"].labels(**labels, endpoint=endpoint).observe(time.perf_counter() - started)

    def _plan(self, plan: OutputPlan, segmenter: Segmenter) -> OutputPlan:
        try:
            return plan.checked(segmenter.metadata)
        except OutputError as error:
            raise ClientError(str(error)) from None

    def _segment(self, data: bytes, probabilities: bool, model: tuple[ModelVersion, Segmenter],
                 ) -> tuple[np.ndarray, SegmentationResult]:  # fmt: skip
        entry, segmenter = model
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
            result = segmenter.segment_many([pixels], probabilities)[0]
        inference = time.perf_counter() - waited
        result.timings = {"decode": decoded - started, "queue": waited - decoded, "inference": inference}
        if "inference" in self.metrics:
            self.metrics["inference"].labels(model=entry.name, version=str(entry.version)).observe(inference)
        return pixels, result

    def _produce(self, endpoint: str, data: bytes, plan: OutputPlan, model: str | None) -> Answer:
        """The one output of ``plan`` for the image in ``data``."""
        with self._serving(endpoint, model) as chosen:
            plan = self._plan(plan, chosen[1])
            pixels, result = self._segment(data, plan.needs_probabilities, chosen)
            ((kind, payload),) = render(plan, result, pixels, chosen[1].metadata).items()
            return (zipped(payload) if isinstance(payload, dict) else payload), plan.media_type(kind)

    def segment(self, data: bytes, model: str | None = None) -> Answer:
        return self._produce("segment", data, OutputPlan(kinds=("labels",)), model)

    def overlay(self, data: bytes, alpha: float = 0.5, fmt: str = "png", model: str | None = None) -> Answer:
        return self._produce("overlay", data, OutputPlan(kinds=("overlay",), alpha=alpha, overlay_format=fmt), model)

    def heatmaps(self, data: bytes, classes: str | None = None, fmt: str = "npz", model: str | None = None) -> Answer:
        chosen = comma_list(classes) if classes else None
        plan = OutputPlan(kinds=("heatmaps",), classes=chosen, heatmap_format=fmt)
        return self._produce("heatmaps", data, plan, model)

    def regions(self, data: bytes, fmt: str = "geojson", tolerance: float = 1.0, min_area: int = 0,
                model: str | None = None) -> Answer:  # fmt: skip
        """The label map as vectors: COCO RLE, polygons or GeoJSON (map coordinates for a georeferenced GeoTIFF)."""
        try:
            kind = output_format("regions", fmt)
        except OutputError as error:
            raise ClientError(str(error)) from None
        with self._serving("regions", model) as chosen:
            plan = self._plan(OutputPlan(kinds=(kind,), tolerance=tolerance, min_area=min_area), chosen[1])
            pixels, result = self._segment(data, plan.needs_probabilities, chosen)
            reference = georeference(data) if kind == "geojson" else None
            (payload,) = render(plan, result, pixels, chosen[1].metadata, reference=reference).values()
            return payload, plan.media_type(kind)

    def analyze(self, data: bytes, regions: bool = False, model: str | None = None) -> dict:
        with self._serving("analyze", model) as chosen:
            entry, segmenter = chosen
            _, result = self._segment(data, True, chosen)
            record = summary_record(result, segmenter.metadata)
            if regions:
                found = vectors.regions(result.labels, 0.0, 0, None)
                record["regions"] = vectors.region_summary(found, segmenter.metadata.classes)
            return {**record, "model": entry.label, "engine": segmenter.choice.candidate.label}

    def metadata(self, model: str | None = None) -> dict:
        try:
            entry, segmenter = self.models.get(model or None)
        except UnknownModel as error:
            raise ClientError(str(error), HTTPStatus.NOT_FOUND) from None
        card = json.loads(segmenter.metadata.to_json())
        card["model"] = {"name": entry.name, "version": entry.version, "file": entry.path.name}
        card["providers"] = segmenter.providers
        card["engine"] = segmenter.describe_engine()
        card["segserve_version"] = segserve.__version__
        card["service"] = {"max_pixels": self.settings.max_pixels, "inference_slots": self.settings.inference_slots}
        return card

    def listing(self) -> dict:
        """``GET /models``: every model and version, its card's essentials, in memory or not."""
        return {"models": self.models.listing(), "max_loaded": self.models.max_loaded,
                "repository": self.models.root is not None}  # fmt: skip
