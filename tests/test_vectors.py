"""Masks as vectors: COCO RLE against pycocotools, valid polygons that rasterize back to the label map, GeoJSON
(pixel and map coordinates), tiled equals whole, and the batch command and the service producing them."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio.features
from PIL import Image
from pycocotools import mask as coco
from shapely.geometry import shape

from segserve.runtime import Segmenter
from segserve.runtime.vectors import coco_rle, geojson_record, polygons_record, regions

ROOT = Path(__file__).resolve().parent.parent
CAMVID_VAL = ROOT.parent / "shared" / "data" / "camvid" / "val"
NAMES = [f"class{i}" for i in range(6)]
PALETTE = [(i * 40, 255 - i * 40, 7 * i) for i in range(6)]


def blobs(height: int, width: int, seed: int) -> np.ndarray:
    """A label map with blobs of every size, holes, diagonal contacts and one-pixel specks."""
    coarse = np.random.default_rng(seed).integers(0, 6, size=(max(2, height // 9), max(2, width // 7)), dtype=np.uint8)
    labels = np.array(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))  # ragged edges
    labels = np.clip(labels, 0, 5)
    labels[::11, ::13] = 5  # specks
    return labels


def smooth(height: int, width: int, seed: int) -> np.ndarray:
    """A label map with smooth region borders, like a segmentation's: the argmax of random smooth class fields."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((6, max(2, height // 40), max(2, width // 40))).astype(np.float32)
    fields = np.stack([np.asarray(Image.fromarray(c).resize((width, height), Image.BICUBIC)) for c in coarse])
    return fields.argmax(axis=0).astype(np.uint8)


def road_labels() -> np.ndarray:
    """A real prediction: the shipped model on a CamVid frame (a smooth synthetic map where ../shared is absent)."""
    frames = sorted(CAMVID_VAL.glob("*.png"))
    if not frames:
        return smooth(360, 480, 9)
    return Segmenter(threads=2).segment(frames[5]).labels


def rasterized(found, shape_: tuple[int, int]) -> np.ndarray:
    return (
        rasterio.features.rasterize(((r.geometry, r.class_index + 1) for r in found), out_shape=shape_, dtype=np.int32)
        - 1
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rle_decodes_with_pycocotools_to_each_class_mask(seed: int) -> None:
    labels = blobs(97 + seed * 40, 131 + seed * 23, seed) if seed < 2 else road_labels()
    entries = coco_rle(labels, [f"c{i}" for i in range(int(labels.max()) + 1)])
    assert [e["category_id"] for e in entries] == sorted(int(v) for v in np.unique(labels))
    for entry in entries:
        encoded = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}
        truth = labels == entry["category_id"]
        assert np.array_equal(coco.decode(encoded).astype(bool), truth)
        assert entry["area"] == int(coco.area(encoded)) == int(truth.sum())
        assert entry["bbox"] == [int(v) for v in coco.toBbox(encoded)]
        assert (
            coco.encode(np.asfortranarray(truth.astype(np.uint8)))["counts"].decode() == entry["segmentation"]["counts"]
        )


@pytest.mark.parametrize("source", ["ragged", "smooth", "road"])
def test_polygons_are_valid_and_rasterize_back(source: str) -> None:
    labels = {"ragged": lambda: blobs(180, 240, 4), "smooth": lambda: smooth(300, 400, 4), "road": road_labels}[
        source
    ]()
    exact = regions(labels, tolerance=0)
    assert all(r.geometry.is_valid for r in exact)
    assert np.array_equal(rasterized(exact, labels.shape), labels)  # 100% at tolerance 0, whatever the map
    assert sum(r.area for r in exact) == labels.size
    simplified = regions(labels)  # default tolerance: about 1 px
    assert all(r.geometry.is_valid for r in simplified)
    if source != "ragged":  # segmentation-like borders (a map of one-pixel specks and stairs loses more)
        assert (rasterized(simplified, labels.shape) == labels).mean() >= 0.99
    assert sum(len(r.geometry.exterior.coords) for r in simplified if r.geometry.geom_type == "Polygon") < sum(
        len(r.geometry.exterior.coords) for r in exact
    )
    for region in exact:
        x, y, w, h = region.bbox
        inside = labels[y : y + h, x : x + w] == region.class_index
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    assert all(r.area >= 20 for r in regions(labels, min_area=20))


def test_polygons_and_geojson_records_hold_holes_and_properties() -> None:
    labels = np.zeros((40, 50), np.uint8)
    labels[5:30, 5:40] = 1
    labels[10:15, 10:15] = 2  # a hole in class 1, an island of class 2
    probabilities = np.full((6, 40, 50), 0.02, np.float32)  # labels are the argmax, as the Segmenter gives them
    for index, top in enumerate((0.9, 0.8, 0.7)):
        probabilities[index][labels == index] = top
    found = regions(labels, tolerance=0, probabilities=probabilities)
    record = polygons_record(found, NAMES, labels.shape)
    ring = next(r for r in record["regions"] if r["class"] == "class1")
    assert len(ring["polygons"][0]) == 2 and ring["area"] == 25 * 35 - 25 and ring["bbox"] == [5, 5, 35, 25]
    collection = geojson_record(found, NAMES, PALETTE)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 3
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and geometry.area == feature["properties"]["area"]
        for linear in feature["geometry"]["coordinates"]:
            assert linear[0] == linear[-1] and len(linear) >= 4  # closed rings
        properties = feature["properties"]
        assert set(properties) == {"class", "class_index", "area", "mean_confidence", "color"}
        assert properties["mean_confidence"] == pytest.approx([0.9, 0.8, 0.7][properties["class_index"]])
        assert properties["color"] == "#{:02x}{:02x}{:02x}".format(*PALETTE[properties["class_index"]])
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        regions(labels, tolerance=-1)


def test_a_tiled_image_gives_regions_across_tile_borders() -> None:
    frames = sorted(CAMVID_VAL.glob("*.png"))
    if frames:  # a road scene at twice its size: road and sky span many tiles
        image = np.asarray(Image.open(frames[20]).convert("RGB").resize((960, 720), Image.BILINEAR))
    else:
        image = np.full((720, 960, 3), 120, np.uint8)
        image[100:400, 200:700] = (200, 40, 40)
    whole = Segmenter(threads=2, scale="native").segment(image).labels  # not tiled (below 2 x 1024^2 pixels)
    tiled = Segmenter(threads=2, tile=256, overlap=64, tile_above=1, scale="native").segment(image).labels
    found = regions(tiled, tolerance=0)
    assert np.array_equal(rasterized(found, tiled.shape), tiled)
    spans = [r for r in found if r.bbox[2] > 256 or r.bbox[3] > 256]  # wider than a tile: across its borders
    assert spans, "no region crosses tile borders"
    assert all(r.geometry.geom_type == "Polygon" for r in spans)  # one polygon each, not one piece per tile
    assert (tiled == whole).mean() > 0.9  # the tiles were blended into one map of the same scene


def test_batch_writes_every_vector_kind(tmp_path: Path, segserve_command: list[str], small_model) -> None:
    path, _ = small_model
    source = tmp_path / "in" / "frame.png"
    source.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(source)
    result = subprocess.run(
        [
            *segserve_command,
            "segment",
            str(source),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(path),
            "--outputs",
            "labels,rle,polygons,geojson,json",
            "--summary-regions",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    labels = np.asarray(Image.open(out / "frame.labels.png"))
    for entry in json.loads((out / "frame.rle.json").read_text()):
        encoded = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}
        assert np.array_equal(coco.decode(encoded).astype(bool), labels == entry["category_id"])
    polygons = json.loads((out / "frame.polygons.json").read_text())
    assert (polygons["width"], polygons["height"]) == (90, 60) and polygons["regions"]
    features = json.loads((out / "frame.geojson").read_text())["features"]
    assert len(features) == len(polygons["regions"])
    summary = json.loads((out / "frame.json").read_text())["regions"]
    assert sum(s["regions"] for s in summary) == len(features)
    for bad, message in (
        (["--tolerance", "-1"], "tolerance must be a number of pixels >= 0"),
        (["--min-area", "-5"], "min_area must be a number of pixels >= 0"),
    ):
        refused = subprocess.run(
            [
                *segserve_command,
                "segment",
                str(source),
                "-o",
                str(tmp_path / "x"),
                "--model",
                str(path),
                "--outputs",
                "polygons",
                *bad,
            ],
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 2 and message in refused.stderr


def geotiff(path: Path | None = None) -> bytes:
    """A small georeferenced GeoTIFF (UTM 30N, 10 m pixels) as bytes (also written to ``path``)."""
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    pixels = np.random.default_rng(2).integers(0, 256, (3, 40, 60), dtype=np.uint8)
    profile = {
        "driver": "GTiff",
        "width": 60,
        "height": 40,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32630",
        "transform": from_origin(500000, 4600000, 10, 10),
    }
    with MemoryFile() as memory:
        with memory.open(**profile) as dataset:
            dataset.write(pixels)
        data = memory.read()
    if path is not None:
        path.write_bytes(data)
    return data


def test_geotiff_gives_geojson_in_map_coordinates(tmp_path: Path, segserve_command, small_model) -> None:
    path, _ = small_model
    image = tmp_path / "tile.tif"
    geotiff(image)
    result = subprocess.run(
        [
            *segserve_command,
            "segment",
            str(image),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(path),
            "--outputs",
            "geojson",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    collection = json.loads((tmp_path / "out" / "tile.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "EPSG:32630"
    x0, y0, x1, y1 = np.array([shape(f["geometry"]).bounds for f in collection["features"]]).T
    assert x0.min() == 500000 and x1.max() == 500600 and y0.min() == 4599600 and y1.max() == 4600000


def test_service_regions_endpoint(tmp_path_factory) -> None:
    import httpx
    from devserver import running_service

    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "SEGSERVE_THREADS": "2"}
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(png, "PNG")
    with running_service(env, home / "serve.log") as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        labels = np.asarray(
            Image.open(
                io.BytesIO(
                    client.post("/segment", content=png.getvalue(), headers={"content-type": "image/png"}).content
                )
            )
        )
        rle = client.post("/regions?format=rle", content=png.getvalue(), headers={"content-type": "image/png"})
        assert rle.status_code == 200 and rle.headers["content-type"] == "application/json"
        for entry in rle.json():
            encoded = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}
            assert np.array_equal(coco.decode(encoded).astype(bool), labels == entry["category_id"])
        form = client.post(
            "/regions", files={"image": ("f.png", png.getvalue())}, data={"format": "polygons", "tolerance": "0"}
        )
        assert form.status_code == 200 and form.json()["regions"]
        geo = client.post("/regions", files={"image": ("f.png", png.getvalue())}, data={"min_area": "10"})
        assert geo.headers["content-type"] == "application/geo+json"
        assert all(f["properties"]["area"] >= 10 for f in geo.json()["features"])
        mapped = client.post("/regions", content=geotiff(), headers={"content-type": "image/tiff"})
        assert mapped.json()["crs"]["properties"]["name"] == "EPSG:32630"
        summary = client.post("/analyze?regions=true", content=png.getvalue(), headers={"content-type": "image/png"})
        assert summary.json()["regions"] and all(r["regions"] >= 1 for r in summary.json()["regions"])
        for query, message in (
            ("format=shp", "regions format must be rle or polygons or geojson"),
            ("tolerance=-1", "tolerance must be >= 0"),
            ("min_area=x", "min_area must be"),
        ):
            refused = client.post(f"/regions?{query}", content=png.getvalue(), headers={"content-type": "image/png"})
            assert refused.status_code == 400 and message in refused.json()["error"]
