"""Losses, registered in LOSSES, for the three tasks.

Every factory returns an nn.Module called as `loss(logits, targets)` and returning a scalar tensor
(the batch mean). Classification: logits B×C, targets B int64 class indices. Regression: outputs
B×1, targets B float (mse, smooth_l1, huber). Seq2seq: logits B×T×V, targets B×T int64 token
ids, where id 0 (<pad>) is ignored (cross_entropy, nll). Losses that compare against one-hot
vectors build them inside with `scatter_`, on the logits' device, so a step never waits for the
host. Losses are computed in float32 (as autocast would) because
log-softmax and squared errors lose too much precision in half types.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from dltrain.config.registry import LOSSES
from dltrain.config.task_fit import TASK_LOSSES, loss_misfit
from dltrain.errors import UserError

ClassWeights = list[Annotated[float, Field(ge=0)]] | Literal["balanced"] | None


def one_hot_like(logits: Tensor, targets: Tensor) -> Tensor:
    """One-hot rows shaped and typed like `logits` (sync-free, unlike checked F.one_hot)."""
    return torch.zeros_like(logits).scatter_(1, targets.unsqueeze(1), 1.0)


def balanced_weights(class_counts: Tensor) -> Tensor:
    """Per-class weights N / (C * count_c), as scikit-learn's 'balanced' class weights."""
    counts = class_counts.detach().to(torch.float64).cpu()
    # A class absent from the training split never appears as a training target; counting it
    # once keeps its weight finite for validation batches instead of dividing by zero.
    counts = counts.clamp(min=1)
    return (counts.sum() / (len(counts) * counts)).to(torch.float32)


def class_weight_tensor(
    class_weights: ClassWeights, num_classes: int, class_counts: Tensor | None
) -> Tensor | None:
    """The weight vector for a `class_weights` option, or a UserError naming what to fix."""
    if class_weights is None:
        return None
    if class_weights == "balanced":
        if class_counts is None:
            raise UserError(
                "loss.class_weights: 'balanced' needs the training set's class counts, which this "
                f"dataset does not provide; give a list of {num_classes} weights instead."
            )
        return balanced_weights(class_counts)
    if len(class_weights) != num_classes:
        raise UserError(
            f"loss.class_weights: expected {num_classes} weights (one per class), got "
            f"{len(class_weights)}; list one weight per class, or use 'balanced'."
        )
    if not any(class_weights):
        raise UserError("loss.class_weights: all weights are 0; give at least one positive weight.")
    return torch.tensor(class_weights, dtype=torch.float32)


class _BufferedLoss(nn.Module):
    """A loss holding optional constant tensors as buffers, moved to the logits' device once."""

    def _buffer(self, name: str, logits: Tensor) -> Tensor | None:
        value = getattr(self, name)
        if value is not None and value.device != logits.device:
            # Assigning to a registered buffer name replaces the buffer: one copy, not per step.
            setattr(self, name, value.to(logits.device))
            value = getattr(self, name)
        return value


PAD_ID = 0  # seq2seq targets: padding positions carry no loss


def _token_rows(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Seq2seq B×T×V logits and B×T targets as (B·T)×V rows; classification passes through."""
    if logits.dim() == 3:
        return logits.flatten(0, 1), targets.flatten()
    return logits, targets


class CrossEntropy(_BufferedLoss):
    """Softmax cross-entropy with optional label smoothing and class weights."""

    def __init__(
        self, weight: Tensor | None = None, label_smoothing: float = 0.0, ignore_index: int = -100
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = self._buffer("weight", logits)
        logits, targets = _token_rows(logits, targets)
        return F.cross_entropy(
            logits.float(),
            targets,
            weight=weight,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )


class NegativeLogLikelihood(_BufferedLoss):
    """Negative log-likelihood of log_softmax(logits), with optional class weights."""

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = self._buffer("weight", logits)
        logits, targets = _token_rows(logits, targets)
        return F.nll_loss(
            F.log_softmax(logits.float(), dim=1),
            targets,
            weight=weight,
            ignore_index=self.ignore_index,
        )


class MeanSquaredError(nn.Module):
    """Mean squared error: against one-hot targets (classification) or the values (regression)."""

    def __init__(self, regression: bool = False):
        super().__init__()
        self.regression = regression

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), targets.float())
        return F.mse_loss(logits, one_hot_like(logits, targets))


class BinaryCrossEntropy(_BufferedLoss):
    """Per-class sigmoid binary cross-entropy against one-hot targets."""

    def __init__(self, pos_weight: Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        pos_weight = self._buffer("pos_weight", logits)
        return F.binary_cross_entropy_with_logits(
            logits, one_hot_like(logits, targets), pos_weight=pos_weight
        )


class SmoothL1(nn.Module):
    """Smooth L1 (Huber-like) distance to one-hot targets (classification) or the values."""

    def __init__(self, beta: float = 1.0, regression: bool = False):
        super().__init__()
        self.beta, self.regression = beta, regression

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        if self.regression:
            return self.distance(logits.squeeze(-1), targets.float())
        return self.distance(logits, one_hot_like(logits, targets))

    def distance(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.smooth_l1_loss(outputs, targets, beta=self.beta)


class Huber(SmoothL1):
    """Huber loss: squared within `beta` (Huber's delta) of the target, linear beyond — smooth
    L1 scaled by delta, so large errors pull with the same force whatever delta is."""

    def distance(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.huber_loss(outputs, targets, delta=self.beta)


CLASSIFYING = ("classification", "seq2seq")
SCORING = ("classification", "regression")  # one-hot targets, or the values themselves


def _needs_task(loss: str, task: str) -> None:
    """At build time (a table's task detected from its data): the loss must fit it."""
    message = loss_misfit(loss, task)
    if message:
        raise UserError(f"loss.name: {message}")


@LOSSES.register(tasks=("classification", "regression", "seq2seq"))
def auto(
    num_classes: int, class_counts: Tensor | None = None, task: str = "classification"
) -> nn.Module:
    """The task's own loss, chosen once the task is known: cross_entropy for classification
    and seq2seq, mse for regression (the default)."""
    return LOSSES.build(
        {"name": TASK_LOSSES[task]}, num_classes=num_classes, class_counts=class_counts, task=task
    )


@LOSSES.register(tasks=CLASSIFYING)
def cross_entropy(
    num_classes: int,
    class_counts: Tensor | None = None,
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    class_weights: ClassWeights = None,
    task: str = "classification",
) -> nn.Module:
    """Softmax cross-entropy; optional label smoothing and class weights (list or 'balanced')."""
    _needs_task("cross_entropy", task)
    weight = class_weight_tensor(class_weights, num_classes, class_counts)
    return CrossEntropy(weight, label_smoothing, PAD_ID if task == "seq2seq" else -100)


@LOSSES.register(tasks=CLASSIFYING)
def nll(
    num_classes: int,
    class_counts: Tensor | None = None,
    class_weights: ClassWeights = None,
    task: str = "classification",
) -> nn.Module:
    """Negative log-likelihood of log_softmax(logits); optional class weights."""
    _needs_task("nll", task)
    weight = class_weight_tensor(class_weights, num_classes, class_counts)
    return NegativeLogLikelihood(weight, PAD_ID if task == "seq2seq" else -100)


@LOSSES.register(tasks=SCORING)
def mse(task: str = "classification") -> nn.Module:
    """Mean squared error: to the target values (regression) or one-hot targets (raw logits)."""
    _needs_task("mse", task)
    return MeanSquaredError(regression=task == "regression")


@LOSSES.register(tasks=("classification",))
def bce_with_logits(
    num_classes: int,
    pos_weight: Annotated[float, Field(gt=0)] | None = None,
    task: str = "classification",
) -> nn.Module:
    """Sigmoid binary cross-entropy per class against one-hot targets; optional pos_weight."""
    _needs_task("bce_with_logits", task)
    # pos_weight > 1 counters the C-1 negatives each sample brings against its one positive.
    weight = None if pos_weight is None else torch.full((num_classes,), float(pos_weight))
    return BinaryCrossEntropy(weight)


@LOSSES.register(tasks=SCORING)
def smooth_l1(beta: Annotated[float, Field(gt=0)] = 1.0, task: str = "classification") -> nn.Module:
    """Smooth L1 loss to the target values (regression) or one-hot targets (raw logits)."""
    _needs_task("smooth_l1", task)
    return SmoothL1(beta, regression=task == "regression")


@LOSSES.register(tasks=SCORING)
def huber(delta: Annotated[float, Field(gt=0)] = 1.0, task: str = "classification") -> nn.Module:
    """Huber loss to the target values (regression; with dltrain's standardised targets, delta
    is in standard deviations) or one-hot targets (raw logits)."""
    _needs_task("huber", task)
    return Huber(delta, regression=task == "regression")
