"""Records a person wants to look at: metrics.csv, curves.png, confusion.png."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segserve.files import publish

COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "lr",
    "pixel_accuracy",
    "mean_accuracy",
    "mean_iou",
    "frequency_weighted_iou",
    "val_mean_iou",
    "epoch_seconds",
    "images_per_second",
)


def write_metrics_csv(path: Path, history: Sequence[dict[str, Any]]) -> None:
    with publish(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Training loss and validation mIoU / pixel accuracy against epochs."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker=".")
    loss_axis.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    evaluated = [row for row in history if row.get("mean_iou") is not None]
    for key, label in (("mean_iou", "mean IoU"), ("pixel_accuracy", "pixel accuracy")):
        metric_axis.plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated], marker=".", label=label)
    metric_axis.set(title="validation", xlabel="epoch", ylim=(0, 1))
    metric_axis.legend()
    metric_axis.grid(alpha=0.3)
    figure.tight_layout()
    with publish(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def plot_confusion(path: Path, confusion: np.ndarray, class_names: Sequence[str], title: str) -> None:
    """Row-normalised confusion matrix (each row: where that class's pixels went), with class names."""
    plt = _pyplot()
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = max(5.0, 0.55 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=60, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set(xlabel="predicted", ylabel="true", title=title)
    if len(class_names) <= 25:
        for i in ticks:
            for j in ticks:
                if normalised[i, j] >= 0.005:
                    colour = "white" if normalised[i, j] > 0.5 else "black"
                    axis.text(j, i, f"{100 * normalised[i, j]:.0f}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    with publish(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
