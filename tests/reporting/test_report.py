"""The line on classes a model never predicted: which, how many rows, and what to do if they
matter — in the run's console report and in report.md."""

from __future__ import annotations

import csv

import yaml

from dltrain.reporting.report import LISTED_CLASSES, unpredicted_classes_line

from helpers.cli import words


def classification(matrix: list[list[int]], classes: list[str] | None = None) -> dict:
    classes = classes or [f"c{i}" for i in range(len(matrix))]
    total = sum(map(sum, matrix))
    return {"split": "test", "classes": classes, "confusion_matrix": matrix, "num_samples": total}


def test_every_present_class_predicted_or_not_a_classification_says_nothing():
    assert unpredicted_classes_line(classification([[5, 1], [2, 3]])) == ""
    # a class absent from the split is not "never predicted": there was nothing to predict
    assert unpredicted_classes_line(classification([[5, 0], [0, 0]])) == ""
    assert unpredicted_classes_line({"split": "test", "r2": 0.4, "num_samples": 9}) == ""


def test_the_line_names_each_class_never_predicted_and_counts_its_rows():
    line = unpredicted_classes_line(classification([[6, 0, 1], [3, 0, 0], [1, 0, 0]]))
    # c1 (3 rows) was never predicted; c2 (1 row) was predicted once, wrongly: not listed
    assert line.startswith("never predicted on the test split: 'c1' (3 of 11 rows, 27%), so its")
    assert "class_weights: balanced" in line
    two = unpredicted_classes_line(classification([[6, 0, 0], [3, 0, 0], [1, 0, 0]]))
    assert "'c1', 'c2' (4 of 10 rows, 40%), so their recall and F1 are 0" in two


def test_many_classes_never_predicted_are_listed_up_to_a_few_and_counted():
    size = LISTED_CLASSES + 3
    matrix = [[1] + [0] * (size - 1) for _ in range(size)]
    line = unpredicted_classes_line(classification(matrix))
    listed_last, more = f"'c{LISTED_CLASSES}'", size - 1 - LISTED_CLASSES  # c0 was predicted
    assert f"{listed_last} and {more} more ({size - 1} of {size} rows" in line


def test_a_run_that_never_predicts_its_rare_classes_says_so_and_report_md_too(tmp_path, invoke):
    with open(tmp_path / "votes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["noise", "party"])
        for i in range(200):  # nothing to learn: the majority class wins every row
            writer.writerow([(i * 37) % 101 / 101, "rare" if i % 10 == 0 else "common"])
    recipe = tmp_path / "votes.yaml"
    data = {"name": "csv", "path": "votes.csv", "label": "party"}
    recipe.write_text(yaml.safe_dump({"data": data, "model": {"name": "mlp"}}))
    result = invoke("fit", str(recipe), "device=cpu", "train.epochs=2")
    assert result.exit_code == 0, result.output
    expected = "never predicted on the test split: 'rare' (4 of 40 rows, 10%)"
    assert expected in words(result.output)
    assert expected in (tmp_path / "runs/votes/report.md").read_text()
