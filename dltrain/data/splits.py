"""Carving one split out of another (class by class when there are classes), reproducibly
for a seed."""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into a kept part and a carved-off part with the same class mix.

    Each class carves off `round(fraction * count)` of its samples, chosen at random with
    `np.random.default_rng(seed)`. A class with at least two samples always gives at least one
    and keeps at least one, so every class appears in both parts whenever it can (small
    classes would otherwise round to zero and vanish from a validation or test split). A class
    with a single sample stays in the kept part.

    labels: 1-D array of class labels of any sortable dtype (ints or strings).
    fraction: share to carve off, 0 <= fraction < 1 (0 carves nothing).

    Returns (kept, carved): int64 index arrays into `labels`, each sorted ascending so the
    original sample order is preserved; together they cover every index exactly once.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return np.arange(len(labels), dtype=np.int64), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    carved = [_carve_class(rng, indices, fraction) for indices in _class_indices(labels)]
    carved_idx = np.sort(np.concatenate(carved)) if carved else np.empty(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[carved_idx] = False
    return np.flatnonzero(mask).astype(np.int64), carved_idx.astype(np.int64)


def random_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices at random (real-valued or sequence targets have no classes to
    stratify by): `round(fraction * n)` carved off, with `np.random.default_rng(seed)`.

    Returns (kept, carved), each sorted ascending, as `stratified_split` does.
    """
    order = np.random.default_rng(seed).permutation(len(targets))
    cut = round(len(targets) * fraction)
    return np.sort(order[cut:]).astype(np.int64), np.sort(order[:cut]).astype(np.int64)


def _class_indices(labels: np.ndarray) -> list[np.ndarray]:
    """Each class's sample indices (ascending), classes in sorted order: one sort, not one
    scan per class (a label with 20,000 values would take 20,000 scans)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse.ravel(), minlength=len(classes)))[:-1]
    return np.split(order, bounds)


def singleton_classes(labels: np.ndarray) -> tuple[int, int]:
    """(classes with a single sample, all classes): a stratified split keeps the former for
    training, so labels made mostly of them leave nothing to carve off."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return int((counts == 1).sum()), len(counts)


def _carve_class(rng: np.random.Generator, indices: np.ndarray, fraction: float) -> np.ndarray:
    """The randomly chosen indices of one class to carve off."""
    count = len(indices)
    if count < 2:
        return indices[:0]
    n = min(max(round(fraction * count), 1), count - 1)
    return rng.permutation(indices)[:n]


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Assign every sample index to one of `k` folds, each class spread evenly over the folds.

    Each class's indices are shuffled with `np.random.default_rng(seed)` and dealt out to the
    folds in turn; the dealing continues where the previous class stopped, so the folds'
    sizes differ by at most one, and so do each class's counts in any two folds. A class with
    fewer than `k` samples is spread over as many folds as it has samples.

    labels: 1-D array of class labels of any sortable dtype (ints or strings).
    k: number of folds, at least 2; at most `len(labels)` (no fold may be empty).

    Returns `k` int64 index arrays into `labels`, each sorted ascending; together they cover
    every index exactly once. The same labels, k and seed always give the same folds.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if len(labels) < k:
        raise ValueError(f"{k} folds need at least {k} samples; there are {len(labels)}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    start = 0  # the fold that the next class's first sample goes to
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold_of[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    return [np.flatnonzero(fold_of == fold).astype(np.int64) for fold in range(k)]
