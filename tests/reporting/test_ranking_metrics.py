"""ranking_report and top_k_correct, checked number by number against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, top_k_accuracy_score

from dltrain.reporting.metrics import ranking_report, top_k_correct

TOL = {"rel": 1e-12, "abs": 1e-12}


def _names(c: int) -> list[str]:
    return [f"class_{i}" for i in range(c)]


def _sample(c: int, n: int, seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet probability rows and targets that agree with them more often than chance.

    With `ties`, scores are rounded to one decimal, so most columns hold many exact ties (for
    C = 2 the row is rebuilt as (1 - p1, p1) so that 50/50 ties occur too).
    """
    rng = np.random.default_rng(seed)
    scores = rng.dirichlet(np.full(c, 0.5), size=n)
    sampled = np.array([rng.choice(c, p=row) for row in scores])
    targets = np.where(rng.random(n) < 0.5, sampled, rng.integers(0, c, size=n))
    if ties:
        scores = np.round(scores, 1)
        if c == 2:
            scores[:, 0] = 1.0 - scores[:, 1]
    return scores, targets


def _assert_json_clean(report: dict) -> None:
    """Serialisable without NaN, and only Python floats / None as values."""
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    for key in ("auroc", "average_precision"):
        values = [report[key]["macro"], *report[key]["per_class"].values()]
        assert all(v is None or type(v) is float for v in values), key
    for v in report.get("top_k_accuracy", {}).values():
        assert type(v) is float


def _assert_matches_sklearn(
    report: dict, scores: np.ndarray, targets: np.ndarray, names: list[str] | None = None
) -> None:
    n, c = scores.shape
    names = names or _names(c)
    onehot = (targets[:, None] == np.arange(c)).astype(int)
    support = onehot.sum(axis=0)
    auroc_ok = (support > 0) & (support < n)
    ap_ok = support > 0

    # AUROC: null exactly where undefined; the rest equal scikit-learn's one-vs-rest values.
    per_class = report["auroc"]["per_class"]
    assert list(per_class) == names
    assert [per_class[x] is None for x in names] == list(~auroc_ok)
    if auroc_ok.any():
        expected = roc_auc_score(onehot[:, auroc_ok], scores[:, auroc_ok], average=None)
        got = [per_class[x] for x, ok in zip(names, auroc_ok) if ok]
        assert got == pytest.approx(list(np.atleast_1d(expected)), **TOL)
        if c == 2:
            assert report["auroc"]["macro"] == pytest.approx(
                roc_auc_score(targets, scores[:, 1]), **TOL
            )
        elif auroc_ok.sum() >= 2:
            # average="macro" is the mean of the average=None values: only recompute it
            # through scikit-learn where that is cheap.
            macro = (
                roc_auc_score(onehot[:, auroc_ok], scores[:, auroc_ok], average="macro")
                if c <= 10
                else float(np.mean(expected))
            )
            assert report["auroc"]["macro"] == pytest.approx(macro, **TOL)
        else:
            assert report["auroc"]["macro"] == pytest.approx(float(expected), **TOL)
    else:
        assert report["auroc"]["macro"] is None

    # Average precision: null only for absent classes.
    per_class = report["average_precision"]["per_class"]
    assert list(per_class) == names
    assert [per_class[x] is None for x in names] == list(~ap_ok)
    expected = list(
        np.atleast_1d(average_precision_score(onehot[:, ap_ok], scores[:, ap_ok], average=None))
    )
    got = [per_class[x] for x, ok in zip(names, ap_ok) if ok]
    assert got == pytest.approx(expected, **TOL)
    if ap_ok.sum() >= 2:
        macro = (
            average_precision_score(onehot[:, ap_ok], scores[:, ap_ok], average="macro")
            if c <= 10
            else float(np.mean(expected))
        )
        assert report["average_precision"]["macro"] == pytest.approx(macro, **TOL)
    elif ap_ok.any():
        assert report["average_precision"]["macro"] == pytest.approx(expected[0], **TOL)
    else:
        assert report["average_precision"]["macro"] is None

    # Top-k accuracy, for every k the report lists.
    for key, value in report.get("top_k_accuracy", {}).items():
        k = int(key)
        if c == 2:  # scikit-learn's binary path wants the positive-class column alone
            expected_acc = top_k_accuracy_score(targets, scores[:, 1], k=k, labels=[0, 1])
        else:
            expected_acc = top_k_accuracy_score(targets, scores, k=k, labels=list(range(c)))
        assert value == pytest.approx(expected_acc, **TOL), key

    _assert_json_clean(report)


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("n", [5, 2000])
@pytest.mark.parametrize("c", [2, 3, 10, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_report_matches_sklearn(c: int, n: int, seed: int, ties: bool):
    scores, targets = _sample(c, n, seed, ties)
    top_k = [k for k in (1, 2, 3, 5, 10) if k < c]
    report = ranking_report(scores, targets, _names(c), top_k=top_k)
    assert list(report["top_k_accuracy"]) == [str(k) for k in top_k]
    _assert_matches_sklearn(report, scores, targets)


def test_absent_class_is_null_and_left_out_of_macro():
    c = 6
    scores, targets = _sample(c, 300, 7, ties=True)
    targets[targets == 2] = 3
    report = ranking_report(scores, targets, _names(c))
    _assert_matches_sklearn(report, scores, targets)
    for key in ("auroc", "average_precision"):
        per_class = report[key]["per_class"]
        assert per_class["class_2"] is None
        defined = [v for v in per_class.values() if v is not None]
        assert len(defined) == c - 1
        assert report[key]["macro"] == pytest.approx(sum(defined) / len(defined), **TOL)


def test_class_in_every_sample_has_no_auroc():
    """Only class 0 occurs: no AUROC anywhere (macro null), AP 1.0 for class 0 only."""
    scores, _ = _sample(3, 20, 8, ties=False)
    targets = np.zeros(20, dtype=np.int64)
    report = ranking_report(scores, targets, _names(3))
    assert report["auroc"] == {
        "macro": None,
        "per_class": {"class_0": None, "class_1": None, "class_2": None},
    }
    assert report["average_precision"] == {
        "macro": 1.0,
        "per_class": {"class_0": 1.0, "class_1": None, "class_2": None},
    }
    _assert_json_clean(report)


def test_binary_macro_is_positive_class_auroc():
    for ties in (False, True):
        scores, targets = _sample(2, 500, 9, ties=ties)
        report = ranking_report(scores, targets, ["neg", "pos"])
        binary = roc_auc_score(targets, scores[:, 1])
        assert report["auroc"]["macro"] == pytest.approx(binary, **TOL)
        assert report["auroc"]["per_class"]["pos"] == pytest.approx(binary, **TOL)
        assert report["auroc"]["per_class"]["neg"] == pytest.approx(binary, **TOL)
        assert "top_k_accuracy" not in report
        _assert_matches_sklearn(report, scores, targets, ["neg", "pos"])


def test_binary_top1_tie_follows_sklearn_binary_rule():
    """A 50/50 row predicts class 0, as top_k_accuracy_score(y, p1, k=1) does."""
    scores = np.array([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    targets = np.array([0, 1, 1, 1])
    report = ranking_report(scores, targets, ["a", "b"], top_k=[1])
    assert report["top_k_accuracy"] == {"1": 0.5}
    assert top_k_accuracy_score(targets, scores[:, 1], k=1) == 0.5


def test_multiclass_ties_follow_sklearn_order():
    """Among equal scores the higher class index ranks first, as in scikit-learn."""
    scores = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]])
    targets = np.array([0, 1, 1, 0])
    report = ranking_report(scores, targets, _names(3), top_k=[1, 2])
    # Row 0: class 1 ranks ahead of class 0 (miss at k=1); rows 1 and 2: hits at k=1 and k=2
    # respectively; row 3: class 0 ranks last.
    assert report["top_k_accuracy"] == {"1": 0.25, "2": 0.75}
    for k in (1, 2):
        expected = top_k_accuracy_score(targets, scores, k=k, labels=[0, 1, 2])
        assert report["top_k_accuracy"][str(k)] == expected


@pytest.mark.parametrize(
    ("c", "top_k", "keys"),
    [
        (2, None, None),
        (5, None, None),
        (6, None, ["5"]),
        (100, None, ["5"]),
        (3, [], None),
        (3, [3, 7], None),
        (3, [2, 1, 2, 3], ["1", "2"]),
        (10, [10, 9, 1], ["1", "9"]),
    ],
)
def test_top_k_defaults_and_skipping(c: int, top_k, keys):
    scores, targets = _sample(c, 40, 10, ties=False)
    report = ranking_report(scores, targets, _names(c), top_k=top_k)
    if keys is None:
        assert "top_k_accuracy" not in report
    else:
        assert list(report["top_k_accuracy"]) == keys
    assert set(report) <= {"top_k_accuracy", "auroc", "average_precision"}
    _assert_matches_sklearn(report, scores, targets)


def test_torch_inputs_give_the_same_report():
    scores, targets = _sample(10, 200, 11, ties=True)
    expected = ranking_report(scores, targets, _names(10), top_k=[1, 5])
    got = ranking_report(torch.from_numpy(scores), torch.from_numpy(targets), _names(10), [1, 5])
    assert got == expected
    # float32 softmax outputs straight from a model also work.
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(dim=1)
    report = ranking_report(probs, torch.from_numpy(targets), _names(10))
    _assert_matches_sklearn(report, probs.double().numpy(), targets)


def test_empty_split():
    report = ranking_report(np.zeros((0, 7)), np.zeros(0, dtype=np.int64), _names(7))
    assert report["top_k_accuracy"] == {"5": 0.0}
    for key in ("auroc", "average_precision"):
        assert report[key]["macro"] is None
        assert set(report[key]["per_class"].values()) == {None}
    _assert_json_clean(report)


def test_ranking_report_rejects_bad_input():
    scores, targets = _sample(3, 10, 12, ties=False)
    with pytest.raises(ValueError, match="N x 4"):
        ranking_report(scores, targets, _names(4))
    with pytest.raises(ValueError, match="one class index per row"):
        ranking_report(scores, targets[:-1], _names(3))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ranking_report(scores, np.full(10, 3), _names(3))
    with pytest.raises(ValueError, match="unique"):
        ranking_report(scores, targets, ["a", "a", "b"])
    with pytest.raises(ValueError, match="positive ints"):
        ranking_report(scores, targets, _names(3), top_k=[0])
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        ranking_report(bad, targets, _names(3))


@pytest.mark.filterwarnings("ignore:'k' .* greater than or equal to 'n_classes'")
@pytest.mark.parametrize("c", [3, 10, 100])
def test_top_k_correct_matches_sklearn(c: int):
    scores, targets = _sample(c, 257, c, ties=True)  # many exact ties
    logits, y = torch.from_numpy(scores), torch.from_numpy(targets)
    for k in (1, 2, 5, c, c + 3):
        count = top_k_correct(logits, y, k)
        assert count.ndim == 0 and count.dtype == torch.int64
        labels = list(range(c))
        expected = top_k_accuracy_score(targets, scores, k=k, labels=labels, normalize=False)
        assert int(count) == expected, k
        # Batches, the last one partial, add up to the same count.
        total = sum(top_k_correct(logits[i : i + 50], y[i : i + 50], k) for i in range(0, 257, 50))
        assert int(total) == expected, k


def test_top_k_correct_mask_and_extra_dims():
    rng = np.random.default_rng(13)
    logits = torch.from_numpy(np.round(rng.normal(size=(4, 9, 6)), 1))
    targets = torch.from_numpy(rng.integers(0, 6, size=(4, 9)))
    mask = torch.from_numpy(rng.random((4, 9)) < 0.6)
    padded = torch.where(mask, targets, torch.full_like(targets, -100))
    got = top_k_correct(logits, padded, 2, mask=mask)
    flat_logits, flat_targets = logits[mask].numpy(), targets[mask].numpy()
    expected = top_k_accuracy_score(
        flat_targets, flat_logits, k=2, labels=range(6), normalize=False
    )
    assert int(got) == expected
    assert int(top_k_correct(logits, targets, 2)) == top_k_accuracy_score(
        targets.reshape(-1).numpy(),
        logits.reshape(-1, 6).numpy(),
        k=2,
        labels=range(6),
        normalize=False,
    )
    with pytest.raises(ValueError, match="positive int"):
        top_k_correct(logits, targets, 0)
    with pytest.raises(ValueError, match="mask"):
        top_k_correct(logits, targets, 1, mask=mask[:, :3])
    with pytest.raises(ValueError, match=r"\(\.\.\., C\)"):
        top_k_correct(logits, targets[:, :3], 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_top_k_correct_does_not_sync_on_cuda():
    logits = torch.randn(64, 10, device="cuda")
    targets = torch.randint(0, 10, (64,), device="cuda")
    mask = torch.rand(64, device="cuda") < 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plain = top_k_correct(logits, targets, 5)
        masked = top_k_correct(logits, targets, 5, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = top_k_accuracy_score(
        targets.cpu().numpy(), logits.cpu().numpy(), k=5, labels=range(10), normalize=False
    )
    assert plain.device.type == "cuda" and int(plain) == expected
    assert int(masked) <= int(mask.sum())
