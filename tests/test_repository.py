"""The model repository: layout, lookup that never leaves the folder, reload of settled files, refusal of broken
ones, the LRU bound; then the same through a real ``bentoml serve`` under concurrent traffic."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from devserver import running_service
from PIL import Image

from segserve.runtime.repository import ModelRepository, UnknownModel, scan
from segserve.runtime.segmenter import Segmenter
from segserve.settings import Settings

HOSTILE_NAMES = ["../a", "..", "/etc/passwd", "a/../../x", "a@1/../../x", "%2e%2e/a", "a@-1", "a@x", "outside",
                 "outside@1", "a b", "a\\..\\b"]  # fmt: skip


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A model with other classes and colours than the small test model (3 classes, not 5)."""
    from segserve.export import checkpoint_graph, export_onnx
    from segserve.training.checkpoint import Checkpoint, ModelConfig

    config = ModelConfig(backbone="mobilenet_v3_small", variant="8s", classes=["water", "land", "cloud"],
                         palette=[[0, 0, 255], [0, 255, 0], [255, 255, 255]], mean=[0.5, 0.5, 0.5],
                         std=[0.25, 0.25, 0.25], input_scale=0.5)  # fmt: skip
    graph, metadata = checkpoint_graph(Checkpoint(config, config.pipeline().state_dict()))
    return export_onnx(graph, tmp_path_factory.mktemp("other") / "other.onnx", metadata)


def load(entry) -> Segmenter:
    return Segmenter(entry.path, threads=1, settings=Settings.from_env({"SEGSERVE_PROVIDERS": "CPUExecutionProvider"}))


def place(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` the recommended way: a temporary name in the same folder, then a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".incoming-{target.name}"
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    return target


@pytest.fixture
def folder(tmp_path: Path, small_model, other_model: Path) -> Path:
    root = tmp_path / "models"
    place(small_model[0], root / "roads" / "1" / "model.onnx")
    place(other_model, root / "coast.onnx")
    (root / "default.json").write_text('{"model": "roads"}')
    outside = tmp_path / "elsewhere"
    place(small_model[0], outside / "1" / "model.onnx")
    (root / "outside").symlink_to(outside, target_is_directory=True)  # leads out of the folder: never listed
    (root / "linked.onnx").symlink_to(small_model[0])  # a file outside the folder: never listed
    return root


def test_layout_default_and_lookup(folder: Path) -> None:
    found = scan(folder)
    assert sorted(found) == ["coast", "roads"] and list(found["coast"]) == [1]
    models = ModelRepository(folder, load, max_loaded=2)
    assert models.resolve(None).label == "roads@1" and models.resolve("coast").label == "coast@1"
    assert models.resolve("roads@1").path == folder / "roads" / "1" / "model.onnx"
    with pytest.raises(UnknownModel, match="roads has no version 7; versions: 1"):
        models.resolve("roads@7")
    with pytest.raises(UnknownModel, match=r"unknown model 'ships'; models: coast \(versions 1\), roads"):
        models.resolve("ships")


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_no_name_leads_out_of_the_folder(folder: Path, name: str) -> None:
    with pytest.raises(UnknownModel):
        ModelRepository(folder, load).resolve(name)


def test_reload_takes_settled_files_and_refuses_broken_ones(folder: Path, small_model) -> None:
    models = ModelRepository(folder, load, max_loaded=3, poll_seconds=0.1)
    held = models.get("roads")  # a request in flight holds version 1
    place(small_model[0], folder / "roads" / "2" / "model.onnx")
    models.refresh()
    assert models.resolve("roads").version == 1  # seen once: it may still be being written
    models.refresh()
    assert models.resolve("roads").version == 2  # unchanged across two scans: taken
    assert models.get("roads")[0].version == 2 and held[1].segment(np.zeros((8, 8, 3), np.uint8)).labels.shape == (8, 8)
    (folder / "roads" / "3").mkdir()
    (folder / "roads" / "3" / "model.onnx").write_bytes(b"not an onnx file" * 100)
    models.refresh()
    models.refresh()
    assert models.resolve("roads").version == 2  # refused, the previous version keeps serving
    listed = {row["version"] for row in models.listing()[1]["versions"]}
    assert listed == {1, 2}
    shutil.rmtree(folder / "roads" / "2")
    models.refresh()
    assert models.resolve("roads").version == 1


def test_at_most_max_loaded_models_are_resident(folder: Path) -> None:
    models = ModelRepository(folder, load, max_loaded=1)
    models.get("roads")
    models.get("coast")
    loaded = {(m["name"], v["version"]) for m in models.listing() for v in m["versions"] if v["loaded"]}
    assert loaded == {("coast", 1)}
    assert models.get("roads")[1].metadata.classes != models.get("coast")[1].metadata.classes


# -- through a real server ----------------------------------------------------------------------------------------


@pytest.fixture
def served(folder: Path, tmp_path: Path) -> Iterator[tuple[httpx.Client, Path, Path]]:
    home = tmp_path / "bentoml-home"
    env = {**os.environ, "BENTOML_HOME": str(home), "SEGSERVE_THREADS": "2", "SEGSERVE_MODELS": str(folder),
           "SEGSERVE_MODELS_POLL": "0.3", "SEGSERVE_MAX_LOADED": "2"}  # fmt: skip
    env.pop("SEGSERVE_MODEL", None)
    home.mkdir()
    with running_service(env, home / "serve.log") as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        yield client, home / "serve.log", folder


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = png(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))


def analyze(client: httpx.Client, model: str | None = None) -> httpx.Response:
    query = {"model": model} if model is not None else {}
    return client.post("/analyze", content=IMAGE, params=query, headers={"content-type": "image/png"})


def test_served_models_answer_with_their_own_classes(served) -> None:
    client, _, _ = served
    listing = client.get("/models").json()
    assert {m["name"] for m in listing["models"]} == {"roads", "coast"}
    for name, classes in (("roads", 5), ("coast", 3)):
        answer = client.post("/segment", files={"image": ("x.png", IMAGE)}, data={"model": name})
        assert answer.status_code == 200, answer.text
        with Image.open(io.BytesIO(answer.content)) as labels:
            palette = np.asarray(labels.getpalette()[: 3 * classes]).reshape(classes, 3)
        card = client.get("/metadata", params={"model": name}).json()
        assert len(card["classes"]) == classes and card["model"]["name"] == name
        assert palette.tolist() == [list(c) for c in card["palette"]]
    assert analyze(client).json()["model"] == "roads@1"  # the default.json entry
    metrics = client.get("/metrics").text
    assert "segserve_model_requests_total{" in metrics and 'model="coast"' in metrics
    assert "segserve_model_inference_seconds_bucket" in metrics


def test_served_hostile_model_names_get_404(served) -> None:
    client, _, _ = served
    for name in HOSTILE_NAMES:
        answer = analyze(client, name)
        assert answer.status_code == 404 and set(answer.json()) == {"error"}, (name, answer.text)
        assert client.get("/metadata", params={"model": name}).status_code == 404
        form = client.post("/segment", files={"image": ("x.png", IMAGE)}, data={"model": name})
        assert form.status_code == 404, (name, form.text)


def test_a_new_version_mid_traffic_loses_no_request(served, small_model) -> None:
    client, log, models_dir = served
    statuses: list[int] = []
    seen: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            while not stop.is_set():
                answer = analyze(own, "roads")
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    seen.append(answer.json()["model"])

    workers = [threading.Thread(target=traffic) for _ in range(8)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    place(small_model[0], models_dir / "roads" / "2" / "model.onnx")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not seen or seen[-1] != "roads@2"):
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join(60)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert "roads@1" in seen and seen[-1] == "roads@2", log.read_text()[-2000:]
    assert analyze(client, "roads").json()["model"] == "roads@2"


def test_a_corrupt_version_is_refused_while_the_old_one_serves(served) -> None:
    client, log, models_dir = served
    (models_dir / "roads" / "5").mkdir()
    (models_dir / "roads" / "5" / "model.onnx").write_bytes(b"\x08\x01garbage" * 1000)
    time.sleep(2.0)  # several scans
    assert analyze(client, "roads").json()["model"] == "roads@1"
    assert "refused roads@5" in log.read_text()
    versions = [v["version"] for v in client.get("/models").json()["models"][1]["versions"]]
    assert 5 not in versions


def test_served_lru_bound(served) -> None:
    client, _, _ = served
    for name in ("coast", "roads@1", "coast"):
        assert analyze(client, name).status_code == 200
    loaded = [(m["name"], v["version"]) for m in client.get("/models").json()["models"] for v in m["versions"]
              if v["loaded"]]  # fmt: skip
    assert len(loaded) <= 2 and ("coast", 1) in loaded


def test_batch_command_takes_a_model_of_the_repository(folder: Path, tmp_path: Path, segserve_command) -> None:
    image = tmp_path / "in" / "frame.png"
    image.parent.mkdir()
    image.write_bytes(IMAGE)
    done = subprocess.run([*segserve_command, "segment", str(image), "-o", str(tmp_path / "out"), "--models",
                           str(folder), "--model", "coast@1", "--no-progress"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "model coast@1" in done.stderr
    with Image.open(tmp_path / "out" / "frame.labels.png") as labels:
        assert labels.getpalette()[:9] == [0, 0, 255, 0, 255, 0, 255, 255, 255]
    for name in ("coast@9", "../roads"):
        command = [*segserve_command, "segment", str(image), "-o", str(tmp_path / "x"), "--models", str(folder)]
        refused = subprocess.run([*command, "--model", name], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and ("no version 9" in refused.stderr or "unknown model" in refused.stderr)
