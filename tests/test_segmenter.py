"""The torch-free Segmenter: same answers as the PyTorch model, any image mode, the default model, tiling."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from segserve.export import classifier_graph, export_onnx
from segserve.modelcard import ModelFileError
from segserve.runtime.segmenter import Segmenter, _starts, _tiling, default_model_path
from segserve.settings import Settings

MODEL_ENV = Settings.variables()["model"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(small_model) -> tuple[Path, torch.nn.Module]:
    return small_model


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


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16"])
def test_image_modes_reach_the_model_as_rgb(model, mode: str) -> None:
    path, pipeline = model
    rgb = np.random.default_rng(3).integers(0, 256, size=(45, 61, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    if mode == "I;16":  # 16-bit grey: scaled to 8 bits, replicated to three channels
        expected_pixels = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)
    else:  # alpha is dropped, the colour channels are segmented as stored
        expected_pixels = np.asarray(image.convert("RGBA" if mode == "LA" else "RGB"))[..., :3]
    labels = Segmenter(path, threads=1).segment(buffer.getvalue()).labels
    assert (labels == torch_labels(pipeline, np.ascontiguousarray(expected_pixels))).mean() >= 0.999


def test_exif_rotated_jpeg_mask_lines_up_with_the_displayed_image(model) -> None:
    path, pipeline = model
    stored = np.random.default_rng(4).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # viewers rotate 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    with Image.open(io.BytesIO(buffer.getvalue())) as reopened:
        displayed = np.asarray(ImageOps.exif_transpose(reopened).convert("RGB"))
    labels = Segmenter(path, threads=1).segment(buffer.getvalue()).labels
    assert labels.shape == (80, 48)
    assert (labels == torch_labels(pipeline, np.ascontiguousarray(displayed))).mean() >= 0.999


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animations_segment_their_first_frame(model, fmt: str) -> None:
    path, pipeline = model
    rng = np.random.default_rng(6)
    frames = [Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)) for _ in range(2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    with Image.open(io.BytesIO(buffer.getvalue())) as first:
        expected = np.asarray(first.convert("RGB"))
    labels = Segmenter(path, threads=1).segment(buffer.getvalue()).labels
    assert (labels == torch_labels(pipeline, np.ascontiguousarray(expected))).mean() >= 0.999


def road_scene(height: int, width: int) -> np.ndarray:
    """A CamVid val frame (when ../shared is here) or a synthetic sky/building/road picture, at height x width."""
    frames = sorted((ROOT.parent / "shared" / "data" / "camvid" / "val").glob("*.png"))
    if frames:
        with Image.open(frames[len(frames) // 2]) as frame:
            return np.asarray(frame.convert("RGB").resize((width, height), Image.BICUBIC))
    rows = np.linspace(0, 1, height)[:, None, None]
    noise = np.random.default_rng(0).normal(0, 12, size=(height, width, 3))
    colours = np.where(rows < 0.35, [150, 170, 200], np.where(rows < 0.6, [120, 60, 50], [110, 100, 115]))
    return np.clip(colours + noise, 0, 255).astype(np.uint8)


def test_tiled_and_whole_labels_agree_on_a_road_scene() -> None:
    """The shipped model at native scale with its default tiles (1024, overlap 256) on an image it would tile."""
    pixels = road_scene(1440, 1920)
    assert pixels.shape[0] * pixels.shape[1] > Segmenter(threads=1).tile_above
    whole = Segmenter(threads=2, tile_above=10**9, scale="native").segment(pixels).labels
    tiled = Segmenter(threads=2, scale="native").segment(pixels).labels
    agreement = (whole == tiled).mean()
    assert agreement >= 0.99, f"tiled vs whole agreement {agreement:.4f}"


@pytest.mark.parametrize("grid", [32, 64, 128, 320, 544, 2048])  # scales 1, 0.5, 0.75, 0.9, 9/17, 1/64
@pytest.mark.parametrize(("tile", "overlap"), [(1024, 256), (256, 64), (128, 32)])
def test_tiles_stay_on_the_grid_and_always_overlap(grid: int, tile: int, overlap: int) -> None:
    """Every tile offset on the alignment grid, every pixel covered, neighbours sharing >= overlap pixels, even
    where the grid is coarser than the tile asked for (the shipped model's 320 px grid with 256 px tiles had left
    rows no tile covered)."""
    used_tile, stride = _tiling(tile, overlap, grid)
    assert used_tile >= tile and used_tile % grid == 0 and stride % grid == 0 and used_tile - stride >= overlap
    for size in (used_tile - 1, used_tile, used_tile + 1, 700, 1440, 3840, 12_000):
        starts = _starts(size, used_tile, stride, grid)
        assert starts[0] == 0 and all(start % grid == 0 for start in starts)
        ends = [start + used_tile for start in starts[:-1]] + [size]  # the last tile runs to the end
        assert size - starts[-1] < used_tile + grid
        for start, previous_end in zip(starts[1:], ends[:-1], strict=True):
            assert previous_end - start >= overlap


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
