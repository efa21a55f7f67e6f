"""Classification metrics: a confusion matrix accumulated on the device, and a report from it.

The matrix is the only state kept during evaluation: every metric dltrain reports (accuracy,
precision, recall, F1 with macro/micro/weighted averages) is derived from it once, on the host,
at the end. Conventions match scikit-learn's `precision_recall_fscore_support(...,
labels=range(C), zero_division=0)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class ConfusionMatrix:
    """A C x C int64 count matrix on `device`; rows are true classes, columns predictions."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(
            (num_classes, num_classes), dtype=torch.int64, device=torch.device(device or "cpu")
        )

    def update(
        self,
        preds: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Count each (target, pred) pair; where `mask` is given, only its True samples count.

        `preds` and `targets` hold class indices of the same shape (any number of dims).
        Nothing here waits for the device: no `.item()`, no data-dependent branch, and no
        `torch.bincount`, whose CUDA kernel copies the input's min/max to the host to size its
        output. A scatter-add into the fixed-size flat matrix does the same count without that.
        Values outside [0, C) are not checked, since that would need a sync: the caller must
        pass valid indices (an out-of-range pair may land in a wrong cell or fail the
        scatter). Masked-out samples may hold any value.
        """
        if preds.shape != targets.shape:
            raise ValueError(
                f"preds and targets must have the same shape, got {tuple(preds.shape)} "
                f"and {tuple(targets.shape)}"
            )
        c = self.num_classes
        device = self.matrix.device
        idx = targets.to(device, torch.int64).reshape(-1) * c
        idx = idx + preds.to(device, torch.int64).reshape(-1)
        weight = torch.ones_like(idx)
        if mask is not None:
            if mask.shape != targets.shape:
                raise ValueError(
                    f"mask must have the shape of targets {tuple(targets.shape)}, "
                    f"got {tuple(mask.shape)}"
                )
            keep = mask.to(device, torch.bool).reshape(-1)
            # Padded positions often hold junk labels (e.g. -100): point them at bin 0 with
            # weight 0 rather than trusting their values to be in range.
            idx = torch.where(keep, idx, torch.zeros_like(idx))
            weight = keep.to(torch.int64)
        self.matrix.view(-1).scatter_add_(0, idx, weight)

    def reset(self) -> None:
        """Zero the counts in place (the tensor keeps its device and identity)."""
        self.matrix.zero_()


def _as_count_matrix(matrix: Any, num_classes: int) -> np.ndarray:
    """The matrix as an int64 numpy array, checked to be square with one row per class."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.ndim == 1 and counts.size == 0 and num_classes == 0:
        counts = counts.reshape(0, 0)
    if counts.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusion matrix must be {num_classes} x {num_classes} (one row and column per "
            f"class), got shape {counts.shape}"
        )
    if (counts < 0).any():
        raise ValueError("confusion matrix counts must be non-negative")
    return counts


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den == 0 (scikit-learn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _averages(per_class: np.ndarray, support: np.ndarray, micro: float) -> dict[str, float]:
    """Macro (plain mean over all classes), micro and support-weighted averages."""
    macro = float(per_class.mean()) if per_class.size else 0.0
    weighted = float(_safe_div((per_class * support).sum(), support.sum()))
    return {"macro": macro, "micro": float(micro), "weighted": weighted}


def classification_report(matrix: Any, classes: list[str]) -> dict[str, Any]:
    """Accuracy, precision, recall and F1 (per class and averaged) from a confusion matrix.

    `matrix` is a C x C count matrix (numpy, torch or nested lists); rows are true classes,
    columns predicted classes, in the order of `classes`. Every class is reported, including
    one absent from the data (support 0, recall 0) or never predicted (precision 0), and all
    of them count in the macro average. An empty matrix gives zeros. The result holds only
    Python ints, floats, strings, lists and dicts, so it can be written as JSON directly.
    """
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {classes}")
    counts = _as_count_matrix(matrix, len(classes))
    tp = np.diag(counts).astype(np.float64)
    support = counts.sum(axis=1).astype(np.float64)
    predicted = counts.sum(axis=0).astype(np.float64)
    total = int(counts.sum())

    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    # 2TP / (2TP + FP + FN), as scikit-learn computes it; 0 when a class is neither present
    # nor predicted.
    f1 = _safe_div(2 * tp, predicted + support)
    # With every class listed, micro precision, recall and F1 all equal accuracy.
    accuracy = float(_safe_div(tp.sum(), total))

    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "num_samples": total,
        "accuracy": accuracy,
        "precision": _averages(precision, support, accuracy),
        "recall": _averages(recall, support, accuracy),
        "f1": _averages(f1, support, accuracy),
        "per_class": per_class,
        "classes": list(classes),
        "confusion_matrix": counts.tolist(),
    }
