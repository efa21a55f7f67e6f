"""The reference training loops dltrain is measured against, written out in full.

Each takes the same uint8 N×3×32×32 images and int64 labels, builds the model with the same
factory dltrain uses, and returns samples/s measurements of training steps only.

- `handwritten`: what a careful PyTorch user writes for data that fits on the device: the data is
  resident there as uint8, each batch is a `randperm` gather scaled and normalised on the device,
  with dltrain's precision, channels_last and fused-optimizer choices. One sync per epoch.
  Optionally with the step's forward half behind torch.compile, as dltrain's `train.compile`.
- `tutorial`: the PyTorch CIFAR-10 tutorial's loop as published
  (https://pytorch.org/tutorials/beginner/blitz/cifar10_tutorial.html): a CIFAR10-style Dataset
  (PIL image → ToTensor → Normalize per sample), DataLoader(batch_size=4, shuffle=True,
  num_workers=2), SGD(lr=0.001, momentum=0.9), fp32, `running_loss += loss.item()` every step.
- `lightning`: PyTorch Lightning's Trainer over a worker DataLoader of the same uint8 data, the
  batch scaled and normalised on the device in `training_step`; None when Lightning is absent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


@dataclass(frozen=True)
class Settings:
    """The numerics dltrain picks for this device; every loop that can, uses the same."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    fused: bool  # fused Adam kernel (dltrain: on CUDA and the CPU)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


ModelFactory = Callable[[], nn.Module]


def sync(device: torch.device) -> None:
    """Wait for the device (timings must cover the work, not just its launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, scaled to [0, 1], shaped 1×C×1×1."""
    scaled = x.float().div_(255.0)
    mean = scaled.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = scaled.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
    return mean, std


# -- (b) the hand-written loop ------------------------------------------------------------------


class Handwritten:
    """The loop a careful PyTorch user writes; `epoch()` trains one epoch and returns samples/s.

    An epoch is timed as dltrain's engine times one: from the shuffle to the sync that reads the
    epoch's loss (the only sync). With `compile` (True/"default": torch's default mode; else the
    mode, e.g. "reduce-overhead") the step's forward half — scaling and normalisation, the model,
    the loss, the running loss sum — is one module behind torch.compile (`CompiledStep`), the
    scope dltrain's `train.compile` captures; the backward goes through the compiled graph's
    AOTAutograd half and the optimizer stays eager, as in dltrain.
    """

    def __init__(
        self,
        x_cpu: torch.Tensor,
        y_cpu: torch.Tensor,
        make_model: ModelFactory,
        batch_size: int,
        s: Settings,
        compile: bool | str = False,
    ):
        self.s, self.batch_size = s, batch_size
        device = s.device
        torch.manual_seed(0)
        memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
        self.model = make_model().to(device, memory_format=memory_format)
        fused = {"fused": True} if s.fused else {}
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, **fused)
        self.scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")
        self.x, self.y = x_cpu.to(device), y_cpu.to(device)
        self.mean, self.std = (t.to(device) for t in channel_stats(x_cpu))
        self.step = None
        if compile:
            mode = None if compile in (True, "default") else compile
            step = CompiledStep(self.model, self.mean, self.std, s)
            self.step = torch.compile(step, mode=mode)

    def epoch(self) -> float:
        if self.step is not None:
            return self._compiled_epoch()
        s, model, optimizer, scaler = self.s, self.model, self.optimizer, self.scaler
        x, y, batch_size, device = self.x, self.y, self.batch_size, s.device
        dtype = s.autocast_dtype
        steps = len(y) // batch_size  # drop_last, as dltrain's training split
        model.train()
        sync(device)
        started = time.perf_counter()
        order = torch.randperm(len(y), device=device)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps):
            index = order[i * batch_size : (i + 1) * batch_size]
            inputs = (x[index].float().div_(255.0) - self.mean) / self.std
            if s.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                loss = F.cross_entropy(model(inputs), y[index])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        loss_sum.item()  # the epoch's one sync: every step has finished on the device
        return steps * batch_size / (time.perf_counter() - started)

    def _compiled_epoch(self) -> float:
        step, optimizer, scaler = self.step, self.optimizer, self.scaler
        x, y, batch_size, device = self.x, self.y, self.batch_size, self.s.device
        steps = len(y) // batch_size
        step.train()
        sync(device)
        started = time.perf_counter()
        order = torch.randperm(len(y), device=device)
        step.loss_sum.zero_()
        for i in range(steps):
            index = order[i * batch_size : (i + 1) * batch_size]
            loss = step(x[index], y[index])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        step.loss_sum.item()  # the epoch's one sync
        return steps * batch_size / (time.perf_counter() - started)


class CompiledStep(nn.Module):
    """The hand-written step's forward half as one module, for torch.compile: uint8 batch →
    scaled, normalised (channels_last) input → model under autocast → loss, added to the
    `loss_sum` buffer (a buffer: a static input that CUDA graphs may update in place)."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, s: Settings):
        super().__init__()
        self.model, self.s = model, s
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("loss_sum", torch.zeros((), device=s.device))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s, dtype = self.s, self.s.autocast_dtype
        inputs = (x.float().div_(255.0) - self.mean) / self.std
        if s.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(s.device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
            loss = F.cross_entropy(self.model(inputs), y)
        self.loss_sum += loss.detach()
        return loss


# -- (c) the PyTorch CIFAR-10 tutorial, as published ---------------------------------------------


class TutorialCIFAR(Dataset):
    """torchvision's CIFAR10 __getitem__ over in-memory data: HWC uint8 → PIL → transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        import torchvision.transforms as transforms

        self.data = x.permute(0, 2, 3, 1).contiguous().numpy()  # CIFAR10.data is N×32×32×3
        self.targets = y.tolist()
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
        )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img, target = Image.fromarray(self.data[index]), self.targets[index]
        return self.transform(img), target


def _forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


class Tutorial:
    """The tutorial's loop, kept open so that it can run in windows between other work (its
    DataLoader's two workers stay alive, as in the tutorial's epoch); `run(n)` trains n batches
    and returns their samples/s. `close()` stops the workers."""

    def __init__(self, x_cpu: torch.Tensor, y_cpu: torch.Tensor, make_model: ModelFactory, device):
        torch.manual_seed(0)
        trainset = TutorialCIFAR(x_cpu, y_cpu)
        trainloader = DataLoader(trainset, batch_size=4, shuffle=True, num_workers=2)
        self.device = device
        self.net = make_model().to(device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.001, momentum=0.9)
        self.running_loss = 0.0
        self.batches = _forever(trainloader)

    def run(self, batches: int) -> float:
        net, criterion, optimizer, device = self.net, self.criterion, self.optimizer, self.device
        sync(device)
        started, seen = time.perf_counter(), 0
        for _ in range(batches):
            data = next(self.batches)
            # get the inputs; data is a list of [inputs, labels]
            inputs, labels = data[0].to(device), data[1].to(device)
            # zero the parameter gradients
            optimizer.zero_grad()
            # forward + backward + optimize
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            self.running_loss += loss.item()
            seen += len(labels)
        sync(device)
        return seen / (time.perf_counter() - started)

    def close(self) -> None:
        self.batches.close()  # ends the DataLoader iterator: its workers exit


def tutorial(
    x_cpu: torch.Tensor,
    y_cpu: torch.Tensor,
    make_model: ModelFactory,
    warmup: int,
    windows: int,
    window: int,
    device: torch.device,
) -> list[float]:
    """The tutorial's loop; samples/s of `windows` windows of `window` batches after `warmup`."""
    loop = Tutorial(x_cpu, y_cpu, make_model, device)
    try:
        loop.run(warmup)
        return [loop.run(window) for _ in range(windows)]
    finally:
        loop.close()


# -- (d) PyTorch Lightning ----------------------------------------------------------------------


def lightning_module():
    """The `lightning.pytorch` (or older `pytorch_lightning`) module, or None."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            return None
    return pl


def lightning(
    x_cpu: torch.Tensor,
    y_cpu: torch.Tensor,
    make_model: ModelFactory,
    batch_size: int,
    warmup: int,
    steps: int,
    s: Settings,
    workers: int,
) -> list[float] | None:
    """Lightning's Trainer for `warmup + steps` steps; samples/s of the last `steps` (or None)."""
    pl = lightning_module()
    if pl is None:
        return None
    device = s.device
    torch.manual_seed(0)
    mean, std = channel_stats(x_cpu)

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model()
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def training_step(self, batch, batch_idx):
            x, y = batch
            x = (x.float().div_(255.0) - self.mean) / self.std
            if s.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            kwargs = {"fused": True} if s.fused else {}
            return torch.optim.Adam(self.parameters(), lr=1e-3, **kwargs)

    class Timer(pl.Callback):
        def __init__(self):
            self.started, self.ended = None, None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == warmup:
                sync(device)
                self.started = time.perf_counter()
            elif trainer.global_step == warmup + steps:
                sync(device)
                self.ended = time.perf_counter()

    module = Classifier()
    if s.channels_last:
        module = module.to(memory_format=torch.channels_last)
    loader = DataLoader(
        TensorDataset(x_cpu, y_cpu),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    timer = Timer()
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision={"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[s.precision],
        max_steps=warmup + steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    if timer.started is None or timer.ended is None:
        return None
    return [steps * batch_size / (timer.ended - timer.started)]
