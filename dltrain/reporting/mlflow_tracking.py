"""MLflow tracking (`logging.mlflow`): one MLflow run per dltrain run, nested under a sweep's.

Logged: the flattened resolved recipe as params (`optimizer.lr`, ...), each epoch's metrics
row (step = epoch), the final report's scalar metrics (prefixed with its split: `test_accuracy`,
`test_f1_macro`, ...), the run folder's files as artifacts (recipe.yaml, metrics.csv, report,
plots; the checkpoints when `log_checkpoints`), and tags: dltrain and torch versions, device,
the run folder. A run that fails or is stopped ends FAILED or KILLED.

The default store is MLflow's own, local, in the output folder: `sqlite:///{output}/mlflow.db`
with artifacts in `{output}/mlartifacts` (`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`
shows them). Any tracking URI MLflow supports (a server: http://host:5000) may be given.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

from dltrain import __version__
from dltrain.errors import UserError, first_line
from dltrain.reporting.report import report_scalars

PARAMS_PER_BATCH = 100  # MLflow's limit of params in one request
MAX_PARAM_CHARS = 6000  # and of one param value's length
ARTIFACTS = ("recipe.yaml", "metrics.csv", "report.json", "report.md", "events.jsonl")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; other values (lists included) as they are."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class MlflowRun:
    """One MLflow run, started when a dltrain run starts."""

    def __init__(self, settings: Any, recipe: dict[str, Any], folder: Path, device: str):
        mlflow = _mlflow()
        self.folder = Path(folder)
        self.log_checkpoints = settings.log_checkpoints
        parent = mlflow.active_run()  # a sweep's run: its trials are its children, in its store
        uri = mlflow.get_tracking_uri() if parent else tracking_uri(settings, recipe)
        with _reported(uri, Path(recipe["output"]).absolute()):
            self.client = mlflow.MlflowClient(uri)
            if parent is not None:
                experiment_id = parent.info.experiment_id
            else:
                experiment_id = ensure_experiment(self.client, settings, recipe)
            tags = _tags(recipe, folder, device)
            if parent is not None:
                tags["mlflow.parentRunId"] = parent.info.run_id
            run = self.client.create_run(experiment_id, run_name=self.folder.name, tags=tags)
            self.run_id = run.info.run_id
            self._log_params(flatten(recipe))

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + PARAMS_PER_BATCH])

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def log_report(self, report: dict[str, Any]) -> None:
        """The final report's scalars, named by its split (test_accuracy, test_f1_macro...)."""

        split = report.get("split", "test")
        scalars = {f"{split}_{k}": v for k, v in report_scalars(report).items()}
        privacy = report.get("privacy") or {}  # a private run's ε, δ, noise... (privacy_epsilon)
        scalars |= {f"privacy_{k}": v for k, v in privacy.items()}
        self._log_metrics(scalars, step=0)

    def _log_metrics(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in values.items()
            if isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, status: str) -> None:
        """Upload the run folder's files and end the run (FINISHED, FAILED or KILLED)."""
        with contextlib.suppress(Exception):  # a lost tracking server must not fail the run
            for name in ARTIFACTS:
                if (self.folder / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.folder / name))
            for image in sorted(self.folder.glob("*.png")):
                self.client.log_artifact(self.run_id, str(image))
            if self.log_checkpoints and (self.folder / "checkpoints").is_dir():
                self.client.log_artifacts(
                    self.run_id, str(self.folder / "checkpoints"), "checkpoints"
                )
        self.client.set_terminated(self.run_id, status)


def tracking_uri(settings: Any, recipe: dict[str, Any]) -> str:
    """The tracking URI asked for, or MLflow's local store in the output folder."""
    output = Path(recipe["output"]).absolute()
    return settings.tracking_uri or f"sqlite:///{output / 'mlflow.db'}"


def ensure_experiment(client: Any, settings: Any, recipe: dict[str, Any]) -> str:
    """The id of the experiment (default: the recipe's name), created when new with its
    artifacts beside the local store (MLflow's default would be ./mlruns, wherever one is)."""
    name = settings.experiment or recipe["name"]
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = (Path(recipe["output"]).absolute() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


@contextlib.contextmanager
def sweep_run(settings: Any, recipe: dict[str, Any], name: str, params: dict[str, Any]):
    """A sweep's parent MLflow run, active while its trials run (they nest under it)."""
    mlflow = _mlflow()
    uri = tracking_uri(settings, recipe)
    with _reported(uri, Path(recipe["output"]).absolute()):
        mlflow.set_tracking_uri(uri)
        experiment_id = ensure_experiment(mlflow.MlflowClient(uri), settings, recipe)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=name)
        mlflow.log_params({k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()})
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        mlflow.end_run(status)


@contextlib.contextmanager
def _reported(uri: str, output: Path):
    """MLflow's errors (an unreachable server, a bad URI) as the user's, naming the URI. Runs
    starting together on one machine take turns (a file lock in the output folder): they would
    race to create the store's tables and the experiment."""
    import filelock

    mlflow = _mlflow()
    output.mkdir(parents=True, exist_ok=True)
    probe_store(uri)
    try:
        with filelock.FileLock(output / ".mlflow.lock"):
            yield
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(
            f"logging.mlflow: cannot log to {uri} ({first_line(exc)}). Check "
            "logging.mlflow.tracking_uri, or set logging.mlflow=false."
        ) from None


PROBE_SECONDS = 5  # how long a tracking store may take to answer before the run is refused


def probe_store(uri: str) -> None:
    """Fail fast, before MLflow's own retries (minutes of them): a local SQLite store that is
    not a database or cannot be written, a server that does not answer within PROBE_SECONDS.
    Each is the user's to fix: exit 2, naming the store. Other URIs are left to MLflow."""
    if uri.startswith("sqlite:///"):
        _probe_sqlite(Path(uri.removeprefix("sqlite:///")), uri)
    elif uri.startswith(("http://", "https://")):
        _probe_server(uri)


def _probe_sqlite(path: Path, uri: str) -> None:
    import os
    import sqlite3

    fix = "Fix or move it, set logging.mlflow.tracking_uri, or set logging.mlflow=false."
    folder = path if path.is_dir() else path.parent
    if (
        path.is_dir()
        or not os.access(folder, os.W_OK)
        or (path.exists() and not os.access(path, os.W_OK))
    ):
        raise UserError(f"logging.mlflow: cannot write the MLflow store {path}. {fix}")
    if not path.exists():
        return  # MLflow creates it
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=PROBE_SECONDS)
        ) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        raise UserError(
            f"logging.mlflow: the MLflow store {path} ({uri}) is damaged or not an SQLite "
            f"database ({first_line(exc)}). {fix}"
        ) from None


def _probe_server(uri: str) -> None:
    import http.client
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return  # it answered: what it says about the path is MLflow's business
    except (ValueError, http.client.InvalidURL) as exc:  # not a URL (an unclosed [, a space)
        raise UserError(
            f"logging.mlflow: the tracking URI {uri} is not a valid URL ({exc}). Fix "
            "logging.mlflow.tracking_uri, e.g. http://host:5000, or set logging.mlflow=false."
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"logging.mlflow: the tracking server {uri} does not answer ({reason}; waited at "
            f"most {PROBE_SECONDS} s). Start it, check logging.mlflow.tracking_uri, or set "
            "logging.mlflow=false."
        ) from None


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise UserError(
            "logging.mlflow needs MLflow: pip install 'dltrain[mlflow]' (or mlflow), or set "
            "logging.mlflow=false."
        ) from None
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines are not dltrain's
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return mlflow


def _tags(recipe: dict[str, Any], folder: Path, device: str) -> dict[str, str]:
    import torch

    return {
        "dltrain.version": __version__,
        "torch.version": torch.__version__,
        "device": device,
        "run_folder": str(Path(folder).absolute()),
        "model": str((recipe.get("model") or {}).get("name")),
        "dataset": str((recipe.get("data") or {}).get("name")),
    }


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
