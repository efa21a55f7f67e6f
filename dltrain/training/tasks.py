"""What differs between classification, regression and seq2seq: the training loss, the
evaluation pass and the report. Everything else (loop, checkpoints, resume) is shared.

Evaluation accumulates on the device (sums, counts, a confusion matrix) and reads the host once,
at the end of the pass. Under data parallelism each process evaluates its own shard and the sums
are added up over processes (`result(world)`), so every sample counts exactly once. A padded
batch (XLA's static shapes) passes `real`, the number of its rows that are data; only those
count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dltrain.config.kinds import Task
from dltrain.reporting.metrics import ConfusionMatrix, classification_report, ranking_report
from dltrain.system.distributed import World

SINGLE = World()


@dataclass
class Evaluation:
    """One pass over a split: mean loss plus what the task measures."""

    loss: float
    matrix: torch.Tensor | None = None  # classification: C×C counts on the CPU
    scores: torch.Tensor | None = None  # classification, when kept: N×C softmax probabilities
    targets: torch.Tensor | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # regression / seq2seq figures

    @property
    def accuracy(self) -> float | None:
        """metrics.csv's val_accuracy: accuracy, exact match for seq2seq, none for regression."""
        if self.matrix is not None:
            total = int(self.matrix.sum())
            return float(self.matrix.diagonal().sum()) / total if total else 0.0
        return self.metrics.get("exact_match")


class Classification:
    """Class labels: cross-entropy-style losses, confusion matrix, ranking metrics."""

    name = "classification"

    def training_loss(self, model, x, y, loss_fn) -> torch.Tensor:
        return loss_fn(model(x), y)

    def evaluator(self, num_classes: int, device: torch.device, keep_scores: bool):
        return _ClassificationPass(num_classes, device, keep_scores)

    def report(self, result: Evaluation, classes: list[str]) -> dict[str, Any]:
        report = classification_report(result.matrix.numpy(), classes)
        if result.scores is not None:
            report.update(ranking_report(result.scores.numpy(), result.targets.numpy(), classes))
        return report


class Regression:
    """One real-valued target: MSE, MAE and R².

    With a target scale (the training targets' mean and std, data_meta["target_scale"]) the
    model answers in the target's units (`TargetScaled`) while the loss compares standardised
    values, so that optimisation sees targets near 0 whatever their units; MSE, MAE and R²
    are always in the target's units.
    """

    name = "regression"

    def __init__(self, scale: dict[str, float] | None = None):
        self.mean, self.std = (scale["mean"], scale["std"]) if scale else (0.0, 1.0)

    def standardised(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std

    def loss(self, out: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
        return loss_fn(self.standardised(out), self.standardised(y))

    def training_loss(self, model, x, y, loss_fn) -> torch.Tensor:
        return self.loss(model(x), y, loss_fn)

    def evaluator(self, num_classes: int, device: torch.device, keep_scores: bool):
        return _RegressionPass(self, device)

    def report(self, result: Evaluation, classes: list[str]) -> dict[str, Any]:
        return {"target": classes[0] if classes else "target", **result.metrics}


class Seq2Seq:
    """Token sequence to token sequence: teacher forcing in training, greedy decoding to
    evaluate (token accuracy and exact match)."""

    name = "seq2seq"

    def __init__(self, bos_id: int, eos_id: int):
        self.bos_id, self.eos_id = bos_id, eos_id

    def training_loss(self, model, x, y, loss_fn) -> torch.Tensor:
        return loss_fn(model(x, self.decoder_input(y)), y)

    def decoder_input(self, y: torch.Tensor) -> torch.Tensor:
        """<bos> followed by the target shifted right (teacher forcing)."""
        bos = torch.full_like(y[:, :1], self.bos_id)
        return torch.cat([bos, y[:, :-1]], dim=1)

    def evaluator(self, num_classes: int, device: torch.device, keep_scores: bool):
        return _Seq2SeqPass(self, device)

    def report(self, result: Evaluation, classes: list[str]) -> dict[str, Any]:
        return dict(result.metrics)


def task_for(name: Task, meta: dict[str, Any]) -> Classification | Regression | Seq2Seq:
    """The task object for a dataset's task name and data_meta."""
    if name == Seq2Seq.name:
        return Seq2Seq(meta.get("bos_id", 1), meta.get("eos_id", 2))
    if name == Regression.name:
        return Regression(meta.get("target_scale"))
    return Classification()


class TargetScaled(nn.Module):
    """A regression model that learns standardised targets and answers in their units:
    model(x) · std + mean (the training targets' statistics, stored in the checkpoint)."""

    def __init__(self, model: nn.Module, scale: dict[str, float]):
        super().__init__()
        self.model = model
        self.mean, self.std = float(scale["mean"]), float(scale["std"])

    def forward(self, *args: Any) -> torch.Tensor:
        return self.model(*args) * self.std + self.mean


# -- evaluation passes ------------------------------------------------------------------------


def _real(out: torch.Tensor, y: torch.Tensor, real: int | None):
    """The rows of a batch's output and target that are data (all, unless it was padded)."""
    if real is None or real == len(y):
        return out, y
    return out[:real], y[:real]


class _ClassificationPass:
    def __init__(self, num_classes: int, device: torch.device, keep_scores: bool):
        self.matrix = ConfusionMatrix(num_classes, device)
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.keep_scores = keep_scores
        self.scores: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, model, x, y, loss_fn, real: int | None = None) -> None:
        logits, y = _real(model(x), y, real)
        self.loss_sum += loss_fn(logits.float(), y).double() * len(y)
        self.matrix.update(logits.argmax(dim=1), y)
        if self.keep_scores:
            self.scores.append(logits.float().softmax(dim=1))
            self.targets.append(y)

    def result(self, world: World = SINGLE) -> Evaluation:
        matrix = world.all_reduce_sum_(self.matrix.matrix)
        loss_sum = world.all_reduce_sum_(self.loss_sum)
        loss = (loss_sum / matrix.sum().clamp(min=1)).item()
        if not self.keep_scores:
            return Evaluation(loss, matrix.cpu())
        # shards are contiguous, so rank order restores the split's order
        scores = world.gather_rows(torch.cat(self.scores)).cpu()
        targets = world.gather_rows(torch.cat(self.targets)).cpu()
        return Evaluation(loss, matrix.cpu(), scores, targets)


class _RegressionPass:
    def __init__(self, task: Regression, device: torch.device):
        self.task = task
        # n, loss·n, Σe², Σ|e|: float64 sums on the device
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)
        # the targets' count, mean and Σ(y − ȳ)², merged batch by batch (Chan et al.):
        # Σy² − (Σy)²/n cancels catastrophically for targets far from 0 (prices, years)
        self.spread = torch.zeros(3, device=device, dtype=torch.float64)

    def update(self, model, x, y, loss_fn, real: int | None = None) -> None:
        out, y = _real(model(x), y, real)
        prediction, target = out.float().squeeze(-1).double(), y.double()
        error = prediction - target
        count = torch.tensor(float(len(y)), device=y.device, dtype=torch.float64)
        self.sums += torch.stack(
            [
                count,
                self.task.loss(out, y, loss_fn).double() * len(y),
                error.square().sum(),
                error.abs().sum(),
            ]
        )
        if len(y):
            mean = target.mean()
            self.spread = _merged(
                self.spread, torch.stack([count, mean, (target - mean).square().sum()])
            )

    def result(self, world: World = SINGLE) -> Evaluation:
        n, loss, sse, sae = world.all_reduce_sum_(self.sums).tolist()
        spreads = world.gather_rows(self.spread[None])  # one (n, mean, M2) row per process
        total = functools.reduce(_merged, spreads)[2].item()  # Σ(y − ȳ)² over the whole split
        n = max(n, 1.0)
        metrics = {
            "num_samples": int(n),
            "mse": sse / n,
            "mae": sae / n,
            # as scikit-learn's r2_score: constant targets score 1 when predicted exactly, else 0
            "r2": 1.0 - sse / total if total > 0 else float(sse == 0),
        }
        return Evaluation(loss / n, metrics=metrics)


def _merged(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two (count, mean, Σ(y − mean)²) summaries as one."""
    count = a[0] + b[0]
    delta = b[1] - a[1]
    share = b[0] / count.clamp(min=1)
    return torch.stack([count, a[1] + delta * share, a[2] + b[2] + delta.square() * a[0] * share])


class _Seq2SeqPass:
    def __init__(self, task: Seq2Seq, device: torch.device):
        self.task = task
        # samples, loss, exact matches, correct target tokens, target tokens
        self.sums = torch.zeros(5, device=device, dtype=torch.float64)

    def update(self, model, x, y, loss_fn, real: int | None = None) -> None:
        logits, _ = _real(model(x, self.task.decoder_input(y)), y, real)
        generated, y = _real(model.generate(x), y, real)
        loss = loss_fn(logits, y)
        predicted = _fit_width(generated, y.shape[1])
        real = y != 0  # <pad> positions are not part of the target
        self.sums += torch.stack(
            [
                torch.tensor(float(len(y)), device=y.device, dtype=torch.float64),
                loss.double() * len(y),
                (predicted == y).all(dim=1).sum().double(),
                ((predicted == y) & real).sum().double(),
                real.sum().double(),
            ]
        )

    def result(self, world: World = SINGLE) -> Evaluation:
        n, loss, exact, correct, tokens = world.all_reduce_sum_(self.sums).tolist()
        metrics = {
            "num_samples": int(n),
            "exact_match": exact / max(n, 1.0),
            "token_accuracy": correct / max(tokens, 1.0),
        }
        return Evaluation(loss / max(n, 1.0), metrics=metrics)


def _fit_width(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """Pad (with <pad>) or cut generated sequences to the target's width."""
    if tokens.shape[1] >= width:
        return tokens[:, :width]
    pad = tokens.new_zeros(tokens.shape[0], width - tokens.shape[1])
    return torch.cat([tokens, pad], dim=1)
