"""ConfusionMatrix and classification_report, checked number by number against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from dltrain.reporting.metrics import ConfusionMatrix, classification_report

AVERAGES = ("macro", "micro", "weighted")


def _accumulate(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, batch: int = 7):
    """Feed the labels to a ConfusionMatrix in batches; the last one is partial."""
    cm = ConfusionMatrix(num_classes, device="cpu")
    for start in range(0, len(y_true), batch):
        cm.update(
            torch.from_numpy(y_pred[start : start + batch]),
            torch.from_numpy(y_true[start : start + batch]),
        )
    return cm.matrix


def _assert_matches_sklearn(report: dict, y_true: np.ndarray, y_pred: np.ndarray, c: int):
    """Every number in the report equals scikit-learn's on the same labels."""
    labels = list(range(c))
    assert report["num_samples"] == len(y_true)
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    for average in AVERAGES:
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        assert report["precision"][average] == pytest.approx(p), average
        assert report["recall"][average] == pytest.approx(r), average
        assert report["f1"][average] == pytest.approx(f), average
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    names = report["classes"]
    assert len(names) == c
    for i, name in enumerate(names):
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(p[i]), name
        assert row["recall"] == pytest.approx(r[i]), name
        assert row["f1"] == pytest.approx(f[i]), name
        assert row["support"] == s[i], name


def _names(c: int) -> list[str]:
    return [f"class_{i}" for i in range(c)]


def test_report_matches_sklearn_with_missing_classes():
    """Class 4 is never predicted and class 2 never occurs: both still reported correctly."""
    c = 6
    rng = np.random.default_rng(0)
    y_true = rng.choice([0, 1, 3, 4, 5], size=103)
    y_pred = rng.choice([0, 1, 2, 3, 5], size=103)
    # Make the case non-trivial: some correct answers, or every class has precision 0.
    agree = rng.random(103) < 0.4
    y_pred = np.where(agree & (y_true != 4), y_true, y_pred)
    assert 4 not in y_pred and 2 not in y_true

    matrix = _accumulate(y_true, y_pred, c)
    assert matrix.dtype == torch.int64 and matrix.shape == (c, c)
    report = classification_report(matrix, _names(c))
    _assert_matches_sklearn(report, y_true, y_pred, c)
    assert report["per_class"]["class_2"]["support"] == 0
    assert report["per_class"]["class_2"]["recall"] == 0.0
    assert report["per_class"]["class_4"]["precision"] == 0.0
    # Macro averages over all 6 classes, so it differs from the mean over present ones.
    recalls = [report["per_class"][n]["recall"] for n in _names(c)]
    assert report["recall"]["macro"] == pytest.approx(sum(recalls) / c)


@pytest.mark.parametrize("c", [2, 3, 10])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_report_matches_sklearn_random(c: int, seed: int):
    """Random labels over several class counts and seeds, batch size not dividing N."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    y_true = rng.integers(0, c, size=n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, c, size=n))
    report = classification_report(_accumulate(y_true, y_pred, c, batch=13), _names(c))
    _assert_matches_sklearn(report, y_true, y_pred, c)


def test_report_accepts_numpy_and_lists():
    """The same counts as numpy or nested lists give the same report as the torch tensor."""
    rng = np.random.default_rng(4)
    y_true, y_pred = rng.integers(0, 3, size=50), rng.integers(0, 3, size=50)
    matrix = _accumulate(y_true, y_pred, 3)
    expected = classification_report(matrix, _names(3))
    assert classification_report(matrix.numpy(), _names(3)) == expected
    assert classification_report(matrix.tolist(), _names(3)) == expected


def test_mask_excludes_masked_out_samples():
    """Masked-out samples do not count, even when their labels are padding junk (-100)."""
    c = 4
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, c, size=(5, 9))
    y_pred = rng.integers(0, c, size=(5, 9))
    mask = rng.random((5, 9)) < 0.6
    padded_true = np.where(mask, y_true, -100)

    cm = ConfusionMatrix(c, device="cpu")
    cm.update(torch.from_numpy(y_pred), torch.from_numpy(padded_true), mask=torch.from_numpy(mask))
    expected = confusion_matrix(y_true[mask], y_pred[mask], labels=list(range(c)))
    assert cm.matrix.tolist() == expected.tolist()
    assert int(cm.matrix.sum()) == int(mask.sum())

    # An all-True mask is the same as no mask.
    full = ConfusionMatrix(c, device="cpu")
    full.update(torch.from_numpy(y_pred), torch.from_numpy(y_true), mask=torch.ones(5, 9) > 0)
    plain = ConfusionMatrix(c, device="cpu")
    plain.update(torch.from_numpy(y_pred), torch.from_numpy(y_true))
    assert torch.equal(full.matrix, plain.matrix)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_does_not_sync_on_cuda():
    """update() never waits on the GPU: sync debug mode turns any host sync into an error."""
    cm = ConfusionMatrix(5, device="cuda")
    preds = torch.randint(0, 5, (64,), device="cuda")
    targets = torch.randint(0, 5, (64,), device="cuda")
    mask = torch.rand(64, device="cuda") < 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm.update(preds, targets)
        cm.update(preds, targets, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(cm.matrix.sum()) == 64 + int(mask.sum())


def test_update_rejects_mismatched_shapes():
    cm = ConfusionMatrix(3, device="cpu")
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.zeros(4, dtype=torch.int64), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        cm.update(
            torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), torch.ones(3) > 0
        )


def test_reset_zeroes_counts_in_place():
    cm = ConfusionMatrix(3, device="cpu")
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]))
    before = cm.matrix
    cm.reset()
    assert cm.matrix is before
    assert int(cm.matrix.sum()) == 0


def test_binary_case():
    y_true = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 1])
    y_pred = np.array([0, 1, 0, 1, 0, 1, 1, 0, 1, 0])
    report = classification_report(_accumulate(y_true, y_pred, 2, batch=3), ["neg", "pos"])
    _assert_matches_sklearn(report, y_true, y_pred, 2)
    assert report["confusion_matrix"] == [[3, 1], [2, 4]]
    assert report["per_class"]["pos"]["precision"] == pytest.approx(0.8)
    assert report["per_class"]["pos"]["recall"] == pytest.approx(4 / 6)


def test_all_correct():
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    report = classification_report(_accumulate(y, y, 3), _names(3))
    _assert_matches_sklearn(report, y, y, 3)
    assert report["accuracy"] == 1.0
    for metric in ("precision", "recall", "f1"):
        assert report[metric] == {"macro": 1.0, "micro": 1.0, "weighted": 1.0}


def test_empty_matrix_gives_zeros():
    c = 3
    report = classification_report(ConfusionMatrix(c, device="cpu").matrix, _names(c))
    assert report["num_samples"] == 0
    assert report["accuracy"] == 0.0
    for metric in ("precision", "recall", "f1"):
        assert report[metric] == {"macro": 0.0, "micro": 0.0, "weighted": 0.0}
    for name in _names(c):
        assert report["per_class"][name] == {
            "precision": 0.0,
            "recall": 0.0,
            "f1": 0.0,
            "support": 0,
        }
    assert report["confusion_matrix"] == [[0] * c] * c


def test_report_rejects_bad_input():
    with pytest.raises(ValueError, match="3 x 3"):
        classification_report(np.zeros((2, 2), dtype=int), _names(3))
    with pytest.raises(ValueError, match="unique"):
        classification_report(np.zeros((2, 2), dtype=int), ["a", "a"])


def test_report_is_json_serialisable_with_python_types():
    rng = np.random.default_rng(6)
    y_true, y_pred = rng.integers(0, 4, size=40), rng.integers(0, 4, size=40)
    report = classification_report(_accumulate(y_true, y_pred, 4), _names(4))
    assert json.loads(json.dumps(report)) == report
    assert type(report["num_samples"]) is int
    assert type(report["accuracy"]) is float
    assert type(report["f1"]["macro"]) is float
    assert type(report["per_class"]["class_0"]["support"]) is int
    assert type(report["confusion_matrix"][0][0]) is int
