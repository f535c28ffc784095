"""What is produced for one segmented image: the output kinds, their options and checks, and their encodings.

The batch command writes these outputs to files and the service returns them over HTTP; both build an
:class:`OutputPlan`, check it against the model once (:meth:`OutputPlan.checked`, which raises
:class:`OutputError` naming the bad option), and call :func:`render` per image. Kinds:

* ``labels``: palette PNG of class indices (``NAME.labels.png``);
* ``overlay``: the image blended with its class colours, PNG or JPEG (``NAME.overlay.png|jpg``);
* ``heatmaps``: per-class probabilities, one float16 ``.npz`` or a set of 8-bit PNGs (a folder in the batch
  command, a zip over HTTP);
* ``json``: size, classes present with pixel share and mean confidence, timings (``NAME.json``);
* ``rle``, ``polygons``, ``geojson``: the label map as vectors (:mod:`segserve.runtime.vectors`): COCO RLE per
  class (``NAME.rle.json``), polygons per connected region (``NAME.polygons.json``) and GeoJSON features
  (``NAME.geojson``), simplified by ``tolerance`` pixels, regions under ``min_area`` pixels dropped.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

import numpy as np

from segserve.modelcard import ModelMetadata
from segserve.runtime import encode, vectors
from segserve.runtime.segmenter import SegmentationResult

OUTPUT_KINDS = ("labels", "overlay", "heatmaps", "json", *vectors.VECTOR_FORMATS)
FORMATS = {"overlay": ("png", "jpeg"), "heatmaps": ("npz", "png"), "regions": vectors.VECTOR_FORMATS}
_SPELLINGS = {"jpg": "jpeg", "jpe": "jpeg"}
MEDIA_TYPES = {
    "labels": "image/png",
    "overlay:png": "image/png",
    "overlay:jpeg": "image/jpeg",
    "heatmaps:npz": "application/x-npz",
    "heatmaps:png": "application/zip",
    "json": "application/json",
    "rle": "application/json",
    "polygons": "application/json",
    "geojson": "application/geo+json",
}

#: A file's bytes, or {file name: bytes} for a set of files (heatmap PNGs).
Payload = bytes | dict[str, bytes]


class OutputError(ValueError):
    """Outputs that cannot be produced as asked: an unknown kind, format or class, a bad option value."""


def output_format(kind: str, text: str) -> str:
    """A format name for ``kind`` in its canonical spelling (``JPG`` -> ``jpeg``), or OutputError."""
    choice = _SPELLINGS.get(text.strip().lower(), text.strip().lower())
    if choice not in FORMATS[kind]:
        raise OutputError(f"{kind} format must be {' or '.join(FORMATS[kind])}, got {text[:40]!r}")
    return choice


@dataclass(frozen=True)
class OutputPlan:
    """Which outputs to produce for each image, and how."""

    kinds: tuple[str, ...] = ("labels",)
    classes: tuple[str, ...] | None = None  # heatmap classes (None: all)
    overlay_format: str = "png"
    alpha: float = 0.5
    heatmap_format: str = "npz"
    tolerance: float = 1.0  # polygon simplification, pixels (0: exact pixel edges)
    min_area: int = 0  # regions smaller than this many pixels are dropped from polygons and GeoJSON
    summary_regions: bool = False  # the json summary lists each class's regions (count, bounding boxes)

    @property
    def needs_probabilities(self) -> bool:
        return bool({"heatmaps", "json", "geojson"} & set(self.kinds))

    @property
    def needs_regions(self) -> bool:
        return bool({"polygons", "geojson"} & set(self.kinds)) or (self.summary_regions and "json" in self.kinds)

    def checked(self, metadata: ModelMetadata) -> OutputPlan:
        """This plan with formats spelled canonically and heatmap classes resolved, or an OutputError."""
        unknown = [k for k in self.kinds if k not in OUTPUT_KINDS]
        if unknown or not self.kinds:
            raise OutputError(f"unknown output kind(s) {unknown}; choose from {', '.join(OUTPUT_KINDS)}")
        if not 0 <= self.alpha <= 1:
            raise OutputError(f"alpha must be between 0 and 1, got {self.alpha}")
        if not 0 <= self.tolerance < float("inf"):
            raise OutputError(f"tolerance must be a number of pixels >= 0, got {self.tolerance}")
        if self.min_area < 0:
            raise OutputError(f"min_area must be a number of pixels >= 0, got {self.min_area}")
        classes = metadata.classes
        if len(classes) > 256 and "labels" in self.kinds:
            raise OutputError(f"a palette PNG holds at most 256 classes; this model has {len(classes)}")
        chosen = classes if self.classes is None else tuple(dict.fromkeys(self.classes))
        if not chosen:
            raise OutputError("classes names no class; give a comma list of class names, or none for all")
        missing = [name for name in chosen if name not in classes]
        if missing:
            shown = ", ".join(missing)[:200]
            raise OutputError(f"unknown class(es) {shown}; the model's classes are {', '.join(classes)[:2000]}")
        return replace(self, classes=chosen, overlay_format=output_format("overlay", self.overlay_format),
                       heatmap_format=output_format("heatmaps", self.heatmap_format))  # fmt: skip

    def file_names(self, stem: PurePosixPath) -> dict[str, PurePosixPath]:
        """Output kind -> path relative to the output folder (a heatmap PNG set is one folder)."""
        suffixes = {
            "labels": ".labels.png",
            "overlay": ".overlay.jpg" if self.overlay_format == "jpeg" else ".overlay.png",
            "heatmaps": ".heatmaps.npz" if self.heatmap_format == "npz" else ".heatmaps",
            "json": ".json",
            "rle": ".rle.json",
            "polygons": ".polygons.json",
            "geojson": ".geojson",
        }
        return {kind: stem.with_name(stem.name + suffixes[kind]) for kind in self.kinds}

    def media_type(self, kind: str) -> str:
        key = {"overlay": f"overlay:{self.overlay_format}", "heatmaps": f"heatmaps:{self.heatmap_format}"}
        return MEDIA_TYPES[key.get(kind, kind)]


def heatmap_file_name(index: int, name: str) -> str:
    """``03-road.png``: class index first (names may clash once cleaned); separators and odd characters -> ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return f"{index:02d}-{cleaned or 'class'}.png"


def summary_record(result: SegmentationResult, metadata: ModelMetadata, source: str | None = None) -> dict:
    """The ``json`` kind as a dict: size, classes present (share, confidence), timings; ``source`` first if given."""
    record = encode.summary(result.labels, metadata.classes, result.probabilities, result.timings)
    return record if source is None else {"source": source, **record}


def render(
    plan: OutputPlan,
    result: SegmentationResult,
    pixels: np.ndarray,
    metadata: ModelMetadata,
    source: str | None = None,
    reference: vectors.Georeference | None = None,
) -> dict[str, Payload]:
    """Output kind -> encoded payload for one image; ``plan`` must come from :meth:`OutputPlan.checked`.

    ``reference``: the input's georeference (a GeoTIFF), for GeoJSON in map coordinates."""
    payloads: dict[str, Payload] = {}
    confidence = result.probabilities if "geojson" in plan.kinds else None  # GeoJSON's mean_confidence property
    found = vectors.regions(result.labels, plan.tolerance, plan.min_area, confidence) if plan.needs_regions else []
    if "labels" in plan.kinds:
        payloads["labels"] = encode.label_png(result.labels, metadata.palette)
    if "overlay" in plan.kinds:
        payloads["overlay"] = encode.overlay(pixels, result.labels, metadata.palette, plan.alpha, plan.overlay_format)
    if "heatmaps" in plan.kinds:
        payloads["heatmaps"] = _heatmaps(plan, result, metadata.classes)
    if "json" in plan.kinds:
        record = summary_record(result, metadata, source)
        if plan.summary_regions:
            record["regions"] = vectors.region_summary(found, metadata.classes)
        payloads["json"] = (json.dumps(record, indent=2) + "\n").encode()
    if "rle" in plan.kinds:
        payloads["rle"] = vectors.dumps(vectors.coco_rle(result.labels, metadata.classes))
    if "polygons" in plan.kinds:
        payloads["polygons"] = vectors.dumps(vectors.polygons_record(found, metadata.classes, result.labels.shape))
    if "geojson" in plan.kinds:
        payloads["geojson"] = vectors.dumps(vectors.geojson_record(found, metadata.classes, metadata.palette,
                                                                   reference))  # fmt: skip
    return payloads


def _heatmaps(plan: OutputPlan, result: SegmentationResult, classes: Sequence[str]) -> Payload:
    if result.probabilities is None:
        raise ValueError("heatmaps need probabilities: segment with probabilities=True (plan.needs_probabilities)")
    chosen = plan.classes or tuple(classes)
    indices = [classes.index(name) for name in chosen]
    probabilities = result.probabilities[indices]
    if plan.heatmap_format == "npz":
        return encode.heatmaps_npz(probabilities, chosen)
    pngs = encode.heatmap_pngs(probabilities, chosen)
    return {heatmap_file_name(i, name): pngs[name] for i, name in zip(indices, chosen, strict=True)}


def zipped(files: Mapping[str, bytes]) -> bytes:
    """A set of files as one zip (stored: PNGs are compressed already), for answers that must be one body."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()
