"""The FCN paper's metrics against hand-computed confusion matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segserve.metrics import compute_metrics, confusion_matrix, format_metrics, top_confusions


def test_confusion_matrix_counts_and_skips_ignored_pixels() -> None:
    labels = np.array([[0, 0, 1], [1, 2, 255]])
    predictions = np.array([[0, 1, 1], [1, 0, 2]])
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert np.array_equal(confusion_matrix(labels, predictions, 3), expected)


def test_hand_computed_metrics() -> None:
    # rows: true class, columns: predicted
    # class c: predicted 3 times, never labelled (IoU 0); class d: never labelled, never predicted (no IoU)
    confusion = np.array([[8, 2, 0, 0], [1, 6, 3, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    m = compute_metrics(confusion, ["a", "b", "c", "d"])
    assert m.pixel_accuracy == pytest.approx(14 / 20)
    assert m.mean_accuracy == pytest.approx((8 / 10 + 6 / 10) / 2)
    iou_a = 8 / (10 + 9 - 8)
    iou_b = 6 / (10 + 8 - 6)
    assert m.per_class_iou == {"a": pytest.approx(iou_a), "b": pytest.approx(iou_b), "c": 0.0, "d": None}
    assert m.mean_iou == pytest.approx((iou_a + iou_b + 0.0) / 3)  # d is left out, not counted as 0 or 1
    assert m.frequency_weighted_iou == pytest.approx((10 * iou_a + 10 * iou_b) / 20)
    assert m.per_class_accuracy["c"] is None and m.per_class_accuracy["d"] is None
    assert m.pixels == 20


def test_predicted_but_never_labelled_class_scores_zero_iou() -> None:
    confusion = np.array([[5, 5], [0, 0]])  # class 1 only predicted
    m = compute_metrics(confusion, ["a", "b"])
    assert m.per_class_iou == {"a": 0.5, "b": 0.0}
    assert m.mean_iou == pytest.approx(0.25)
    assert m.per_class_accuracy == {"a": 0.5, "b": None}
    assert m.mean_accuracy == pytest.approx(0.5)


def test_all_ignored_images_have_no_metrics() -> None:
    labels = np.full((4, 4), 255)
    confusion = confusion_matrix(labels, np.zeros((4, 4), dtype=int), 3)
    assert confusion.sum() == 0
    m = compute_metrics(confusion, ["a", "b", "c"])
    assert (m.pixel_accuracy, m.mean_accuracy, m.mean_iou, m.frequency_weighted_iou) == (None, None, None, None)
    assert "n/a" in format_metrics(m)


def test_perfect_prediction() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(30, 40))
    m = compute_metrics(confusion_matrix(labels, labels, 4), list("abcd"))
    assert m.pixel_accuracy == m.mean_accuracy == m.mean_iou == m.frequency_weighted_iou == 1.0


def test_bad_labels_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="label 7 is outside the 3 classes"):
        confusion_matrix(np.array([7]), np.array([0]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    assert math.isclose(compute_metrics(np.eye(2) * 3, ["x", "y"]).mean_iou, 1.0)


def test_top_confusions_rank_mistakes_by_share_of_the_true_class() -> None:
    confusion = np.array([[90, 10, 0], [1, 3, 96], [0, 0, 0]])  # rows true, columns predicted
    mistakes = top_confusions(confusion, ["a", "b", "c"])
    assert [(m["true"], m["predicted"]) for m in mistakes] == [("b", "c"), ("a", "b"), ("b", "a")]
    assert [m["share"] for m in mistakes] == [0.96, 0.1, 0.01]  # a class with no labelled pixels adds nothing
    assert top_confusions(np.diag([5, 7]), ["a", "b"]) == []
