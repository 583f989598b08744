"""Measures shared by the samplers and evaluators: class coverage, k-NN vote, accuracies."""
from __future__ import annotations

import numpy as np

from lowbudget.feature_files import DatasetIndices


def coverage(labels: np.ndarray | None, pool: DatasetIndices) -> float | None:
    """Percentage of the dataset's classes with at least one image in `pool`, from the `labels` of every
    training image (None without labels): both by dataset index, never by selectable row."""
    if labels is None:
        return None
    return 100.0 * len(np.unique(labels[pool])) / len(np.unique(labels))


def majority_vote(neighbor_labels: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Most frequent label in each row of (queries, k) neighbour labels sorted nearest first.

    Ties go to the class of the nearest neighbour among the tied classes. Vectorised: each position
    counts how many of the row's k labels equal its own, and the first position with the top count
    wins (O(k^2) per query, in chunks of rows).
    """
    q, k = neighbor_labels.shape
    winners = np.empty(q, dtype=neighbor_labels.dtype)
    for start in range(0, q, chunk):
        rows = neighbor_labels[start:start + chunk]
        counts = (rows[:, :, None] == rows[:, None, :]).sum(2)
        winners[start:start + chunk] = rows[np.arange(len(rows)), np.argmax(counts, axis=1)]
    return winners


def top1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy in percent."""
    return 100.0 * float(np.mean(predictions == labels))


def class_mean_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of each class's accuracy, in percent."""
    classes, class_of = np.unique(labels, return_inverse=True)
    correct = np.bincount(class_of, weights=(predictions == labels), minlength=len(classes))
    return 100.0 * float(np.mean(correct / np.bincount(class_of, minlength=len(classes))))
