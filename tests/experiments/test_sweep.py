"""`dltrain sweep`: the space is checked before any trial, trials are run folders judged on
validation, only the best is evaluated on test, a rerun continues the study to --trials in all,
Ctrl-C stops after the running trial's save, and two processes share one SQLite study."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dltrain.reporting.progress import LOG_EVERY_VARIABLE
from dltrain.runs.metrics_csv import read_metrics

from helpers.cli import REPO, dltrain, interruptible, words
from helpers.postgres import new_database
from helpers.training import TABULAR

SPACE = {
    "metric": "val_accuracy",
    "sampler": "random",
    "pruner": "none",
    "params": {
        "optimizer.lr": {"type": "float", "low": 0.001, "high": 0.3, "log": True},
        "model.hidden": {"type": "categorical", "choices": [[16], [32, 32]]},
    },
}


def write(tmp_path: Path, epochs: int = 2, train_size: int = 256, **space) -> tuple[Path, Path]:
    recipe = {
        **TABULAR,
        "name": "search",
        "output": str(tmp_path / "runs"),
        "data": {**TABULAR["data"], "val_split": 0.25, "train_size": train_size},
        "train": {"epochs": epochs},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({**SPACE, **space}))
    return tmp_path / "recipe.yaml", tmp_path / "space.yaml"


def report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs/search/sweep_report.json").read_text())


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"optimizer.lrr": {"type": "float", "low": 0.1, "high": 1}}, "Did you mean 'lr'?"),
        ({"optimizer.lr": {"type": "float", "low": 1, "high": 0.1}}, "must be below high"),
        ({"optimizer.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "low > 0"),
        ({"optimizer.lr": {"type": "float", "low": -1, "high": 1}}, "optimizer.lr = -1"),
        ({"model.hidden": {"type": "categorical", "choices": [[0]]}}, "model.hidden"),
    ],
)
def test_the_space_is_checked_against_the_recipe_before_any_trial(
    tmp_path, invoke, params, expected
):
    recipe, space = write(tmp_path, params=params)
    result = invoke("sweep", str(recipe), str(space), "--trials", "3")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert expected in words(result.stderr), result.stderr
    assert not (tmp_path / "runs/search/trials").exists()  # no trial ran


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, "params.optimizer.lr: give a mapping with type"),
        ([0.1, 0.2], "params.optimizer.lr: give a mapping with type"),
        ({"low": 0.1, "high": 1}, "params.optimizer.lr.type: one of float, int, categorical"),
        ({"type": "float", "high": 1}, "params.optimizer.lr.low: required key is missing"),
        ({"type": "int", "low": 1, "high": 5, "step": 0}, "params.optimizer.lr.step:"),
        ({"type": "categorical", "choices": []}, "params.optimizer.lr.choices:"),
        ({"type": "float", "low": 0.1, "high": 1, "hihg": 2}, "Did you mean 'high'?"),
    ],
)
def test_a_bad_parameter_is_named_with_its_own_key(tmp_path, invoke, spec, expected):
    recipe, space = write(tmp_path, params={"optimizer.lr": spec})
    result = invoke("sweep", str(recipe), str(space), "--trials", "3")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert expected in words(result.stderr), result.stderr


def test_a_grid_is_counted_before_it_is_built(tmp_path, invoke):
    # 10^9 integers would be gigabytes of Python ints: refused with the count, before any trial
    huge = {"type": "int", "low": 1, "high": 10**9}
    params = {"data.batch_size": huge, "model.hidden": SPACE["params"]["model.hidden"]}
    recipe, space = write(tmp_path, sampler="grid", params=params)
    result = invoke("sweep", str(recipe), str(space), "--trials", "3")
    assert result.exit_code == 2, result.output
    said = words(result.stderr)
    assert (
        "the grid has 2,000,000,000 points" in said
        and "params.data.batch_size: 1,000,000,000" in said
    )
    assert not (tmp_path / "runs/search/trials").exists()


def test_a_damaged_study_file_is_blamed_on_itself_not_on_storage(tmp_path, invoke):
    recipe, space = write(tmp_path)
    study = tmp_path / "runs/search/study.db"
    study.parent.mkdir(parents=True)
    study.write_bytes(b"not a database at all" * 200)
    result = invoke("sweep", str(recipe), str(space), "--trials", "1")
    assert result.exit_code == 2, result.output
    said = words(result.stderr)
    assert f"the sweep's study {study} cannot be opened" in said and "--storage" not in said
    assert study.read_bytes().startswith(b"not a database")


def test_a_sweep_judges_trials_on_validation_and_tests_only_the_best(tmp_path, invoke):
    recipe, space = write(tmp_path)
    first = invoke("sweep", str(recipe), str(space), "--trials", "3")
    assert first.exit_code == 0, first.output
    summary = report(tmp_path)
    trials = summary["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert all(t["state"] == "complete" for t in trials)
    for t in trials:  # each trial is a run folder, reported on validation only
        run = tmp_path / "runs/search" / t["run"]
        assert json.loads((run / "report.json").read_text())["split"] == "val"
        assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["monitor"] == (
            "val_accuracy"
        )
        assert t["params"]["model.hidden"] in ([16], [32, 32])
        # its value is its best epoch's, as its own metrics.csv has it (not the last or worst)
        epochs = [row["val_accuracy"] for row in read_metrics(run / "metrics.csv")]
        assert len(epochs) == 2 and t["value"] == pytest.approx(max(epochs))
    best = max(trials, key=lambda t: t["value"])
    assert summary["best_trial"] == best["number"] and summary["best_value"] == best["value"]
    tested = json.loads((tmp_path / "runs/search/best-test/report.json").read_text())
    assert tested["split"] == "test" and summary["best_test"]["accuracy"] == tested["accuracy"]
    assert "epoch" not in summary["best_test"]
    # the test figures are the best trial's best.pt (its best epoch), as `dltrain eval` reads it
    assert tested["checkpoint"].endswith("checkpoints/best.pt") and tested["best_by"]
    rows = read_metrics(tmp_path / "runs/search" / best["run"] / "metrics.csv")
    accuracies = [row["val_accuracy"] for row in rows]
    assert tested["epoch"] == accuracies.index(max(accuracies)) + 1
    best_pt = tmp_path / "runs/search" / best["run"] / "checkpoints/best.pt"
    evaluated = invoke("eval", str(best_pt), "--split", "test", "--output", str(tmp_path / "e"))
    assert evaluated.exit_code == 0, evaluated.output
    again_tested = json.loads((tmp_path / "e/report.json").read_text())
    assert again_tested["accuracy"] == tested["accuracy"] and again_tested["loss"] == pytest.approx(
        tested["loss"]
    )
    folder = tmp_path / "runs/search"
    assert all((folder / name).stat().st_size > 5000 for name in ("history.png", "slices.png"))
    assert "test accuracy" in first.stdout
    said = words((folder / "sweep_report.md").read_text())
    assert "3 trials ended of 3 requested" in said and f"trial {best['number']}." not in said
    if "importances" in summary:  # unless they cannot tell the two parameters apart
        assert "from 3 completed trials only: a rough guide" in said
        assert summary["importances_note"].startswith("from 3 completed trials only")
    else:
        assert "importances" not in said and not (folder / "importances.png").exists()

    # --trials is the total: the same command with 4 continues the study by one trial
    again = invoke("sweep", str(recipe), str(space), "--trials", "4")
    assert again.exit_code == 0, again.output
    assert [t["number"] for t in report(tmp_path)["trials"]] == [0, 1, 2, 3]
    changed = dict(SPACE, metric="val_loss")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(changed))
    refused = invoke("sweep", str(recipe), str(space), "--trials", "5")
    assert refused.exit_code == 2
    assert "another search space or metric" in refused.stderr and "--study NAME" in refused.stderr


def test_ctrl_c_stops_after_the_running_trial_and_a_rerun_completes_the_count(tmp_path):
    # trials that outlast any delay of a busy machine; the test stops the first, and the
    # rerun trains 2 epochs
    recipe, space = write(tmp_path, epochs=300, train_size=4096)
    sweep = subprocess.Popen(
        [sys.executable, "-m", "dltrain", "sweep", str(recipe), str(space), "--trials", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, LOG_EVERY_VARIABLE: "0.001"},  # off a terminal: lines during a trial
        preexec_fn=interruptible,  # the test stops it with SIGINT
    )
    metrics = tmp_path / "runs/search/trials/000/metrics.csv"
    deadline = time.monotonic() + 120
    while not metrics.exists() and time.monotonic() < deadline and sweep.poll() is None:
        time.sleep(0.1)
    while len(read_metrics(metrics)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # the trial is under way: past its first epoch's line
    sweep.send_signal(signal.SIGINT)
    output, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, output
    assert "0 of 2 trials ended" in words(output) and "the same command continues" in output
    assert re.search(r"\d\d:\d\d:\d\d +epoch \d+/300 +batch \d+/\d+", output), output
    stopped = report(tmp_path)  # the report of the trials so far, written on the way out
    states = [(t["number"], t["state"], t.get("interrupted")) for t in stopped["trials"]]
    assert states == [(0, "fail", True), (1, "waiting", None)]  # its parameters queued again
    assert "0 trials ended of 2 requested (1 more interrupted" in words(
        (tmp_path / "runs/search/sweep_report.md").read_text()
    )
    trial = tmp_path / "runs/search/trials/000"
    assert not (trial / "checkpoints").exists()  # never resumed: run again from its start
    assert len(read_metrics(trial / "metrics.csv")) >= 2  # the record of how far it got

    rerun = dltrain("sweep", recipe, space, "--trials", "2", "train.epochs=2", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    study = optuna.load_study(
        study_name="search", storage=f"sqlite:///{tmp_path / 'runs/search/study.db'}"
    )
    trials = study.get_trials()
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0].number == 0
    retried = [t for t in trials if t.number > 0 and t.params == interrupted[0].params]
    assert retried, "the interrupted trial's parameters are tried again first"
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 2
    said = words((tmp_path / "runs/search/sweep_report.md").read_text())
    assert "2 trials ended of 2 requested (1 more interrupted, not counted)" in said


def test_two_processes_share_one_study_without_duplicate_trials(tmp_path):
    recipe, space = write(tmp_path)
    command = [sys.executable, "-m", "dltrain", "sweep", str(recipe), str(space), "--trials", "4"]
    workers = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = report(tmp_path)["trials"]
    numbers = [t["number"] for t in trials]
    assert numbers == list(range(len(numbers))) and 4 <= len(numbers) <= 5  # one may overlap
    assert all(t["state"] == "complete" for t in trials)
    runs = sorted(p.name for p in (tmp_path / "runs/search/trials").iterdir() if p.is_dir())
    assert runs == [f"{n:03d}" for n in numbers]  # a run folder each, none shared
    both = [o for o in outputs if "trial" in o]
    assert len(both) == 2  # each process ran trials


def test_every_shipped_search_space_fits_its_recipe():
    from dltrain.experiments.sweep_space import check_space, load_space

    root = REPO / "recipes"
    spaces = sorted((root / "spaces").glob("*.yaml"))
    assert spaces
    for space in spaces:  # spaces/NAME.yaml searches recipes/NAME.yaml
        check_space(load_space(space), root / space.name, [])


def test_a_space_with_folds_values_each_trial_by_the_mean_of_its_folds(tmp_path, invoke):
    recipe, space = write(tmp_path, epochs=2, folds=2, sampler="random")
    result = invoke("sweep", str(recipe), str(space), "--trials", "2")
    assert result.exit_code == 0, result.output
    summary = report(tmp_path)
    assert summary["folds"] == 2 and len(summary["trials"]) == 2
    for t in summary["trials"]:
        folds = sorted((tmp_path / "runs/search" / t["run"]).glob("fold-*"))
        assert [f.name for f in folds] == ["fold-1", "fold-2"]
        bests = [max(r["val_accuracy"] for r in read_metrics(f / "metrics.csv")) for f in folds]
        assert t["value"] == pytest.approx(sum(bests) / 2)
    tested = sorted(p.name for p in (tmp_path / "runs/search/best-test").iterdir() if p.is_dir())
    assert tested == ["fold-1", "fold-2"]  # each fold's best.pt on the test split
    figures = [
        json.loads((tmp_path / f"runs/search/best-test/{f}/report.json").read_text())["accuracy"]
        for f in tested
    ]
    assert summary["best_test"]["accuracy"] == pytest.approx(sum(figures) / 2)


def test_the_pruner_ends_trials_whose_epochs_fall_behind_and_the_count_goes_on(tmp_path):
    from dltrain.experiments.sweep import run_trials
    from dltrain.experiments.sweep_report import write_sweep_report
    from dltrain.experiments.sweep_study import open_sweep

    recipe, space = write(tmp_path, epochs=4, pruner="median")
    sweep = open_sweep(recipe, space, [], 10, None, None)
    epochs_run: dict[int, int] = {}

    def train(trial_recipe, after_epoch):
        """Trials 0-4 learn (the pruner's start-up trials); after them, odd ones lag."""
        number = int(trial_recipe.name)
        lagging = number >= 5 and number % 2 == 1
        for epoch in range(1, 5):
            epochs_run[number] = epoch
            after_epoch({"epoch": epoch, "val_accuracy": (0.1 if lagging else 0.5) + epoch / 10})
        return 0.9

    run_trials(sweep, train, lambda text: None)
    states = {t.number: t.state.name for t in sweep.study.get_trials()}
    assert len(states) == 10  # pruned trials count towards --trials
    assert {n for n, s in states.items() if s == "PRUNED"} == {5, 7, 9}
    assert [epochs_run[n] for n in (5, 7, 9)] == [1, 1, 1]  # ended at their first report
    assert all(epochs_run[n] == 4 for n in (0, 1, 2, 3, 4, 6, 8))
    pruned = [t for t in write_sweep_report(sweep, None)["trials"] if t["state"] == "pruned"]
    assert [t["number"] for t in pruned] == [5, 7, 9]


def test_importances_that_cannot_tell_parameters_apart_are_left_out(tmp_path):
    from dltrain.experiments.sweep_report import write_sweep_report
    from dltrain.experiments.sweep_study import open_sweep

    def told(folder: Path, value) -> dict:
        folder.mkdir()
        sweep = open_sweep(*write(folder), [], 20, None, None)
        for _ in range(20):
            trial = sweep.study.ask()
            lr = trial.suggest_float("optimizer.lr", 0.001, 0.3, log=True)
            trial.suggest_categorical("model.hidden", ["[16]", "[32, 32]"])
            sweep.study.tell(trial, value(lr))
        return write_sweep_report(sweep, None)

    same = told(tmp_path / "same", lambda lr: 0.5)  # no parameter matters more than another
    assert "importances" not in same
    assert not (tmp_path / "same/runs/search/importances.png").exists()
    decided = told(tmp_path / "lr", lambda lr: lr)  # the learning rate decides
    assert max(decided["importances"], key=decided["importances"].get) == "optimizer.lr"
    assert decided["importances_note"] == "from 20 completed trials"
    assert (tmp_path / "lr/runs/search/importances.png").exists()


@pytest.fixture(params=["postgresql", "journal"])
def shared_storage(request, tmp_path):
    """A study's storage several machines could share: a real PostgreSQL server, or Optuna's
    journal file (a shared filesystem without a database)."""
    if request.param == "journal":
        return f"journal:{tmp_path / 'shared' / 'study.log'}"
    server = request.getfixturevalue("postgres_url")  # one per session: a database per test
    return new_database(server, f"sweep_{tmp_path.name}".lower()[:60])


def test_processes_share_one_study_on_a_shared_storage(tmp_path, shared_storage):
    """Two sweep processes, one study: unique trial numbers, --trials in all (one more at most:
    the last two may start together), a run folder each, and the report agrees with Optuna."""
    (tmp_path / "shared").mkdir()
    url = shared_storage
    recipe, space = write(tmp_path)
    command = [sys.executable, "-m", "dltrain", "sweep", str(recipe), str(space), "--trials", "3"]
    command += ["--storage", url]
    workers = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = study_on(url)
    numbers = [t.number for t in study.get_trials()]
    assert numbers == list(range(len(numbers))) and 3 <= len(numbers) <= 4
    summary = report(tmp_path)
    assert summary["storage"] == url
    assert summary["best_test"]["trial"] == summary["best_trial"]  # once every trial ended
    folders = sorted(p.name for p in (tmp_path / "runs/search/trials").iterdir() if p.is_dir())
    assert folders == [f"{n:03d}" for n in numbers]  # a run folder each, none shared
    assert not (tmp_path / "runs/search/study.db").exists()  # the server holds the study
    told = {t.number: t.value for t in study.get_trials()}  # Optuna's own view, as reported
    assert {t["number"]: t["value"] for t in summary["trials"]} == told
    assert summary["best_trial"] == study.best_trial.number


def study_on(url: str) -> optuna.Study:
    """The sweep's study, opened with Optuna itself: its own view of the trials."""
    storage = url
    if url.startswith("journal:"):
        backend = optuna.storages.journal.JournalFileBackend(url[len("journal:") :])
        storage = optuna.storages.JournalStorage(backend)
    return optuna.load_study(study_name="search", storage=storage)


def test_a_killed_sweeps_trial_is_retried_on_a_shared_storage(tmp_path, shared_storage):
    """A sweep process killed mid-trial (SIGKILL: no goodbye) leaves its trial RUNNING in the
    shared study; the next sweep on this machine sees its process gone, ends it as
    interrupted and tries its parameters again first, and --trials counts only the others."""
    (tmp_path / "shared").mkdir()
    recipe, space = write(tmp_path, epochs=30, train_size=4096)  # trials long enough to kill
    command = ["sweep", str(recipe), str(space), "--trials", "2", "--storage", shared_storage]
    killed = subprocess.Popen(
        [sys.executable, "-m", "dltrain", *command], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    metrics = tmp_path / "runs/search/trials/000/metrics.csv"
    deadline = time.monotonic() + 120
    while len(read_metrics(metrics) if metrics.exists() else []) < 1:
        assert killed.poll() is None and time.monotonic() < deadline, "no epoch was trained"
        time.sleep(0.1)
    killed.kill()
    killed.wait(timeout=30)
    assert [t.state.name for t in study_on(shared_storage).get_trials()] == ["RUNNING"]

    rerun = dltrain(*command, "train.epochs=2", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    trials = study_on(shared_storage).get_trials()
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs.get("interrupted")
    assert trials[1].params == trials[0].params  # tried again first
    assert [t.state.name for t in trials[1:]] == ["COMPLETE", "COMPLETE"]
    states = [(t["number"], t["state"], t.get("interrupted")) for t in report(tmp_path)["trials"]]
    assert states == [(0, "fail", True), (1, "complete", None), (2, "complete", None)]


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("missing/study.log", "does not exist"),
        (".", "is a folder"),
        ("junk.log", "is not an Optuna journal"),
    ],
)
def test_a_journal_that_cannot_be_used_is_refused_naming_it(tmp_path, where, said):
    (tmp_path / "junk.log").write_text("not a journal\n")
    recipe, space = write(tmp_path)
    storage = f"journal:{tmp_path / where}"
    refused = dltrain("sweep", recipe, space, "--trials", "1", "--storage", storage, cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"--storage {storage}" in words(refused.stderr) and said in words(refused.stderr)


def test_a_database_server_that_never_answers_is_reported_not_waited_for(tmp_path):
    recipe, space = write(tmp_path)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql+psycopg://user@127.0.0.1:{silent.getsockname()[1]}/db"
        refused = dltrain("sweep", recipe, space, "--trials", "1", "--storage", url, cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    said = words(refused.stderr)
    assert f"--storage {url}: cannot open it as an Optuna storage" in said
    assert "timeout expired" in said and "Traceback" not in said


# -- any search space: opened, or refused naming the key ------------------------------------

KEYS = ("optimizer.lr", "model.hidden", "data.batch_size", "train.epochs", "optimizer.lrr")
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_subnormal=False),  # torch may set flush-to-zero in this process
    st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=3),
)
NUMBER = st.one_of(st.integers(-5, 10**12), st.floats(-1e3, 1e3, allow_subnormal=False), JUNK)


@st.composite
def well_formed(draw) -> dict:
    """A parameter as a user writes one (its range may still be too large for a grid)."""
    kind = draw(st.sampled_from(["int", "float", "categorical"]))
    if kind == "categorical":
        return {"type": kind, "choices": draw(st.lists(st.integers(1, 64), min_size=1, max_size=5))}
    if kind == "int":
        low = draw(st.integers(1, 50))
        spec = {"type": kind, "low": low, "high": low + draw(st.integers(1, 10**10))}
        return spec | draw(st.fixed_dictionaries({}, optional={"step": st.integers(1, 10**6)}))
    low = draw(st.floats(1e-5, 1.0, allow_subnormal=False))
    spec = {
        "type": kind,
        "low": low,
        "high": low + draw(st.floats(1e-3, 10.0, allow_subnormal=False)),
    }
    return spec | draw(
        st.fixed_dictionaries({}, optional={"step": st.floats(1e-4, 1.0, allow_subnormal=False)})
    )


SPEC = st.one_of(
    well_formed(),
    well_formed(),
    JUNK,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["float", "int"]), "low": NUMBER, "high": NUMBER},
        optional={"log": st.one_of(st.booleans(), JUNK), "step": NUMBER},
    ),
    st.fixed_dictionaries(
        {"type": st.just("categorical"), "choices": st.one_of(st.lists(JUNK, max_size=4), JUNK)}
    ),
    st.dictionaries(st.sampled_from(["type", "low", "choices", "extra"]), JUNK, max_size=3),
)


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    params=st.dictionaries(st.sampled_from(KEYS), SPEC, max_size=3),
    sampler=st.sampled_from(["grid", "random", "tpe", "annealing"]),
)
def test_any_search_space_opens_or_is_refused_naming_its_key(tmp_path, params, sampler):
    from dltrain.errors import UserError
    from dltrain.experiments.sweep_study import MAX_GRID_POINTS, open_sweep

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    recipe, space = write(folder, sampler=sampler, params=params)
    try:
        sweep = open_sweep(recipe, space, [], 1, None, None)
    except UserError as exc:
        message = str(exc)
        named = re.search(
            r"params\.[\w.]+|params: dictionary should have at least 1|sampler: |the grid has",
            message,
        )
        assert named, message  # never "invalid value None" without the parameter's key
        return
    assert sweep.space.params and sampler != "annealing"
    if sampler == "grid":
        grid = sweep.study.sampler._search_space
        assert math.prod(len(values) for values in grid.values()) <= MAX_GRID_POINTS


@pytest.mark.slow
def test_trials_in_two_processes_report_what_one_process_trials_do(tmp_path):
    """`sweep --nproc 2`: every trial a 2-process fit. With a global batch (2 processes = 1
    process), each point of a grid gets the value a one-process sweep gives it (the grid's
    order is each process's own), and each trial's run was data-parallel."""
    space = {"sampler": "grid", "pruner": "none", "params": {
        "optimizer.lr": {"type": "categorical", "choices": [0.001, 0.01, 0.05, 0.2]}}}  # fmt: skip
    values = []
    for name, launch in (("one", []), ("two", ["--nproc", "2"])):
        folder = tmp_path / name
        folder.mkdir()
        recipe, space_file = write(folder, epochs=2, **space)
        base = yaml.safe_load(recipe.read_text())
        base["data"] = {**base["data"], "global_batch_size": 32}
        base["data"].pop("batch_size", None)
        recipe.write_text(yaml.safe_dump(base))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "dltrain", "sweep", str(recipe), str(space_file), "--trials",
             "4", *launch], cwd=folder, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        trials = report(folder)["trials"]
        assert [t["state"] for t in trials] == ["complete"] * 4
        values.append({t["params"]["optimizer.lr"]: t["value"] for t in trials})
    assert values[1] == pytest.approx(values[0], abs=1e-6) and len(values[0]) == 4
    started = (tmp_path / "two/runs/search/trials/000/events.jsonl").read_text()
    assert '"processes": 2' in started  # the trial ran data-parallel


def test_rank_0_asks_the_sweeps_pruner_and_every_rank_stops_with_it(tmp_path, monkeypatch):
    """A trial's processes (TRIAL_VARIABLE set): rank 0 reports each epoch to the trial on the
    sweep's study, with the sweep's pruner; when it says prune, the answer (broadcast) stops
    the rank with TrialPrunedStop — the exit code the sweep tells as pruned."""
    from dltrain.experiments.sweep_processes import (
        PRUNED_EXIT,
        TRIAL_VARIABLE,
        TrialPrunedStop,
        trial_pruning,
    )  # fmt: skip
    from dltrain.experiments.sweep_study import open_sweep
    from dltrain.system.distributed import World

    recipe, space = write(tmp_path, pruner="median")
    sweep = open_sweep(recipe, space, [], 10, None, None)
    for _ in range(5):  # the median pruner's startup trials, all good at epoch 1
        done = sweep.study.ask()
        done.report(0.9, 1)
        sweep.study.tell(done, 0.9)
    trial = sweep.study.ask()
    monkeypatch.setenv(TRIAL_VARIABLE, json.dumps({
        "storage": None, "root": str(sweep.root), "trial_id": trial._trial_id,
        "study": sweep.study.study_name, "metric": "val_accuracy",
        "space": sweep.space.model_dump(mode="json"), "epochs": 2}))  # fmt: skip
    after_epoch = trial_pruning(World(), torch.device("cpu"))
    with pytest.raises(TrialPrunedStop) as stopped:
        after_epoch({"epoch": 1, "val_accuracy": 0.1})
    assert stopped.value.exit_code == PRUNED_EXIT
    reported = sweep.study.get_trials()[trial.number].intermediate_values
    assert reported == {1: 0.1}  # what rank 0 told the trial
    monkeypatch.delenv(TRIAL_VARIABLE)
    assert trial_pruning(World(), torch.device("cpu")) is None  # an ordinary fit


@pytest.mark.slow
def test_a_trial_whose_processes_fail_fails_alone(tmp_path):
    """`sweep --nproc 2` with a model too large for the machine's memory (refused in its
    processes): that trial is told as failed, and the sweep goes on to the next."""
    huge = [100_000_000, 100]  # 10^10 weights: refused before anything is allocated
    space = {"sampler": "grid", "pruner": "none", "params": {
        "model.hidden": {"type": "categorical", "choices": [huge, [16]]}}}  # fmt: skip
    recipe, space_file = write(tmp_path, epochs=2, **space)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dltrain", "sweep", str(recipe), str(space_file), "--trials", "2",
         "--nproc", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    states = {str(t["params"]["model.hidden"]): t["state"] for t in report(tmp_path)["trials"]}
    assert states == {str(huge): "fail", "[16]": "complete"}, states
    assert "processes failed" in done.stdout
