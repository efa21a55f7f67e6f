"""Everything dltrain prints while it works: one rich console, progress bars and tables.

The fit loop calls these hooks; they decide what to show. The running loss is a device tensor and
is read (a host sync) only when the display is due to refresh, a few times per second.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

from dltrain.config.task_fit import loss_label
from dltrain.data.repeated_rows import repeated_rows_note
from dltrain.reporting.console_tables import columns_table, confusion_table, report_table
from dltrain.reporting.report import (
    privacy_line,
    report_scalars,
    unpredicted_classes_line,
    weights_label,
)

REFRESH_SECONDS = 0.25
LOG_EVERY_VARIABLE = "DLTRAIN_LOG_EVERY"


class Progress:
    """Live training display: a bar per epoch with loss, samples/s and ETA, then a summary line."""

    def __init__(
        self,
        console: Console | None = None,
        quiet: bool = False,
        log_every: float | None = None,
        live_only: bool = False,
    ):
        self.console = console or Console()
        self.quiet = quiet
        # only what shows the work going on (the bar, or plain lines without a terminal), no
        # summaries: a sweep prints one line per trial of its own
        self.live_only = live_only
        # seconds between plain progress lines without a terminal: `fit --log-every` sets the
        # variable, so the processes of --nproc and --folds runs see it too
        self.log_every = log_every or _seconds(os.environ.get(LOG_EVERY_VARIABLE), 30.0)
        self._plain: _PlainLines | None = None
        self._bar: RichProgress | None = None
        self._task = None
        self._epoch_started = 0.0
        self._epochs = 0
        self._next_refresh = 0.0

    # -- run ------------------------------------------------------------------------------------

    def start(
        self,
        recipe,
        device: torch.device,
        precision: str,
        loader: str,
        model: torch.nn.Module,
        data,
    ) -> None:
        """One line on what is about to run."""
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        counted = f"{params:,} parameters" + (
            f", {trainable:,} trainable" if trainable != params else ""
        )
        sizes = ", ".join(f"{name} {len(split):,}" for name, split in data.splits.items())
        self._print(
            f"[bold]{recipe.name}[/]: {escape(recipe.model['name'])} ({counted}) "
            f"on {recipe.data.name} ({sizes}; {_learned(data)}) · batch {_batch(recipe.data)} · "
            f"device {device} · {precision} · loss {escape(loss_label(recipe.loss, data.task))} · "
            f"data path: {loader}",
            wrap=self.console.is_terminal,  # folded at words on screen, one line in a log
        )
        columns = data.extra.get("table_columns")
        if columns and not self.quiet and not self.live_only:
            self.console.print(columns_table(columns))
        repeated = repeated_rows_note(data.extra.get("repeated_rows", {}))
        if repeated:
            self._print(f"[dim]{escape(repeated)}[/]", wrap=True)

    def data_parallel(self, processes: int, batch_size: int, accumulate: int) -> None:
        """Under torchrun: how one optimizer step's samples are shared out."""
        per_step = processes * batch_size * accumulate
        micro = f" × {accumulate} accumulated" if accumulate > 1 else ""
        self.note(
            f"data parallel: {processes} processes × batch {batch_size}{micro} "
            f"= {per_step} samples per step"
        )

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        """Open the epoch's bar (at `done` batches when a resumed epoch continues). Without a
        terminal (a pipe, a batch job's log) a plain line comes every `log_every` seconds."""
        self._epochs = epochs
        if self.quiet:
            return
        if not self.console.is_terminal:
            self._plain = _PlainLines(epoch, epochs, steps, done, self.log_every)
            return
        self._bar = RichProgress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            auto_refresh=False,  # redrawn from step() at REFRESH_SECONDS: no drawing thread
        )
        self._task = self._bar.add_task("train", total=steps, completed=done, loss="…", speed="…")
        self._bar.start()
        self._epoch_started = time.perf_counter()
        self._next_refresh = self._epoch_started + REFRESH_SECONDS

    def step(self, done: int, seen: int, loss_sum: torch.Tensor, count: int) -> None:
        """Called every step; touches the device tensor only when a refresh is due."""
        if self._plain is not None:
            line = self._plain.line_due(done, seen, loss_sum, count)
            if line:
                self._print(line, live=True)
            return
        if self._bar is None:
            return
        now = time.perf_counter()
        if now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_SECONDS
        loss = loss_sum.item() / max(count, 1)  # the display's sync, a few times per second
        speed = seen / max(now - self._epoch_started, 1e-9)
        self._bar.update(self._task, completed=done, loss=f"{loss:.4f}", speed=f"{speed:,.0f}")
        self._bar.refresh()

    def epoch_end(self, row: dict[str, Any], improved: bool) -> None:
        """Replace the bar with one summary line for the epoch."""
        self._plain = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        width = len(str(self._epochs))
        parts = [f"epoch {row['epoch']:>{width}}/{self._epochs}", f"loss {row['train_loss']:.4f}"]
        if row["val_loss"] is not None:
            parts.append(f"val_loss {row['val_loss']:.4f}")
        if row["val_accuracy"] is not None:
            parts.append(f"val_acc {row['val_accuracy']:.4f}")
        if row.get("epsilon") is not None:  # a private run: the ε spent so far
            parts.append(f"ε {row['epsilon']:.2f}")
        parts += [f"lr {row['lr']:.1e}", f"{row['seconds']:.1f}s", f"{_si(row['samples_per_s'])}/s"]
        self._print("  ".join(parts) + ("  [green]★[/]" if improved else ""))

    def note(self, text: str) -> None:
        """One informational line (printed above a live bar)."""
        self._print(f"[dim]{text}[/]")

    def early_stop(self, epoch: int, best_epoch: int | None) -> None:
        """Early stopping ended the run; the report uses the best epoch's weights."""
        self._print(
            f"[yellow]early stopping after epoch {epoch}[/]: no improvement; "
            f"using the best weights (epoch {best_epoch})"
        )

    def skipped(self, epoch: int, batch: int) -> None:
        """A step skipped for a non-finite loss (train.on_nonfinite: skip_step)."""
        self._print(f"[yellow]skipped epoch {epoch} batch {batch}: non-finite loss[/]")

    def evaluating(self, split: str, size: int) -> None:
        self._print(f"evaluating on the {split} split ({size:,} samples)")

    def evaluated(self, report: dict[str, Any]) -> None:
        """The final evaluation is done; its files are written next (a hook for timing it)."""

    def report(self, report: dict[str, Any]) -> None:
        """The evaluation as tables: per-class metrics, averages, and the confusion matrix
        (and what privacy a private run spent)."""
        if self.quiet or self.live_only:
            return
        self._report_figures(report)
        if privacy_line(report):
            self._print(privacy_line(report))
        unpredicted = unpredicted_classes_line(report)
        if unpredicted:
            self._print(f"[yellow]{escape(unpredicted)}[/]", wrap=True)

    def _report_figures(self, report: dict[str, Any]) -> None:
        if "confusion_matrix" not in report:  # regression, seq2seq: their few figures
            scaled = "target_scale" in report or "r2" in report  # regression learns z-scores
            figures = " · ".join(
                f"{'loss (standardised)' if k == 'loss' and scaled else k} {v:.4f}"
                for k, v in report_scalars(report).items()
            )
            held = weights_label(report)
            self._print(
                f"[bold]{report['split']}[/]: {figures} · {report['num_samples']:,} samples"
                + (f" · {held}" if held else "")
            )
            return
        self.console.print(report_table(report))
        if len(report["classes"]) <= 20:
            self.console.print(confusion_table(report))
        self.console.print(
            f"[bold]{report['split']} accuracy {report['accuracy']:.4f}[/] · "
            f"macro F1 {report['f1']['macro']:.4f} · loss {report['loss']:.4f} · "
            f"{report['num_samples']:,} samples"
        )

    def close(self) -> None:
        """Stop a live bar (on errors and interrupts) so the terminal is left clean."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _print(self, text: str, live: bool = False, wrap: bool = False) -> None:
        """A line as it is (a terminal folds it), or with `wrap` folded at words: a paragraph
        of advice read in a terminal rather than grepped from a log."""
        if not self.quiet and (live or not self.live_only):
            self.console.print(text, highlight=False, soft_wrap=not wrap)


class _PlainLines:
    """Progress as plain timestamped lines, one every `every` seconds: what a batch job's log
    (SLURM, CI, `> train.log`) shows between epoch lines, with how long the epoch and the run
    have left."""

    def __init__(self, epoch: int, epochs: int, steps: int, done: int, every: float):
        self.epoch, self.epochs, self.steps, self.every = epoch, epochs, steps, every
        self.started, self.done_at_start = time.perf_counter(), done
        self.next_line = self.started + every

    def line_due(self, done: int, seen: int, loss_sum: torch.Tensor, count: int) -> str | None:
        now = time.perf_counter()
        if now < self.next_line or done <= self.done_at_start:
            return None
        self.next_line = now + self.every
        elapsed = now - self.started
        per_step = elapsed / (done - self.done_at_start)
        epoch_left = per_step * (self.steps - done)
        run_left = epoch_left + per_step * self.steps * (self.epochs - self.epoch)
        loss = loss_sum.item() / max(count, 1)  # one sync per line
        return (
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}  epoch {self.epoch}/{self.epochs}  "
            f"batch {done}/{self.steps} ({100 * done // max(self.steps, 1)}%)  loss {loss:.4f}  "
            f"{_si(seen / max(elapsed, 1e-9))} samples/s  epoch ends in {_duration(epoch_left)}  "
            f"run ends in ~{_duration(run_left)}"
        )


def _seconds(text: str | None, default: float) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if value > 0 and math.isfinite(value) else default


def _duration(seconds: float) -> str:
    """3725 → '1:02:05'."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _batch(data) -> str:
    """The per-process batch size, or the global one when the recipe gave that."""
    if data.global_batch_size is not None:
        return f"{data.global_batch_size} (global)"
    return str(data.batch_size)


def _learned(data) -> str:
    """What the model learns, by task: '10 classes', 'regression of sum', 'seq2seq, 14 tokens'."""
    if data.task == "regression":
        return f"regression of {data.classes[0] if data.classes else 'the target'}"
    if data.task == "seq2seq":
        return f"seq2seq, {len(data.classes)} target tokens"
    return f"{data.num_classes} class" + ("" if data.num_classes == 1 else "es")


def _si(value: float) -> str:
    """12345 → '12.3k': short rates for one-line summaries."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"
