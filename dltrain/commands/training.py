"""`dltrain fit`: one run, data-parallel runs (--nproc) and k-fold cross-validation (--folds).

The pre-run checks (recipe, run folder free and writable, the checkpoint to resume) are
runs/planning.py's `planned_run`, used alike by a single run (under the run folder's lock) and
by the launcher before it starts the processes.
"""

from __future__ import annotations

import io
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from dltrain.commands import exit_stopped

if TYPE_CHECKING:  # only for annotations: --help stays free of torch
    from dltrain.runs.planning import RunPlan
    from dltrain.system.interrupts import GracefulStop

NPROC_VARIABLE = "DLTRAIN_NPROC"  # set by fit --nproc for the processes it starts
LOG_EVERY_VARIABLE = "DLTRAIN_LOG_EVERY"  # progress.py reads it (not imported: --help is fast)
OVERRIDES_HELP = "KEY=VALUE overrides with dotted keys, VALUE parsed as YAML (train.epochs=3)."


def fit(
    recipe: Path = typer.Argument(..., help="The recipe YAML file.", show_default=False),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    resume: str = typer.Option(
        None,
        "--resume",
        metavar="PATH|auto",
        help="Continue from a checkpoint; 'auto': this run's last.pt.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace a different run already in the run folder."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print errors and the result."),
    log_every: float = typer.Option(
        None,
        "--log-every",
        metavar="SECONDS",
        min=1,
        help="Without a terminal (a batch job's log): a progress line with ETA this often "
        "(default 30).",
        show_default=False,
    ),
    smoke: bool = typer.Option(
        False,
        "--smoke",
        help="One batch of each split through the whole path (train step, evaluation, report, "
        "checkpoint round trip) in a temporary folder: catches mistakes in seconds.",
    ),
    folds: int = typer.Option(
        None,
        "--folds",
        metavar="K",
        help="K-fold cross-validation (K ≥ 2): K runs, each validating on another stratified "
        "fold of the train split, in runs/NAME/fold-k/; summary in runs/NAME/cv_report.json.",
        show_default=False,
    ),
    nproc: int = typer.Option(
        None,
        "--nproc",
        metavar="N",
        help="Train data-parallel in N processes on this machine (one per GPU; CPU: gloo). "
        "Runs torchrun's launcher; for several machines use torchrun itself (README).",
        show_default=False,
    ),
    max_restarts: int = typer.Option(
        0,
        "--max-restarts",
        metavar="K",
        help="With --nproc and --resume auto: restart all processes up to K times when one "
        "fails, continuing from the last checkpoint.",
    ),
    nnodes: int = typer.Option(
        None,
        "--nnodes",
        metavar="M",
        help="With --nproc: train on M machines, each running this same command (torchrun's "
        "c10d rendezvous at --rdzv-endpoint).",
        show_default=False,
    ),
    rdzv_endpoint: str = typer.Option(
        None,
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="With --nnodes: where the machines meet (one of them, a free port).",
        show_default=False,
    ),
    node_rank: int = typer.Option(
        None,
        "--node-rank",
        metavar="R",
        help="With --nnodes: this machine's rank (0..M-1).",
        show_default=False,
    ),
    report_on: str = typer.Option(None, "--report-on", hidden=True),  # a sweep's trial: val
) -> None:
    """Train a model from a recipe, then evaluate its best checkpoint on the test split.

    Writes runs/NAME/: recipe.yaml, metrics.csv, checkpoints/{last,best}.pt, report.json/.md.

    [bold]Examples[/]

      dltrain fit recipes/quickstart.yaml

      dltrain fit recipes/mnist_mlp.yaml data.name=npz data.path=mnist.npz train.epochs=3

      dltrain fit recipes/quickstart.yaml --folds 5

      dltrain fit recipes/cifar10_resnet18.yaml --nproc 4

      dltrain fit recipes/cifar10_resnet18.yaml --nproc 8 --nnodes 2 --rdzv-endpoint node0:29500

      torchrun --nproc-per-node 8 -m dltrain fit recipes/cifar10_resnet18.yaml
    """
    from dltrain.system.interrupts import LAUNCHER_ECHO_SECONDS, GracefulStop

    stop = GracefulStop()
    with stop:  # from here on a Ctrl-C is a request, never a KeyboardInterrupt inside torch's C++
        from dltrain.errors import UserError
        from dltrain.runs.planning import planned_run
        from dltrain.system.distributed import world_from_environment

        world = world_from_environment()
    stop.check(None, "while starting")
    if log_every is not None:  # read by every Progress, in this process and those it starts
        os.environ[LOG_EVERY_VARIABLE] = str(log_every)
    overrides = overrides or []
    console = Console(stderr=True) if quiet else Console()
    if smoke:
        if nproc is not None or folds is not None or resume is not None or world.launched:
            raise UserError("--smoke runs one process once: leave out --nproc, --folds, --resume.")
        _smoke(recipe, overrides, console, stop)
        return
    nodes = _nodes(recipe, overrides, nnodes, rdzv_endpoint, node_rank)
    if nproc is not None or max_restarts or nodes:
        _launch(
            recipe, overrides, nproc, max_restarts, resume, force, quiet, folds, nodes, report_on
        )
    if folds is not None:
        if world.launched:
            raise UserError("--folds runs one process per fold; leave out torchrun/--nproc.")
        _cross_validate(recipe, overrides, folds, resume, force, quiet, console)
        return
    if not world.is_main:  # rank 0 checks and writes the run folder; the rest stay silent
        console, quiet = Console(file=io.StringIO()), True
    again = _resume_command(recipe, overrides, world.launched)
    writer = world.is_main  # rank 0 alone checks, locks and writes the run folder
    stop.echo_seconds = LAUNCHER_ECHO_SECONDS if world.launched else 0.0
    with (
        stop,
        planned_run(
            recipe, overrides, resume, force, console, again, check=writer, lock=writer
        ) as plan,
    ):
        _train_one(plan, again, console, quiet, stop, report_on)


def _train_one(
    plan: RunPlan,
    resume_command: str,
    console: Console,
    quiet: bool,
    stop: GracefulStop,
    report_on: str | None = None,
) -> None:
    """Train the planned run with live progress; on a stop signal, say how to resume. A
    sweep's trial in several processes reports on `report_on` (val) and to its pruner."""
    from dltrain.experiments.sweep_processes import trial_pruning
    from dltrain.reporting.progress import Progress
    from dltrain.reporting.report import headline
    from dltrain.system.distributed import process_device, world_from_environment
    from dltrain.system.interrupts import Interrupted
    from dltrain.system.slurm import requeue
    from dltrain.training.loop import fit as run_fit

    progress = Progress(console, quiet=quiet)
    world = world_from_environment()
    writer = world.is_main  # one process puts the job back in the queue
    try:
        stop.check(str(plan.checkpoint) if plan.checkpoint else None, "before training started")
        pruning = trial_pruning(world, process_device(plan.recipe.device, world))
        report = run_fit(
            plan.recipe, plan.run, progress, plan.checkpoint, stop, report_on, after_epoch=pruning
        )
    except Interrupted as stopped:
        then = f"resume with: {resume_command}" if stopped.checkpoint else ""
        requeued = requeue(stopped.signum, saved=bool(stopped.checkpoint)) if writer else ""
        exit_stopped(console, stopped, "\n".join(filter(None, [then, requeued])))
    finally:
        progress.close()
    label, value = headline(report)
    console.print(
        f"run folder: {escape(str(plan.run.root))} · {report['split']} {label} "
        f"[bold]{value:.4f}[/]",
        highlight=False,
    )


def _smoke(recipe_path: Path, overrides: list[str], console: Console, stop: GracefulStop) -> None:
    """`fit --smoke`: the recipe as given, one epoch of one batch per split, in a temporary
    folder (trackers off), then the best checkpoint loaded back for inference."""
    import tempfile
    import time

    from dltrain.config.loading import load_recipe
    from dltrain.data.paths import check_input_paths
    from dltrain.reporting.progress import Progress
    from dltrain.runs.folder import RunFolder
    from dltrain.training.build import per_process_batch_size
    from dltrain.training.loop import fit as run_fit
    from dltrain.use.inference import load_for_inference

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dltrain-smoke-") as folder:
        smoke = [
            f"output={folder}",
            "train.epochs=1",
            "logging.tensorboard=false",
            "logging.mlflow=false",
        ]
        recipe = load_recipe(recipe_path, [*overrides, *smoke])
        check_input_paths(recipe.data.dataset_args)
        run = RunFolder.for_recipe(recipe)
        batch = per_process_batch_size(recipe.data, 1, recipe.train.accumulate)
        with stop:
            report = run_fit(
                recipe, run, Progress(console, quiet=True), stop=stop, sample_limit=batch
            )
        predictor = load_for_inference(run.best_path, device=str(recipe.device))
    console.print(
        f"smoke test passed in {time.perf_counter() - started:.1f} s: {recipe.name} builds, "
        f"takes a training step, evaluates, reports on {report['split']} and round-trips its "
        f"checkpoint ({predictor.kind} input {list(predictor.input_shape)}, {predictor.task})",
        highlight=False,
        soft_wrap=True,
    )


def _resume_command(recipe: Path, overrides: list[str], launched: bool) -> str:
    """The command that continues this run (under torchrun: what each process must run)."""
    command = ["dltrain", "fit", str(recipe), *overrides, "--resume", "auto"]
    nproc = os.environ.get(NPROC_VARIABLE) if launched else None  # set by fit --nproc
    if launched and not nproc:
        return f"the same torchrun command, running {shlex.join(command)}"
    return shlex.join([*command, "--nproc", nproc] if nproc else command)


def _launch(
    recipe: Path,
    overrides: list[str],
    nproc: int | None,
    max_restarts: int,
    resume: str | None,
    force: bool,
    quiet: bool,
    folds: int | None,
    nodes=None,
    report_on: str | None = None,
) -> None:
    """`fit --nproc N`: check the recipe here (errors once, not N times), then run torchrun's
    launcher on this machine (one of `nodes`) with the same fit command; exits with the
    processes' code."""
    from dltrain.errors import UserError
    from dltrain.runs.planning import RUN_DIR_VARIABLE, planned_run
    from dltrain.system.distributed import world_from_environment
    from dltrain.system.launch import launch_local

    if nproc is None:
        needing = "--nnodes" if nodes else "--max-restarts"
        raise UserError(f"{needing} needs --nproc N, the processes on each machine.")
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc}).")
    if world_from_environment().launched:
        raise UserError("--nproc starts torchrun itself; under torchrun, leave it out.")
    if folds is not None:
        raise UserError("--nproc does not combine with --folds; train the folds one by one.")
    if max_restarts and resume != "auto":
        raise UserError(
            "--max-restarts needs --resume auto, so that restarted processes continue from the "
            "last checkpoint instead of starting over."
        )
    # the checks, once, here, saying which version of the name a new run takes; rank 0 takes
    # the lock and says what it resumes
    again = _resume_command(recipe, overrides, launched=False) + f" --nproc {nproc}"
    notes = (Console(stderr=True) if quiet else Console()) if resume is None else None
    with planned_run(
        recipe, overrides, resume, force, notes, again, check=True, lock=False
    ) as plan:
        os.environ[RUN_DIR_VARIABLE] = str(plan.run.root.absolute())
    args = ["fit", str(recipe), *overrides]
    args += ["--resume", resume] if resume else []
    args += ["--force"] if force else []
    args += ["--quiet"] if quiet else []
    args += ["--report-on", report_on] if report_on else []
    os.environ[NPROC_VARIABLE] = str(nproc)
    raise typer.Exit(launch_local(nproc, args, max_restarts, nodes))


def _nodes(recipe: Path, overrides: list[str], count, endpoint, rank):
    """`--nnodes M --rdzv-endpoint HOST:PORT [--node-rank R]`, checked; None on one machine."""
    from dltrain.config.loading import load_recipe
    from dltrain.errors import UserError
    from dltrain.system.launch import Nodes

    if count is None:
        if endpoint is not None or rank is not None:
            raise UserError("--rdzv-endpoint and --node-rank go with --nnodes M (M machines).")
        return None
    if count < 1:
        raise UserError(f"--nnodes must be at least 1 (got {count}).")
    host, _, port = (endpoint or "").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"--nnodes {count} needs --rdzv-endpoint HOST:PORT, where the machines meet (one of "
            f"them and a free port, e.g. node0:29500); got {endpoint!r}."
        )
    if rank is not None and not 0 <= rank < count:
        raise UserError(f"--node-rank must be 0..{count - 1} for --nnodes {count} (got {rank}).")
    return Nodes(count, endpoint, load_recipe(recipe, overrides).name, rank)


def _cross_validate(
    recipe: Path,
    overrides: list[str],
    folds: int,
    resume: str | None,
    force: bool,
    quiet: bool,
    console: Console,
) -> None:
    """`fit --folds K`: one run per stratified fold of the train split, then cv_report.json."""
    from dltrain.errors import UserError

    if folds < 2:
        raise UserError(f"--folds must be at least 2 (got {folds}); leave it out to train once.")
    if resume is not None:
        raise UserError(
            "--resume does not combine with --folds. Run the same --folds command again instead "
            "(finished folds are kept and an interrupted fold continues from its last.pt), or "
            "resume one fold: dltrain fit OUTPUT/NAME/fold-K/recipe.yaml --resume auto."
        )
    from dltrain.config.loading import load_recipe
    from dltrain.experiments.crossval import CV_REPORT, cv_root, run_cross_validation
    from dltrain.reporting.console_tables import cv_table
    from dltrain.reporting.progress import Progress
    from dltrain.system.interrupts import Interrupted

    loaded = load_recipe(recipe, overrides)
    progress = Progress(console, quiet=quiet)
    try:
        cv_report = run_cross_validation(loaded, folds, progress, force)
    except Interrupted as stop:
        command = shlex.join(["dltrain", "fit", str(recipe), *overrides, "--folds", str(folds)])
        exit_stopped(
            console,
            stop,
            f"continue with: {command} (finished folds are kept; the interrupted fold resumes "
            "from its last.pt)",
        )
    finally:
        progress.close()
    console.print(cv_table(cv_report))
    accuracy = cv_report["metrics"].get("accuracy")
    summary = ""
    if accuracy:
        summary = f" · accuracy [bold]{accuracy['mean']:.4f} ± {accuracy['std']:.4f}[/]"
    console.print(
        f"cross-validation report: {escape(str(cv_root(loaded) / CV_REPORT))}{summary}",
        highlight=False,
        soft_wrap=True,
    )
