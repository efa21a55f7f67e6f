"""The `dltrain` command line: parses, calls, prints. No training logic lives here.

Nothing at module level imports torch, so `dltrain --help` starts fast; each command imports
what it needs when it runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from dltrain.errors import DltrainError

app = typer.Typer(
    name="dltrain",
    help="Train and evaluate PyTorch models from YAML recipes.\n\n"
    "Start with: [bold]dltrain fit recipes/quickstart.yaml[/]",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

NPROC_VARIABLE = "DLTRAIN_NPROC"  # set by fit --nproc for the processes it starts
OVERRIDES_HELP = "KEY=VALUE overrides with dotted keys, VALUE parsed as YAML (train.epochs=3)."


class Split(str, Enum):
    test = "test"
    val = "val"
    train = "train"


class Kind(str, Enum):
    models = "models"
    datasets = "datasets"
    losses = "losses"
    optimizers = "optimizers"
    schedulers = "schedulers"
    augmentations = "augmentations"


@contextlib.contextmanager
def user_facing_errors() -> Iterator[None]:
    """Turn failures into one message and an exit code; tracebacks only with DLTRAIN_DEBUG=1.

    Messages go to stderr, so `dltrain check r.yaml > resolved.yaml` or `eval --json > r.json`
    never write an error into the file meant for data.
    """
    debug = os.environ.get("DLTRAIN_DEBUG") == "1"
    console = _stderr_console()
    # Under torchrun, rank 0 reports the errors every process meets alike; the others name
    # themselves, since their error may be theirs alone (a missing GPU, out of memory).
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    who = "" if rank == "0" else f"rank {rank}: "
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            # A skipped image file and the like: one 'warning:' line, not Python's file:line dump.
            warnings.showwarning = lambda message, *_args, **_kwargs: console.print(
                f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True
            )
            yield
    except typer.Exit:  # a command's own exit code (e.g. 130 after an interrupt) passes through
        raise
    except DltrainError as exc:
        if debug:
            raise
        if not (who and exc.same_on_every_process):
            console.print(
                f"[bold red]{who}error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/] (files are intact: last.pt holds the last saved progress)"
        )
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            raise
        if type(exc).__name__ == "OutOfMemoryError":
            console.print(
                "[bold red]error:[/] the device ran out of memory; lower "
                "data.batch_size (or use train.precision=bf16).",
                highlight=False,
            )
        else:
            console.print(
                f"[bold red]{who}internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                "Re-run with DLTRAIN_DEBUG=1 to see the traceback, and please report it.",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(1) from None


def _stderr_console() -> Console:
    return Console(stderr=True)


@app.command()
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
) -> None:
    """Train a model from a recipe, then evaluate its best checkpoint on the test split.

    Writes runs/NAME/: recipe.yaml, metrics.csv, checkpoints/{last,best}.pt, report.json/.md.

    [bold]Examples[/]

      dltrain fit recipes/quickstart.yaml

      dltrain fit recipes/mnist_mlp.yaml data.name=npz data.path=mnist.npz train.epochs=3

      dltrain fit recipes/quickstart.yaml --folds 5

      dltrain fit recipes/cifar10_resnet.yaml --nproc 4

      torchrun --nproc-per-node 8 -m dltrain fit recipes/cifar10_resnet.yaml
    """
    console = _stderr_console() if quiet else Console()
    with user_facing_errors():
        from dltrain.distributed import world_from_environment

        world = world_from_environment()
        if nproc is not None or max_restarts:
            _launch(recipe, overrides or [], nproc, max_restarts, resume, force, quiet, folds)
        if folds is not None:
            if world.launched:
                from dltrain.errors import UserError

                raise UserError("--folds runs one process per fold; leave out torchrun/--nproc.")
            _cross_validate(recipe, overrides or [], folds, resume, force, quiet, console)
            return
        from dltrain.engine import fit as run_fit
        from dltrain.interrupts import Interrupted
        from dltrain.progress import Progress
        from dltrain.recipe import load_recipe
        from dltrain.report import headline
        from dltrain.run_folder import RunFolder

        loaded = load_recipe(recipe, overrides or [])
        run = RunFolder.for_recipe(loaded)
        if not world.is_main:  # rank 0 checks and writes the run folder; the rest stay silent
            console, quiet = Console(file=io.StringIO()), True
        checkpoint = _resume_path(resume, run, console)
        if world.is_main:
            run.check_free_for(loaded, force, resuming=checkpoint is not None)
            run.ensure_writable()  # an unwritable output is wrong input (2), before training
        progress = Progress(console, quiet=quiet)
        try:
            report = run_fit(loaded, run, progress, resume=checkpoint)
        except Interrupted as stop:
            console.print(
                f"[yellow]{escape(str(stop))}[/]\n"
                + escape(_resume_hint(recipe, overrides or [], world.launched)),
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(stop.exit_code) from None
        finally:
            progress.close()
        console.print(
            f"run folder: {escape(str(run.root))} · {report['split']} {headline(report)[0]} "
            f"[bold]{headline(report)[1]:.4f}[/]",
            highlight=False,
        )


def _resume_hint(recipe: Path, overrides: list[str], launched: bool) -> str:
    """The command that continues an interrupted run."""
    command = ["dltrain", "fit", str(recipe), *overrides, "--resume", "auto"]
    if not launched:
        return f"resume with: {shlex.join(command)}"
    nproc = os.environ.get(NPROC_VARIABLE)  # set when --nproc started this process
    if nproc:
        return f"resume with: {shlex.join([*command, '--nproc', nproc])}"
    return f"resume with the same torchrun command, running: {shlex.join(command)}"


def _launch(
    recipe: Path,
    overrides: list[str],
    nproc: int | None,
    max_restarts: int,
    resume: str | None,
    force: bool,
    quiet: bool,
    folds: int | None,
) -> None:
    """`fit --nproc N`: check the recipe here (errors once, not N times), then run torchrun's
    launcher on this machine with the same fit command; exits with the processes' code."""
    from dltrain.distributed import world_from_environment
    from dltrain.errors import UserError
    from dltrain.launch import launch_local
    from dltrain.recipe import load_recipe
    from dltrain.run_folder import RunFolder

    if nproc is None:
        raise UserError("--max-restarts needs --nproc N (or torchrun's own --max-restarts).")
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
    loaded = load_recipe(recipe, overrides)
    run = RunFolder.for_recipe(loaded)
    resuming = resume is not None and (resume != "auto" or run.last_path.exists())
    run.check_free_for(loaded, force, resuming=resuming)
    run.ensure_writable()
    args = ["fit", str(recipe), *overrides]
    args += ["--resume", resume] if resume else []
    args += ["--force"] if force else []
    args += ["--quiet"] if quiet else []
    os.environ[NPROC_VARIABLE] = str(nproc)
    raise typer.Exit(launch_local(nproc, args, max_restarts))


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
    from dltrain.crossval import CV_REPORT, cv_root, run_cross_validation
    from dltrain.interrupts import Interrupted
    from dltrain.progress import Progress
    from dltrain.recipe import load_recipe
    from dltrain.tables import cv_table

    loaded = load_recipe(recipe, overrides)
    progress = Progress(console, quiet=quiet)
    try:
        cv_report = run_cross_validation(loaded, folds, progress, force)
    except Interrupted as stop:
        command = shlex.join(["dltrain", "fit", str(recipe), *overrides, "--folds", str(folds)])
        console.print(
            f"[yellow]{escape(str(stop))}[/]\ncontinue with: {escape(command)} (finished folds "
            "are kept; the interrupted fold resumes from its last.pt)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(stop.exit_code) from None
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


def _resume_path(resume: str | None, run, console: Console) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        if run.last_path.exists():
            return run.last_path
        console.print(f"no checkpoint at {run.last_path} yet: starting a new run", markup=False)
        return None
    return Path(resume)


@app.command(name="eval")
def evaluate(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint written by dltrain fit.", show_default=False
    ),
    overrides: list[str] = typer.Argument(
        None, help="Recipe overrides, e.g. data.root=/elsewhere.", show_default=False
    ),
    split: Split = typer.Option(None, "--split", help="Split to evaluate (default: test, or val)."),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Folder for report.json/.md (default: eval-SPLIT beside the checkpoint).",
    ),
    device: str = typer.Option(None, "--device", help="Device to use (default: the recipe's)."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
) -> None:
    """Evaluate a checkpoint: everything it needs (recipe, classes, normalisation) is inside it.

    [bold]Examples[/]

      dltrain eval runs/quickstart/checkpoints/best.pt

      dltrain eval best.pt --split val --output reports/ --json
    """
    console = _stderr_console() if as_json else Console()
    with user_facing_errors():
        from dltrain.engine import evaluate_checkpoint
        from dltrain.progress import Progress

        report = evaluate_checkpoint(
            checkpoint,
            output,
            Progress(console, quiet=as_json),
            split=split.value if split else None,
            device=device,
            overrides=overrides or [],
        )
        if as_json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            folder = output or checkpoint.parent / f"eval-{report['split']}"
            console.print(f"report written to {folder / 'report.json'}", markup=False)


@app.command()
def devices(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """List every device torch can use here, and which one `device: auto` picks.

    [bold]Example[/]

      dltrain devices --json
    """
    console = Console()
    with user_facing_errors():
        from dltrain.devices import describe_devices
        from dltrain.tables import devices_table

        info = describe_devices()
        if as_json:
            sys.stdout.write(json.dumps(info, indent=2) + "\n")
            return
        console.print(devices_table(info))
        for note in info["notes"]:
            console.print(f"[dim]· {escape(note)}[/]", highlight=False)
        console.print(f"device: auto → [bold]{info['auto']}[/]", highlight=False)


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="The recipe YAML file.", show_default=False),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
) -> None:
    """Validate a recipe and print it fully resolved (all defaults filled in). Reads no data.

    [bold]Example[/]

      dltrain check recipes/quickstart.yaml optimizer.lr=0.01
    """
    console = Console()
    with user_facing_errors():
        from rich.syntax import Syntax

        from dltrain.recipe import load_recipe, to_yaml

        text = to_yaml(load_recipe(recipe, overrides or []))
        if console.is_terminal:
            console.print(Syntax(text, "yaml", background_color="default", word_wrap=True))
        else:  # piped: the exact text, not cropped to a console width, so it stays valid YAML
            sys.stdout.write(text)
        _stderr_console().print(f"[green]✓[/] {recipe} is valid", highlight=False)


@app.command(name="list")
def list_components(
    kind: Kind = typer.Argument(None, help="What to list (default: everything)."),
) -> None:
    """List registered components with one-line descriptions and accepted arguments.

    [bold]Examples[/]

      dltrain list models

      dltrain list optimizers
    """
    console = Console()
    with user_facing_errors():
        from dltrain import components
        from dltrain.registry import REGISTRIES
        from dltrain.tables import registry_table

        components.load_all()
        kinds = [kind.value] if kind else list(REGISTRIES)
        for name in kinds:
            console.print(registry_table(REGISTRIES[name]))


@app.command()
def runs(
    folder: Path = typer.Argument(
        Path("runs"), help="Folder to search, at any depth (default: runs).", show_default=False
    ),
    sort: str = typer.Option(
        "test_accuracy",
        "--sort",
        metavar="KEY",
        help="name, model, dataset, epochs, best_val_loss, best_val_accuracy, test_accuracy, "
        "f1_macro or modified (names and best_val_loss ascending, the rest largest first).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """List the runs under a folder: model, dataset, epochs, best validation and test metrics.

    A run is any folder with recipe.yaml and metrics.csv or report.json (fold-k folders of a
    cross-validation included). Missing values show as —.

    [bold]Examples[/]

      dltrain runs

      dltrain runs experiments/ --sort best_val_loss --json
    """
    console = Console()
    if not console.is_terminal:  # piped: whole rows (the table is as wide as it needs), not 80
        console = Console(width=240)
    with user_facing_errors():
        from dltrain.runs_table import list_runs
        from dltrain.tables import runs_table

        rows = list_runs(folder, sort)
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        elif not rows:
            console.print(
                f"no runs in {escape(str(folder))} (a run folder holds recipe.yaml and "
                "metrics.csv or report.json). Train one with: dltrain fit RECIPE",
                highlight=False,
                soft_wrap=True,
            )
        else:
            console.print(runs_table(rows, str(folder)))


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


class ExplainMethod(str, Enum):
    gradxinput = "gradxinput"
    gradcam = "gradcam"
    both = "both"


@app.command()
def predict(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint written by dltrain fit.", show_default=False
    ),
    inputs: list[Path] = typer.Argument(
        None,
        help="Image files (png/jpg/jpeg/bmp/gif/webp) or .npy arrays for image models; .csv "
        "tables or .npy arrays for tabular models; .npy arrays for sequence models; .txt files "
        "(one text per line) or .csv tables (the text column) for text models.",
        show_default=False,
    ),
    texts: list[str] = typer.Option(
        None,
        "--text",
        "-t",
        metavar="TEXT",
        help="A text to predict, for text models (repeatable; predicted after the files).",
        show_default=False,
    ),
    top_k: int = typer.Option(
        None,
        "--top-k",
        "-k",
        min=1,
        help="Classes to show per input (default: 5, or all if fewer). Classification only.",
    ),
    device: str = typer.Option("cpu", "--device", help="Device to run the model on."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON array to stdout."),
) -> None:
    """Predict from files or texts, prepared as in training, from the checkpoint alone.

    Images of any size: converted to the model's channels, resized (bilinear) to its input.
    .npy arrays: one sample or a batch; uint8 = pixels (scaled by 1/255), floats as they are.
    .csv tables (tabular models): one sample per row; a label column is ignored.
    Text models: --text "..." or .txt/.csv files, encoded with the checkpoint's vocabulary.
    Classifiers print the top classes, regression models the value, seq2seq models the
    decoded output sequence.

    [bold]Examples[/]

      dltrain predict runs/quickstart/checkpoints/best.pt digit.png other.jpg

      dltrain predict best.pt batch.npy --top-k 3 --json

      dltrain predict runs/sms/checkpoints/best.pt --text "free prize, call now" messages.txt

      dltrain predict runs/reverse/checkpoints/best.pt --text 3071
    """
    console = _stderr_console() if as_json else Console()
    with user_facing_errors():
        from dltrain.inference import load_for_inference
        from dltrain.predict import predict_files
        from dltrain.tables import outputs_table, predictions_table

        predictor = load_for_inference(checkpoint, device)
        results = predict_files(predictor, inputs or [], top_k, texts or [])
        if as_json:
            sys.stdout.write(json.dumps(results, indent=2) + "\n")
        elif predictor.task == "regression":
            target = predictor.classes[0] if predictor.classes else "value"
            console.print(outputs_table(results, "prediction", f"predicted {target}"))
        elif predictor.task == "seq2seq":
            console.print(outputs_table(results, "output", "output"))
        else:
            for result in results:
                console.print(predictions_table(result))


@app.command()
def export(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint written by dltrain fit.", show_default=False
    ),
    format: ExportFormat = typer.Option(
        ..., "--format", "-f", help="onnx or torchscript.", show_default=False
    ),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="File to write (default: beside the checkpoint: best.onnx, best.torchscript.pt).",
    ),
) -> None:
    """Export a checkpoint's model to ONNX or TorchScript, for use without dltrain.

    The file maps a preprocessed float32 batch (N × input shape) to logits (regression: the
    predicted values). Preprocessing is not in the graph; the file's metadata (dltrain.json)
    says it: x = uint8/255 for images, then (x - mean) / std per channel or feature.
    Text models take int64 token ids; the metadata holds the vocabulary and tokenizer.
    It also holds the class names and the input shape.
    Seq2seq models decode step by step and are not exported (use dltrain predict); recurrent
    models over token ids export to TorchScript only.
    ONNX export needs: pip install onnx onnxscript

    [bold]Examples[/]

      dltrain export runs/quickstart/checkpoints/best.pt --format onnx

      dltrain export best.pt --format torchscript --output model.pt
    """
    console = Console()
    with user_facing_errors():
        from dltrain.export import export_checkpoint, summary

        written, predictor = export_checkpoint(checkpoint, format.value, output)
        console.print(
            f"exported {format.value} to {escape(str(written))} · {escape(summary(predictor))}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def explain(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint of an image model.", show_default=False
    ),
    image: Path = typer.Argument(
        ..., help="An image file (or a one-sample .npy array).", show_default=False
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="PNG to write (default: ./explain-<image stem>.png)."
    ),
    method: ExplainMethod = typer.Option(
        ExplainMethod.both,
        "--method",
        help="gradxinput: |gradient × input|; gradcam: Grad-CAM at the last conv layer.",
    ),
) -> None:
    """Show which pixels drove the predicted class: saliency maps over the image (PNG).

    Grad-CAM needs a convolutional model; with --method both, a model without a conv layer
    gets gradient × input only.

    [bold]Examples[/]

      dltrain explain runs/quickstart/checkpoints/best.pt digit.png

      dltrain explain best.pt cat.jpg --method gradcam --output cat-gradcam.png
    """
    console = Console()
    with user_facing_errors():
        from dltrain.explain import default_output, explain_file, write_png
        from dltrain.inference import load_for_inference

        predictor = load_for_inference(checkpoint)
        result = explain_file(predictor, image, method.value)
        target = output or default_output(image)
        write_png(result, image.name, target)
        for note in result.notes:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
        console.print(
            f"predicted [bold]{escape(result.predicted)}[/] ({result.probability:.3f}) · "
            f"saliency map written to {escape(str(target))}",
            highlight=False,
            soft_wrap=True,
        )


def main() -> None:
    """Entry point for `python -m dltrain`."""
    app(prog_name="dltrain")


if __name__ == "__main__":
    main()
