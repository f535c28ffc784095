"""The FCN paper's segmentation metrics, all from one confusion matrix (numpy only: usable without torch).

With ``n[i, j]`` the pixels of true class ``i`` predicted as ``j`` and ``t[i] = sum_j n[i, j]``:

* pixel accuracy            ``sum_i n[i, i] / sum_i t[i]``
* mean (class) accuracy     ``mean_i n[i, i] / t[i]``
* mean IoU                  ``mean_i n[i, i] / (t[i] + sum_j n[j, i] - n[i, i])``
* frequency-weighted IoU    ``sum_i t[i] * IoU[i] / sum_i t[i]``

A class with no labelled pixels has no accuracy, and one also never predicted has no IoU (0/0): such classes
are left out of the means (reported as ``None``) rather than counted as 0 or 1. Ignored pixels never enter the
matrix. An image set with no labelled pixel at all has no metrics (all ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """``num_classes`` x ``num_classes`` int64 counts, rows = true class, columns = predicted class.

    Pixels labelled ``ignore_index`` are skipped. A label outside ``[0, num_classes)`` that is not the ignore
    index is a data error and raises ValueError; predictions must lie in range.
    """
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    keep = labels != ignore_index
    truth = labels[keep].astype(np.int64)
    guess = predictions[keep].astype(np.int64)
    if truth.size and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"label {int(truth.max())} is outside the {num_classes} classes and not the ignore index")
    if guess.size and (guess.min() < 0 or guess.max() >= num_classes):
        raise ValueError(f"prediction {int(guess.max())} is outside the {num_classes} classes")
    counts = np.bincount(truth * num_classes + guess, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationMetrics:
    """The four FCN metrics plus per-class IoU and accuracy (``None`` where undefined, see module docs)."""

    pixel_accuracy: float | None
    mean_accuracy: float | None
    mean_iou: float | None
    frequency_weighted_iou: float | None
    per_class_iou: dict[str, float | None]
    per_class_accuracy: dict[str, float | None]
    pixels: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio with NaN where the denominator is 0."""
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _value(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def compute_metrics(confusion: np.ndarray, class_names: list[str] | tuple[str, ...]) -> SegmentationMetrics:
    """The metrics of ``confusion`` (rows true, columns predicted)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {confusion.shape} does not match {len(class_names)} class names")
    correct = np.diag(confusion)
    labelled = confusion.sum(axis=1)  # t_i
    predicted = confusion.sum(axis=0)
    total = labelled.sum()
    iou = _ratio(correct, labelled + predicted - correct)
    accuracy = _ratio(correct, labelled)
    with np.errstate(invalid="ignore"):
        pixel_accuracy = correct.sum() / total if total else np.nan
        mean_accuracy = np.nanmean(accuracy) if np.any(~np.isnan(accuracy)) else np.nan
        mean_iou = np.nanmean(iou) if np.any(~np.isnan(iou)) else np.nan
        fw_iou = np.nansum(labelled * iou) / total if total else np.nan
    return SegmentationMetrics(
        pixel_accuracy=_value(pixel_accuracy),
        mean_accuracy=_value(mean_accuracy),
        mean_iou=_value(mean_iou),
        frequency_weighted_iou=_value(fw_iou),
        per_class_iou={name: _value(v) for name, v in zip(class_names, iou, strict=True)},
        per_class_accuracy={name: _value(v) for name, v in zip(class_names, accuracy, strict=True)},
        pixels=int(total),
    )


def format_metrics(metrics: SegmentationMetrics) -> str:
    """A terminal table: the four metrics, then per-class IoU and accuracy."""

    def pct(value: float | None) -> str:
        return "   n/a" if value is None else f"{100 * value:6.2f}"

    lines = [
        f"pixel accuracy   {pct(metrics.pixel_accuracy)}",
        f"mean accuracy    {pct(metrics.mean_accuracy)}",
        f"mean IoU         {pct(metrics.mean_iou)}",
        f"f.w. IoU         {pct(metrics.frequency_weighted_iou)}",
        f"(% of {metrics.pixels:,} labelled pixels)",
        "",
    ]
    width = max([len("class"), *map(len, metrics.per_class_iou)])
    lines.append(f"{'class':<{width}}     IoU  accuracy")
    for name, iou in metrics.per_class_iou.items():
        lines.append(f"{name:<{width}}  {pct(iou)}    {pct(metrics.per_class_accuracy[name])}")
    return "\n".join(lines)


def top_confusions(confusion: np.ndarray, class_names: Sequence[str], count: int = 8) -> list[dict]:
    """The largest mistakes: for each (true, predicted) pair off the diagonal, the share of the true class's
    labelled pixels given the wrong class, largest first (what a model card's limits section reports)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    np.fill_diagonal(shares, 0)
    order = np.argsort(shares, axis=None)[::-1][:count]
    return [
        {"true": class_names[t], "predicted": class_names[g], "share": round(float(shares[t, g]), 4)}
        for t, g in zip(*np.unravel_index(order, shares.shape), strict=True)
        if shares[t, g] > 0
    ]
