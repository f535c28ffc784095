"""The torch-free Segmenter: same answers as the PyTorch model, any image mode, the default model, tiling."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segserve.export import checkpoint_graph, classifier_graph, export_onnx
from segserve.modelcard import ModelFileError
from segserve.runtime.segmenter import MODEL_ENV, Segmenter, default_model_path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from test_export import fake_checkpoint

    graph, metadata = checkpoint_graph(fake_checkpoint("8s", input_scale=0.5, backbone="mobilenet_v3_small"))
    path = export_onnx(graph, tmp_path_factory.mktemp("seg") / "m.onnx", metadata)
    return path, graph.pipeline.eval()


def torch_labels(pipeline: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return pipeline(torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None]).argmax(1)[0].numpy()


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (240, 320), (333, 517)])
def test_labels_match_pytorch(model, size: tuple[int, int]) -> None:
    path, pipeline = model
    pixels = np.random.default_rng(sum(size)).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    result = Segmenter(path, threads=1).segment(pixels, probabilities=True)
    assert result.labels.shape == size and result.probabilities.shape == (5, *size)
    assert (result.labels == torch_labels(pipeline, pixels)).mean() >= 0.999
    assert np.allclose(result.probabilities.sum(axis=0), 1, atol=1e-5)
    assert {"decode", "inference"} <= set(result.timings)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_image_modes_reach_the_model_as_rgb(model, mode: str) -> None:
    path, pipeline = model
    rgb = np.random.default_rng(3).integers(0, 256, size=(45, 61, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    expected_pixels = np.asarray(image.convert("RGB")) if mode != "I;16" else np.repeat(
        np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)  # fmt: skip
    labels = Segmenter(path, threads=1).segment(buffer.getvalue()).labels
    assert (labels == torch_labels(pipeline, np.ascontiguousarray(expected_pixels))).mean() >= 0.999


def test_tiling_covers_the_image_and_blends(model) -> None:
    path, _ = model
    pixels = np.random.default_rng(5).integers(0, 256, size=(300, 700, 3), dtype=np.uint8)
    tiled = Segmenter(path, threads=1, tile=128, overlap=32, tile_above=0).segment(pixels, probabilities=True)
    assert tiled.labels.shape == (300, 700) and tiled.labels.dtype == np.uint8
    assert np.allclose(tiled.probabilities.sum(axis=0), 1, atol=1e-5)
    assert (tiled.probabilities.argmax(axis=0) == tiled.labels).mean() >= 0.999  # float ties aside


def test_classifier_heatmaps_are_resized_to_the_image(tmp_path: Path) -> None:
    graph, metadata = classifier_graph("mobilenet_v3_small")
    path = export_onnx(graph, tmp_path / "cls.onnx", metadata)
    result = Segmenter(path, threads=1).segment(np.zeros((250, 300, 3), np.uint8), probabilities=True)
    assert result.labels.shape == (250, 300) and result.labels.dtype == np.uint16
    assert result.probabilities.shape == (1000, 250, 300)


def test_default_model_comes_from_the_environment(model, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = model
    monkeypatch.setenv(MODEL_ENV, str(path))
    assert default_model_path() == path
    assert Segmenter(threads=1).metadata.classes[0] == "sky"
    monkeypatch.setenv(MODEL_ENV, str(path.parent / "nope.onnx"))
    with pytest.raises(ModelFileError, match="model file does not exist"):
        Segmenter()
    with pytest.raises(ValueError, match="tile must be >= 64"):
        Segmenter(path, tile=32)
