"""`python bench/speedrun.py RECIPE [--seeds 5] [--data PATH] [KEY=VALUE ...]`: time to accuracy.

Made for recipes/cifar10_speedrun.yaml (CIFAR-10 from the JPEG folder, 45,000 train / 5,000 val,
the final report on val with TTA), measured the way the public CIFAR-10 speed records are: in
one process, a warm-up fit first (seed 1000, the same recipe: torch.compile, cuDNN autotuning and
the decoded-image cache are warm after it; its time is reported apart as "warm-up/compile"),
then N timed fits with seeds 0..N-1, each `dltrain.training.loop.fit` on the recipe with `seed=K`
(the same as `dltrain fit RECIPE seed=K`, less the CLI's run-folder checks; the run folders go to a
temporary folder).

What a fit's time covers. The clock starts when the engine opens the first epoch
(`Progress.epoch_start`) and stops when the final evaluation is done, before the report is
written:
  timed    every epoch: the training steps, the per-epoch validation, metrics.csv and the
           checkpoint writes (last.pt every epoch, best.pt when the monitor improves), loading
           the final weights, and the final evaluation (with the recipe's eval.tta views)
  not      building the setup (reading/decoding the images, the upload to the device, building
           the model), and writing report.json/.md and the plots
On CUDA the device is synchronised before each clock read. The clock stops at
`Progress.evaluated`, which the engine calls when the final evaluation is done, before the report
files are written.

Prints each fit and a summary; writes JSON (--json, default bench/results/speedrun.json, after
every fit, so a run cut short keeps what it measured): per seed the report's accuracy and split,
seconds (timed), its parts, epochs and per-epoch rows; mean/std/min/max of accuracy and
seconds; how many seeds reached the --target accuracy (0.94); the warm-up; the machine.
Exit status: 0, 2 for a recipe or data problem (dltrain's message), 1 for anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from rich.console import Console  # noqa: E402

from dltrain.config.loading import load_recipe  # noqa: E402
from dltrain.errors import DltrainError  # noqa: E402
from dltrain.reporting.progress import Progress  # noqa: E402
from dltrain.runs.folder import RunFolder  # noqa: E402
from dltrain.system.host import usable_cores  # noqa: E402
from dltrain.training.loop import fit  # noqa: E402

TARGET = 0.94
WARMUP_SEED = 1000
DEFAULT_JSON = HERE / "results" / "speedrun.json"
TIMED = (
    "from the first epoch's start to the end of the final evaluation (with eval.tta): every "
    "epoch's training, per-epoch validation, metrics.csv and checkpoint writes, loading the "
    "final weights and the final evaluation; not building the setup (data decode and upload, "
    "model) nor writing the report and its plots. CUDA synchronised at each clock read."
)


class Stopwatch(Progress):
    """dltrain's display, plus the clock of a speed record read at the engine's hooks."""

    def __init__(self, console: Console, quiet: bool = False, tables: bool = False):
        super().__init__(console, quiet=quiet)
        self.tables = tables
        self.device: torch.device | None = None
        self.marks: dict[str, float] = {}
        self.rows: list[dict[str, Any]] = []
        self.data_path: str | None = None
        self.sizes: dict[str, int] = {}

    def mark(self, name: str) -> None:
        """The time of an event (its first occurrence), after the device has caught up."""
        if name in self.marks:
            return
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks[name] = time.perf_counter()

    def start(self, recipe, device, precision, loader, model, data, *args, **kwargs) -> None:
        self.device, self.data_path = device, loader
        self.sizes = {name: len(split) for name, split in data.splits.items()}
        super().start(recipe, device, precision, loader, model, data, *args, **kwargs)

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        self.mark("start")  # the first epoch's: the setup is built, training begins
        super().epoch_start(epoch, epochs, steps, done)

    def epoch_end(self, row: dict[str, Any], improved: bool) -> None:
        super().epoch_end(row, improved)
        self.rows.append(dict(row))

    def evaluating(self, split: str, size: int) -> None:
        # only the final report calls this (per-epoch validation does not)
        if "start" in self.marks:
            self.mark("final_evaluation")
        super().evaluating(split, size)

    def evaluated(self, report: dict[str, Any]) -> None:
        self.mark("evaluated")  # the final evaluation is done; the report files come next

    def report(self, report: dict[str, Any]) -> None:
        self.mark("report_written")
        if self.tables:  # else the harness's one line per fit says it
            super().report(report)

    def times(self) -> dict[str, Any]:
        """Seconds timed and their parts; where the clock stopped."""
        m = self.marks
        if "start" not in m:
            raise RuntimeError("the fit never started an epoch: nothing was timed")
        end = m.get("evaluated")
        if end is None:
            raise RuntimeError("the fit ended without its final evaluation")
        final = m.get("final_evaluation", end)
        written = m.get("report_written")
        return {
            "seconds": end - m["start"],
            "train_seconds": final - m["start"],
            "final_eval_seconds": end - final,
            "report_write_seconds": None if written is None else written - end,
        }


def raise_recompile_limit(limit: int = 64) -> None:
    """Each fit compiles new modules (train.compile) in this one process: never let dynamo fall
    back to eager in a later seed for hitting its per-function recompile limit (8)."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(limit, getattr(config, name)))
            return


def timed_fit(
    recipe_path: Path,
    overrides: Sequence[str],
    seed: int,
    name: str,
    workdir: Path,
    console: Console,
    quiet: bool,
    tables: bool = False,
) -> dict[str, Any]:
    """One fit of the recipe with this seed, timed as a record; its figures."""
    recipe = load_recipe(
        recipe_path, [*overrides, f"seed={seed}", f"name={name}", f"output={workdir}"]
    )
    run = RunFolder.for_recipe(recipe)
    watch = Stopwatch(console, quiet, tables)
    began = time.perf_counter()
    report = fit(recipe, run, watch)
    wall = time.perf_counter() - began
    if "accuracy" not in report:
        raise SystemExit(f"{recipe_path}: its report has no accuracy (task {report.get('task')})")
    times = watch.times()
    result = {
        "seed": seed,
        "split": report["split"],
        "accuracy": report["accuracy"],
        "samples": report.get("num_samples"),
        **times,
        "epochs": len(watch.rows),
        "best_epoch": report.get("epoch"),
        "setup_seconds": watch.marks["start"] - began,
        "fit_wall_seconds": wall,
        "device": str(watch.device),
        "data_path": watch.data_path,
        "split_sizes": watch.sizes,
        "history": [_history_row(row) for row in watch.rows],
    }
    del watch, report
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _history_row(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("epoch", "train_loss", "val_loss", "val_accuracy", "seconds", "samples_per_s")
    return {k: row.get(k) for k in keep}


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample; 0 for one value), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(runs: Sequence[dict[str, Any]], target: float) -> dict[str, Any]:
    """The timed fits' accuracy and seconds, and the share of seeds reaching `target`."""
    if not runs:
        return {"seeds": 0, "target": target}
    reached = sum(r["accuracy"] >= target for r in runs)
    return {
        "seeds": len(runs),
        "accuracy": spread([r["accuracy"] for r in runs]),
        "seconds": spread([r["seconds"] for r in runs]),
        "epochs": spread([r["epochs"] for r in runs]),
        "target": target,
        "reached_target": reached,
        "fraction_reaching_target": reached / len(runs),
    }


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(result: dict[str, Any], target: float) -> str:
    r = result
    mark = "reached" if r["accuracy"] >= target else "short of"
    return (
        f"{r['split']} accuracy {r['accuracy']:.4f} ({mark} {target}) in {r['seconds']:.2f} s: "
        f"{r['epochs']} epoch{'' if r['epochs'] == 1 else 's'} {r['train_seconds']:.2f} s + final "
        f"evaluation {r['final_eval_seconds']:.2f} s (setup {r['setup_seconds']:.1f} s, whole "
        f"fit {r['fit_wall_seconds']:.1f} s)"
    )


def summary_lines(document: dict[str, Any]) -> list[str]:
    s, lines = document["summary"], []
    warmup = document.get("warmup")
    if warmup:
        lines.append(
            f"warm-up/compile (seed {warmup['seed']}): {warmup['seconds']:.2f} s timed, "
            f"{warmup['fit_wall_seconds']:.1f} s whole fit (setup, data decode included)"
        )
    if s["seeds"]:
        a, t = s["accuracy"], s["seconds"]
        lines.append(
            f"{s['seeds']} seeds: accuracy {a['mean']:.4f} ± {a['std']:.4f} "
            f"(min {a['min']:.4f}, max {a['max']:.4f}); time {t['mean']:.2f} ± {t['std']:.2f} s "
            f"(min {t['min']:.2f}, max {t['max']:.2f}); {s['reached_target']}/{s['seeds']} "
            f"reached {s['target']} ({s['fraction_reaching_target']:.0%})"
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/speedrun.py",
        description="Time to accuracy of a recipe over seeds, as CIFAR-10 speed records time it.",
    )
    parser.add_argument("recipe", type=Path, help="the recipe (e.g. recipes/cifar10_speedrun.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--seeds", type=int, default=5, help="timed fits, seeds 0..N-1 (5)")
    parser.add_argument("--data", help="the image folder: sets data.path")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    parser.add_argument("--target", type=float, default=TARGET, help=f"accuracy ({TARGET})")
    parser.add_argument("--warmup-seed", type=int, default=WARMUP_SEED)
    parser.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True, help="the warm-up fit"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (torch's default)")
    parser.add_argument("--quiet", action="store_true", help="without dltrain's epoch lines")
    parser.add_argument("--tables", action="store_true", help="with each report's tables")
    args = parser.parse_intermixed_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    raise_recompile_limit()
    overrides = ([f"data.path={args.data}"] if args.data else []) + list(args.overrides)
    console = Console(force_terminal=False, width=120)  # dltrain's display as in a log
    try:
        base = load_recipe(args.recipe, overrides)  # a bad recipe fails now, not after warm-up
    except DltrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    document: dict[str, Any] = {
        "recipe": str(args.recipe),
        "overrides": overrides,
        "name": base.name,
        "timed": TIMED,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "warmup": None,
        "runs": [],
        "summary": summarise([], args.target),
    }

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

    m = document["machine"]
    print(
        f"{base.name}: {args.seeds} timed seeds after "
        f"{'a warm-up' if args.warmup else 'no warm-up'} · {m['gpu'] or m['cpu']} · "
        f"torch {m['torch']} · {m['cpu_count']} CPUs"
    )
    fits = ([("warm-up", args.warmup_seed)] if args.warmup else []) + [
        (f"seed {k}", k) for k in range(args.seeds)
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="dltrain-speedrun-") as tmp:
            for label, seed in fits:
                name = f"{base.name}-{'warmup' if label == 'warm-up' else 'seed'}{seed}"
                result = timed_fit(
                    args.recipe, overrides, seed, name, Path(tmp), console, args.quiet, args.tables
                )
                print(f"{label}: {describe(result, args.target)}", flush=True)
                if label == "warm-up":
                    document["warmup"] = result
                else:
                    document["runs"].append(result)
                    document["summary"] = summarise(document["runs"], args.target)
                save()
    except DltrainError as error:
        save()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print()
    for line in summary_lines(document):
        print(line)
    save()
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
