"""The training step never waits on the device: between display refreshes and finite checks, a
step reads nothing back to the host.

A host read of a device tensor (`.item()`, `if tensor:`, `float(t)`, `.cpu()`, boolean-mask
indexing...) makes the CPU wait until the GPU has finished everything queued so far; one per step
leaves the GPU idle while Python prepares the next step. dltrain reads the running loss only when
the display refreshes (progress.REFRESH_SECONDS), checks for NaN/inf only every
step_policy.FINITE_CHECK_SECONDS, and syncs once at the end of an epoch. These tests set both
intervals to infinity and watch the steps in between:

- everywhere (CPU): the Python-level reads are counted by patching torch.Tensor's methods, and
  what they (and C++ code) reduce to — `aten::_local_scalar_dense`, plus the ops whose output size
  depends on the data and so sync on CUDA — by a TorchDispatchMode; each step must count zero.
- on CUDA: the same steps under `torch.cuda.set_sync_debug_mode("error")`, which raises on any
  synchronising CUDA call.

`train.on_nonfinite: skip_step` reads the loss every step by design (documented); the default
`stop` is what is tested.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from rich.console import Console
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from dltrain.data.pipeline import BatchPipeline
from dltrain.reporting import progress
from dltrain.reporting.progress import Progress
from dltrain.runs.folder import RunFolder
from dltrain.training import build, loop, step_policy

from helpers.training import make_recipe, recipe

STEPS = 12
IMAGES = recipe(
    {
        "name": "synthetic",
        "shape": [3, 16, 16],
        "num_classes": 4,
        "train_size": 8 * STEPS,
        "test_size": 16,
        "val_split": 0.0,
        "batch_size": 8,
    },
    {"name": "seed_cnn"},
    epochs=1,
    device="cpu",
)
# Besides the defaults: every optional part of the step (L1, accumulation, clipping, autocast,
# NHWC, a per-step lr schedule, label smoothing, param groups, the weights' moving average).
EVERYTHING = (
    "optimizer={name: adamw, lr: 0.001, norms_and_biases: {lr_scale: 4, weight_decay: 0}}",
    "train.ema={decay: 0.9, every_steps: 2, warmup: true}",
    "data.augment=[hflip, {random_crop: {padding: 2, padding_mode: reflect}}]",
    "scheduler={name: cosine, warmup_epochs: 0.5}",
    "loss={name: cross_entropy, label_smoothing: 0.1}",
    "train.l1=0.00001",
    "train.accumulate=2",
    "train.grad_clip=1.0",
    "train.precision=bf16",
    "train.channels_last=true",
)

# Python-level reads of a tensor's value on the host.
PYTHON_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
# What reads reduce to in ATen, and ops whose output size depends on the data (a CUDA sync).
DISPATCH_READS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "equal",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
    }
)

# Indexing with a boolean mask: its size depends on the data (`x[x > 0]`, `x[mask] = 0`).
MASK_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def _has_mask(indices) -> bool:
    return isinstance(indices, list | tuple) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


class HostReads(TorchDispatchMode):
    """Tallies host reads per training step while open (see StepWindow)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = False
        self.current: Counter[str] = Counter()
        self.steps: list[Counter[str]] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    def host_resident(self, tensor) -> bool:
        # torch's non-fused optimizers keep `step` as a CPU scalar and read it with .item() —
        # on CUDA too, where it is a plain host read, not a device sync.
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.dim():
            return False
        steps = (
            state["step"]
            for optimizer in self.optimizers
            for state in optimizer.state.values()
            if isinstance(state.get("step"), torch.Tensor)
        )
        return any(tensor is step or tensor.data_ptr() == step.data_ptr() for step in steps)

    def read(self, name: str, tensor) -> None:
        if self.open and not self.host_resident(tensor):
            self.current[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in DISPATCH_READS and args:
            self.read(f"aten::{name}", args[0])
        elif name in MASK_INDEXING and len(args) > 1 and _has_mask(args[1]):
            # the kernel calls nonzero itself, below this mode: count the boolean index
            self.read(f"aten::{name} (boolean mask)", args[0])
        return func(*args, **(kwargs or {}))

    def start(self) -> None:
        self.open = True
        self.__enter__()

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = Counter()

    def stop(self) -> None:
        if self.open:
            self.open = False
            self.__exit__(None, None, None)


class StepWindow:
    """The training split's batches, calling hooks around the steps they feed.

    The engine's step for batch k runs between the k-th and the (k+1)-th resumption of the
    epoch's generator: `on_step_end` runs at each resumption after `first` (batch index), and
    `on_close` once the last step has ended — before the epoch's own end-of-epoch sync.
    """

    def __init__(self, batches, on_start, on_step_end, on_close, first: int = 0):
        self._batches = batches
        self.on_start, self.on_step_end, self.on_close, self.first = (
            on_start,
            on_step_end,
            on_close,
            first,
        )

    def __len__(self) -> int:
        return len(self._batches)

    def __getattr__(self, name: str):
        return getattr(self._batches, name)

    def epoch(self, epoch: int, start: int = 0) -> Iterator:
        try:
            for k, batch in enumerate(self._batches.epoch(epoch, start)):
                if k == self.first:
                    self.on_start()
                elif k > self.first:
                    self.on_step_end()
                yield batch
            self.on_step_end()
        finally:
            self.on_close()


def watch_training_steps(monkeypatch, on_start, on_step_end, on_close, first: int = 0) -> None:
    """No refresh, no finite check between steps; wrap the training split's batches."""
    monkeypatch.setattr(step_policy, "FINITE_CHECK_SECONDS", math.inf)
    monkeypatch.setattr(progress, "REFRESH_SECONDS", math.inf)
    make_batches = build.make_batches

    def wrapped(split, batch_size, device, *, shuffle, **kwargs):
        batches = make_batches(split, batch_size, device, shuffle=shuffle, **kwargs)
        if not shuffle:  # validation / test: not training steps
            return batches
        return StepWindow(batches, on_start, on_step_end, on_close, first)

    monkeypatch.setattr(build, "make_batches", wrapped)


def terminal_progress() -> Progress:
    """The live bar as in a terminal: its per-step hook runs (and must not read the loss)."""
    return Progress(Console(file=io.StringIO(), force_terminal=True, width=100))


def fit_counting_reads(tmp_path, monkeypatch, *overrides: str) -> list[Counter[str]]:
    """Fit one epoch on the CPU; the host reads of each training step."""
    reads = HostReads()
    for name in PYTHON_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            reads.read(_name, self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: (
            None
            if any(optimizer is o for o in reads.optimizers)
            else reads.optimizers.append(optimizer)
        )
    )
    watch_training_steps(monkeypatch, reads.start, reads.end_step, reads.stop)
    recipe = make_recipe(tmp_path, IMAGES, "no-sync", *overrides)
    try:
        loop.fit(recipe, RunFolder.for_recipe(recipe), terminal_progress())
    finally:
        hook.remove()
        reads.stop()
    return reads.steps


@pytest.mark.parametrize("overrides", [(), EVERYTHING], ids=["defaults", "everything"])
def test_training_steps_read_nothing_back(tmp_path, monkeypatch, overrides):
    steps = fit_counting_reads(tmp_path, monkeypatch, *overrides)
    assert len(steps) == STEPS
    assert all(not reads for reads in steps), [dict(r) for r in steps]


@pytest.mark.parametrize(
    "sync",
    [
        lambda x: x.sum().item(),
        lambda x: bool(x.sum() > 0),
        lambda x: x[x > 128].float().mean(),  # boolean-mask indexing: nonzero
        lambda x: x.float().mean().tolist(),
    ],
    ids=["item", "bool", "mask", "tolist"],
)
def test_a_host_read_in_the_step_is_caught(tmp_path, monkeypatch, sync):
    """The check above is not vacuous: one read per step (in the batch pipeline) is seen."""
    original = BatchPipeline.train

    def train_with_a_read(self, x):
        sync(x)
        return original(self, x)

    monkeypatch.setattr(BatchPipeline, "train", train_with_a_read)
    steps = fit_counting_reads(tmp_path, monkeypatch)
    assert len(steps) == STEPS
    assert all(sum(reads.values()) >= 1 for reads in steps), [dict(r) for r in steps]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("train.precision=fp16", "train.grad_clip=1.0"),
        # precision auto: bf16 where the GPU has it (EVERYTHING's bf16 fails on older GPUs)
        tuple(o for o in EVERYTHING if not o.startswith("train.precision")),
    ],
    ids=["defaults", "fp16-gradscaler-clip", "everything"],
)
def test_cuda_training_steps_do_not_synchronise(tmp_path, monkeypatch, overrides):
    """From the second step (after lazy CUDA/cuDNN initialisation) to the last, any
    synchronising CUDA call raises."""
    steps = []

    def errors_on_sync():
        torch.cuda.set_sync_debug_mode("error")

    def default_mode():
        torch.cuda.set_sync_debug_mode("default")

    watch_training_steps(
        monkeypatch, errors_on_sync, lambda: steps.append(1), default_mode, first=1
    )
    recipe = make_recipe(tmp_path, IMAGES, "no-sync-cuda", "device=cuda", *overrides)
    try:
        loop.fit(recipe, RunFolder.for_recipe(recipe), terminal_progress())
    finally:
        default_mode()
    assert len(steps) == STEPS - 1
