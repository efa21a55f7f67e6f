"""Shared helpers for tests that train tiny runs in-process: the base recipes (DIGITS, TABULAR)
and the builder of others (`recipe`), `train` and what reads a run back. A run trained once and
shared by a module's tests comes from the `trained_run` fixture in tests/conftest.py."""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from rich.console import Console

from dltrain.config.loading import resolve_with_context
from dltrain.config.schema import Recipe
from dltrain.reporting.progress import Progress
from dltrain.runs.folder import RunFolder
from dltrain.training.loop import fit

from helpers.cli import QUICKSTART

TIMING_COLUMNS = {"seconds", "samples_per_s"}


def recipe(
    data: dict,
    model: dict,
    *,
    epochs: int,
    optimizer: str | dict = "adam",
    lr: float | None = None,
    **sections,
) -> dict:
    """A base recipe for `train`: seed 0, the data and model sections, the optimizer (a name,
    with `lr` when given, or a whole section), `epochs` epochs, and any other sections given
    (loss=..., device=..., seed=...)."""
    if isinstance(optimizer, str):
        optimizer = {"name": optimizer, **({} if lr is None else {"lr": lr})}
    return {
        "seed": 0,
        "data": data,
        "model": model,
        "optimizer": optimizer,
        "train": {"epochs": epochs},
        **sections,
    }


def quickstart_recipe() -> dict:
    """recipes/quickstart.yaml as a base recipe (digits, seed_cnn)."""
    return yaml.safe_load(QUICKSTART.read_text())


# Digits with everything that draws random numbers during training: dropout, augmentations.
DIGITS = recipe(
    {
        "name": "digits",
        "batch_size": 64,
        "val_split": 0.1,
        "augment": ["hflip", {"random_crop": {"padding": 1}}],
    },
    {"name": "seed_cnn", "dropout": 0.3},
    epochs=2,
    optimizer="adamw",
    lr=0.003,
    seed=3,
    device="cpu",
    scheduler=None,
)

# Linearly separable-ish rows for an MLP without batch norm (exact accumulation maths).
TABULAR = recipe(
    {
        "name": "synthetic",
        "shape": [8],
        "num_classes": 4,
        "train_size": 256,
        "test_size": 128,
        "val_split": 0,
    },
    {"name": "mlp", "hidden": [32]},
    epochs=2,
    optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
    device="cpu",
)

# A transformer_seq2seq small enough to learn to reverse short digit strings in seconds.
TINY_SEQ2SEQ = {
    "name": "transformer_seq2seq",
    "d_model": 32,
    "heads": 2,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "feedforward": 64,
    "dropout": 0.0,
}


def make_recipe(tmp_path: Path, base: dict, name: str, *overrides: str) -> Recipe:
    raw = {**base, "name": name, "output": str(tmp_path)}
    return resolve_with_context(raw, list(overrides), "test recipe")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block. These runs are tiny: with two threads on a
    2-core machine that is also busy with other work, OpenMP's spin-waiting turns 0.05 s epochs
    into seconds; one thread is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quiet() -> Progress:
    return Progress(Console(file=io.StringIO(), width=120))


def train(tmp_path, base, name, *overrides, resume=None, progress=None):
    """Fit a recipe into tmp_path/name; returns (run folder, report)."""
    recipe = make_recipe(tmp_path, base, name, *overrides)
    run = RunFolder.for_recipe(recipe)
    report = fit(recipe, run, progress or quiet(), resume=resume)
    return run, report


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metric_rows(run: RunFolder, drop=TIMING_COLUMNS) -> list[dict[str, str]]:
    with open(run.metrics_path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def model_outputs(checkpoint_path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's model, rebuilt from it alone, on a whole split: (outputs, targets)."""
    from dltrain.runs.checkpoint import load_checkpoint
    from dltrain.training.build import build_setup

    checkpoint = load_checkpoint(checkpoint_path)
    setup = build_setup(Recipe.model_validate(checkpoint["recipe"]), meta=checkpoint["data_meta"])
    setup.model.load_state_dict(checkpoint["model"])
    setup.model.eval()
    data = setup.data.splits[split]
    with torch.no_grad():
        return setup.model(setup.pipeline.eval(data.x)), data.y


def mid_epoch_saves(tmp_path: Path, base: dict, *overrides: str) -> list[tuple[int, bytes]]:
    """Train a probe run and keep each mid-epoch last.pt as written: (its batch, its bytes)."""
    saved = []
    real_save = RunFolder.save_last

    def remember(self, state):
        real_save(self, state)
        if state["train_state"]["batch"]:  # a mid-epoch save
            saved.append((state["train_state"]["batch"], self.last_path.read_bytes()))

    RunFolder.save_last = remember
    try:
        train(tmp_path, base, "probe", *overrides)
    finally:
        RunFolder.save_last = real_save
    return saved


def assert_resumes_bitwise(invoke, recipe: str, halt_after: int, uninterrupted: Path) -> None:
    """`dltrain fit RECIPE` stopped after `halt_after` epochs, then resumed from its last.pt to
    the recipe's own end, ends with the weights of the `uninterrupted` run's last.pt (the same
    recipe under another name). Runs in the working folder (the `invoke` fixture's tmp_path)."""
    halted = invoke("fit", recipe, "-q", f"train.epochs={halt_after}")
    assert halted.exit_code == 0, halted.output
    last = Path("runs") / Path(recipe).stem / "checkpoints" / "last.pt"
    resumed = invoke("fit", recipe, "-q", "--resume", str(last))
    assert resumed.exit_code == 0, resumed.output
    assert_same_tensors(weights(uninterrupted), weights(last))
