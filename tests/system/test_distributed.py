"""Data-parallel training: real torch.distributed (gloo) processes on the CPU, started by
torchrun's launcher (`dltrain fit --nproc 2`, or `python -m torch.distributed.run`).

The parity test is the contract: with the same global batch and seed, 2 processes end with the
weights 1 process ends with (DDP averages the two halves' gradients, which is the gradient of
the whole batch). The rest: every test sample counted once, rank 0 alone writing, a DDP
checkpoint evaluating in one process, a dead process ending the run with a message, and
torchrun restarts continuing from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from dltrain.config.schema import resolve
from dltrain.data.base import ArraySplit
from dltrain.data.loaders import EpochSampler, ResidentBatches, Shard, WorkerBatches
from dltrain.errors import UserError
from dltrain.runs.folder import RunFolder
from dltrain.system.distributed import World, backend_for, process_device, world_from_environment
from dltrain.training.build import build_setup, per_process_batch_size
from dltrain.training.evaluate import evaluate_checkpoint
from dltrain.training.wrapping import training_modules

from helpers.training import make_recipe, metric_rows, quiet, train, weights

CPU = torch.device("cpu")

# Bundled digits through an MLP without dropout or batch norm: nothing random in the steps, and
# nothing that depends on how a batch is split, so 1 and 2 processes must agree to rounding.
PARITY = {
    "seed": 5,
    "device": "cpu",
    "data": {"name": "digits", "global_batch_size": 64, "val_split": 0.1},
    "model": {"name": "mlp", "hidden": [64]},
    "optimizer": {"name": "adam", "lr": 0.003},
    "scheduler": {"name": "cosine"},
    "train": {"epochs": 5},
}


def write_recipe(folder: Path, name: str, base: dict = PARITY, **sections) -> Path:
    recipe = {**base, **sections, "name": name, "output": str(folder / "runs")}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def dltrain(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    # the processes' temp folder is the test's own: what torchrun leaves there is checked
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(cwd)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The parity recipe trained by 2 gloo processes (`fit --nproc 2`)."""
    folder = tmp_path_factory.mktemp("ddp")
    recipe = write_recipe(folder, "ddp")
    done = dltrain("dltrain", "fit", str(recipe), "--nproc", "2", cwd=folder)
    assert done.returncode == 0, done.stderr + done.stdout
    return folder / "runs" / "ddp", done


# -- the contract: 2 processes = 1 process ------------------------------------------------------


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one(tmp_path, two_processes):
    ddp_run, _ = two_processes
    single, _ = train(tmp_path, PARITY, "single")
    one, two = weights(single.last_path), weights(ddp_run / "checkpoints" / "last.pt")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    # the per-epoch figures are the whole split's too (losses all-reduced, not rank 0's half)
    for a, b in zip(metric_rows(single), metric_rows(RunFolder(ddp_run)), strict=True):
        for column in ("train_loss", "val_loss", "val_accuracy"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-5), column


@pytest.mark.slow
def test_the_report_counts_every_test_sample_once(tmp_path, two_processes):
    ddp_run, done = two_processes
    report = json.loads((ddp_run / "report.json").read_text())
    single, expected = train(tmp_path, PARITY, "single")
    assert report["num_samples"] == expected["num_samples"] == 359  # odd: shards of 179 + 180
    assert sum(map(sum, report["confusion_matrix"])) == 359
    assert report["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert report["accuracy"] > 0.9
    # rank 0 alone printed: one start line, one result line
    assert done.stdout.count("run folder:") == 1
    assert done.stdout.count("data parallel: 2 processes × batch 32") == 1
    assert "rank 1" not in done.stderr


@pytest.mark.slow
def test_a_ddp_checkpoint_evaluates_in_one_process(tmp_path, two_processes):
    ddp_run, _ = two_processes
    report = json.loads((ddp_run / "report.json").read_text())
    again = evaluate_checkpoint(ddp_run / "checkpoints" / "best.pt", tmp_path / "eval", quiet())
    assert again["confusion_matrix"] == report["confusion_matrix"]
    assert again["accuracy"] == report["accuracy"]
    saved = torch.load(ddp_run / "checkpoints" / "best.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in saved["model"])  # no DDP wrapper names
    events = [json.loads(line) for line in (ddp_run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1 and events[0]["processes"] == 2


# -- failures -----------------------------------------------------------------------------------

# A model that kills its own process (rank 1, first attempt only) at a chosen training step, as
# a crashed GPU or a lost node would: no exception, no message, no goodbye. Or, with `hang`,
# that stops answering instead (a stuck process: alive, its connections open).
CRASHING_MODEL = textwrap.dedent(
    """
    import os
    import time
    import torch
    from dltrain.models.mlp import mlp
    from dltrain.config.registry import MODELS

    class Crashing(torch.nn.Module):
        def __init__(self, inner, at_step, hang):
            super().__init__()
            self.inner, self.at_step, self.hang, self.calls = inner, at_step, hang, 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
                if self.calls == self.at_step and first_attempt and os.environ["RANK"] == "1":
                    if self.hang:
                        time.sleep(3600)
                    os._exit(3)
            return self.inner(x)

    @MODELS.register("crashing_mlp")
    def crashing_mlp(
        input_shape, num_classes, at_step: int = 40, hang: bool = False, input_kind: str = "tabular"
    ):
        return Crashing(mlp(input_shape, num_classes, hidden=(64,)), at_step, hang)
    """
)


def crashing_recipe(folder: Path, name: str, at_step: int, hang: bool = False) -> Path:
    (folder / "crashing.py").write_text(CRASHING_MODEL, encoding="utf-8")
    return write_recipe(
        folder,
        name,
        imports=[str(folder / "crashing.py")],
        model={"name": "crashing_mlp", "at_step": at_step, "hang": hang},
        distributed={"timeout_s": 10 if hang else 30},
    )


@pytest.mark.slow
def test_batch_size_auto_on_a_small_table_fits_two_processes(tmp_path):
    """auto never exceeds the rows a process reads: 45 training rows are 2 × 22, where 2 × 32
    would not fit one global batch in the split."""
    rows = ["a,b,y", *(f"{i % 17 / 17:.3f},{i % 5},{'yes' if i % 3 else 'no'}" for i in range(50))]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    recipe = write_recipe(
        tmp_path,
        "auto",
        base={"seed": 0, "device": "cpu", "model": {"name": "mlp", "hidden": [8]}},
        data={"name": "csv", "train": "t.csv", "label": "y", "batch_size": "auto"},
        train={"epochs": 2},
    )
    done = dltrain("dltrain", "fit", str(recipe), "--nproc", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "2 processes × batch 22" in " ".join((done.stdout + done.stderr).split())
    checkpoint = torch.load(tmp_path / "runs/auto/checkpoints/last.pt", weights_only=False)
    assert checkpoint["recipe"]["data"]["batch_size"] == 22 and checkpoint["step"] == 2


@pytest.mark.slow
def test_a_dead_process_ends_the_run_with_a_message(tmp_path):
    # 20 steps an epoch (1293 samples / 64): the crash comes in epoch 2, after last.pt of epoch 1
    recipe = crashing_recipe(tmp_path, "crash", at_step=30)
    # a hang would end in TimeoutExpired (the timeout is a guard, not a measure)
    done = dltrain("dltrain", "fit", str(recipe), "--nproc", "2", cwd=tmp_path, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]  # the code of the process that died
    assert "Traceback" not in done.stderr
    said = " ".join(done.stderr.split())
    assert "process rank 1 exited with code 3; the other processes were stopped" in said
    # torch's inductor cache (torchinductor_USER, made where TMPDIR points when an optimizer
    # imports torch._dynamo, unless an earlier test's import set TORCHINDUCTOR_CACHE_DIR) is
    # torch's own cache, not the launcher's log folder
    left = [p for p in tmp_path.glob("*torch*") if not p.name.startswith("torchinductor_")]
    assert not left, "the launcher left its log folder behind"
    last = tmp_path / "runs" / "crash" / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 1  # the good checkpoint is intact
    assert not (tmp_path / "runs" / "crash" / "report.json").exists()


@pytest.mark.slow
def test_a_stuck_process_ends_the_run_after_the_timeout(tmp_path):
    # rank 1 stops answering mid-epoch 2; rank 0 waits in the gradient all-reduce, gives up after
    # distributed.timeout_s=10, says so, and torchrun then stops rank 1: no endless hang
    recipe = crashing_recipe(tmp_path, "stuck", at_step=30, hang=True)
    done = dltrain("dltrain", "fit", str(recipe), "--nproc", "2", cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "rank 0 of 2 lost contact with the other processes" in done.stderr
    assert "distributed.timeout_s=10s" in done.stderr  # it was the timeout that ended it
    last = tmp_path / "runs" / "stuck" / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_ctrl_c_under_fit_nproc_saves_once_and_prints_the_resume_command(tmp_path):
    # A terminal's Ctrl-C reaches the whole foreground process group: `dltrain fit --nproc`,
    # torchrun and both training processes at once; torchrun then forwards its own copy. That
    # copy must not count as a second Ctrl-C: the processes agree to stop and rank 0 saves.
    recipe = write_recipe(tmp_path, "stopped", train={"epochs": 500})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    launched = subprocess.Popen(
        [sys.executable, "-m", "dltrain", "fit", str(recipe), "--nproc", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    last = tmp_path / "runs" / "stopped" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and launched.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), "training never saved an epoch"
    os.killpg(launched.pid, signal.SIGINT)
    output, _ = launched.communicate(timeout=120)
    said = " ".join(output.split())
    assert launched.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    assert "--resume auto --nproc 2" in said and "stopped at once" not in said
    saved = torch.load(last, weights_only=True)
    assert 1 <= saved["epoch"] < 500  # a whole checkpoint of the stopped run


@pytest.mark.slow
def test_torchrun_restarts_continue_from_the_last_checkpoint(tmp_path, two_processes):
    ddp_run, _ = two_processes
    recipe = crashing_recipe(tmp_path, "restarted", at_step=50)  # dies in epoch 3
    done = dltrain(
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "-m",
        "dltrain",
        "fit",
        str(recipe),
        "--resume",
        "auto",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "restarted"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert [s["epoch"] for s in starts] == [0, 2]  # the second attempt resumed after epoch 2
    # the same weights as the uninterrupted 2-process run (the wrapper adds 'inner.')
    restarted = weights(run / "checkpoints" / "last.pt")
    reference = weights(ddp_run / "checkpoints" / "last.pt")
    for key, value in reference.items():
        assert torch.equal(restarted[f"inner.{key}"], value), key


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_node(tmp_path: Path, rank: int, port: int, recipe_in, *more: str) -> subprocess.Popen:
    """`dltrain fit RECIPE --nproc 2 --nnodes 2 --rdzv-endpoint 127.0.0.1:PORT`: one "machine"
    of two, with its own folder (machines need not share a disk); `recipe_in` writes the
    node's recipe into its folder."""
    folder = tmp_path / f"node{rank}"
    folder.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(folder)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    command = ["dltrain", "fit", str(recipe_in(folder)), "--nproc", "2", *more]
    command += ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--node-rank", str(rank)]
    return subprocess.Popen(
        [sys.executable, "-m", *command], cwd=folder, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def start_nodes(tmp_path: Path, recipe_in, *more: str) -> tuple[int, list[subprocess.Popen]]:
    """Both nodes on a free port; the second once the first serves the rendezvous store there,
    as on a cluster, where the endpoint is the first machine's (on loopback either launcher
    could serve it, and a test that takes the second node away would take the store along)."""
    port = free_port()
    first = start_node(tmp_path, 0, port, recipe_in, *more)
    deadline = time.monotonic() + 120
    while True:
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "the first node never served the rendezvous"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return port, [first, start_node(tmp_path, 1, port, recipe_in, *more)]


def finish_nodes(tmp_path: Path, launchers: list[subprocess.Popen]) -> tuple[list[str], list[Path]]:
    """What each launcher said (each must succeed) and the last.pt written, by the node that
    got rank 0 (the other writes nothing)."""
    try:
        said = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:  # a launcher that hangs: it, and the processes it started (in their own sessions)
        subprocess.run(["pkill", "-9", "-f", str(tmp_path)], check=False)
    assert [launcher.returncode for launcher in launchers] == [0, 0], said
    return said, list(tmp_path.glob("node*/runs/*/checkpoints/last.pt"))


def assert_weights_of_one_process(tmp_path: Path, last: Path, prefix: str = "") -> None:
    """`last` holds the weights 1 process ends with for the parity recipe (1e-5)."""
    single, _ = train(tmp_path, PARITY, "single")
    one, many = weights(single.last_path), weights(last)
    assert {prefix + key for key in one} == many.keys()
    for key in one:
        torch.testing.assert_close(many[prefix + key], one[key], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_nodes_on_loopback_end_with_the_weights_of_one_process(tmp_path):
    """Two launchers on 127.0.0.1: torchrun's c10d rendezvous joins them into 4 gloo
    processes, and they end with the weights one process ends with for the same global
    batch."""
    _, nodes = start_nodes(tmp_path, lambda folder: write_recipe(folder, "multi"))
    said, written = finish_nodes(tmp_path, nodes)
    assert len(written) == 1, written
    assert sum("data parallel: 4 processes × batch 16" in text for text in said) == 1
    assert_weights_of_one_process(tmp_path, written[0])


# A model whose processes on the second node stop answering at a chosen step, once (a marker
# file says it happened): the node is lost, as a machine that froze.
HANGING_NODE_MODEL = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path
    import torch
    from dltrain.models.mlp import mlp
    from dltrain.config.registry import MODELS

    class HangsOnce(torch.nn.Module):
        def __init__(self, inner, at_step, marker):
            super().__init__()
            self.inner, self.at_step, self.marker, self.calls = inner, at_step, marker, 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                second_node = os.environ["GROUP_RANK"] == "1"
                if self.calls == self.at_step and second_node and not self.marker.exists():
                    self.marker.touch()
                    time.sleep(3600)
            return self.inner(x)

    @MODELS.register("hangs_once")
    def hangs_once(input_shape, num_classes, at_step: int, marker: str, input_kind="tabular"):
        return HangsOnce(mlp(input_shape, num_classes, hidden=(64,)), at_step, Path(marker))
    """
)


@pytest.mark.slow
def test_a_lost_node_replaced_by_a_new_one_resumes_and_ends_as_if_never_lost(tmp_path):
    """The second machine freezes at step 30 (in epoch 2, after epoch 1's last.pt) and is
    killed — launcher and processes — and a new launcher takes its place. With
    --max-restarts 1 --resume auto the first node's processes fail, its launcher restarts
    them, the new node joins the rendezvous, and the 4 processes resume from last.pt to the
    uninterrupted weights. (The new launcher counts no restart where the first counts one:
    with torchrun's store shared with the processes, keyed by those counts, the two never met
    again — pytorch#135712; dltrain's launcher keeps the store apart.)"""
    model, marker = tmp_path / "hangs.py", tmp_path / "hung"
    model.write_text(HANGING_NODE_MODEL)  # one path for both nodes: the same recipe

    def node_recipe(folder: Path) -> Path:
        hangs = {"name": "hangs_once", "at_step": 30, "marker": str(marker)}
        return write_recipe(
            folder, "lost", imports=[str(model)], model=hangs, distributed={"timeout_s": 60}
        )

    restarts = ("--max-restarts", "1", "--resume", "auto")
    port, (first, second) = start_nodes(tmp_path, node_recipe, *restarts)
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert first.poll() is None and second.poll() is None, "a launcher ended early"
        assert time.monotonic() < deadline, "the second node never reached step 30"
        time.sleep(0.1)
    subprocess.run(["pkill", "-9", "-f", str(tmp_path / "node1")], check=False)
    second.wait(timeout=30)
    replacement = start_node(tmp_path, 1, port, node_recipe, *restarts)

    _, written = finish_nodes(tmp_path, [first, replacement])
    assert len(written) == 1, written
    events = [json.loads(line) for line in (written[0].parents[1] / "events.jsonl").open()]
    starts = [(e["epoch"], e["step"], e["processes"]) for e in events if e["event"] == "start"]
    assert starts == [(0, 0, 4), (1, 20, 4)]  # 20 steps an epoch: resumed after epoch 1
    assert_weights_of_one_process(tmp_path, written[0], prefix="inner.")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nnodes", "2", "--nproc", "2"], "needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:1"], "--nnodes needs --nproc N"),
        (["--rdzv-endpoint", "h:1", "--nproc", "2"], "go with --nnodes M"),
        (["--nnodes", "2", "--nproc", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2"], "0..1"),
    ],
)
def test_node_options_are_checked_before_starting_anything(tmp_path, invoke, args, message):
    recipe = write_recipe(tmp_path, "nodes")
    refused = invoke("fit", str(recipe), *args)
    assert refused.exit_code == 2 and message in refused.output, refused.output
    assert not (tmp_path / "runs").exists()


# -- the pieces, in one process -------------------------------------------------------------------


def id_split(n: int) -> ArraySplit:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return ArraySplit(x, torch.arange(n) % 3)


def rows(batches, epoch: int) -> list[list[int]]:
    return [x[:, 0].long().tolist() for x, _ in batches.epoch(epoch)]


@pytest.mark.parametrize("path", ["resident", "workers"])
def test_each_process_reads_its_block_of_every_global_batch(path):
    n, batch, world = 103, 8, 3

    def build(shard, batch_size, shuffle=True, drop_last=True):
        common = dict(device=CPU, shuffle=shuffle, drop_last=drop_last, seed=4, shard=shard)
        if path == "resident":
            return ResidentBatches(id_split(n), batch_size, **common)
        return WorkerBatches(id_split(n), batch_size, **common, num_workers=0)

    whole = rows(build(Shard(), batch * world), epoch=2)
    shards = [rows(build(Shard(r, world), batch), epoch=2) for r in range(world)]
    assert all(len(s) == len(whole) == n // (batch * world) for s in shards)
    for step, global_batch in enumerate(whole):
        assert sum((s[step] for s in shards), []) == global_batch
    # evaluation: contiguous shards, every sample exactly once, no padding repeats
    evaluation = [rows(build(Shard(r, world), 10, False, False), 0) for r in range(world)]
    assert sum((sum(e, []) for e in evaluation), []) == list(range(n))
    # resuming mid-epoch at batch 2 gives the rest of the same epoch
    assert rows_from(build(Shard(1, world), batch), 2, start=2) == shards[1][2:]


def rows_from(batches, epoch, start):
    return [x[:, 0].long().tolist() for x, _ in batches.epoch(epoch, start)]


def test_the_worker_path_uses_a_distributed_sampler_with_set_epoch():
    batches = WorkerBatches(id_split(20), 4, CPU, True, True, 0, 0, shard=Shard(1, 2))
    assert isinstance(batches.sampler, EpochSampler)
    assert isinstance(batches.sampler, torch.utils.data.DistributedSampler)
    rows(batches, 7)
    assert batches.sampler.epoch == 7


def test_padded_evaluation_batches_mark_their_real_rows():
    batches = ResidentBatches(id_split(10), 4, CPU, False, False, 0, pad_last=True)
    got = rows(batches, 0)
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]  # one shape for every batch
    assert [batches.real_rows(i) for i in range(3)] == [4, 4, 2]
    workers = WorkerBatches(id_split(10), 4, CPU, False, False, 0, 0, pad_last=True)
    assert rows(workers, 0) == got


def test_global_batch_size_is_shared_out_over_processes_and_accumulation():
    data = resolve(
        {"name": "t", "data": {"name": "digits", "global_batch_size": 96}, "model": {"name": "mlp"}}
    ).data  # noqa: E501
    assert per_process_batch_size(data, processes=1, accumulate=1) == 96
    assert per_process_batch_size(data, processes=4, accumulate=2) == 12
    with pytest.raises(UserError, match="use a multiple of 5"):
        per_process_batch_size(data, processes=5, accumulate=1)


def test_the_world_comes_from_torchrun_environment():
    assert world_from_environment({}) == World()
    world = world_from_environment(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    )
    assert (world.rank, world.size, world.local_rank, world.launched) == (3, 4, 1, True)
    assert not world.is_main
    with pytest.raises(UserError, match="integers"):
        world_from_environment({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="out of range"):
        world_from_environment({"RANK": "2", "WORLD_SIZE": "2"})


def test_backend_and_device_choices():
    assert backend_for("auto", CPU) == "gloo"
    assert backend_for("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(UserError, match="nccl needs CUDA"):
        backend_for("nccl", CPU)
    with pytest.raises(UserError, match="xla needs device: xla"):
        backend_for("xla", CPU)
    two_per_node = World(0, 2, 0, 2, launched=True)
    assert process_device("cpu", two_per_node) == "cpu"
    with pytest.raises(UserError, match="LOCAL_RANK"):
        process_device("cuda:1", two_per_node)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-restarts", "2"], "--max-restarts needs --nproc"),
        (["--nproc", "2", "--max-restarts", "2"], "needs --resume auto"),
        (["--nproc", "0"], "at least 1"),
        (["--nproc", "2", "--folds", "3"], "does not combine with --folds"),
    ],
)
def test_launch_options_are_checked_before_starting_anything(tmp_path, args, message):
    recipe = write_recipe(tmp_path, "refused")
    done = dltrain("dltrain", "fit", str(recipe), *args, cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_sync_batchnorm_is_refused_where_torch_cannot_run_it(tmp_path):
    recipe = make_recipe(tmp_path, PARITY, "sync", "distributed.sync_batchnorm=true")
    s = dataclasses.replace(build_setup(recipe), world=World(0, 2, 0, 2, launched=True))
    with pytest.raises(UserError, match="sync_batchnorm needs CUDA"):
        training_modules(s)


@pytest.mark.slow
def test_muon_under_two_processes_ends_with_the_weights_of_one(tmp_path):
    # Muon orthogonalises each step's momentum in bf16, where a gradient summed in another
    # order rounds differently and 5 epochs make that 1e-2: the one process therefore adds its
    # two halves' gradients as the two processes do (train.accumulate: 2, the same global
    # batch), and then they agree to rounding
    muon = {"name": "muon", "lr": 0.05, "others": {"name": "adam", "lr": 0.003}}
    recipe = write_recipe(tmp_path, "ddp_muon", optimizer=muon)
    done = dltrain("dltrain", "fit", str(recipe), "--nproc", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    base = {**PARITY, "optimizer": muon}
    single, report = train(tmp_path, base, "single", "train.accumulate=2")
    one = weights(single.last_path)
    two = weights(tmp_path / "runs" / "ddp_muon" / "checkpoints" / "last.pt")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    assert report["accuracy"] > 0.9
