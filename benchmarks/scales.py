"""Scale-aware inference against native-size inference on CamVid val frames upscaled 1x-8x (camera sizes)."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from benchmarks.common import CAMVID, Section
from segserve.metrics import compute_metrics, confusion_matrix
from segserve.runtime import Segmenter
from segserve.settings import Settings


def _frames(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    files = sorted((CAMVID / "val").glob("*.png"))
    picked = files[:: max(1, len(files) // count)][:count]
    return [(np.asarray(Image.open(f).convert("RGB")), np.asarray(Image.open(CAMVID / "valannot" / f.name)))
            for f in picked]  # fmt: skip


def _up(array: np.ndarray, factor: float, resample: int) -> np.ndarray:
    if factor == 1:
        return array
    size = (round(array.shape[1] * factor), round(array.shape[0] * factor))
    return np.asarray(Image.fromarray(array).resize(size, resample))


def scales(quick: bool) -> Section:
    """mIoU, pixel accuracy and ms per image at 0.5x, 1x, 2x, 4x and 8x for ``scale="model"`` and ``"native"``."""
    settings = Settings.from_env({})
    runners = {scale: Segmenter(scale=scale, settings=settings) for scale in ("model", "native")}
    frames = _frames(6 if quick else 24)
    if not frames:
        return Section("Scale-aware inference: skipped", ["reason"], [["CamVid val not present (../shared)"]])
    names = runners["model"].metadata.classes
    section = Section(
        f"Scale-aware inference on CamVid val frames upscaled ({len(frames)} frames, "
        f"{runners['model'].choice.candidate.label})",
        ["factor", "size", "model mIoU", "native mIoU", "model pixel acc", "native pixel acc", "model ms",
         "native ms", "native / model time"],
    )  # fmt: skip
    for factor in (0.5, 1, 2, 4, 8):
        confusion = {scale: 0 for scale in runners}
        seconds: dict[str, list[float]] = {scale: [] for scale in runners}
        for image, truth in frames:
            big, big_truth = _up(image, factor, Image.BILINEAR), _up(truth, factor, Image.NEAREST)
            for scale, runner in runners.items():  # alternating, per frame
                time.sleep(0.05)
                started = time.perf_counter()
                labels = runner.segment(big).labels
                seconds[scale].append(time.perf_counter() - started)
                confusion[scale] = confusion[scale] + confusion_matrix(big_truth, labels, len(names), 11)
        metrics = {scale: compute_metrics(confusion[scale], names) for scale in runners}
        ms = {scale: 1000 * float(np.median(seconds[scale])) for scale in runners}
        height, width = frames[0][0].shape[:2]
        section.rows.append([f"{factor:g}x", f"{round(height * factor)}x{round(width * factor)}",
                             100 * metrics["model"].mean_iou, 100 * metrics["native"].mean_iou,
                             100 * metrics["model"].pixel_accuracy, 100 * metrics["native"].pixel_accuracy,
                             ms["model"], ms["native"], f"{ms['native'] / ms['model']:.2f}"])  # fmt: skip
    section.notes.append(
        "Frames rescaled bilinearly (antialiased at 0.5x), labels by nearest neighbour; scored at that size, void "
        "ignored. "
        "model: the image is resampled to the model's training frame area (360x480) and the labels brought back "
        "(segserve.runtime.resample); native: the image runs at its own size, in 1024 px tiles above 2 MP. "
        "ms: median per image, decode excluded, labels only."
    )
    return section
