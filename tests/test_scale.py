"""Scale-aware inference: images at camera sizes are answered as the model's training-size view of them is.

The shipped model records its training frames' size (360x480); an image of another size is resampled to that area
before the network and its answer brought back to full size (segserve.runtime.resample). Checked on CamVid val
frames upscaled 2x-8x against equally upscaled labels, where ../shared is present, and always on synthetic scenes:
the answer for an upscaled image is the upscaled answer for the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segserve.metrics import compute_metrics, confusion_matrix
from segserve.runtime import Segmenter
from segserve.runtime.resample import upsample_labels, upsample_logits, working_size

ROOT = Path(__file__).resolve().parent.parent
CAMVID = ROOT.parent / "shared" / "data" / "camvid"


def _smooth_logits(classes: int, height: int, width: int, seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).standard_normal((classes, 6, 8)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(c).resize((width, height), Image.BICUBIC)) for c in coarse]) * 4


@pytest.mark.parametrize("target", [(150, 200), (361, 479), (720, 960), (1000, 1700)])
def test_boundary_only_upsampling_is_the_argmax_of_bilinear_scores(target: tuple[int, int]) -> None:
    logits = _smooth_logits(11, 120, 160, seed=target[0])
    labels = logits.argmax(axis=0).astype(np.uint8)
    fast = upsample_labels(logits, labels, *target)
    exact = upsample_logits(logits, *target).argmax(axis=0)
    assert fast.shape == target and fast.dtype == np.uint8
    assert (fast == exact).mean() >= 0.99999  # float ties aside
    assert (fast == labels[0, 0]).any() and len(np.unique(fast)) > 1


def test_working_size_keeps_the_aspect_and_leaves_near_sizes_alone() -> None:
    assert working_size(360, 480, (360, 480)) == (360, 480)
    assert working_size(400, 520, (360, 480)) == (400, 520)  # within 1.25x: not worth resampling
    assert working_size(2160, 3840, (360, 480)) == (312, 554)  # 16:9, same area as 360x480
    assert working_size(3000, 4000, (360, 480)) == (360, 480)
    assert working_size(90, 120, (360, 480)) == (90, 120)  # smaller images are not enlarged


def _road_scene(height: int, width: int, seed: int) -> np.ndarray:
    """Sky, buildings, road and a few blocks, smooth at 360x480 (CamVid frames replace it where present)."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, 360)[:, None, None]
    colours = np.where(rows < 0.3, [140, 160, 190], np.where(rows < 0.6, [110, 70, 60], [100, 95, 105]))
    scene = np.broadcast_to(colours, (360, 480, 3)).astype(np.float64).copy()
    for _ in range(4):
        y, x = rng.integers(150, 300), rng.integers(0, 400)
        scene[y : y + 50, x : x + 80] = rng.integers(0, 256, 3)
    scene += rng.normal(0, 6, scene.shape)
    image = Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8))
    return np.asarray(image.resize((width, height), Image.BILINEAR))


def _upscaled(image: np.ndarray, factor: int, resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((image.shape[1] * factor, image.shape[0] * factor), resample))


def _val_frames(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    files = sorted((CAMVID / "val").glob("*.png"))[5::23][:count]
    return [(np.asarray(Image.open(f).convert("RGB")), np.asarray(Image.open(CAMVID / "valannot" / f.name)))
            for f in files]  # fmt: skip


@pytest.fixture(scope="module")
def segmenters() -> dict[str, Segmenter]:
    return {scale: Segmenter(threads=2, scale=scale) for scale in ("model", "native")}


@pytest.mark.parametrize("factor", [2, 4])
def test_an_upscaled_image_gets_the_upscaled_answer(segmenters: dict[str, Segmenter], factor: int) -> None:
    frames = [image for image, _ in _val_frames(2)] or [_road_scene(360, 480, seed) for seed in (1, 2)]
    for image in frames:
        base = segmenters["model"].segment(image).labels
        expected = _upscaled(base, factor, Image.NEAREST)
        big = _upscaled(image, factor, Image.BILINEAR)
        scaled = segmenters["model"].segment(big)
        assert scaled.labels.shape == big.shape[:2]
        assert (scaled.labels == expected).mean() >= 0.95, (scaled.labels == expected).mean()


@pytest.mark.skipif(not (CAMVID / "val").is_dir(), reason="CamVid not present (../shared/data/camvid)")
def test_upscaled_val_frames_keep_their_miou(segmenters: dict[str, Segmenter]) -> None:
    """mIoU on frames upscaled 4x (1440x1920), against labels upscaled alike, within 1.5 points of 1x on the same
    frames; at native scale (the runtime before scale-aware inference) it falls far."""
    frames = _val_frames(4)
    names = segmenters["model"].metadata.classes

    def miou(scale: str, factor: int) -> float:
        confusion = 0
        for image, truth in frames:
            labels = segmenters[scale].segment(_upscaled(image, factor, Image.BILINEAR)).labels
            confusion = confusion + confusion_matrix(_upscaled(truth, factor, Image.NEAREST), labels, len(names), 11)
        return 100 * compute_metrics(confusion, names).mean_iou

    at_1x, at_4x = miou("model", 1), miou("model", 4)
    assert abs(at_4x - at_1x) <= 1.5, (at_1x, at_4x)
    assert miou("native", 4) < at_4x - 3


def test_heatmaps_come_back_at_full_size(segmenters: dict[str, Segmenter]) -> None:
    image = _upscaled(_road_scene(360, 480, 3), 3, Image.BILINEAR)
    result = segmenters["model"].segment(image, probabilities=True)
    assert result.probabilities.shape == (11, 1080, 1440)
    assert np.allclose(result.probabilities.sum(axis=0), 1, atol=1e-4)
    assert (result.probabilities.argmax(axis=0) == result.labels).mean() >= 0.9999
    labels_only = segmenters["model"].segment(image).labels
    assert (labels_only == result.labels).mean() >= 0.9999
