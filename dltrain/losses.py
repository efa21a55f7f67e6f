"""Classification losses, registered in LOSSES.

Every factory returns an nn.Module called as `loss(logits, targets)` with logits B×C (any float
dtype) and targets B int64 class indices; it returns a scalar tensor (the batch mean). Losses
that compare against one-hot vectors build them inside with `scatter_`, on the logits' device,
so a step never waits for the host. Losses are computed in float32 (as autocast would) because
log-softmax and squared errors lose too much precision in half types.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from dltrain.errors import UserError
from dltrain.registry import LOSSES

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


class CrossEntropy(_BufferedLoss):
    """Softmax cross-entropy with optional label smoothing and class weights."""

    def __init__(self, weight: Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = self._buffer("weight", logits)
        return F.cross_entropy(
            logits.float(), targets, weight=weight, label_smoothing=self.label_smoothing
        )


class NegativeLogLikelihood(_BufferedLoss):
    """Negative log-likelihood of log_softmax(logits), with optional class weights."""

    def __init__(self, weight: Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = self._buffer("weight", logits)
        return F.nll_loss(F.log_softmax(logits.float(), dim=1), targets, weight=weight)


class MeanSquaredError(nn.Module):
    """Mean squared error between raw logits and one-hot targets."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
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
    """Smooth L1 (Huber-like) distance between raw logits and one-hot targets."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        return F.smooth_l1_loss(logits, one_hot_like(logits, targets), beta=self.beta)


@LOSSES.register()
def cross_entropy(
    num_classes: int,
    class_counts: Tensor | None = None,
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    class_weights: ClassWeights = None,
) -> nn.Module:
    """Softmax cross-entropy; optional label smoothing and class weights (list or 'balanced')."""
    weight = class_weight_tensor(class_weights, num_classes, class_counts)
    return CrossEntropy(weight, label_smoothing)


@LOSSES.register()
def nll(
    num_classes: int,
    class_counts: Tensor | None = None,
    class_weights: ClassWeights = None,
) -> nn.Module:
    """Negative log-likelihood of log_softmax(logits); optional class weights."""
    return NegativeLogLikelihood(class_weight_tensor(class_weights, num_classes, class_counts))


@LOSSES.register()
def mse() -> nn.Module:
    """Mean squared error between the raw logits (no softmax) and one-hot targets."""
    return MeanSquaredError()


@LOSSES.register()
def bce_with_logits(
    num_classes: int, pos_weight: Annotated[float, Field(gt=0)] | None = None
) -> nn.Module:
    """Sigmoid binary cross-entropy per class against one-hot targets; optional pos_weight."""
    # pos_weight > 1 counters the C-1 negatives each sample brings against its one positive.
    weight = None if pos_weight is None else torch.full((num_classes,), float(pos_weight))
    return BinaryCrossEntropy(weight)


@LOSSES.register()
def smooth_l1(beta: Annotated[float, Field(gt=0)] = 1.0) -> nn.Module:
    """Smooth L1 loss between the raw logits (no softmax) and one-hot targets."""
    return SmoothL1(beta)
