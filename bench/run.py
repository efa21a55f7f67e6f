"""`make bench` / `python bench/run.py`: samples/s of dltrain's engine against reference loops.

In one process, on the same synthetic CIFAR-10-shaped data (uint8 3×32×32, 10 classes), for the
models `seed_cnn` and `resnet18` (CIFAR form):

  dltrain      dltrain.training.loop.fit on a resolved recipe (data.name=synthetic, adam,
               no scheduler, no validation split), with the live progress bar drawn as in a
               terminal. Each epoch is timed by the loop itself (metrics.csv `samples_per_s`:
               the epoch's training loop, from its shuffle to the sync that reads its loss).
  handwritten  a plain loop written here (bench/loops.py): the same resident uint8 data,
               randperm, on-device scaling/normalisation, model, Adam, precision, channels_last
               and fused choices; timed exactly like the engine times an epoch.
  tutorial     the PyTorch CIFAR-10 tutorial's loop as published (batch 4, 2 workers, SGD),
               over a fixed number of batches after a warm-up.
  lightning    Lightning's Trainer over a worker DataLoader, when `lightning` or
               `pytorch_lightning` is importable (null otherwise).

Two more comparisons (issue 15), in the same process, after those:

  seed_recipe_b4  the seed recipe as shipped (recipes/cifar10_seed_cnn.yaml: seed_cnn, batch 4,
               Adam lr 1e-3, its normalisation and loader choice, precision auto) fitted by dltrain
               on the same synthetic data (data.name=synthetic, val_split 0: no per-epoch
               validation) against the tutorial's loop at batch 4, alternating epoch by epoch: after
               each dltrain epoch its display hook runs as many tutorial batches as the epoch had.
  compiled     seed_cnn with `train.compile` set to a torch.compile mode (reduce-overhead: CUDA
               graphs; default) against the hand-written loop with the same scope behind
               torch.compile(mode=...): the step's forward half (scaling/normalisation, model,
               loss, running loss sum) as one module, Adam eager; alternating as above. The
               first epoch of each (the compilation) is reported apart. Skipped (null, with the
               reason) on the CPU at BENCH_SCALE=small unless BENCH_COMPILE=1: compiling on 2
               cores takes minutes.

dltrain and handwritten alternate epoch by epoch in one process: after each epoch of the fit,
its display hook (outside the engine's timing) runs one hand-written epoch. Each fit (a "round",
fresh models for both) drops its first epoch of each as warm-up; a figure is the median over the
kept epochs, and `paired_ratio` the median of dltrain/handwritten over adjacent epoch pairs (the
steadier comparison on a shared machine). Both loops use the same torch thread count.

Environment:
  BENCH_SCALE    small (CPU-sized: 1-2 minutes on 2 cores) | full (batch 512, CIFAR-sized
                 epochs; the default when CUDA is available)
  BENCH_JSON     where to write the results (default bench/results/latest.json)
  BENCH_THREADS  torch intra-op threads for every variant (default: 1 on CPU — steady figures on
                 a shared machine —, torch's default on CUDA)
  BENCH_DEVICE   cpu | cuda (default: cuda when available)
  BENCH_CASES    comma-separated subset of: seed_cnn,resnet18,seed_recipe_b4,compiled
                 (default: all of them)
  BENCH_COMPILE  0: skip the compiled rows · 1: run them on the CPU at BENCH_SCALE=small too
                 (default: run them on CUDA and at BENCH_SCALE=full)
  BENCH_COMPILE_MODES  comma-separated torch.compile modes for the compiled rows
                 (default: reduce-overhead,default)
  BENCH_BAR      0: run dltrain without its live progress bar (as in a pipe or with -q)
  BENCH_MALLOC   keep (default): on Linux/glibc, serve allocations up to 32 MiB from the heap and
                 never trim it, for every variant. With glibc's defaults, freed activations go
                 back to the OS at random points and each step then page-faults them in again
                 (tens of thousands of faults per epoch, 10-20% slower), which makes CPU
                 figures bimodal; `default` leaves malloc as it is.
"""

from __future__ import annotations

import csv
import datetime
import functools
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from loops import (  # noqa: E402
    Handwritten,
    Settings,
    Tutorial,
    lightning,
    lightning_module,
    tutorial,
)
from rich.console import Console  # noqa: E402

from dltrain.config.loading import load_recipe, resolve_with_context  # noqa: E402
from dltrain.config.schema import Recipe  # noqa: E402
from dltrain.data.loaders import default_workers  # noqa: E402
from dltrain.data.synthetic import synthetic  # noqa: E402
from dltrain.models.cnn import seed_cnn  # noqa: E402
from dltrain.models.resnet import resnet18  # noqa: E402
from dltrain.optim import fused_kwargs  # noqa: E402
from dltrain.reporting.progress import Progress  # noqa: E402
from dltrain.runs.folder import RunFolder  # noqa: E402
from dltrain.system import host  # noqa: E402
from dltrain.training.build import use_channels_last  # noqa: E402
from dltrain.training.loop import fit  # noqa: E402
from dltrain.training.precision import resolve_precision  # noqa: E402

MODELS = {"seed_cnn": seed_cnn, "resnet18": resnet18}
EXTRA_ROWS = ("seed_recipe_b4", "compiled")  # BENCH_CASES names beyond the models
SEED_RECIPE = HERE.parent / "recipes" / "cifar10_seed_cnn.yaml"
COMPILE_MODES = ("reduce-overhead", "default")
BAR = os.environ.get("BENCH_BAR", "1") != "0"
SHAPE, CLASSES = (3, 32, 32), 10


@dataclass(frozen=True)
class Case:
    """How long to measure one model at one scale."""

    batch_size: int
    steps_per_epoch: int
    epochs: int  # per fit; the first is the warm-up
    rounds: int  # fits (each with fresh models)
    tutorial_warmup: int  # batches of 4
    tutorial_windows: int
    tutorial_window: int
    lightning_warmup: int  # steps
    lightning_steps: int

    @property
    def train_size(self) -> int:
        return self.batch_size * self.steps_per_epoch


SCALES = {
    # 2 CPU cores: 1-2 minutes in all. resnet18 trains at ~20 samples/s on one core: tiny epochs.
    "small": {
        "seed_cnn": Case(256, 12, 8, 2, 20, 5, 40, 3, 16),
        "resnet18": Case(32, 2, 4, 2, 3, 2, 6, 1, 2),
    },
    # GPU: CIFAR-10-sized epochs (98 × 512 = 50,176 samples).
    "full": {
        "seed_cnn": Case(512, 98, 8, 2, 50, 5, 200, 20, 200),
        "resnet18": Case(512, 98, 4, 2, 50, 5, 60, 20, 100),
    },
}


@dataclass(frozen=True)
class SeedRecipeCase:
    """The seed recipe (batch 4) against the tutorial's loop: how long to measure."""

    steps_per_epoch: int  # dltrain batches per epoch; the tutorial runs as many between epochs
    epochs: int  # the first is the warm-up of each
    tutorial_warmup: int  # batches before the first window (its workers start)


SEED_RECIPE_SCALES = {
    # 2 CPU cores: ~20 s (dltrain ~900, tutorial ~500 samples/s at batch 4, 1 thread)
    "small": SeedRecipeCase(200, 5, 20),
    # GPU: each step is a few kernel launches for 4 images; ~15 s
    "full": SeedRecipeCase(600, 5, 50),
}

# The compiled rows: seed_cnn at the scale's seed_cnn batch, one fit each; epoch 1 compiles.
COMPILE_EPOCHS = {"small": 4, "full": 6}


class _Sink(io.TextIOBase):
    """Where the progress bar draws: nowhere, but as fast as a terminal would let it."""

    def write(self, text: str) -> int:
        return len(text)


class Interleaved(Progress):
    """dltrain's own display, plus one hand-written epoch after each dltrain epoch.

    `epoch_end` runs after the engine has timed the epoch and written its checkpoint, so the
    hand-written epoch is outside dltrain's timing; alternating epochs in one process cancels
    most of the drift in a shared machine's speed.
    """

    def __init__(self, after_epoch, bar: bool = True):
        # The live bar as `dltrain fit` draws it in a terminal (its refreshes are a real cost);
        # without it, as in a pipe or CI log.
        super().__init__(Console(file=_Sink(), force_terminal=bar, width=120))
        self.after_epoch = after_epoch

    def epoch_end(self, row, improved) -> None:
        super().epoch_end(row, improved)
        self.after_epoch()


def dltrain_fit(
    case: str,
    c: Case,
    device: torch.device,
    workdir: Path,
    tag: str,
    progress,
    compile: bool | str = False,
) -> list[dict]:
    """`dltrain fit` in-process; each epoch's metrics.csv row (samples_per_s: as the engine
    timed the epoch)."""
    raw = {
        "name": f"{case}-{tag}",
        "seed": 0,
        "device": str(device),
        "output": str(workdir),
        "data": {
            "name": "synthetic",
            "train_size": c.train_size,
            "test_size": min(c.batch_size, 64),
            "val_split": 0,
            "batch_size": c.batch_size,
        },
        "model": {"name": case},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "scheduler": None,
        "train": {"epochs": c.epochs, "compile": compile},
    }
    return fit_rows(resolve_with_context(raw, [], "bench recipe"), progress)


def fit_rows(recipe: Recipe, progress) -> list[dict]:
    """Fit in-process; metrics.csv's rows (as floats where they are numbers)."""
    run = RunFolder.for_recipe(recipe)
    fit(recipe, run, progress)
    with open(run.metrics_path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text or None


def interleaved_rounds(
    case: str, c: Case, s: Settings, workdir: Path, x, y, compile: bool | str = False
) -> dict:
    """dltrain and the hand-written loop, epoch by epoch in `c.rounds` fits: the kept samples
    (first epoch of each fit dropped), the paired ratios and the first epochs' seconds."""

    def make_model():
        return MODELS[case](SHAPE, CLASSES)

    label = case if not compile else f"{case} compile={compile}"
    samples: dict[str, list[float]] = {"dltrain": [], "handwritten": []}
    ratios, first_seconds = [], {"dltrain": [], "handwritten": []}
    for r in range(c.rounds):
        hand, hand_rates = Handwritten(x, y, make_model, c.batch_size, s, compile), []
        progress = Interleaved(lambda h=hand, rates=hand_rates: rates.append(h.epoch()), BAR)
        rows = dltrain_fit(case, c, s.device, workdir, f"r{r}", progress, compile)
        dl_rates = [row["samples_per_s"] for row in rows]
        del hand
        _free(s.device)
        # the first epoch of each is the warm-up
        first_seconds["dltrain"].append(rows[0]["seconds"])
        first_seconds["handwritten"].append(c.train_size / hand_rates[0])
        samples["dltrain"] += dl_rates[1:]
        samples["handwritten"] += hand_rates[1:]
        ratios += [a / b for a, b in zip(dl_rates[1:], hand_rates[1:])]
        print(f"  {label} fit {r + 1}/{c.rounds}: dltrain     " + _fmt_rates(dl_rates[1:]))
        print(f"  {label} fit {r + 1}/{c.rounds}: handwritten " + _fmt_rates(hand_rates[1:]))
    return {"samples": samples, "ratios": ratios, "first_epoch_seconds": first_seconds}


def measure_case(case: str, c: Case, s: Settings, workdir: Path) -> dict:
    """All four variants for one model: medians in samples/s, paired ratio, every sample."""
    data = synthetic(seed=0, train_size=c.train_size, test_size=1).train
    x, y = data.x, data.y

    def make_model():
        return MODELS[case](SHAPE, CLASSES)

    rounds = interleaved_rounds(case, c, s, workdir, x, y)
    samples, ratios = rounds["samples"], rounds["ratios"]
    samples["tutorial"] = tutorial(
        x, y, make_model, c.tutorial_warmup, c.tutorial_windows, c.tutorial_window, s.device
    )
    print(f"  {case} tutorial    " + _fmt_rates(samples["tutorial"]))
    _free(s.device)
    samples["lightning"] = lightning(
        x, y, make_model, c.batch_size, c.lightning_warmup, c.lightning_steps, s, default_workers()
    )
    if samples["lightning"] is not None:
        print(f"  {case} lightning   " + _fmt_rates(samples["lightning"]))
    _free(s.device)
    medians = {k: (statistics.median(v) if v else None) for k, v in samples.items()}
    return {"medians": medians, "samples": samples, "paired_ratio": statistics.median(ratios)}


class DataPath(Interleaved):
    """Interleaved, also keeping the data path the fit chose (resident, workers...)."""

    data_path: str | None = None

    def start(self, recipe, device, precision, loader, model, data, *args, **kwargs) -> None:
        super().start(recipe, device, precision, loader, model, data, *args, **kwargs)
        self.data_path = loader


def measure_seed_recipe(c: SeedRecipeCase, s: Settings, workdir: Path) -> dict:
    """The seed recipe as shipped (batch 4) against the tutorial's loop at batch 4, alternating:
    after each dltrain epoch, the tutorial runs as many batches (outside dltrain's timing)."""
    shipped = load_recipe(SEED_RECIPE)
    batch = shipped.data.batch_size
    train_size = batch * c.steps_per_epoch
    data = synthetic(seed=0, train_size=train_size, test_size=1).train
    loop = Tutorial(data.x, data.y, lambda: seed_cnn(SHAPE, CLASSES), s.device)
    tutorial_rates: list[float] = []
    try:
        loop.run(c.tutorial_warmup)
        progress = DataPath(lambda: tutorial_rates.append(loop.run(c.steps_per_epoch)), BAR)
        recipe = load_recipe(
            SEED_RECIPE,
            [
                "name=seed_recipe_b4",
                f"output={workdir}",
                f"device={s.device}",
                "data.name=synthetic",  # in place of CIFAR-10 (its `root` is dropped)
                f"data.train_size={train_size}",
                "data.test_size=64",
                "data.val_split=0",
                f"train.epochs={c.epochs}",
            ],
        )
        rows = fit_rows(recipe, progress)
    finally:
        loop.close()
    _free(s.device)
    dl_rates = [row["samples_per_s"] for row in rows]
    kept = {"dltrain": dl_rates[1:], "tutorial": tutorial_rates[1:]}
    ratios = [a / b for a, b in zip(kept["dltrain"], kept["tutorial"])]
    print(f"  seed recipe b={batch}: dltrain  " + _fmt_rates(kept["dltrain"]))
    print(f"  seed recipe b={batch}: tutorial " + _fmt_rates(kept["tutorial"]))
    medians = {k: statistics.median(v) for k, v in kept.items()}
    return {
        "recipe": str(SEED_RECIPE.relative_to(HERE.parent)),
        "batch_size": batch,
        "optimizer": recipe.optimizer,
        "precision": resolve_precision(recipe.train.precision, s.device),
        "data_path": progress.data_path,
        "steps_per_epoch": c.steps_per_epoch,
        "dltrain": medians["dltrain"],
        "tutorial": medians["tutorial"],
        "ratio": medians["dltrain"] / medians["tutorial"],
        "paired_ratio": statistics.median(ratios),
        "samples": kept,
    }


def compile_rows_skipped(device: torch.device, scale: str) -> str | None:
    """Why the compiled rows do not run here (None: they run)."""
    choice = os.environ.get("BENCH_COMPILE", "")
    if choice == "0":
        return "BENCH_COMPILE=0"
    if choice != "1" and device.type == "cpu" and scale == "small":
        return (
            "CPU at BENCH_SCALE=small: torch.compile takes minutes on 2 cores and reduce-overhead "
            "has no CUDA graphs there (BENCH_COMPILE=1 runs them anyway)"
        )
    return None


def _raise_recompile_limit() -> None:
    """Several compiled models (dltrain's, the hand-written loop's; train and eval modes) in one
    process: never let dynamo fall back to eager for hitting its recompile limit."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(64, getattr(config, name)))
            return


def measure_compiled(mode: str, c: Case, s: Settings, workdir: Path) -> dict:
    """seed_cnn with train.compile=mode against the hand-written loop behind torch.compile."""
    import torch._dynamo

    torch._dynamo.reset()  # each mode compiles from scratch (inductor's caches stay warm)
    _raise_recompile_limit()
    data = synthetic(seed=0, train_size=c.train_size, test_size=1).train
    rounds = interleaved_rounds("seed_cnn", c, s, workdir, data.x, data.y, compile=mode)
    samples = rounds["samples"]
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {
        **medians,
        "ratio": medians["dltrain"] / medians["handwritten"],
        "paired_ratio": statistics.median(rounds["ratios"]),
        "first_epoch_seconds": rounds["first_epoch_seconds"],
        "batch_size": c.batch_size,
        "samples": samples,
    }


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt_rates(rates: list[float]) -> str:
    return " ".join(f"{r:,.0f}" for r in rates) + " samples/s"


def keep_freed_memory() -> bool:
    """dltrain's own allocator setting (dltrain.system.host), for every variant;
    BENCH_MALLOC=default leaves glibc as it is, to see its effect."""
    if os.environ.get("BENCH_MALLOC", "keep") == "default":
        return False
    return host.keep_freed_memory()


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {cpu_name()} ({cores} cores)"


def extra_table(seed_recipe: dict | None, compiled: dict, eager: dict | None) -> str:
    """The seed-recipe and compiled rows, each with its ratio to its reference loop."""
    lines = []
    if seed_recipe is not None:
        r = seed_recipe
        lines.append(
            f"seed recipe, batch {r['batch_size']} ({r['optimizer']['name']}, {r['precision']}, "
            f"{r['data_path']}): dltrain {r['dltrain']:,.0f} vs tutorial loop "
            f"{r['tutorial']:,.0f} samples/s = {r['ratio']:.2f}x (paired {r['paired_ratio']:.2f})"
        )
    for mode, r in compiled.items():
        if r is None:
            continue
        first = r["first_epoch_seconds"]
        lines.append(
            f"seed_cnn compile={mode}, batch {r['batch_size']}: dltrain {r['dltrain']:,.0f} vs "
            f"handwritten compiled {r['handwritten']:,.0f} samples/s = {r['ratio']:.2f}x "
            f"(paired {r['paired_ratio']:.2f}); first epoch {first['dltrain'][0]:.1f}s / "
            f"{first['handwritten'][0]:.1f}s"
            + (f"; eager dltrain {eager['dltrain']:,.0f}" if eager else "")
        )
    return "\n".join(lines)


def table(results: dict, batch_sizes: dict[str, int]) -> str:
    """The figures, each with its ratio to the hand-written loop."""
    header = f"{'case':<10} {'batch':>5}  " + "  ".join(
        f"{name:>18}" for name in ("dltrain", "handwritten", "tutorial (b=4)", "lightning")
    )
    lines = [header, "-" * len(header)]
    for case, figures in results.items():
        base = figures["handwritten"]
        cells = []
        for name in ("dltrain", "handwritten", "tutorial", "lightning"):
            value = figures[name]
            cells.append(
                f"{'—':>18}" if value is None else f"{value:>10,.0f} ({value / base:.2f}x)"
            )
        lines.append(f"{case:<10} {batch_sizes[case]:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def main() -> int:
    malloc_kept = keep_freed_memory()
    cuda = torch.cuda.is_available()
    device = torch.device(os.environ.get("BENCH_DEVICE") or ("cuda" if cuda else "cpu"))
    scale = os.environ.get("BENCH_SCALE") or ("full" if device.type == "cuda" else "small")
    if scale not in SCALES:
        print(f"BENCH_SCALE must be one of {', '.join(SCALES)}, not {scale!r}", file=sys.stderr)
        return 2
    everything = [*MODELS, *EXTRA_ROWS]
    chosen = [c for c in os.environ.get("BENCH_CASES", ",".join(everything)).split(",") if c]
    unknown = [c for c in chosen if c not in everything]
    modes = os.environ.get("BENCH_COMPILE_MODES", ",".join(COMPILE_MODES)).split(",")
    modes = [m for m in modes if m]
    bad_modes = [m for m in modes if m not in COMPILE_MODES]
    if unknown or bad_modes:
        what = f"BENCH_CASES: unknown {unknown}; choose from {everything}"
        if bad_modes:
            what = f"BENCH_COMPILE_MODES: unknown {bad_modes}; choose from {list(COMPILE_MODES)}"
        print(what, file=sys.stderr)
        return 2
    cases = [c for c in chosen if c in MODELS]
    threads = os.environ.get("BENCH_THREADS") or ("1" if device.type == "cpu" else "")
    if threads:
        torch.set_num_threads(int(threads))
    # dltrain's build_setup turns this process-wide switch on; set it before any variant runs.
    torch.set_flush_denormal(True)
    settings = Settings(
        device=device,
        precision=resolve_precision("auto", device),
        channels_last=use_channels_last("auto", device, "image"),
        fused=bool(fused_kwargs(torch.optim.Adam, "auto", device.type)),
    )
    out = Path(os.environ.get("BENCH_JSON") or HERE / "results" / "latest.json")
    load_before = _load_average()
    print(
        f"{device_name(device)} · torch {torch.__version__} · scale {scale} · "
        f"threads {torch.get_num_threads()} · {settings.precision} · "
        f"channels_last {settings.channels_last} · fused {settings.fused} · "
        f"dltrain bar {'on' if BAR else 'off'} · malloc {'kept' if malloc_kept else 'default'} · "
        f"lightning {'yes' if lightning_module() else 'not installed'}"
    )
    if load_before is not None:
        print(f"load average (1 min) before: {load_before:.2f} — other work skews CPU figures")

    results, samples, paired, failed = {}, {}, {}, []
    seed_recipe, skipped = None, compile_rows_skipped(device, scale)
    batch_sizes = {case: SCALES[scale][case].batch_size for case in cases}

    def document() -> dict:
        return {
            "device": device_name(device),
            "cases": results,
            "torch": torch.__version__,
            "scale": scale,
            "threads": torch.get_num_threads(),
            "batch_size": batch_sizes,
            "settings": {
                "dltrain_progress_bar": BAR,
                "malloc": (
                    "glibc heap kept (mmap/trim thresholds raised)" if malloc_kept else "default"
                ),
                "precision": settings.precision,
                "channels_last": settings.channels_last,
                "fused_adam": settings.fused,
            },
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "paired_ratio": paired,
            "load_average_1min": {"before": load_before, "after": _load_average()},
            "samples": samples,
            "seed_recipe_b4": seed_recipe,
            "compiled": compiled,
            "compiled_skipped": skipped,
            "errors": failed,
        }

    def save() -> None:  # after each row: a run cut short (a time limit) keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document(), indent=2) + "\n", encoding="utf-8")

    compiled = dict.fromkeys(modes) if "compiled" in chosen else {}
    if "compiled" not in chosen:
        skipped = "not in BENCH_CASES"
    elif skipped:
        print(f"compiled rows skipped: {skipped}")
    with tempfile.TemporaryDirectory(prefix="dltrain-bench-") as tmp:
        for case in cases:
            measured = measure_case(case, SCALES[scale][case], settings, Path(tmp))
            results[case], samples[case] = measured["medians"], measured["samples"]
            paired[case] = measured["paired_ratio"]
            save()
        if "seed_recipe_b4" in chosen:
            c_b4 = SEED_RECIPE_SCALES[scale]
            measure = functools.partial(measure_seed_recipe, c_b4, settings, Path(tmp))
            seed_recipe = _or_error(measure, failed)
            save()
        if "compiled" in chosen and skipped is None:
            c = replace(SCALES[scale]["seed_cnn"], epochs=COMPILE_EPOCHS[scale], rounds=1)
            for mode in modes:
                measure = functools.partial(measure_compiled, mode, c, settings, Path(tmp))
                compiled[mode] = _or_error(measure, failed)
                save()

    print()
    if results:
        print(table(results, batch_sizes))
        print(
            "paired ratio dltrain/handwritten (median over adjacent epochs): "
            + ", ".join(f"{case} {ratio:.3f}" for case, ratio in paired.items())
        )
    extra = extra_table(seed_recipe, compiled, results.get("seed_cnn"))
    if extra:
        print(extra)
    save()
    print(f"\nwrote {out}")
    return 1 if failed else 0


def _or_error(measure, failed: list[str]):
    """A row's result; on an exception (a compiler missing, a backend failing), its traceback
    printed, the error kept in `failed` and None, so the rows after it still run."""
    try:
        return measure()
    except Exception as exc:
        traceback.print_exc()
        failed.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
        return None


if __name__ == "__main__":
    sys.exit(main())
