"""Encodings of a segmentation, shared by the batch command and the HTTP service (numpy + Pillow).

* :func:`label_png`: the label map as a palette PNG, same size as the input, pixel value = class index, colours
  from the model's palette (viewers show colours, programs read indices);
* :func:`overlay`: the image blended with the class colours (``alpha`` = weight of the colours), PNG or JPEG;
* :func:`heatmap_pngs` and :func:`heatmaps_npz`: per-class probability maps as 8-bit greyscale PNGs (0-255 for
  0-1) or as one float16 ``.npz`` keyed by class name;
* :func:`summary`: a JSON-ready dict: size, classes present with pixel share and mean confidence, timings.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable softmax over ``axis`` (class scores -> probabilities), float32."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted.astype(np.float32, copy=False)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # speed over the last few percent of size
    return buffer.getvalue()


def label_png(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """An H x W array of class indices (< 256 classes) as a palette PNG."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be H x W, got shape {labels.shape}")
    if len(palette) > 256:
        raise ValueError(f"a palette PNG holds at most 256 classes, the model has {len(palette)}")
    image = Image.fromarray(labels.astype(np.uint8, copy=False)).convert("P")  # L -> P keeps the indices
    flat = [int(v) for colour in palette for v in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return _png(image)


def colourize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """H x W class indices -> H x W x 3 uint8 colours."""
    lookup = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return lookup[labels]


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: Sequence[Sequence[int]],
    alpha: float = 0.5,
    fmt: str = "png",
    quality: int = 90,
) -> bytes:
    """``image`` blended with the class colours: ``(1 - alpha) * image + alpha * colour``, as PNG or JPEG."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    fmt = fmt.lower()
    if fmt not in ("png", "jpeg", "jpg"):
        raise ValueError(f"overlay format must be png or jpeg, got {fmt!r}")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    lookup = np.asarray(palette, dtype=np.float32).reshape(-1, 3) * alpha
    blended = np.empty(image.shape, np.uint8)
    for top in range(0, image.shape[0], 512):  # bands: float temporaries stay small on huge images
        rows = slice(top, top + 512)
        band = image[rows].astype(np.float32) * (1 - alpha) + lookup[labels[rows]]
        blended[rows] = np.clip(np.rint(band), 0, 255)
    result = Image.fromarray(blended)
    if fmt == "png":
        return _png(result)
    buffer = io.BytesIO()
    result.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def heatmap_pngs(probabilities: np.ndarray, classes: Sequence[str]) -> dict[str, bytes]:
    """C x H x W probabilities -> {class name: 8-bit greyscale PNG}, 255 = probability 1."""
    _check(probabilities, classes)
    grey = np.clip(np.rint(probabilities * 255), 0, 255).astype(np.uint8)
    return {name: _png(Image.fromarray(grey[i])) for i, name in enumerate(classes)}


def heatmaps_npz(probabilities: np.ndarray, classes: Sequence[str]) -> bytes:
    """C x H x W probabilities -> a compressed ``.npz`` of float16 H x W arrays keyed by class name."""
    _check(probabilities, classes)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{name: probabilities[i].astype(np.float16) for i, name in enumerate(classes)})
    return buffer.getvalue()


def _check(probabilities: np.ndarray, classes: Sequence[str]) -> None:
    if probabilities.ndim != 3 or probabilities.shape[0] != len(classes):
        raise ValueError(f"expected {len(classes)} x H x W probabilities, got shape {probabilities.shape}")


def summary(
    labels: np.ndarray,
    classes: Sequence[str],
    probabilities: np.ndarray | None = None,
    timings: Mapping[str, float] | None = None,
) -> dict:
    """Size, and for each class present its pixel share and (with ``probabilities``) mean confidence there."""
    total = labels.size
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    present = []
    for index in np.flatnonzero(counts):
        entry = {
            "index": int(index),
            "class": classes[index],
            "pixels": int(counts[index]),
            "share": round(float(counts[index]) / total, 6),
        }
        if probabilities is not None:
            entry["mean_confidence"] = round(float(probabilities[index][labels == index].mean()), 6)
        present.append(entry)
    present.sort(key=lambda e: -e["pixels"])
    result: dict = {"width": int(labels.shape[1]), "height": int(labels.shape[0]), "classes": present}
    if timings is not None:
        result["timings_ms"] = {k: round(v * 1000, 2) for k, v in timings.items()}
    return result
