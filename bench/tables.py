"""Tables: dltrain's table models against scikit-learn's HistGradientBoosting defaults, on the
tables that ship with scikit-learn (no download), on the same train/test split.

Each table is written as train.csv / test.csv (a stratified 80/20 split for classification,
split seed 0, or seeds 0..N-1 with --splits N); every dltrain variant trains from those files
with `dltrain fit` in a subprocess (what a user runs; the wall time includes Python's start and
the import of torch) and reads report.json; HistGradientBoosting fits the same rows
in-process. Figures: test accuracy and macro F1 (classification) or R² (regression), and wall
seconds; with several splits, each split's and their mean ± std. `randhie_by_person` is
randhie split by person (its rows repeat each person's features over the years: a random
split tests recall of training persons, this one people never seen).

    .venv/bin/python bench/tables.py [--splits N] [VARIANT ...]   # JSON: bench/results/tables.json
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn import datasets
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import accuracy_score, f1_score, r2_score
from sklearn.model_selection import GroupShuffleSplit, train_test_split


def _sklearn(load) -> Callable[[], tuple[pd.DataFrame, pd.Series]]:
    def table() -> tuple[pd.DataFrame, pd.Series]:
        bunch = load(as_frame=True)
        return bunch.data, bunch.target

    return table


def _statsmodels(name: str, target: str) -> Callable[[], tuple[pd.DataFrame, pd.Series]]:
    def table() -> tuple[pd.DataFrame, pd.Series]:
        import statsmodels.api as sm

        frame = getattr(sm.datasets, name).load_pandas().data
        return frame.drop(columns=[target]), frame[target]

    return table


def _penguins() -> tuple[pd.DataFrame, pd.Series]:
    from palmerpenguins import load_penguins

    frame = load_penguins()
    return frame.drop(columns=["species"]), frame["species"]


# name: (rows and target, task); the tables that install offline with scikit-learn,
# statsmodels and palmerpenguins (`pip install -e .[bench]`)
TABLES = {
    "breast_cancer": (_sklearn(datasets.load_breast_cancer), "classification"),
    "wine": (_sklearn(datasets.load_wine), "classification"),
    "digits": (_sklearn(datasets.load_digits), "classification"),
    "penguins": (_penguins, "classification"),  # missing values, categorical columns
    "anes96": (_statsmodels("anes96", "PID"), "classification"),  # 7 party-id classes
    "diabetes": (_sklearn(datasets.load_diabetes), "regression"),
    # 303 school districts, students above the median: a linear model does well (ridge R² ~0.6)
    "star98": (_statsmodels("star98", "NABOVE"), "regression"),
    "fair": (_statsmodels("fair", "affairs"), "regression"),  # 6,366 rows, a skewed target
    "randhie": (_statsmodels("randhie", "mdvis"), "regression"),  # 20,190 rows, visit counts
    "randhie_by_person": (_statsmodels("randhie", "mdvis"), "regression"),  # see BY_PERSON
}
# Tables split by group: the rows of one person (one distinct feature row) on one side
BY_PERSON = {"randhie_by_person"}
# What a short table recipe gets (dltrain's defaults for a csv table: batch 256, 50 epochs,
# early stopping), and the tuned table models
VARIANTS = {
    "mlp (defaults)": {"model": {"name": "mlp"}},
    "mlp_plr": {
        "model": {"name": "mlp_plr"},
        "train": {"epochs": 200, "early_stopping": {"patience": 16}},
        "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001},
        "data": {"batch_size": 32},
    },
    "ft_transformer": {
        "model": {"name": "ft_transformer"},
        "train": {"epochs": 200, "early_stopping": {"patience": 16}},
        "optimizer": {"name": "adamw", "lr": 0.0003, "weight_decay": 0.00001},
        "data": {"batch_size": 32},
    },
}


def write_split(folder: Path, name: str, seed: int = 0) -> str:
    """train.csv / test.csv of the table: 80/20, stratified for classification, or by person."""
    load, task = TABLES[name]
    x, y = load()
    if name in BY_PERSON:
        persons = x.astype(str).agg("|".join, axis=1)
        splitter = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=seed)
        train, test = next(splitter.split(x, y, groups=persons))
        parts = [x.iloc[train], x.iloc[test], y.iloc[train], y.iloc[test]]
    else:
        stratify = y if task == "classification" else None
        parts = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=stratify)
    for split, (xs, ys) in {"train": parts[0::2], "test": parts[1::2]}.items():
        xs.assign(target=ys.to_numpy()).to_csv(folder / f"{name}-{split}.csv", index=False)
    return task


def gradient_boosting(folder: Path, name: str, task: str) -> dict:
    """HistGradientBoosting with its defaults (text columns as pandas categories, which it
    reads natively; missing values as NaN)."""

    def read(split: str) -> tuple[pd.DataFrame, pd.Series]:
        frame = pd.read_csv(folder / f"{name}-{split}.csv")
        for column in frame.columns[:-1]:
            if frame[column].dtype == object or str(frame[column].dtype) == "str":
                frame[column] = frame[column].astype("category")
        return frame.iloc[:, :-1], frame["target"]

    (x, y), (tx, ty) = read("train"), read("test")
    tx = tx.astype(
        {c: pd.CategoricalDtype(x[c].cat.categories) for c in x.select_dtypes("category")}
    )
    classifier = task == "classification"
    # its defaults, but random_state: on over 10,000 rows it early-stops on a random
    # validation carve, and its R² on randhie moved 0.10-0.15 between runs without one
    estimator = HistGradientBoostingClassifier if classifier else HistGradientBoostingRegressor
    model = estimator(random_state=0)
    start = time.perf_counter()
    predicted = model.fit(x, y).predict(tx)
    seconds = time.perf_counter() - start
    return _figures(task, ty.to_numpy(), predicted, seconds)


def dltrain_fit(folder: Path, name: str, task: str, variant: dict) -> dict:
    recipe = {
        "name": name,
        "output": str(folder / "runs"),
        "device": "cpu",
        "seed": 0,
        **variant,
        "data": {"name": "csv", "train": f"{name}-train.csv", "test": f"{name}-test.csv",
                 "label": "target", "task": task, **variant.get("data", {})},
    }  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "dltrain", "fit", str(path), "-q", "--force"],
        cwd=folder, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode:
        return {"error": done.stderr.strip()[-300:]}
    run = folder / "runs" / name
    report = json.loads((run / "report.json").read_text())
    with open(run / "metrics.csv") as f:
        epochs = list(csv.DictReader(f))
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    timing = {
        "seconds": seconds,  # the whole command: Python's start, torch's import, data, report
        # in the process, from reading the data to the written report (plots included)
        "fit_seconds": next(e["seconds"] for e in events if e["event"] == "end"),
        "train_seconds": sum(float(row["seconds"]) for row in epochs),
        "epochs": len(epochs),
    }
    if task == "classification":
        return {"accuracy": report["accuracy"], "f1_macro": report["f1"]["macro"], **timing}
    return {"r2": report["r2"], **timing}


def _figures(task: str, truth: np.ndarray, predicted: np.ndarray, seconds: float) -> dict:
    if task == "classification":
        return {
            "accuracy": accuracy_score(truth, predicted),
            "f1_macro": f1_score(truth, predicted, average="macro"),
            "seconds": seconds,
        }
    return {"r2": r2_score(truth, predicted), "seconds": seconds}


def main(chosen: list[str], splits: int = 1) -> None:
    variants = {k: v for k, v in VARIANTS.items() if not chosen or k in chosen}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in TABLES:
            runs: dict[str, list[dict]] = {k: [] for k in ["hist_gradient_boosting", *variants]}
            for seed in range(splits):
                task = write_split(folder, name, seed)
                runs["hist_gradient_boosting"].append(gradient_boosting(folder, name, task))
                for label, variant in variants.items():
                    runs[label].append(dltrain_fit(folder, name, task, variant))
            results[name] = {label: _summary(each) for label, each in runs.items()}
            for label, summary in results[name].items():
                print(name, label, {k: v for k, v in summary.items() if k != "splits"}, flush=True)
    out = Path(os.environ.get("BENCH_JSON", "bench/results/tables.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))
    print(f"written {out}")


def _summary(runs: list[dict]) -> dict:
    """One split's figures as they are; several splits' as mean and sample std, and each."""
    if len(runs) == 1 or any("error" in run for run in runs):
        return runs[0] if len(runs) == 1 else {"splits": runs}
    summary: dict = {"splits": runs}
    for key in runs[0]:
        values = [run[key] for run in runs]
        summary[key] = round(statistics.mean(values), 4)
        summary[f"{key}_std"] = round(statistics.stdev(values), 4)
    return summary


if __name__ == "__main__":
    arguments = sys.argv[1:]
    count = 1
    if "--splits" in arguments:
        at = arguments.index("--splits")
        count = int(arguments[at + 1])
        del arguments[at : at + 2]
    main(arguments, count)
