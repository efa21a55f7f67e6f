"""Evaluation: a model's loss and measures over a split, and the report on a checkpoint.

`evaluate` is the pass the fit loop runs on the validation split every epoch; `report_on_split`
evaluates the final (best) model and writes report.json/.md with the plots; `evaluate_checkpoint`
is `dltrain eval`: a setup rebuilt from the checkpoint alone, then the same report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dltrain.checkpoint import load_checkpoint, load_weights
from dltrain.data.loaders import Batches
from dltrain.errors import UserError
from dltrain.memory import out_of_memory_is_a_run_failure
from dltrain.progress import Progress
from dltrain.recipe import resolve_with_context
from dltrain.setup import Setup, build_setup, split_batches
from dltrain.tasks import Evaluation


def evaluate(model, batches: Batches, s: Setup, keep_scores: bool = False) -> Evaluation:
    """Loss and the task's measures over a split, every sample counted once (over all processes
    under DDP); class scores on request (for AUROC, average precision, top-k: the final report,
    not every epoch)."""
    model.eval()
    accumulator = s.task.evaluator(s.data.num_classes, s.device, keep_scores)
    # torch_xla's lazy tensors do not support inference mode; no_grad is its equivalent there
    with torch.no_grad() if s.device.type == "xla" else torch.inference_mode():
        for i, (x, y) in enumerate(batches.epoch(0)):
            with s.precision.autocast():
                accumulator.update(model, s.pipeline.eval(x), y, s.loss_fn, batches.real_rows(i))
            s.end_step()
        return accumulator.result(s.world)


def evaluate_checkpoint(
    checkpoint_path: Path,
    output: Path | None,
    progress: Progress,
    split: str | None = None,
    device: str | None = None,
    overrides: list[str] = (),
) -> dict:
    """Rebuild the checkpoint's setup, load its weights, and report on a split.

    The report goes to `output` (default: eval-SPLIT beside the checkpoint), with
    confusion_matrix.png.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    recipe = resolve_with_context(
        dict(checkpoint["recipe"]), list(overrides), f"checkpoint {checkpoint_path}"
    )
    setup = build_setup(recipe, device, meta=checkpoint["data_meta"])
    load_weights(setup.model, checkpoint, checkpoint_path, built_from=recipe.model)
    return report_on_split(setup, checkpoint_path, output, progress, split)


def report_on_split(
    s: Setup,
    checkpoint_path: Path,
    output: Path | None,
    progress: Progress,
    split: str | None = None,
    history: list[dict[str, Any]] | None = None,
) -> dict:
    """Evaluate s.model on a split and (rank 0) write report.json/.md and the plots; curves.png
    too when the training `history` is given."""
    from dltrain.report import write_report

    split = split or ("test" if "test" in s.data.splits else "val")
    if split not in s.data.splits:
        raise UserError(
            f"this dataset has no '{split}' split; choose one of: {', '.join(s.data.splits)}."
        )
    output = output or Path(checkpoint_path).parent / f"eval-{split}"
    progress.evaluating(split, len(s.data.splits[split]))
    batches = split_batches(s, split, shuffle=False)
    with out_of_memory_is_a_run_failure(
        s.device, s.recipe, s.precision.name, eval_batch_size=batches.batch_size
    ):
        result = evaluate(s.model, batches, s, keep_scores=True)
    report = {
        "split": split,
        "checkpoint": _relative(checkpoint_path, output),
        "task": s.task.name,
        "loss": result.loss,
        **s.task.report(result, s.data.classes),
    }
    if s.world.is_main:
        write_report(output, report, history=history, title=s.recipe.name)
    progress.report(report)
    return report


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)
