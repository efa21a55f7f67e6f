"""Threads: dltrain with `train.threads: auto` against a hand-written loop with torch's default
thread count (one per core) and with its best count, on a quiet machine and under a load the
bench makes itself (one CPU-burning process per usable core, stopped before it exits).

Cases (issue 24): the seed recipe's CNN at batch 4 (CIFAR-shaped synthetic images), a table
MLP 26→256→128→2 at batch 64, and a small LSTM (the adding problem, 50 steps, hidden 64) at
batch 32. The hand-written loop trains the same model (dltrain's factory) on the same resident
tensors, in a shuffled order, with Adam: torch's default Adam (a per-parameter loop on the
CPU) at torch's default thread count and at 1 thread — the plain loop —, and the same two with
`fused=True`, the one-kernel update dltrain uses by default, so that the engine's own per-step
work shows apart from the kernel choice. dltrain trains the recipe with
`dltrain.training.loop.fit` and its figure is the median of metrics.csv's `samples_per_s` over
the epochs after the first. Rounds alternate the variants within the same minute; figures are
medians over rounds. Every variant runs with dltrain's CPU process settings (denormals flushed,
freed memory kept: dltrain.system.host).

    .venv/bin/python bench/threads.py            # JSON: bench/results/threads.json
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dltrain.config.schema import Recipe, resolve  # noqa: E402
from dltrain.reporting.progress import Progress  # noqa: E402
from dltrain.runs.folder import RunFolder  # noqa: E402
from dltrain.runs.metrics_csv import read_metrics  # noqa: E402
from dltrain.system.host import tune_for_training, usable_cores  # noqa: E402
from dltrain.training.build import build_setup  # noqa: E402
from dltrain.training.loop import fit  # noqa: E402

CASES = {
    "seed_cnn_b4": {
        "data": {"name": "synthetic", "shape": [3, 32, 32], "num_classes": 10,
                 "train_size": 800, "batch_size": 4},
        "model": {"name": "seed_cnn"},
    },
    "table_mlp_b64": {
        "data": {"name": "synthetic", "shape": [26], "num_classes": 2, "train_size": 12800,
                 "batch_size": 64},
        "model": {"name": "mlp", "hidden": [256, 128]},
    },
    "lstm_b32": {
        "data": {"name": "adding", "length": 50, "train_size": 3200, "batch_size": 32},
        "model": {"name": "lstm", "hidden_size": 64},
    },
}  # fmt: skip
ROUNDS = 2
EPOCHS = 3


def recipe_for(case: str, folder: Path, threads: str | int = "auto") -> Recipe:
    spec = CASES[case]
    return resolve(
        {
            "name": case, "output": str(folder), "device": "cpu", "seed": 0,
            "data": {**spec["data"], "val_split": 0, "test_size": 64},
            "model": spec["model"], "optimizer": {"name": "adam", "lr": 0.001},
            "train": {"epochs": EPOCHS, "threads": threads},
        }
    )  # fmt: skip


def hand_loop(case: str, folder: Path, threads: int, steps: int, fused: bool = False) -> float:
    """Samples/s of a plain loop: the model from dltrain's factory, the resident training
    tensors drawn in a shuffled order (as any SGD loop must), Adam — torch's default
    per-parameter kernel, or with `fused` the one-kernel update dltrain uses on the CPU —, the
    loss the recipe's task trains with."""
    torch.set_num_threads(threads)
    setup = build_setup(recipe_for(case, folder, threads))
    model, split = setup.model.train(), setup.data.splits["train"]
    x, y = split.x, split.y
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, fused=fused or None)
    batch = setup.recipe.data.batch_size
    regression = setup.data.task == "regression"
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))

    def step(i: int) -> None:
        at = (i * batch) % (len(x) - batch)
        index = order[at : at + batch]
        out = model(x.index_select(0, index))
        target = y.index_select(0, index)
        loss = (
            torch.nn.functional.mse_loss(out.squeeze(-1), target.float())
            if regression
            else torch.nn.functional.cross_entropy(out, target)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(10):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch / (time.perf_counter() - start)


def dltrain_rate(case: str, folder: Path) -> tuple[float, dict]:
    """Median samples/s of dltrain's epochs after the first, and its thread choice."""
    folder = Path(tempfile.mkdtemp(dir=folder))  # a fresh run folder for every fit
    recipe = recipe_for(case, folder)
    run = RunFolder(folder / case)
    fit(recipe, run, Progress(Console(file=io.StringIO()), quiet=True))
    rates = [row["samples_per_s"] for row in read_metrics(run.metrics_path)][1:]
    events = [json.loads(line) for line in (run.root / "events.jsonl").read_text().splitlines()]
    start = next(event for event in events if event["event"] == "start")
    choice = {k: start.get(k) for k in ("threads", "threads_chosen", "step_ms_by_threads")}
    return statistics.median(rates), choice


def _burn() -> None:
    while True:
        pass


class Load:
    """One CPU-burning process per usable core while the block runs."""

    def __enter__(self):
        self.procs = [
            multiprocessing.Process(target=_burn, daemon=True) for _ in range(usable_cores())
        ]
        for p in self.procs:
            p.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join()


STEPS = {"seed_cnn_b4": 300, "table_mlp_b64": 300, "lstm_b32": 60}


HAND_VARIANTS = {  # name: (threads: None = torch's default, one per core; fused Adam)
    "hand_default": (None, False),
    "hand_1": (1, False),
    "hand_default_fused": (None, True),
    "hand_1_fused": (1, True),
}


def measure(case: str, folder: Path) -> dict:
    cores = usable_cores()
    rows: dict[str, list] = {name: [] for name in HAND_VARIANTS} | {"dltrain_auto": []}
    choices = []
    for _ in range(ROUNDS):
        for name, (threads, fused) in HAND_VARIANTS.items():
            rows[name].append(hand_loop(case, folder, threads or cores, STEPS[case], fused))
        rate, choice = dltrain_rate(case, folder)
        rows["dltrain_auto"].append(rate)
        choices.append(choice)
    result = {k: statistics.median(v) for k, v in rows.items()}
    best = max(result["hand_default"], result["hand_1"])
    best_fused = max(result["hand_default_fused"], result["hand_1_fused"])
    dltrain = result["dltrain_auto"]
    result |= {
        "hand_best": best,
        "hand_best_fused": best_fused,
        "vs_hand_default": dltrain / result["hand_default"],
        "vs_hand_best": dltrain / best,
        "vs_hand_best_fused": dltrain / best_fused,
        "choices": choices,
        "samples": rows,
    }
    return result


def main() -> None:
    os.environ.pop("OMP_NUM_THREADS", None)
    tune_for_training(torch.device("cpu"), cudnn_benchmark=False, tf32=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for condition in ("quiet", "loaded"):
            results[condition] = {}
            for case in CASES:
                if condition == "loaded":
                    with Load():
                        results[condition][case] = measure(case, folder)
                else:
                    results[condition][case] = measure(case, folder)
                r = results[condition][case]
                print(
                    f"{condition:6} {case:14} hand(default {usable_cores()}) "
                    f"{r['hand_default']:9.0f}  hand(1) {r['hand_1']:9.0f}  hand fused best "
                    f"{r['hand_best_fused']:9.0f}  dltrain(auto) {r['dltrain_auto']:9.0f}  "
                    f"×default {r['vs_hand_default']:.2f}  ×best {r['vs_hand_best']:.2f}  "
                    f"×fused best {r['vs_hand_best_fused']:.2f}  "
                    f"picked {[c['threads'] for c in r['choices']]}",
                    flush=True,
                )
    out = Path(os.environ.get("BENCH_JSON", "bench/results/threads.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cores": usable_cores(), "cpu": platform.processor(), "torch": torch.__version__}
    out.write_text(json.dumps({**meta, "results": results}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
