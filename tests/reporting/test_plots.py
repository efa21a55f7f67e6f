"""Plots: curves.png and confusion_matrix.png are valid images, report.md embeds them, and a
plot that fails never breaks the report."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib.image  # noqa: E402

from dltrain.reporting import plots  # noqa: E402
from dltrain.reporting.metrics import classification_report  # noqa: E402
from dltrain.reporting.report import write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_report(num_classes: int, per_class: int = 20, seed: int = 0) -> dict:
    """A report as evaluate_checkpoint builds it, for a mostly-right classifier."""
    rng = np.random.default_rng(seed)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for true in range(num_classes):
        for _ in range(per_class):
            predicted = true if rng.random() > 0.2 else int(rng.integers(num_classes))
            matrix[true, predicted] += 1
    matrix[-1] = 0  # one class absent from the split: its row stays zero
    classes = [f"class_{i}" for i in range(num_classes)]
    return {
        "split": "test",
        "checkpoint": "checkpoints/best.pt",
        "loss": 0.25,
        **classification_report(matrix, classes),
    }


def make_history(epochs: int, validation: bool = True) -> list[dict]:
    """metrics.csv rows with a cosine learning rate."""
    rows = []
    for epoch in range(1, epochs + 1):
        train_loss = 2.3 * math.exp(-epoch / 5) + 0.05
        rows.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": train_loss * 1.1 if validation else None,
                "val_accuracy": 1 - train_loss / 2.5 if validation else None,
                "lr": 0.002 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs)),
                "seconds": 1.0,
                "samples_per_s": 1000.0,
            }
        )
    return rows


def assert_png(path: Path, min_side: int = 300) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert min(pixels.shape[:2]) >= min_side
    assert pixels.std() > 0.01  # something was drawn
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))  # written atomically, no leftovers


@pytest.mark.parametrize(("num_classes", "min_height"), [(2, 600), (10, 600), (100, 2000)])
def test_confusion_matrix_png(tmp_path, num_classes, min_height):
    path = plots.write_confusion_matrix(
        tmp_path / "confusion_matrix.png", make_report(num_classes), "run"
    )
    assert path == tmp_path / "confusion_matrix.png"
    assert_png(path)
    # the figure grows with the class count: room for 100 legible class names
    assert matplotlib.image.imread(path).shape[0] >= min_height


@pytest.mark.parametrize("epochs", [1, 30])
@pytest.mark.parametrize("validation", [True, False])
def test_curves_png(tmp_path, epochs, validation):
    path = plots.write_curves(tmp_path / "curves.png", make_history(epochs, validation), "run")
    assert path == tmp_path / "curves.png"
    assert_png(path)


@pytest.mark.parametrize(
    ("monitor", "validation", "panel"),
    [("val_loss", True, 0), ("val_accuracy", True, 1), ("train_loss", False, 0)],
)
def test_curves_star_the_epoch_best_pt_holds_on_its_monitors_curve(
    tmp_path, monkeypatch, monitor, validation, panel
):
    starred = []
    real = plots._star_best

    def spy(ax, rows, epochs, epoch, name):
        real(ax, rows, epochs, epoch, name)
        axes = list(ax.values())
        texts = [(axes.index(a), t.get_text()) for a in axes for t in a.texts]
        starred.extend(texts)

    monkeypatch.setattr(plots, "_star_best", spy)
    history = make_history(6, validation)
    assert_png(plots.write_curves(tmp_path / "c.png", history, "run", best=(4, monitor)))
    value = history[3][monitor]
    assert starred == [(panel, f"best.pt: epoch 4 ({monitor} {value:.4f})")]


def test_curves_survive_odd_values(tmp_path):
    history = make_history(5)
    history[2]["val_loss"] = float("nan")
    history[3]["train_loss"] = float("inf")
    for row in history:
        row["lr"] = 0.0  # a constant zero learning rate: no log scale possible
    assert_png(plots.write_curves(tmp_path / "curves.png", history, "run"))


def test_curves_need_an_epoch(tmp_path):
    with pytest.raises(ValueError, match="no epochs"):
        plots.write_curves(tmp_path / "curves.png", [], "run")


def test_plots_do_not_use_pyplot(tmp_path):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plots.write_confusion_matrix(tmp_path / "cm.png", make_report(3), "run")
    plots.write_curves(tmp_path / "curves.png", make_history(2), "run")
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules


def test_long_class_names_keep_both_ends():
    short = plots._shorten("class_with_a_very_long_name_17")
    assert len(short) == plots.MAX_LABEL_CHARS
    assert short.startswith("class") and short.endswith("_17")
    assert plots._shorten("cat") == "cat"


def test_report_embeds_plots(tmp_path):
    report = make_report(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(tmp_path, report, history=make_history(3), title="quickstart")
    assert_png(tmp_path / "confusion_matrix.png")
    assert_png(tmp_path / "curves.png")
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "![confusion matrix](confusion_matrix.png)" in markdown
    assert "![training curves](curves.png)" in markdown
    # the images come before the tables
    assert markdown.index("](curves.png)") < markdown.index("## Per class")
    # report.json is the contract, byte for byte: the plots are extra files
    text = (tmp_path / "report.json").read_text(encoding="utf-8")
    assert text == json.dumps(report, indent=2) + "\n"
    assert list(json.loads(text)) == list(report)


def test_report_old_signature_has_no_curves(tmp_path):
    write_report(tmp_path, make_report(2))
    assert_png(tmp_path / "confusion_matrix.png")
    assert not (tmp_path / "curves.png").exists()
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "![confusion matrix](confusion_matrix.png)" in markdown
    assert "curves.png" not in markdown


def test_failing_plot_still_writes_the_report(tmp_path, monkeypatch):
    # a stale image from an earlier report must not be shown beside the new numbers
    (tmp_path / "confusion_matrix.png").write_bytes(b"old")

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "write_confusion_matrix", broken)
    report = make_report(4)
    with pytest.warns(UserWarning, match=r"plots skipped: .*no fonts"):
        write_report(tmp_path, report, history=make_history(2), title="run")
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == report
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "confusion_matrix.png" not in markdown
    assert not (tmp_path / "confusion_matrix.png").exists()
    assert "![training curves](curves.png)" in markdown  # the other plot is unaffected
    assert "## Per class" in markdown


def test_report_without_matplotlib(tmp_path, monkeypatch):
    # None in sys.modules makes `import matplotlib` raise ImportError, as if not installed
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.warns(UserWarning, match="plots skipped") as caught:
        write_report(tmp_path, make_report(3), history=make_history(2))
    assert len(caught) == 1  # one warning for the whole report, not one per plot
    assert (tmp_path / "report.json").is_file()
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "![" not in markdown
    assert not list(tmp_path.glob("*.png"))
