"""Evaluation at full label resolution: any predictor, one confusion matrix, the FCN metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from segserve.datasets import IGNORE, Collection, load_pair
from segserve.metrics import SegmentationMetrics, compute_metrics, confusion_matrix

#: Images (N x H x W x 3 uint8, all one size) -> class indices (N x H x W) at the same size.
Predictor = Callable[[np.ndarray], np.ndarray]


def pairs_of(collection: Collection) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for sample in collection.samples:
        yield load_pair(sample, collection.classes)


def evaluate(
    predict: Predictor,
    collection: Collection,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[SegmentationMetrics, np.ndarray]:
    """Metrics and confusion matrix of ``predict`` over ``collection`` against its full-resolution masks.

    Consecutive same-size images are batched; ``pairs`` (decoded images and masks) skips decoding.
    """
    names = collection.classes.names
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    source = pairs if pairs is not None else pairs_of(collection)
    batch: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        images = np.stack([image for image, _ in batch])
        predictions = predict(images)
        for (_, mask), prediction in zip(batch, predictions, strict=True):
            if prediction.shape != mask.shape:
                raise ValueError(f"prediction {prediction.shape} does not match label map {mask.shape}")
            confusion[:] += confusion_matrix(mask, prediction, len(names), IGNORE)
        batch.clear()

    bar = tqdm(
        source,
        total=len(collection.samples),
        desc=f"evaluate {collection.split}",
        unit="img",
        disable=not progress,
        leave=False,
    )
    for image, mask in bar:
        if batch and (len(batch) == batch_size or batch[0][0].shape != image.shape):
            flush()
        batch.append((image, mask))
    if batch:
        flush()
    return compute_metrics(confusion, names), confusion
