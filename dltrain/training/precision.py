"""Numerics of the update: autocast dtype, gradient scaling, clipping."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(mode: str, device: torch.device) -> str:
    """`auto` → bf16 on GPUs that support it, else fp16 on CUDA; fp32 elsewhere."""
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class MixedPrecision:
    """Autocast plus a GradScaler when (and only when) training in fp16."""

    def __init__(self, mode: str, device: torch.device):
        self.name = resolve_precision(mode, device)
        self.device = device
        self.dtype = DTYPES[self.name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's context: autocast to the training dtype, or nothing for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params, grad_clip: float | None) -> None:
        """Unscale, clip (if asked), step and update the scale; all without a host sync."""
        if grad_clip is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        self.scaler.step(optimizer)
        self.scaler.update()
