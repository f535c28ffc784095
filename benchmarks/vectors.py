"""Vectorization (COCO RLE, polygons, GeoJSON) against the model's own time, at 360x480 and 4000x3000."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
        if size == (360, 480):  # as a request runs: the model, then at once one output (each kind in turn)
            medians = _as_served(lambda i=image: segmenter.segment(i, probabilities=True), contenders,
                                 5 if quick else 15)  # fmt: skip
            model = medians["model"]
        else:
            medians = alternate(contenders, 3 if quick else 7)
        section.rows.append([f"{size[0]}x{size[1]}", 1000 * model, 1000 * medians["rle"], 1000 * medians["polygons"],
                             1000 * medians["geojson"], f"{medians['geojson'] / model:.0%}"])  # fmt: skip
    section.notes.append(_library_floor(segmenter))
    section.notes.append(
        "Model time includes the class probabilities (GeoJSON's mean confidence needs them); at 4000x3000 the image "
        "is segmented in tiles (one run, not a median). Polygons: rasterio (GDAL polygonize) along pixel edges, "
        "simplified as a coverage by shapely at 1 px; GeoJSON adds each region's mean confidence. Targets: under "
        "25% of the model's time at 360x480, under 1 s at 4000x3000."
    )
    return section


def _as_served(model: Callable[[], object], contenders: dict[str, Callable[[], object]],
               rounds: int) -> dict[str, float]:  # fmt: skip
    """Median seconds of the model call and of each output rendered right after it, with no pause in between: what
    a request does. (A pause before each call, as ``alternate`` makes for thread pools, leaves the short
    single-threaded vector calls cold and reads them up to 1.5x slower than they run behind the model.)"""
    times: dict[str, list[float]] = {"model": [], **{name: [] for name in contenders}}
    for _ in range(rounds):
        for name, render_one in contenders.items():
            started = time.perf_counter()
            model()
            middle = time.perf_counter()
            render_one()
            times["model"].append(middle - started)
            times[name].append(time.perf_counter() - middle)
    return {name: statistics.median(values) for name, values in times.items()}


def _library_floor(segmenter: Segmenter) -> str:
    """What the two library calls alone cost at 360x480, the floor under the polygon and GeoJSON figures."""
    import rasterio.features
    import shapely

    from segserve.runtime import vectors

    labels = segmenter.segment(road_images(1, (360, 480))[0]).labels
    shapes = list(rasterio.features.shapes(labels, connectivity=4))
    exact = vectors._polygons([g["coordinates"] for g, _ in shapes])
    medians = alternate({
        "trace": lambda: list(rasterio.features.shapes(labels, connectivity=4)),
        "simplify": lambda: shapely.coverage_simplify(exact, 1.0),
    }, 15, settle=0)  # fmt: skip
    return (f"At 360x480 ({len(shapes)} regions) the tracing call alone (rasterio.features.shapes, GDAL polygonize) "
            f"takes {1000 * medians['trace']:.2f} ms and the coverage simplification alone (shapely, GEOS) "
            f"{1000 * medians['simplify']:.2f} ms.")  # fmt: skip
