"""What a person sees while training, when nobody is watching a terminal: a batch job's log
gets a plain timestamped line with the ETA every `--log-every` seconds."""

from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

import torch
from rich.console import Console

from dltrain.reporting.progress import LOG_EVERY_VARIABLE, Progress

from helpers.training import TABULAR, train

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  epoch 2/3  batch (\d+)/10 \((\d+)%\)  loss 0\.5000  "
    r"\S+ samples/s  epoch ends in \d:\d\d:\d\d  run ends in ~\d:\d\d:\d\d$"
)


def test_without_a_terminal_a_timestamped_line_with_the_eta_comes_every_few_seconds():
    log = io.StringIO()
    progress = Progress(Console(file=log, width=300), log_every=0.05)
    progress.epoch_start(2, 3, steps=10)
    for done in range(1, 11):
        time.sleep(0.02)
        progress.step(done, seen=32 * done, loss_sum=torch.tensor(0.5 * done), count=done)
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 5, lines  # about one per 0.05 s over 0.2 s: not one per step
    assert all(LINE.match(line) for line in lines), lines
    batches = [int(LINE.match(line).group(1)) for line in lines]
    assert batches == sorted(batches) and batches[0] >= 2


def test_log_every_comes_from_the_environment_for_every_process(monkeypatch):
    monkeypatch.setenv(LOG_EVERY_VARIABLE, "12.5")
    assert Progress(Console(file=io.StringIO())).log_every == 12.5
    monkeypatch.setenv(LOG_EVERY_VARIABLE, "soon")
    assert Progress(Console(file=io.StringIO())).log_every == 30.0


def test_a_fit_logged_to_a_file_shows_life_between_epoch_lines(tmp_path):
    log = io.StringIO()
    progress = Progress(Console(file=log, width=300), log_every=1e-6)
    train(tmp_path, TABULAR, "logged", "train.epochs=2", "data.batch_size=16", progress=progress)
    lines = log.getvalue().splitlines()
    timestamped = [line for line in lines if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert len(timestamped) >= 20  # 16 steps an epoch, a line each at this interval
    assert any("epoch 2/2" in line and "run ends in ~" in line for line in timestamped)


def _header(console: Console) -> list[str]:
    recipe = SimpleNamespace(
        name="table",
        model={"name": "mlp"},
        data=SimpleNamespace(name="csv", batch_size=1024, global_batch_size=None),
        loss={"name": "auto"},
    )
    data = SimpleNamespace(
        splits={"train": range(11_700), "val": range(1_300)},
        task="classification",
        num_classes=3,
        extra={},
    )
    Progress(console).start(recipe, "cpu", "fp32", "resident", torch.nn.Linear(2, 3), data)
    return re.sub(r"\x1b\[[0-9;]*m", "", console.file.getvalue()).splitlines()  # no styles


def test_the_header_folds_at_words_on_a_terminal_and_stays_one_line_in_a_log():
    screen = _header(Console(file=io.StringIO(), force_terminal=True, width=60))
    logged = _header(Console(file=io.StringIO(), width=60))
    assert len(logged) == 1 and "· batch 1024 · device cpu ·" in logged[0]  # grep finds it whole
    assert len(screen) > 1 and all(len(line) <= 60 for line in screen)
    assert " ".join(line.strip() for line in screen) == logged[0]  # no word cut in two
