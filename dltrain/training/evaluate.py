"""Evaluation: a model's loss and measures over a split, and the report on a checkpoint.

`evaluate` is the pass the fit loop runs on the validation split every epoch; `report_on_split`
evaluates the final (best) model and writes report.json/.md with the plots; `evaluate_checkpoint`
is `dltrain eval`: a setup rebuilt from the checkpoint alone, then the same report.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from dltrain.config.loading import resolve_with_context
from dltrain.config.user_imports import import_for_checkpoint
from dltrain.data.loaders import Batches
from dltrain.errors import UserError
from dltrain.models.pretrained import without_pretrained_weights
from dltrain.reporting.progress import Progress
from dltrain.runs.checkpoint import load_checkpoint, load_weights, which_weights
from dltrain.runs.folder import RunFolder
from dltrain.runs.lock import holding_output
from dltrain.system.out_of_memory import out_of_memory_is_a_run_failure
from dltrain.system.threads import choose_threads
from dltrain.training.build import Setup, build_setup, split_batches
from dltrain.training.tasks import Evaluation
from dltrain.training.thread_probe import probe_forward
from dltrain.training.tta import with_tta


def evaluate(
    model,
    batches: Batches,
    setup: Setup,
    keep_scores: bool = False,
    between_batches: Callable[[], None] | None = None,
) -> Evaluation:
    """Loss and the task's measures over a split, every sample counted once (over all processes
    under DDP); class scores on request (for AUROC, average precision, top-k: the final report,
    not every epoch). `between_batches` runs after each batch (e.g. a stop request's check)."""
    model.eval()
    accumulator = setup.task.evaluator(setup.data.num_classes, setup.device, keep_scores)
    # torch_xla's lazy tensors do not support inference mode; no_grad is its equivalent there
    with torch.no_grad() if setup.device.type == "xla" else torch.inference_mode():
        for i, (x, y) in enumerate(batches.epoch(0)):
            with setup.precision.autocast():
                accumulator.update(
                    model, setup.pipeline.eval(x), y, setup.loss_fn, batches.real_rows(i)
                )
            setup.end_step()
            if between_batches is not None:
                between_batches()
        return accumulator.result(setup.world)


def evaluate_checkpoint(
    checkpoint_path: Path,
    output: Path | None,
    progress: Progress,
    split: str | None = None,
    device: str | None = None,
    overrides: list[str] = (),
    imports: list[str] = (),
    force: bool = False,
    threads: str | int | None = None,
) -> dict:
    """Rebuild the checkpoint's setup, load its weights, and report on a split.

    The report goes to `output` (default: eval-SPLIT beside the checkpoint), with
    confusion_matrix.png. The user's own components come from `imports` (the command line),
    never from the checkpoint. An `output` folder that holds a training run is refused unless
    `force` (its report would be replaced). `threads` (auto or a count; default: the recipe's
    train.threads) is chosen as fit chooses it, timing the evaluation's forward pass.
    """
    where = (split, device, overrides, imports, threads)
    if output is None:
        return _evaluate_checkpoint(checkpoint_path, None, progress, *where)
    _refuse_replacing_a_run(Path(output), force)
    with holding_output(Path(output), "evaluating a checkpoint"):  # from the start: one writer
        return _evaluate_checkpoint(checkpoint_path, Path(output), progress, *where)


def _evaluate_checkpoint(
    checkpoint_path: Path,
    output: Path | None,
    progress: Progress,
    split: str | None,
    device: str | None,
    overrides: list[str],
    imports: list[str],
    threads: str | int | None,
) -> dict:
    checkpoint = load_checkpoint(checkpoint_path)
    source = f"checkpoint {checkpoint_path}"
    saved = dict(checkpoint["recipe"])
    saved["imports"] = import_for_checkpoint(saved, list(imports), source)
    recipe = resolve_with_context(saved, list(overrides), source)
    # the checkpoint's weights go over the model at once: pretrained ones are not fetched again
    recipe = recipe.model_copy(update={"model": without_pretrained_weights(recipe.model)})
    setup = build_setup(recipe, device, meta=checkpoint["data_meta"])
    load_weights(setup.model, checkpoint, checkpoint_path, built_from=recipe.model)
    held = which_weights(checkpoint)
    threads = threads or recipe.train.threads
    return report_on_split(
        setup, checkpoint_path, output, progress, split, held=held, threads=threads
    )


def report_split(splits: Collection[str]) -> str:
    """The split a report is on by default: test; else val; else (data with neither, e.g. a
    final model trained on everything) the training data itself, labelled as such."""
    return next(name for name in ("test", "val", "train") if name in splits)


def report_on_split(
    setup: Setup,
    checkpoint_path: Path,
    output: Path | None,
    progress: Progress,
    split: str | None = None,
    history: list[dict[str, Any]] | None = None,
    between_batches: Callable[[], None] | None = None,
    held: dict[str, Any] | None = None,
    threads: str | int | None = None,
) -> dict:
    """Evaluate setup.model (with eval.tta's views, if any) on a split and (rank 0) write
    report.json/.md and the plots; curves.png too when the training `history` is given. `held`
    says which weights these are (their epoch, and what made them the best: `which_weights`).
    `threads`: the CPU thread count to choose first (None: as it is, e.g. fit's choice)."""
    from dltrain.reporting.report import write_report

    split = split or report_split(setup.data.splits)
    if split not in setup.data.splits:
        raise UserError(
            f"this dataset has no '{split}' split; choose one of: {', '.join(setup.data.splits)}."
        )
    output = output or Path(checkpoint_path).parent / f"eval-{split}"
    progress.evaluating(split, len(setup.data.splits[split]))
    batches = split_batches(setup, split, shuffle=False)
    if threads is not None:
        choice = choose_threads(
            threads, setup.device, lambda: probe_forward(setup, batches), len(batches)
        )
        progress.note(choice.describe())
    with out_of_memory_is_a_run_failure(
        setup.device, setup.recipe, setup.precision.name, eval_batch_size=batches.batch_size
    ):
        model = with_tta(setup.model, setup.recipe.eval.tta, setup.data.model_kind)
        result = evaluate(model, batches, setup, keep_scores=True, between_batches=between_batches)
    report = {
        "split": split,
        "checkpoint": _relative(checkpoint_path, output),
        **(held or {}),
        "task": setup.task.name,
        "loss": result.loss,
        **setup.task.report(result, setup.data.classes),
    }
    progress.evaluated(report)
    if setup.world.is_main:
        with holding_output(output, "writing a report"):
            write_report(output, report, history=history, title=setup.recipe.name)
    progress.report(report)
    return report


def _refuse_replacing_a_run(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder for report.json/.md.")
    if RunFolder(output).holds_a_run() and not force:
        raise UserError(
            f"--output {output} holds a training run: this evaluation would replace its "
            "report.json and plots. Choose another folder (by default the report goes to "
            "eval-SPLIT beside the checkpoint), or add --force."
        )


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)
