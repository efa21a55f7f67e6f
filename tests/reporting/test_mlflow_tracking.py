"""MLflow tracking: a fit with logging.mlflow is readable with MLflow's own client (params,
per-epoch metrics, report metrics, artifacts, tags), and a sweep's trials nest under its run."""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.cli import dltrain
from helpers.training import TABULAR

mlflow = pytest.importorskip("mlflow")


def write_recipe(tmp_path: Path, **logging) -> Path:
    recipe = {
        **TABULAR,
        "name": "tracked",
        "output": str(tmp_path / "runs"),
        "data": {**TABULAR["data"], "val_split": 0.25},
        "train": {"epochs": 3},
        "logging": {"mlflow": logging or True},
    }
    path = tmp_path / "tracked.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def client(tmp_path: Path):
    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")


def test_a_fit_is_readable_with_mlflows_own_client(tmp_path):
    recipe = write_recipe(tmp_path)
    result = dltrain("fit", recipe, "-q", cwd=tmp_path)  # a real process: its own logging
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mlflow" not in result.stderr.lower()  # MLflow's own INFO lines stay out

    tracking = client(tmp_path)
    experiment = tracking.get_experiment_by_name("tracked")
    (run,) = tracking.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["optimizer.lr"] == "0.05" and run.data.params["model.name"] == "mlp"
    history = tracking.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2, 3]
    rows = [json.loads(line) for line in (tmp_path / "runs/tracked/events.jsonl").open()]
    epochs = [r for r in rows if r["event"] == "epoch"]
    assert [m.value for m in history] == pytest.approx([r["val_loss"] for r in epochs])
    report = json.loads((tmp_path / "runs/tracked/report.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(report["accuracy"])
    assert run.data.metrics["test_f1_macro"] == pytest.approx(report["f1"]["macro"])
    assert run.data.tags["dltrain.version"] and run.data.tags["device"] == "cpu"
    artifacts = {a.path for a in tracking.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "report.md", "metrics.csv", "curves.png"} <= artifacts
    assert (tmp_path / "runs/mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_a_sweeps_trials_are_nested_runs(tmp_path, invoke):
    recipe = write_recipe(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "sampler": "random",
                "pruner": "none",
                "params": {"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}},
            }
        )
    )
    result = invoke("sweep", str(recipe), str(space), "--trials", "2", "train.epochs=1")
    assert result.exit_code == 0, result.output
    tracking = client(tmp_path)
    experiment = tracking.get_experiment_by_name("tracked")
    runs = tracking.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["000", "001"]
    assert parent.info.status == "FINISHED" and parent.data.params["metric"] == "val_loss"
    assert all("val_loss" in r.data.metrics for r in children)


def test_a_tracking_uri_mlflow_cannot_use_is_the_users_error(tmp_path, invoke):
    recipe = write_recipe(tmp_path, tracking_uri="nosuchscheme://nowhere")
    result = invoke("fit", str(recipe))
    assert result.exit_code == 2, result.output
    assert "logging.mlflow: cannot log to nosuchscheme://nowhere" in result.stderr


def test_a_damaged_local_store_is_refused_at_once_naming_it(tmp_path, invoke):
    recipe = write_recipe(tmp_path)
    store = tmp_path / "runs" / "mlflow.db"
    store.parent.mkdir()
    store.write_bytes(b"this is not an SQLite database" * 100)
    result = invoke("fit", str(recipe))
    assert result.exit_code == 2, result.output
    said = " ".join(result.stderr.split())
    assert f"the MLflow store {store}" in said and "not an SQLite database" in said
    assert "internal error" not in said
    assert store.read_bytes().startswith(b"this is not")  # left as it was


def test_a_tracking_server_that_does_not_answer_is_refused_at_once(tmp_path, invoke):
    with socket.socket() as probe:  # a port on this machine that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recipe = write_recipe(tmp_path, tracking_uri=f"http://127.0.0.1:{port}")
    result = invoke("fit", str(recipe))
    assert result.exit_code == 2, result.output
    said = " ".join(result.stderr.split())
    assert f"the tracking server http://127.0.0.1:{port} does not answer" in said
    assert not (tmp_path / "runs" / "tracked" / "checkpoints").exists()  # nothing trained


# -- any store URL: used, or refused with one message naming it ---------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free once closed: nothing listens there


SCHEMES = ("sqlite:///", "sqlite://", "http://", "https://", "file://", "junk://", "", "//")
HOSTS = ("127.0.0.1:{port}", "localhost:{port}", "", "[::1]:{port}", "[::1", "h st", "%zz", ":x")
PLACES = ("{tmp}/store.db", "{tmp}", "{tmp}/garbage.db", "{tmp}/missing/dir/x.db", "", "?a=b", "#")


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    scheme=st.sampled_from(SCHEMES),
    host=st.sampled_from(HOSTS),
    place=st.sampled_from(PLACES),
    store=st.sampled_from(["mlflow", "optuna"]),
)
def test_any_store_url_is_used_or_refused_naming_it(
    tmp_path, monkeypatch, scheme, host, place, store
):
    """A tracking URI (probed as a fit does before MLflow's own minutes of retries) and a sweep's
    --storage: opened, or one UserError that names the URL — never another exception."""
    monkeypatch.chdir(tmp_path)  # a relative SQLite path is a file in the working folder
    from dltrain.errors import UserError
    from dltrain.experiments.sweep_study import open_storage
    from dltrain.reporting.mlflow_tracking import probe_store

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "garbage.db").write_bytes(b"not a database at all" * 50)
    where = place.format(tmp=folder).lstrip("/") if scheme.endswith("///") else place
    url = scheme + host.format(port=_closed_port()) + where.format(tmp=folder)
    try:
        if store == "mlflow":
            probe_store(url)
        else:
            open_storage(url, folder)
    except UserError as exc:
        assert url in str(exc) or url.removeprefix("sqlite:///") in str(exc), str(exc)


def test_a_private_runs_epsilon_is_tracked(tmp_path, invoke):
    """privacy: each epoch's ε as the `epsilon` metric, the run's ε, δ and noise as privacy_*."""
    pytest.importorskip("opacus")
    recipe = yaml.safe_load(write_recipe(tmp_path).read_text())
    recipe["privacy"] = {"epsilon": 5.0}
    (tmp_path / "tracked.yaml").write_text(yaml.safe_dump(recipe))
    fitted = invoke("fit", str(tmp_path / "tracked.yaml"), "-q")
    assert fitted.exit_code == 0, fitted.output
    tracking = client(tmp_path)
    (run,) = tracking.search_runs([tracking.get_experiment_by_name("tracked").experiment_id])
    history = tracking.get_metric_history(run.info.run_id, "epsilon")
    spent = json.loads((tmp_path / "runs/tracked/report.json").read_text())["privacy"]
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value == pytest.approx(spent["epsilon"]) and spent["epsilon"] <= 5.0
    assert run.data.metrics["privacy_delta"] == spent["delta"]
    assert run.data.metrics["privacy_noise_multiplier"] == pytest.approx(spent["noise_multiplier"])


def test_mlflow_on_a_postgresql_server_tracks_a_fit(tmp_path, postgres_url):
    """logging.mlflow.tracking_uri: a PostgreSQL database as MLflow's backend store (what a team
    shares), read back with MLflow's own client."""
    from helpers.postgres import new_database

    uri = new_database(postgres_url, f"mlflow_{tmp_path.name}".lower()[:60])
    recipe = write_recipe(tmp_path, tracking_uri=uri)
    result = dltrain("fit", recipe, "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    said = result.stderr.lower()  # dltrain's last line alone: no MLflow or alembic INFO lines
    assert said.startswith("run folder:") and " info " not in said and "alembic" not in said
    tracking = mlflow.MlflowClient(uri)
    (run,) = tracking.search_runs([tracking.get_experiment_by_name("tracked").experiment_id])
    report = json.loads((tmp_path / "runs/tracked/report.json").read_text())
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(report["accuracy"])
    assert [m.step for m in tracking.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3]
