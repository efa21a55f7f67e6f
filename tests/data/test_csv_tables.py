"""Users' own tables: the task read from the label column, preprocessing learned from the
training split and kept in the checkpoint (imputation, categories, indicators), regression
targets in their own units, and the same encoding at predict time and through ONNX."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from dltrain.config.schema import Recipe
from dltrain.data import csv_tables
from dltrain.data.prepare import prepare_data
from dltrain.data.table_encoding import RawColumn, TableEncoding, fit_encoding
from dltrain.errors import UserError

from helpers.cli import words
from helpers.training import model_outputs


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_recipe(path: Path, data: dict, model: dict | None = None, **top) -> Path:
    recipe = {
        "name": path.stem,
        "output": "runs",
        "device": "cpu",
        "data": {"name": "csv", **data},
        "model": model or {"name": "mlp", "hidden": [32]},
        **top,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


# -- the task, read from the label column ------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "task"),
    [
        (["cat", "dog", "7"] * 20, "classification"),  # text labels are class names
        ([str(i % 3) for i in range(60)], "classification"),  # a few integer classes
        ([f"{0.5 + i:.2f}" for i in range(60)], "regression"),  # a price, with cents
        ([str(100 + 7 * i) for i in range(60)], "regression"),  # many integers, none repeated
    ],
)
def test_task_auto_reads_the_label_column(tmp_path, labels, task):
    path = write_csv(tmp_path / "t.csv", ["x", "y"], [[i % 7, v] for i, v in enumerate(labels)])
    loaded = csv_tables.csv(path=path, label="y")
    assert loaded.task == task
    if task == "regression":
        assert loaded.classes == ["y"] and loaded.train.y.dtype == torch.float32
        expected = sorted(float(v) for v in labels)
        got = sorted(torch.cat([loaded.train.y, loaded.test.y]).tolist())
        assert got == pytest.approx(expected)


def test_many_class_ids_with_few_rows_each_are_a_question_not_a_guess(tmp_path):
    rows = [[i % 7, i % 30] for i in range(60)]  # ids 0..29, two rows each: classes or amounts?
    path = write_csv(tmp_path / "t.csv", ["x", "grade"], rows)
    with pytest.raises(UserError) as info:
        csv_tables.csv(path=path, label="grade")
    message = str(info.value)
    assert "30 distinct integers (0..29) over 60 rows" in message
    assert "data.task: classification or data.task: regression" in message
    assert csv_tables.csv(path=path, label="grade", task="regression").task == "regression"
    assert len(csv_tables.csv(path=path, label="grade", task="classification").classes) == 30


def test_regression_asked_of_text_labels_names_the_line(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["x", "y"], [[1, "2.5"], [2, "three"]])
    with pytest.raises(UserError, match=r"line 3 has label 'three', which is not a finite"):
        csv_tables.csv(train=path, label="y", task="regression")


# -- preprocessing learned from the training split --------------------------------------------


def test_the_encoding_imputes_indicates_and_one_hot_encodes_with_an_unknown_bucket():
    layout = [RawColumn("size", "numeric"), RawColumn("city", "categorical", ["A", "B", "C"])]
    nan = np.nan
    raw = np.array([[1.0, 0], [3.0, 1], [nan, 1], [10.0, nan], [2.0, 2]])
    encoding = fit_encoding(raw, layout, max_categories=2)
    size, city = encoding.columns
    assert (size.fill, size.indicator) == (2.5, True)  # the median of 1, 3, 10, 2
    assert city.categories == ["A", "B"]
    assert (city.fill, city.indicator) == ("B", True)  # the most frequent; C is too rare
    assert encoding.feature_names() == [
        "size",
        "size_missing",
        "city=<unknown>",
        "city=A",
        "city=B",
        "city_missing",
    ]
    cells = [["", "C"], ["4", "Z"], ["NA", ""], ["5", "A"]]
    encoded = encoding.encode_cells(cells, [f"row {i}" for i in range(4)])
    assert encoded.tolist() == [
        [2.5, 1, 1, 0, 0, 0],  # empty size: the median, flagged; C was cut: <unknown>
        [4.0, 0, 1, 0, 0, 0],  # Z never seen: <unknown>
        [2.5, 1, 0, 0, 1, 1],  # NA is missing too; an empty city is the most frequent
        [5.0, 0, 0, 1, 0, 0],
    ]
    assert encoding.scaled_features().tolist() == [True, False, False, False, False, False]
    with pytest.raises(UserError, match=r"row 0: column 'size' holds 'big', not a finite"):
        encoding.encode_cells([["big", "A"]], ["row 0"])


def test_preprocessing_is_learned_from_the_training_split_only(tmp_path):
    # The validation file holds a city and sizes the training file never has: neither may
    # leak into the categories, the median or the normalisation.
    train = write_csv(
        tmp_path / "train.csv",
        ["size", "city", "label"],
        [[1, "A", "x"], [2, "B", "y"], ["", "A", "x"], [4, "B", "y"], [100, "", "x"]],
    )
    val = write_csv(
        tmp_path / "val.csv", ["size", "city", "label"], [[1000, "Z", "x"], [2000, "Z", "y"]]
    )
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "data": {"name": "csv", "train": str(train), "val": str(val)},
            "model": {"name": "mlp"},
        }
    )
    data = prepare_data(recipe.data, seed=0)
    encoding = TableEncoding.from_dict(data.extra["table"])
    size, city = encoding.columns
    assert size.fill == 3.0 and size.indicator  # median of 1, 2, 4, 100
    assert city.categories == ["A", "B"] and city.fill in ("A", "B") and city.indicator
    filled = [1.0, 2.0, 3.0, 4.0, 100.0]
    assert data.mean[0] == pytest.approx(np.mean(filled))
    assert data.std[0] == pytest.approx(np.std(filled, ddof=1))
    assert data.mean[1:] == [0.0] * 5 and data.std[1:] == [1.0] * 5  # 0/1 features stay
    val_x = data.splits["val"].x
    assert val_x[:, 2].tolist() == [1.0, 1.0]  # Z: <unknown>
    assert data.input_shape == (6,) and "table_layout" not in data.meta()


def test_a_typo_in_a_numeric_column_is_reported_not_read_as_categories(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["size", "label"], [[1, "a"], [2, "b"], ["3,5", "a"]])
    with pytest.raises(UserError) as info:
        csv_tables.csv(path=path)
    assert "line 4, column 'size': '3,5' is not a finite number" in str(info.value)
    assert "data.columns: {size: categorical}" in str(info.value)


def test_categorical_names_a_feature_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["size", "grade", "label"], [[1, 2, "a"]])
    with pytest.raises(UserError, match=r"data.categorical: 'grades' is not a feature column"):
        csv_tables.csv(path=path, categorical=["grades"])


# -- whole runs -------------------------------------------------------------------------------


def _diabetes_csv(path: Path) -> Path:
    d = load_diabetes(scaled=False)
    rows = np.column_stack([d.data, d.target])
    return write_csv(path, [*d.feature_names, "progression"], [[f"{v:g}" for v in r] for r in rows])


@pytest.mark.slow
def test_diabetes_as_a_csv_trains_as_regression_and_reports_what_sklearn_computes(tmp_path, invoke):
    path = _diabetes_csv(tmp_path / "diabetes.csv")
    recipe = write_recipe(
        tmp_path / "diabetes.yaml",
        {"path": "diabetes.csv", "label": "progression", "batch_size": 32},
        {"name": "mlp", "hidden": [64]},
        optimizer={"name": "adam", "lr": 0.001, "weight_decay": 0.01},
        train={"epochs": 40},
    )
    result = invoke("fit", str(recipe))
    assert result.exit_code == 0, result.output
    assert "regression of progression" in result.output and "loss auto → mse" in result.output
    assert not re.search(r"epoch \d+\.\d{4}", result.output)  # the epoch is not a figure
    report = json.loads((tmp_path / "runs/diabetes/report.json").read_text())
    assert report["task"] == "regression" and report["num_samples"] == 88

    # The report's figures are scikit-learn's on the model's own test predictions, in the
    # target's units (not standardised ones).
    out, y = model_outputs(tmp_path / "runs/diabetes/checkpoints/best.pt", "test")
    predicted, y = out.squeeze(1).double().numpy(), y.double().numpy()
    assert report["r2"] == pytest.approx(r2_score(y, predicted), abs=1e-6)
    assert report["mse"] == pytest.approx(mean_squared_error(y, predicted), rel=1e-6)
    assert report["mae"] == pytest.approx(mean_absolute_error(y, predicted), rel=1e-6)

    # As good as a linear model on the same test split (about 0.45 there).
    loaded = csv_tables.csv(path=path, label="progression", seed=0)
    linear = LinearRegression().fit(loaded.train.x.numpy(), loaded.train.y.numpy())
    baseline = linear.score(loaded.test.x.numpy(), loaded.test.y.numpy())
    assert report["r2"] > max(0.4, baseline - 0.1), (report["r2"], baseline)


def test_targets_far_from_zero_train_in_their_own_units(tmp_path, invoke):
    # Prices around 200,000: learned standardised, answered in their units (without scaling
    # the output would need thousands of steps just to reach the mean).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    price = 200_000 + 30_000 * x[:, 0] - 10_000 * x[:, 1] + rng.normal(0, 1_000, size=300)
    write_csv(tmp_path / "prices.csv", ["a", "b", "price"], np.column_stack([x, price]).tolist())
    recipe = write_recipe(
        tmp_path / "prices.yaml",
        {"path": "prices.csv", "label": "price", "batch_size": 32},
        loss={"name": "mse"},
        optimizer={"name": "adam", "lr": 0.01},
        train={"epochs": 10},
    )
    result = invoke("fit", str(recipe), "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs/prices/report.json").read_text())
    assert report["r2"] > 0.95 and report["mae"] < 5_000, report
    new = write_csv(tmp_path / "new.csv", ["a", "b"], [[0, 0], [1, 0]])
    result = invoke("predict", "runs/prices/checkpoints/best.pt", str(new), "--json")
    values = [r["prediction"] for r in json.loads(result.stdout)]
    assert values == pytest.approx([200_000, 230_000], abs=5_000)


def _mixed_rows(rng: np.random.Generator, n: int) -> list[list]:
    """city (text), size (numeric, some blank or NA), grade (integers, categorical): the class
    is 'high' when the city is north or the size is large."""
    rows = []
    for _ in range(n):
        city = rng.choice(["Lille", "Paris", "Lyon", "Nice"])
        size = rng.uniform(20, 80)
        label = "high" if city in ("Lille", "Paris") or size > 60 else "low"
        shown = "" if rng.random() < 0.1 else f"{size:.1f}"
        rows.append([city if rng.random() > 0.1 else "", shown, int(rng.integers(1, 4)), label])
    return rows


def _reference_encoding(info: dict, rows: list[dict]) -> np.ndarray:
    """Rows encoded from the exported metadata alone, the way its 'preprocessing' text says."""
    features = []
    for row in rows:
        out = []
        for column in info["table"]["columns"]:
            cell = row.get(column["name"], "").strip()
            empty = cell.lower() in ("", "na", "n/a", "nan", "null", "none", "?")
            if column["kind"] == "numeric":
                out.append(column["fill"] if empty else float(cell))
            else:
                value = column["fill"] if empty else cell
                names = ["<unknown>", *column["categories"]]
                out += [float(value == name) for name in names]
                if value not in column["categories"]:
                    out[-len(names)] = 1.0
            if column["indicator"]:
                out.append(float(empty))
        features.append(out)
    x = np.array(features, dtype=np.float32)
    return (x - np.array(info["mean"], dtype=np.float32)) / np.array(info["std"], dtype=np.float32)


@pytest.mark.slow
def test_a_mixed_table_trains_evaluates_and_predicts_unseen_categories_and_blanks(tmp_path, invoke):
    onnxruntime = pytest.importorskip("onnxruntime")
    import onnx

    header = ["city", "size", "grade", "label"]
    write_csv(tmp_path / "homes.csv", header, _mixed_rows(np.random.default_rng(0), 500))
    recipe = write_recipe(
        tmp_path / "homes.yaml",
        {"path": "homes.csv", "categorical": ["grade"]},
        optimizer={"name": "adam", "lr": 0.01},
        train={"epochs": 30},
    )
    result = invoke("fit", str(recipe), "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs/homes/report.json").read_text())
    assert report["accuracy"] > 0.85, report["accuracy"]
    result = invoke("eval", "runs/homes/checkpoints/best.pt", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["accuracy"] == report["accuracy"]

    # From the checkpoint alone: unseen cities, blanks and NA, columns in another order, an
    # extra column and no label column.
    (tmp_path / "homes.csv").unlink()
    new_rows = [
        {"id": "1", "size": "75", "grade": "9", "city": "Atlantis"},  # unseen city and grade
        {"id": "2", "size": "", "grade": "2", "city": "Paris"},  # a blank size
        {"id": "3", "size": "NA", "grade": "", "city": ""},  # everything missing
        {"id": "4", "size": "30", "grade": "1", "city": "Nice"},
    ]
    write_csv(
        tmp_path / "new.csv", ["id", "size", "grade", "city"], [list(r.values()) for r in new_rows]
    )
    result = invoke("predict", "runs/homes/checkpoints/best.pt", "new.csv", "--json")
    assert result.exit_code == 0, result.output
    answers = [r["predictions"] for r in json.loads(result.stdout)]
    assert [a[0]["class"] for a in answers][::3] == ["high", "low"]  # large size; south, small
    assert answers[1][0]["class"] == "high"  # Paris, whatever its size
    said = words(result.stderr)  # what it met that training never showed, per column
    assert (
        "2 values never seen in training, read as <unknown> (city: 1 ('Atlantis'); grade: 1 ('9'))"
        in said
    )
    assert "4 missing cells, imputed (city: 1, size: 2, grade: 1)" in said

    result = invoke("export", "runs/homes/checkpoints/best.pt", "--format", "onnx")
    assert result.exit_code == 0, result.output
    model = onnx.load(tmp_path / "runs/homes/checkpoints/best.onnx")
    info = json.loads({p.key: p.value for p in model.metadata_props}["dltrain.json"])
    x = _reference_encoding(info, new_rows)
    assert x.shape[1] == len(info["feature_names"]) == info["input_shape"][0]
    session = onnxruntime.InferenceSession(model.SerializeToString())
    logits = torch.from_numpy(session.run(None, {"input": x})[0])
    probabilities = logits.softmax(dim=1)
    for row, answer in zip(probabilities, answers, strict=True):
        for entry in answer:
            at = info["classes"].index(entry["class"])
            assert float(row[at]) == pytest.approx(entry["probability"], abs=1e-5)


def test_a_label_with_a_class_per_row_says_why_no_validation_is_left(tmp_path):
    rows = [[i % 7, f"order-{i:05d}"] for i in range(2_000)]
    train = write_csv(tmp_path / "train.csv", ["x", "id"], rows)
    recipe = Recipe.model_validate(
        {"name": "t", "data": {"name": "csv", "train": str(train), "label": "id"}, "model": {}}
    )
    with pytest.raises(UserError) as info:
        prepare_data(recipe.data, seed=0)
    message = " ".join(str(info.value).split())
    assert "data.val_split=0.1 leaves no validation samples" in message
    assert "2,000 of its 2,000 classes have a single sample" in message
    assert "data.task=regression" in message


def test_the_shortest_regression_recipe_trains_with_the_tasks_own_loss(tmp_path, invoke):
    _diabetes_csv(tmp_path / "diabetes.csv")
    recipe = tmp_path / "short.yaml"
    recipe.write_text(
        "data:\n  name: csv\n  path: diabetes.csv\n  label: progression\nmodel: {name: mlp}\n"
    )
    checked = invoke("check", str(recipe))
    assert (
        checked.exit_code == 0
        and "loss: auto → cross_entropy (classification, seq2seq) or mse" in words(checked.output)
    )
    result = invoke("fit", str(recipe), "device=cpu")
    assert result.exit_code == 0, result.output
    assert "loss auto → mse" in result.output and "loss (standardised)" in result.output
    report = json.loads((tmp_path / "runs/short/report.json").read_text())
    assert report["task"] == "regression" and report["r2"] > 0.2  # far better than the mean (0)


@pytest.mark.parametrize(
    ("data", "loss", "expected"),
    [
        (
            {"name": "csv", "path": "missing.csv", "task": "regression"},
            "cross_entropy",
            "(data.task)",
        ),
        ({"name": "adding"}, "nll", "(dataset 'adding')"),
        ({"name": "digits"}, "smooth_l1", None),  # one-hot targets: a classification loss too
        ({"name": "reverse"}, "mse", "(dataset 'reverse')"),
    ],
)
def test_a_loss_that_cannot_train_the_recipes_task_is_refused_before_any_data(
    tmp_path, invoke, data, loss, expected
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": data, "model": {"name": "mlp"}, "loss": loss}))
    result = invoke("check", str(recipe))
    if expected is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    said = words(result.stderr)
    assert f"loss.name: '{loss}' does not fit a" in said and expected in said
    assert "use loss: auto" in said
    fitted = invoke("fit", str(recipe))  # refused before the missing file is even looked for
    assert fitted.exit_code == 2 and "does not fit a" in words(fitted.stderr)


def test_a_detected_regression_with_a_classification_loss_stops_before_training(tmp_path, invoke):
    _diabetes_csv(tmp_path / "diabetes.csv")
    recipe = write_recipe(
        tmp_path / "ce.yaml", {"path": "diabetes.csv", "label": "progression"}, loss="cross_entropy"
    )
    assert invoke("check", str(recipe)).exit_code == 0  # the task is the data's to tell
    result = invoke("fit", str(recipe))
    assert result.exit_code == 2
    assert "'cross_entropy' does not fit a regression task" in words(result.stderr)
    assert not (tmp_path / "runs/ce/metrics.csv").exists()  # no epoch was trained


def test_rows_without_a_label_are_left_out_and_counted_never_a_class(tmp_path):
    rows = [[i % 7, ["yes", "no"][i % 2]] for i in range(40)]
    for i, marker in zip((3, 8, 13, 21, 30, 31), ("", "NA", "nan", "null", "?", " N/A ")):
        rows[i][1] = marker
    write_csv(tmp_path / "t.csv", ["x", "y"], rows)
    with pytest.warns(
        UserWarning,
        match=r"6 of 40 rows of .* have no 'y' value .*lines 5, 10, 15, 23, 32, …\): left out",
    ):
        loaded = csv_tables.csv(path=str(tmp_path / "t.csv"), label="y")
    assert loaded.classes == ["no", "yes"]  # NA is no third class
    assert len(loaded.train) + len(loaded.test) == 34


@pytest.mark.parametrize("labels", [["spam"] * 30, ["spam"] * 29 + ["NA"]])
def test_a_label_with_one_class_is_refused_before_training(tmp_path, labels):
    write_csv(tmp_path / "t.csv", ["x", "y"], [[i % 7, v] for i, v in enumerate(labels)])
    with pytest.raises(UserError, match="every labelled row of .* has the class 'spam'"):
        csv_tables.csv(path=str(tmp_path / "t.csv"), label="y")


def test_a_label_column_with_no_value_at_all_is_named(tmp_path):
    write_csv(tmp_path / "t.csv", ["x", "y"], [[i, ""] for i in range(5)])
    with pytest.raises(UserError, match="no row of .* has a 'y' value"):
        csv_tables.csv(path=str(tmp_path / "t.csv"), label="y")


def test_with_one_file_the_encoding_is_learned_from_the_training_rows_only(tmp_path):
    """data.path carves test (and then val) rows out of one file: changing only those rows
    changes nothing of the medians, categories, fills or normalisation — and changing one
    training row does (so the comparison can tell)."""
    from dltrain.data.splits import stratified_split

    rng = np.random.default_rng(1)
    rows = _mixed_rows(rng, 300)
    labels = np.array([row[-1] for row in rows])
    kept, test_rows = stratified_split(labels, 0.2, 0)
    _, val_of_kept = stratified_split(labels[kept], 0.1, 0)
    held_out = [*test_rows, *kept[val_of_kept]]

    def prepared(changed: list[int], name: str):
        table = [list(row) for row in rows]
        for i in changed:
            table[i][:3] = ["Atlantis", "99999.0", 77]  # unseen city, huge size, odd grade
        write_csv(tmp_path / f"{name}.csv", ["city", "size", "grade", "label"], table)
        recipe = Recipe.model_validate(
            {
                "name": "t",
                "data": {
                    "name": "csv",
                    "path": str(tmp_path / f"{name}.csv"),
                    "categorical": ["grade"],
                },
                "model": {},
            }
        )
        return prepare_data(recipe.data, seed=0)

    base, other = prepared([], "base"), prepared(held_out, "held-out")
    assert other.extra["table"] == base.extra["table"]
    assert (other.mean, other.std) == (base.mean, base.std)
    assert not torch.equal(other.splits["test"].x, base.splits["test"].x)  # the rows did change
    assert not torch.equal(other.splits["val"].x, base.splits["val"].x)
    train_row = int(kept[np.setdiff1d(np.arange(len(kept)), val_of_kept)[0]])
    assert prepared([train_row], "train-row").extra["table"] != base.extra["table"]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([1 + i % 3 for i in range(60)], "classification"),  # ids from 1, many rows each
        ([i % 20 for i in range(60)], "classification"),  # 20 classes: at MANY_CLASSES
        ([i % 21 for i in range(60)], "question"),  # 21 consecutive ids from 0, 2-3 rows each
        ([1 + i % 21 for i in range(60)], "question"),  # ... from 1
        ([5 + i % 21 for i in range(60)], "regression"),  # consecutive, but not class ids
        ([3 * (i % 21) for i in range(60)], "regression"),  # 21 values with gaps
        ([i % 30 for i in range(300)], "classification"),  # 30 ≤ a tenth of 300 rows
        ([i % 31 for i in range(300)], "question"),  # one more than a tenth
        ([(i % 23) + (i % 23 > 20) * 9 for i in range(3000)], "regression"),  # counts with gaps
        ([1990 + i % 31 for i in range(3000)], "regression"),  # years: not ids from 0 or 1
    ],
)
def test_task_auto_at_its_thresholds(tmp_path, labels, expected):
    path = write_csv(tmp_path / "t.csv", ["x", "y"], [[i % 7, v] for i, v in enumerate(labels)])
    if expected == "question":
        with pytest.raises(UserError, match="class ids with few rows each, or a quantity"):
            csv_tables.csv(path=path, label="y")
        return
    assert csv_tables.csv(path=path, label="y").task == expected
