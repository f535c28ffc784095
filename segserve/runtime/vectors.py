"""Label maps as vectors: COCO RLE per class, polygons per connected region, GeoJSON features.

* **RLE**: COCO's results form, one entry per class present, compressed string counts over the column-major mask
  (what ``pycocotools.mask.decode`` reads back exactly). Encoded here with numpy: the runs of the whole label map
  are found once, then split by class.
* **Polygons**: ``rasterio.features.shapes`` (GDAL's polygonize) traces every 4-connected region of equal label
  along pixel edges, exterior and holes, so at tolerance 0 the polygons rasterize back to the label map exactly.
  Measured on a 4000x3000 map it took 0.15 s, as long as OpenCV's ``findContours`` over every class mask, whose
  contours run through boundary pixel centres and so cannot give back the exact map. ``shapely`` then simplifies
  the regions as one coverage (``coverage_simplify``, ``tolerance`` pixels): a border shared by two regions is
  simplified once, so neighbours keep neither gaps nor overlaps. Measured on segmentation-like maps at the
  default tolerance (1 px): 99.75% of pixels rasterize back to their label, against 98.9% when each polygon is
  simplified on its own (Douglas-Peucker), and every polygon is valid.
* **GeoJSON**: a FeatureCollection of those regions, one Polygon (or MultiPolygon) feature each, in pixel
  coordinates, or in map coordinates with the input's CRS when it is a georeferenced GeoTIFF.

A tiled huge image is vectorized after its tiles are blended into one label map, so a region crossing tile borders
is one polygon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

VECTOR_FORMATS = ("rle", "polygons", "geojson")


@dataclass(frozen=True)
class Georeference:
    """An affine pixel -> map transform (rasterio's ``Affine``) and the CRS it maps into."""

    transform: Any
    crs: str


def georeference(source: object) -> Georeference | None:
    """The georeference of a GeoTIFF (path or bytes), or None for anything else (most images)."""
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else None
    if data is not None and not data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return None
    try:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    except ImportError:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            if data is not None:
                with rasterio.MemoryFile(data) as memory, memory.open() as dataset:
                    return _reference_of(dataset)
            if str(source).lower().endswith((".tif", ".tiff")):
                with rasterio.open(str(source)) as dataset:
                    return _reference_of(dataset)
        except (RasterioIOError, ValueError):
            return None
    return None


def _reference_of(dataset: Any) -> Georeference | None:
    if dataset.crs is None:
        return None
    return Georeference(dataset.transform, dataset.crs.to_string())


# ---- COCO RLE -----------------------------------------------------------------------------------------------------


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, values) of the runs of the column-major flattened label map."""
    flat = labels.T.ravel()  # column-major, as COCO counts
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], edges))
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    return starts, lengths, flat[starts]


def _counts_string(counts: Sequence[int]) -> str:
    """COCO's compressed RLE string (``rleToString`` in maskApi.c): LEB128-like, 5 bits a character, deltas."""
    out = []
    for index, count in enumerate(counts):
        x = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def coco_rle(labels: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One COCO result entry per class present: segmentation (compressed RLE), area, bbox [x, y, w, h]."""
    height, width = labels.shape
    starts, lengths, values = _runs(labels)
    total = labels.size
    entries = []
    for index in np.unique(values):
        mine = values == index
        begin, length = starts[mine], lengths[mine]
        gaps = begin - np.concatenate(([0], begin[:-1] + length[:-1]))
        counts = np.empty(2 * len(begin) + 1, dtype=np.int64)
        counts[0:-1:2], counts[1:-1:2] = gaps, length
        counts[-1] = total - (begin[-1] + length[-1])
        if counts[-1] == 0:
            counts = counts[:-1]
        columns = np.unique(np.concatenate([begin // height, (begin + length - 1) // height]))
        first_col, last_col = int(columns.min()), int(columns.max())
        rows = (labels[:, first_col : last_col + 1] == index).any(axis=1).nonzero()[0]
        entries.append({
            "category_id": int(index), "category": classes[index],
            "segmentation": {"size": [height, width], "counts": _counts_string(counts)},
            "area": int(length.sum()),
            "bbox": [first_col, int(rows[0]), last_col - first_col + 1, int(rows[-1] - rows[0] + 1)],
        })  # fmt: skip
    return entries


# ---- polygons -----------------------------------------------------------------------------------------------------


@dataclass
class Region:
    """One 4-connected region of one class: its (simplified) geometry, exact pixel area and bounding box."""

    class_index: int
    geometry: Any  # shapely Polygon or MultiPolygon, pixel coordinates (x right, y down), pixel edges at integers
    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h in pixels
    mean_confidence: float | None = None


def regions(labels: np.ndarray, tolerance: float = 1.0, min_area: int = 0,
            probabilities: np.ndarray | None = None) -> list[Region]:  # fmt: skip
    """Every connected region of every class (largest first), simplified by ``tolerance`` pixels (0: exact)."""
    import rasterio.features
    import shapely

    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    kind = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    shapes = list(rasterio.features.shapes(labels.astype(kind, copy=False), connectivity=4))
    exact = _polygons([g["coordinates"] for g, _ in shapes])
    areas = np.rint(shapely.area(exact)).astype(np.int64)  # exact: the traced polygons follow pixel edges
    bounds = np.rint(shapely.bounds(exact)).astype(np.int64) if len(exact) else np.zeros((0, 4), np.int64)
    simplified = shapely.coverage_simplify(exact, tolerance) if tolerance > 0 and len(exact) else exact
    confidences = None if probabilities is None else _mean_confidences(shapes, labels.shape, probabilities, areas)
    valid = shapely.is_valid(simplified)
    found: list[Region] = []
    for number, (_, value) in enumerate(shapes):
        if areas[number] < min_area:
            continue
        x0, y0, x1, y1 = (int(v) for v in bounds[number])
        outline = simplified[number] if valid[number] else shapely.make_valid(simplified[number])
        confidence = None if confidences is None else round(float(confidences[number]), 6)
        found.append(Region(int(value), outline, int(areas[number]), (x0, y0, x1 - x0, y1 - y0), confidence))
    found.sort(key=lambda r: -r.area)
    return found


def _polygons(rings_of: list) -> np.ndarray:
    """GeoJSON-style polygon coordinates (exterior, then holes) -> shapely Polygons, built in bulk from one
    coordinate array (8x faster than ``shape()`` one by one: 0.2 against 1.8 ms on a 360x480 road map)."""
    import itertools

    import shapely

    if not rings_of:
        return np.zeros(0, dtype=object)
    rings = [ring for rings in rings_of for ring in rings]
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable(rings))
    coordinates = np.fromiter(flat, np.float64).reshape(-1, 2)
    ring_index = np.repeat(np.arange(len(rings)), [len(ring) for ring in rings])
    owner = np.repeat(np.arange(len(rings_of)), [len(rings) for rings in rings_of])
    return shapely.polygons(shapely.linearrings(coordinates, indices=ring_index), indices=owner)


def _mean_confidences(shapes: list, size: tuple[int, int], probabilities: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """Each region's mean confidence: the mean over its pixels of the top class probability (the region's own class
    wherever labels are the probabilities' argmax, as they are except on ties and for coarse classifier heatmaps).
    The pixels are found by burning the traced polygons, as GDAL's own GeoJSON dicts (1.1 against 2.5 ms for
    shapely geometries), into one raster of region numbers; each region's pixel count is its exact area."""
    import rasterio.features

    identifiers = rasterio.features.rasterize(((g, i + 1) for i, (g, _) in enumerate(shapes)),
                                              out_shape=size, dtype=np.int32)  # fmt: skip
    top = probabilities.max(axis=0)  # 0.2 ms, against 0.6 for gathering each pixel's own class
    sums = np.bincount(identifiers.ravel(), weights=top.ravel(), minlength=len(shapes) + 1)
    return sums[1:] / np.maximum(areas, 1)


def _rings(geometries: Sequence[Any], transform: Any | None) -> list[list[list[list]]]:
    """Each geometry's polygons as GeoJSON coordinate arrays (exterior first, then holes), optionally mapped by
    ``transform``: one shapely call for all coordinates, one list conversion, then a slice per ring (0.6 -> 0.1 ms
    on a 360x480 map). Pixel coordinates stay integers (simplification only drops vertices), so they are written
    as such."""
    import shapely

    if not len(geometries):
        return []
    parts, owner = shapely.get_parts(np.asarray(geometries, dtype=object), return_index=True)
    while np.isin(shapely.get_type_id(parts), (6, 7)).any():  # collections from make_valid: down to their parts
        parts, inner = shapely.get_parts(parts, return_index=True)
        owner = owner[inner]
    keep = shapely.get_type_id(parts) == 3  # polygons (make_valid may leave lines or points beside them)
    parts, owner = parts[keep], owner[keep]
    rings, part_of = shapely.get_rings(parts, return_index=True)
    points, ring_of = shapely.get_coordinates(rings, return_index=True)
    if transform is not None:
        a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
        points = np.stack([a * points[:, 0] + b * points[:, 1] + c, d * points[:, 0] + e * points[:, 1] + f], 1)
    integral = transform is None and np.array_equal(points, np.rint(points))
    points = points.astype(np.int32) if integral else points.round(6)
    ends = np.cumsum(np.bincount(ring_of, minlength=len(rings))).tolist()
    listed = points.tolist()  # one conversion, then slices: plain lists, for any JSON writer
    per_ring = [listed[begin:end] for begin, end in zip([0, *ends[:-1]], ends, strict=True)]
    polygons: list[list[list]] = [[] for _ in range(len(parts))]
    for ring, part in zip(per_ring, part_of.tolist(), strict=True):
        polygons[part].append(ring)
    out: list[list[list[list]]] = [[] for _ in range(len(geometries))]
    for polygon, geometry in zip(polygons, owner.tolist(), strict=True):
        out[geometry].append(polygon)
    return out


def polygons_record(found: Sequence[Region], classes: Sequence[str], size: tuple[int, int]) -> dict:
    """The ``polygons`` output: image size and, per region, class, area, bbox and rings (pixel coordinates)."""
    rings = _rings([r.geometry for r in found], None)
    return {"width": size[1], "height": size[0], "regions": [
        {"class": classes[r.class_index], "class_index": r.class_index, "area": r.area, "bbox": list(r.bbox),
         **({"mean_confidence": r.mean_confidence} if r.mean_confidence is not None else {}),
         "polygons": polygons}
        for r, polygons in zip(found, rings, strict=True)
    ]}  # fmt: skip


def geojson_record(found: Sequence[Region], classes: Sequence[str], palette: Sequence[Sequence[int]],
                   reference: Georeference | None = None) -> dict:  # fmt: skip
    """A GeoJSON FeatureCollection: one feature per region, in pixel coordinates or the input's map coordinates."""
    features = []
    all_rings = _rings([r.geometry for r in found], reference.transform if reference else None)
    for number, (region, rings) in enumerate(zip(found, all_rings, strict=True)):
        geometry = ({"type": "Polygon", "coordinates": rings[0]} if len(rings) == 1
                    else {"type": "MultiPolygon", "coordinates": rings})  # fmt: skip
        r, g, b = palette[region.class_index]
        features.append({"type": "Feature", "id": number, "geometry": geometry, "properties": {
            "class": classes[region.class_index], "class_index": region.class_index, "area": region.area,
            "mean_confidence": region.mean_confidence, "color": f"#{r:02x}{g:02x}{b:02x}"}})  # fmt: skip
    collection: dict = {"type": "FeatureCollection", "features": features}
    if reference is not None:
        collection["crs"] = {"type": "name", "properties": {"name": reference.crs}}
    else:
        collection["coordinates"] = "pixels: x right, y down, pixel edges at integers"
    return collection


def region_summary(found: Sequence[Region], classes: Sequence[str]) -> list[dict]:
    """Per class present: how many regions and their bounding boxes (for the JSON summary)."""
    by_class: dict[int, list[Region]] = {}
    for region in found:
        by_class.setdefault(region.class_index, []).append(region)
    return [{"class": classes[k], "class_index": k, "regions": len(v), "bboxes": [list(r.bbox) for r in v]}
            for k, v in sorted(by_class.items())]  # fmt: skip


def dumps(record: object) -> bytes:
    """Compact JSON bytes (masks as JSON are large; no indentation), by orjson: 0.1 against 0.7 ms for
    ``json.dumps`` on a 360x480 road map's GeoJSON. Numpy scalars or arrays in a record are written too."""
    import orjson

    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
