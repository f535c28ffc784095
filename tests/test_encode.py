"""Encodings round-trip: label PNGs keep indices and colours, overlays blend, heatmaps keep probabilities."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segserve.runtime.encode import heatmap_pngs, heatmaps_npz, label_png, overlay, softmax, summary

PALETTE = [(128, 128, 128), (128, 64, 128), (0, 0, 142)]
CLASSES = ["sky", "road", "car"]


@pytest.fixture
def labels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 3, size=(17, 29)).astype(np.uint8)


def test_label_png_keeps_indices_and_palette(labels) -> None:
    image = Image.open(io.BytesIO(label_png(labels, PALETTE)))
    assert image.mode == "P" and image.size == (29, 17)
    assert np.array_equal(np.asarray(image), labels)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(PALETTE, np.uint8)[labels])
    with pytest.raises(ValueError, match="at most 256 classes"):
        label_png(labels, [(0, 0, 0)] * 300)


def test_overlay_blends(labels) -> None:
    image = np.full((17, 29, 3), 200, np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(overlay(image, labels, PALETTE, alpha=0)))), image)
    colours = np.asarray(Image.open(io.BytesIO(overlay(image, labels, PALETTE, alpha=1))))
    assert np.array_equal(colours, np.asarray(PALETTE, np.uint8)[labels])
    half = np.asarray(Image.open(io.BytesIO(overlay(image, labels, PALETTE, alpha=0.5)))).astype(int)
    expected = np.rint((200 + np.asarray(PALETTE)[labels]) / 2)
    assert np.abs(half - expected).max() <= 1
    jpeg = overlay(image, labels, PALETTE, fmt="jpeg")
    assert jpeg[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(jpeg)).size == (29, 17)
    with pytest.raises(ValueError, match="alpha must be between 0 and 1"):
        overlay(image, labels, PALETTE, alpha=1.5)
    with pytest.raises(ValueError, match="png or jpeg"):
        overlay(image, labels, PALETTE, fmt="gif")


def test_heatmaps_keep_probabilities(labels) -> None:
    logits = np.random.default_rng(1).normal(size=(3, 17, 29)).astype(np.float32)
    probabilities = softmax(logits)
    assert np.allclose(probabilities.sum(axis=0), 1, atol=1e-6)
    archive = np.load(io.BytesIO(heatmaps_npz(probabilities, CLASSES)))
    assert sorted(archive.files) == sorted(CLASSES)
    assert archive["road"].dtype == np.float16
    assert np.abs(archive["road"].astype(np.float32) - probabilities[1]).max() < 1e-3
    pngs = heatmap_pngs(probabilities, CLASSES)
    grey = np.asarray(Image.open(io.BytesIO(pngs["car"])))
    assert grey.dtype == np.uint8 and np.abs(grey / 255 - probabilities[2]).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="expected 3 x H x W probabilities"):
        heatmaps_npz(probabilities[:2], CLASSES)


def test_summary_shares_and_confidence() -> None:
    labels = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    probabilities = np.zeros((3, 2, 4), np.float32)
    probabilities[0][labels == 0] = 0.9
    probabilities[1][labels == 1] = 0.6
    result = summary(labels, CLASSES, probabilities, {"inference": 0.0123})
    assert (result["width"], result["height"]) == (4, 2)
    assert [c["class"] for c in result["classes"]] == ["road", "sky"]  # largest first; car absent
    assert result["classes"][0]["share"] == 0.75 and result["classes"][1]["pixels"] == 2
    assert result["classes"][1]["mean_confidence"] == pytest.approx(0.9)
    assert result["timings_ms"] == {"inference": 12.3}
