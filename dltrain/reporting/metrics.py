"""Classification metrics: a confusion matrix accumulated on the device, and a report from it.

The matrix is the only state kept during evaluation: every metric dltrain reports (accuracy,
precision, recall, F1 with macro/micro/weighted averages) is derived from it once, on the host,
at the end. Conventions match scikit-learn's `precision_recall_fscore_support(...,
labels=range(C), zero_division=0)`.

The ranking metrics (`ranking_report`: top-k accuracy, one-vs-rest AUROC and average
precision) need the per-sample class probabilities instead; `top_k_correct` counts top-k hits
on the device inside the evaluation loop.
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


# --- Ranking metrics: top-k accuracy, one-vs-rest AUROC and average precision -----------------
#
# These need the per-sample scores, not just the confusion matrix, so the evaluation loop has to
# keep the N x C probabilities (or count top-k hits on the device with `top_k_correct`).
# Everything below is plain numpy float64 so that scikit-learn stays a dev-only dependency; the
# test suite checks every number against scikit-learn.

# Upper bound on the elements of each temporary work array (rows or class columns are processed
# a block at a time, which bounds peak memory on large splits).
_CHUNK_ELEMENTS = 1 << 22


def top_k_correct(
    logits: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """How many samples have their target among the `k` highest scores: a 0-d int64 tensor.

    `logits` is (..., C) and `targets` holds class indices of shape (...); probabilities work
    as well, since softmax keeps the order (only where distinct logits round to equal
    probabilities can the two differ, through the tie rule below). Everything stays on the
    device (no `.item()`, no `torch.topk`, whose order among ties is unspecified), so the count
    can be summed across batches and all-reduced before a single read at the end.

    Ties follow scikit-learn's `top_k_accuracy_score` (a stable sort by score, reversed): among
    classes with equal scores the one with the *higher* index ranks first. A sample is a hit
    when (#classes scoring strictly higher than its target) + (#classes with an equal score and
    a higher index) < k. With k >= C every sample is a hit. (This is scikit-learn's multiclass
    rule, used for every C here; `ranking_report` follows scikit-learn's binary rule for C == 2,
    which differs only on an exact 50/50 tie.) Where `mask` is given (shape of `targets`),
    only its True samples count; masked-out targets may hold any value (e.g. -100).
    Targets outside [0, C) are not checked (that would need a sync).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if logits.ndim < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits must be (..., C) with targets of shape (...), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    c = logits.shape[-1]
    flat = logits.reshape(-1, c)
    target = targets.to(flat.device, torch.int64).reshape(-1)
    keep = None
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(
                f"mask must have the shape of targets {tuple(targets.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        keep = mask.to(flat.device, torch.bool).reshape(-1)
        target = torch.where(keep, target, torch.zeros_like(target))
    target_score = flat.gather(1, target.unsqueeze(1))
    classes = torch.arange(c, device=flat.device)
    ahead = (flat > target_score) | ((flat == target_score) & (classes > target.unsqueeze(1)))
    hit = ahead.sum(dim=1) < k
    if keep is not None:
        hit = hit & keep
    return hit.sum(dtype=torch.int64)


def _as_float64(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().to(torch.float64).numpy()
    return np.asarray(array, dtype=np.float64)


def _as_targets(targets: Any) -> np.ndarray:
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    targets = np.asarray(targets)
    integral = np.issubdtype(targets.dtype, np.integer) or np.issubdtype(targets.dtype, np.bool_)
    if targets.size and not integral and not np.all(np.mod(targets, 1) == 0):
        raise ValueError("targets must be integer class indices")
    return targets.astype(np.int64)


def _top_k_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sample, how many classes rank ahead of its target (scikit-learn's tie order)."""
    n, c = scores.shape
    ranks = np.empty(n, dtype=np.int64)
    class_index = np.arange(c)
    step = max(1, _CHUNK_ELEMENTS // max(c, 1))
    for start in range(0, n, step):
        s = scores[start : start + step]
        t = targets[start : start + step]
        target_score = s[np.arange(len(t)), t][:, None]
        ahead = (s > target_score) | ((s == target_score) & (class_index > t[:, None]))
        ranks[start : start + step] = ahead.sum(axis=1)
    return ranks


def _one_vs_rest_curves(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class: one-vs-rest AUROC and average precision (NaN where undefined).

    Equal scores form one threshold, as in scikit-learn's `_binary_clf_curve`. For class j
    with P positives and Q negatives, and for each positive score x, let lo(x) / hi(x) be the
    number of samples scoring < x / <= x, and pos_ge(x) / all_ge(x) the number of positives /
    samples scoring >= x (binary searches in the sorted column and the sorted positive
    scores; no per-sample sort order is needed):
      - AUROC, the trapezoid ROC area over the distinct thresholds, is the Mann-Whitney
        statistic with tied pairs counting 1/2, i.e. with average ranks:
        (sum over positives of (lo + hi) - P^2) / (2 P Q). The numerator is an exact integer,
        so the only rounding is the final division.
      - AP = sum over thresholds t of (R_t - R_t-1) * P_t, with recall R_t and precision P_t
        at threshold t (scikit-learn's step-wise, non-interpolated definition). Each positive
        raises recall by 1/P at its own threshold x, where precision is pos_ge(x) / all_ge(x):
        AP = sum over positives of pos_ge(x) / all_ge(x), over P.
    Columns are sorted a block at a time (transposed, so each sort runs over contiguous
    memory), with at most `_CHUNK_ELEMENTS` elements per block.
    """
    n, c = scores.shape
    auroc = np.full(c, np.nan)
    ap = np.full(c, np.nan)
    if n == 0:
        return auroc, ap
    by_class = np.argsort(targets, kind="stable")
    bounds = np.searchsorted(targets[by_class], np.arange(c + 1))
    step = max(1, _CHUNK_ELEMENTS // n)
    for first in range(0, c, step):
        cols = range(first, min(c, first + step))
        sorted_block = np.sort(scores[:, first : cols.stop].T, axis=1)
        for j in cols:
            members = by_class[bounds[j] : bounds[j + 1]]
            p = len(members)
            if p == 0:
                continue
            q = n - p
            column = sorted_block[j - first]
            x = scores[members, j]
            lo = np.searchsorted(column, x, side="left")
            if q > 0:
                hi = np.searchsorted(column, x, side="right")
                twice_u = int(lo.sum(dtype=np.int64) + hi.sum(dtype=np.int64)) - p * p
                auroc[j] = twice_u / (2.0 * p * q)
            pos_ge = p - np.searchsorted(np.sort(x), x, side="left")
            ap[j] = float(np.sum(pos_ge / (n - lo))) / p
    return auroc, ap


def _summary(values: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """{"macro": mean over defined classes or None, "per_class": {name: float or None}}."""
    defined = ~np.isnan(values)
    macro = float(values[defined].mean()) if defined.any() else None
    per_class = {name: (float(values[i]) if defined[i] else None) for i, name in enumerate(classes)}
    return {"macro": macro, "per_class": per_class}


def ranking_report(
    scores: Any,
    targets: Any,
    classes: list[str],
    top_k: list[int] | None = None,
) -> dict[str, Any]:
    """Top-k accuracy, one-vs-rest AUROC and average precision: extra keys for report.json.

    `scores` is an N x C array or tensor of class probabilities (softmax outputs), columns in
    the order of `classes`; `targets` holds N class indices. Computed in numpy float64 with no
    scikit-learn at run time, but with scikit-learn's definitions:

    - ``top_k_accuracy``: ``{"5": x, ...}``, one entry per k of `top_k` (ascending, duplicates
      dropped), as `top_k_accuracy_score(targets, scores, k=k, labels=range(C))`. The default
      `top_k` is [5] when C > 5 and [] otherwise; any k >= C is skipped (every sample would be a
      hit), and when no k is left the key is left out. Ties: among equal scores the class with
      the higher index ranks first (scikit-learn's reversed stable sort), so a sample counts as
      a hit when (#classes scoring higher) + (#classes scoring the same with a higher index) < k.
      For C == 2 (only k = 1 is possible) scikit-learn's binary rule applies instead: class 1
      is predicted when scores[:, 1] > 0.5, so a 0.5/0.5 tie predicts class 0. An empty split
      gives 0.0, like `accuracy` in `classification_report`.
    - ``auroc``: ``{"macro": x, "per_class": {name: x}}``. per_class holds each class's
      one-vs-rest AUROC, `roc_auc_score(targets == i, scores[:, i])`; tied scores form one
      threshold (a tied positive/negative pair counts 1/2, the trapezoid over distinct
      thresholds). macro is the mean over the classes where AUROC is defined. For C == 2 macro
      is instead the binary AUROC of the positive class (index 1), `roc_auc_score(targets,
      scores[:, 1])` - the number every binary tool reports; for probability rows (summing to
      1) it equals both per-class values and hence their mean.
    - ``average_precision``: same shape, one-vs-rest `average_precision_score(targets == i,
      scores[:, i])`: sum over distinct thresholds of (recall step) x precision, step-wise and
      not interpolated. macro is the mean over defined classes (also for C == 2).

    Undefined values: a class absent from the split, or (for AUROC only) one that is the
    target of every sample, has no defined AUROC/AP. It is reported as None (JSON null) and
    left out of the macro mean; when no class is defined, macro is None. (scikit-learn instead
    raises for such an AUROC and scores such an AP 0.) So the result never holds NaN and
    `json.dumps(..., allow_nan=False)` works. All numbers are Python floats.
    """
    s, t = _ranking_inputs(scores, targets, classes)
    c = len(classes)
    report: dict[str, Any] = {}
    ks = _top_k_values(top_k, c)
    if ks:
        report["top_k_accuracy"] = _top_k_accuracy(s, t, ks)
    auroc, ap = _one_vs_rest_curves(s, t)
    report["auroc"] = _summary(auroc, classes)
    if c == 2:
        # Binary: macro is the AUROC of the positive class (index 1), as roc_auc_score(y, p1).
        report["auroc"]["macro"] = None if np.isnan(auroc[1]) else float(auroc[1])
    report["average_precision"] = _summary(ap, classes)
    return report


def _ranking_inputs(scores: Any, targets: Any, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`ranking_report`'s scores (N x C float64) and targets (N int64), checked: a ValueError
    for duplicate class names, mismatched shapes, targets outside [0, C) or non-finite scores."""
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {classes}")
    c = len(classes)
    s = _as_float64(scores)
    t = _as_targets(targets)
    if s.ndim == 1 and s.size == 0:
        s = s.reshape(0, c)
    if s.ndim != 2 or s.shape[1] != c:
        raise ValueError(
            f"scores must be N x {c} (one column per class), got shape {tuple(s.shape)}"
        )
    if t.shape != (s.shape[0],):
        raise ValueError(
            f"targets must hold one class index per row of scores ({s.shape[0]}), "
            f"got shape {tuple(t.shape)}"
        )
    if t.size and (t.min() < 0 or t.max() >= c):
        raise ValueError(f"targets must be class indices in [0, {c}), got values outside")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    return s, t


def _top_k_values(top_k: list[int] | None, c: int) -> list[int]:
    """The k to report, ascending and once each: [5] by default when C > 5; any k >= C is
    dropped (every sample would be a hit). A k that is not a positive int is a ValueError."""
    if top_k is None:
        top_k = [5] if c > 5 else []
    for k in top_k:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"top_k values must be positive ints, got {k!r}")
    return sorted({int(k) for k in top_k if k < c})


def _top_k_accuracy(s: np.ndarray, t: np.ndarray, ks: list[int]) -> dict[str, float]:
    """{"k": fraction of samples whose target ranks in the top k}; 0.0 for an empty split."""
    n = len(t)
    if s.shape[1] == 2:
        # Only k == 1 is left for two classes. scikit-learn takes its binary path here:
        # predict class 1 when its score is > 0.5 (> 0 if the scores are not in [0, 1]).
        p1 = s[:, 1]
        threshold = 0.5 if n and p1.min() >= 0 and p1.max() <= 1 else 0.0
        ranks = ((p1 > threshold).astype(np.int64) != t).astype(np.int64)
    else:
        ranks = _top_k_ranks(s, t)
    return {str(k): (float(np.count_nonzero(ranks < k) / n) if n else 0.0) for k in ks}
