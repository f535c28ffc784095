"""Vectorization (COCO RLE, polygons, GeoJSON) against the model's own time, at 360x480 and 4000x3000."""

from __future__ import annotations

import time

from benchmarks.common import Section, alternate, road_images
from segserve.runtime import Segmenter
from segserve.runtime.outputs import OutputPlan, render
from segserve.settings import Settings


def vectors_vs_model(quick: bool) -> Section:
    segmenter = Segmenter(settings=Settings.from_env({}))
    section = Section(f"Vectorizing a label map against the model ({segmenter.choice.candidate.label})",
                      ["input", "model ms", "rle ms", "polygons ms", "geojson ms", "geojson / model"])  # fmt: skip
    metadata = segmenter.metadata
    for size in ((360, 480), (3000, 4000)):
        image = road_images(1, size)[0]
        started = time.perf_counter()
        result = segmenter.segment(image, probabilities=True)
        model = time.perf_counter() - started
        plans = {kind: OutputPlan(kinds=(kind,)).checked(metadata) for kind in ("rle", "polygons", "geojson")}
        contenders = {
            kind: (lambda p=plan, r=result, i=image: render(p, r, i, metadata)) for kind, plan in plans.items()
        }
        medians = alternate(contenders, 3 if quick else 7)
        if size == (360, 480):  # the model at this size: a median too
            timed = {"model": lambda i=image: segmenter.segment(i, probabilities=True)}
            model = alternate(timed, 3 if quick else 7)["model"]
        section.rows.append([f"{size[0]}x{size[1]}", 1000 * model, 1000 * medians["rle"], 1000 * medians["polygons"],
                             1000 * medians["geojson"], f"{medians['geojson'] / model:.0%}"])  # fmt: skip
    section.notes.append(
        "Model time includes the class probabilities (GeoJSON's mean confidence needs them); at 4000x3000 the image "
        "is segmented in tiles (one run, not a median). Polygons: rasterio (GDAL polygonize) along pixel edges, "
        "simplified as a coverage by shapely at 1 px; GeoJSON adds each region's mean confidence. Targets: under "
        "25% of the model's time at 360x480, under 1 s at 4000x3000."
    )
    return section
