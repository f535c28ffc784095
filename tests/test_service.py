"""The HTTP service through a real ``bentoml serve`` process on a free port, over loopback HTTP."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from conftest import png_bomb
from devserver import running_service
from PIL import Image

from segserve.runtime import Segmenter, load_model

ROOT = Path(__file__).resolve().parent.parent
CAMVID_VAL = ROOT.parent / "shared" / "data" / "camvid" / "val"
TIMEOUT = httpx.Timeout(60.0)


class Server:
    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process, self.url = process, url
        self.client = httpx.Client(base_url=url, timeout=TIMEOUT)

    def rss(self) -> int:
        """Resident memory of the server's whole process tree, bytes."""
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())

    def post(self, endpoint: str, image: bytes, content_type: str = "image/png", **fields) -> httpx.Response:
        files = {"image": ("upload", image, content_type)}
        return self.client.post(f"/{endpoint}", files=files, data={k: str(v) for k, v in fields.items()})


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "SEGSERVE_THREADS": "2", "SEGSERVE_MAX_PIXELS": "40000000"}
    env.pop("SEGSERVE_MODEL", None)
    with running_service(env, home / "serve.log") as (url, process):
        yield Server(process, url)


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def runtime() -> Segmenter:
    return Segmenter(threads=2)


@pytest.mark.parametrize("size", [(1, 1), (333, 517), (1500, 97)])
def test_segment_equals_the_runtime_at_odd_sizes(server: Server, runtime: Segmenter, size) -> None:
    pixels = noise(*size, seed=size[1])
    answer = server.post("segment", png(pixels))
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(answer.content)) as labels:
        assert labels.mode == "P" and labels.size == (size[1], size[0])
        assert np.array_equal(np.asarray(labels), runtime.segment(pixels).labels)


def test_any_declared_content_type_is_accepted(server: Server) -> None:
    jpeg = png(noise(40, 60), fmt="JPEG")
    for declared in ("application/octet-stream", "image/png", "text/plain"):
        answer = server.post("segment", jpeg, content_type=declared)
        assert answer.status_code == 200, (declared, answer.text)


def test_overlay_heatmaps_and_analyze(server: Server, runtime: Segmenter) -> None:
    pixels = noise(90, 120, seed=3)
    jpeg = server.post("overlay", png(pixels), alpha=0.3, format="jpeg")
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size == (120, 90)
    plain = server.post("overlay", png(pixels), alpha=0)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(plain.content))), pixels)  # alpha 0: the image itself

    classes = runtime.metadata.classes
    expected = runtime.segment(pixels, probabilities=True)
    npz = server.post("heatmaps", png(pixels), classes=f"{classes[3]},{classes[0]}")
    assert npz.status_code == 200
    arrays = np.load(io.BytesIO(npz.content))
    assert sorted(arrays.files) == sorted([classes[3], classes[0]])
    assert np.abs(arrays[classes[3]].astype(np.float32) - expected.probabilities[3]).max() < 1e-3
    zipped = server.post("heatmaps", png(pixels), format="png")
    assert zipped.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
        names = archive.namelist()
        assert len(names) == len(classes)
        grey = np.asarray(Image.open(io.BytesIO(archive.read(names[3]))))
    assert grey.shape == (90, 120) and np.abs(grey / 255 - expected.probabilities[3]).max() <= 0.5 / 255 + 1e-3

    summary = server.post("analyze", png(pixels)).json()
    assert (summary["width"], summary["height"]) == (120, 90)
    assert sum(c["pixels"] for c in summary["classes"]) == 90 * 120
    assert {"decode", "inference"} <= set(summary["timings_ms"])


def test_metadata_matches_the_onnx_file(server: Server, runtime: Segmenter) -> None:
    card = server.client.get("/metadata").json()
    stored = json.loads(load_model(runtime.model_path).metadata.to_json())
    assert {k: card[k] for k in stored} == stored
    assert card["providers"] == ["CPUExecutionProvider"] and card["segserve_version"]


@pytest.mark.parametrize(
    ("endpoint", "image", "fields", "status", "message"),
    [
        ("segment", b"", {}, 400, "empty"),
        ("segment", b"GIF89a but not really", {}, 400, "not an image"),
        ("segment", "truncated", {}, 400, "cannot be decoded"),
        ("segment", png_bomb(50_000, 50_000), {}, 413, "too large"),
        ("heatmaps", "good", {"classes": "road,unicorn"}, 400, "unknown class(es) unicorn"),
        ("overlay", "good", {"alpha": "2"}, 400, "alpha must be between 0 and 1"),
        ("overlay", "good", {"alpha": "half"}, 400, "alpha must be a number between 0 and 1"),
        ("overlay", "good", {"format": "gif"}, 400, "overlay format must be png or jpeg"),
    ],
    ids=["empty", "not-image", "truncated", "bomb", "unknown-class", "alpha-range", "alpha-type", "format"],
)
def test_client_errors_are_4xx_json_and_the_server_carries_on(server, endpoint, image, fields, status, message):
    good = png(noise(50, 70))
    named = {"good": good, "truncated": png(noise(200, 300))[:3000]}
    data = named[image] if isinstance(image, str) else image
    started = time.perf_counter()
    answer = server.post(endpoint, data, **fields)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert "/tmp" not in answer.text and str(ROOT) not in answer.text  # no server paths
    if status == 413:
        assert time.perf_counter() - started < 5
    assert server.client.get("/livez").status_code == 200
    assert server.post("segment", good).status_code == 200


def test_a_request_without_an_image_is_400(server: Server) -> None:
    answer = server.client.post("/segment", data={"alpha": "1"})
    assert answer.status_code == 400 and "image" in answer.text


def test_camvid_road_scene_is_plausible(server: Server) -> None:
    """The shipped model on a CamVid val frame (or a synthetic one): road low, sky high, building in between."""
    frames = sorted(CAMVID_VAL.glob("*.png"))
    if frames:
        data = frames[len(frames) // 3].read_bytes()
        truth = np.asarray(Image.open(ROOT.parent / "shared/data/camvid/valannot" / frames[len(frames) // 3].name))
    else:  # no shared data here: only the contract (a full-size mask of known classes) is checked
        data, truth = png(noise(360, 480)), None
    answer = server.post("segment", data)
    labels = np.asarray(Image.open(io.BytesIO(answer.content)))
    assert labels.shape == (360, 480)
    if truth is not None:
        classes = server.client.get("/metadata").json()["classes"]
        road, sky, building = classes.index("road"), classes.index("sky"), classes.index("building")
        for index in (road, sky, building):
            region = truth == index
            assert (labels[region] == index).mean() > 0.7, classes[index]
        assert (labels[-40:] == road).mean() > 0.5 and (labels[:40] == sky).mean() > 0.3


def test_load_400_requests_16_clients_no_errors_bounded_memory(server: Server) -> None:
    sizes = [(64, 64), (97, 151), (240, 320), (360, 480), (33, 517)]
    bodies = [png(noise(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]

    def call(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
            files = {"image": ("x.png", bodies[i % len(bodies)], "image/png")}
            return client.post("/segment", files=files).status_code

    with ThreadPoolExecutor(16) as pool:
        first = list(pool.map(call, range(50)))
        after_50 = server.rss()
        rest = list(pool.map(call, range(50, 400)))
    after_400 = server.rss()
    assert first + rest == [200] * 400
    assert after_400 <= 1.2 * after_50, f"RSS {after_50 / 1e6:.0f} MB after 50, {after_400 / 1e6:.0f} MB after 400"


def test_python_client_from_the_readme(server: Server, runtime: Segmenter, tmp_path: Path) -> None:
    import bentoml

    image = tmp_path / "street.png"
    image.write_bytes(png(noise(45, 71, seed=8)))
    with bentoml.SyncHTTPClient(server.url, timeout=60) as client:
        summary = client.analyze(image=image)
        labels = client.segment(image=image)
    assert (summary["width"], summary["height"]) == (71, 45)
    assert np.array_equal(np.asarray(Image.open(labels)), runtime.segment(image).labels)
