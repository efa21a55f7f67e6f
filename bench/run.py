"""`make bench` / `python bench/run.py`: samples/s of dltrain's engine against reference loops.

In one process, on the same synthetic CIFAR-10-shaped data (uint8 3×32×32, 10 classes), for the
models `seed_cnn` and `resnet18` (CIFAR form):

  dltrain      dltrain.engine.fit on a resolved recipe (data.name=synthetic, adam, no scheduler,
               no validation split), with the live progress bar drawn as in a terminal. Each epoch
               is timed by the engine itself (metrics.csv `samples_per_s`: the training loop of
               the epoch, from its shuffle to the sync that reads the epoch's loss).
  handwritten  a plain loop written here (bench/loops.py): the same resident uint8 data,
               randperm, on-device scaling/normalisation, model, Adam, precision, channels_last
               and fused choices; timed exactly like the engine times an epoch.
  tutorial     the PyTorch CIFAR-10 tutorial's loop as published (batch 4, 2 workers, SGD),
               over a fixed number of batches after a warm-up.
  lightning    Lightning's Trainer over a worker DataLoader, when `lightning` or
               `pytorch_lightning` is importable (null otherwise).

dltrain and handwritten alternate epoch by epoch in one process: after each epoch of the fit,
its display hook (outside the engine's timing) runs one hand-written epoch. Each fit (a "round",
fresh models for both) drops its first epoch of each as warm-up; a figure is the median over the
kept epochs, and `paired_ratio` the median of dltrain/handwritten over adjacent epoch pairs (the
steadier comparison on a shared machine). Both loops use the same torch thread count.

Environment:
  BENCH_SCALE    small (CPU-sized: about a minute on 2 cores) | full (batch 512, CIFAR-sized
                 epochs; the default when CUDA is available)
  BENCH_JSON     where to write the results (default bench/results/latest.json)
  BENCH_THREADS  torch intra-op threads for every variant (default: 1 on CPU — steady figures on
                 a shared machine —, torch's default on CUDA)
  BENCH_DEVICE   cpu | cuda (default: cuda when available)
  BENCH_CASES    comma-separated subset of: seed_cnn,resnet18
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
import io
import json
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from loops import Handwritten, Settings, lightning, lightning_module, tutorial  # noqa: E402
from rich.console import Console  # noqa: E402

from dltrain import host  # noqa: E402
from dltrain.amp import resolve_precision  # noqa: E402
from dltrain.data.loaders import default_workers  # noqa: E402
from dltrain.data.synthetic import synthetic  # noqa: E402
from dltrain.engine import fit  # noqa: E402
from dltrain.models.cnn import seed_cnn  # noqa: E402
from dltrain.models.resnet import resnet18  # noqa: E402
from dltrain.optim import fused_kwargs  # noqa: E402
from dltrain.progress import Progress  # noqa: E402
from dltrain.recipe import resolve_with_context  # noqa: E402
from dltrain.run_folder import RunFolder  # noqa: E402
from dltrain.setup import use_channels_last  # noqa: E402

MODELS = {"seed_cnn": seed_cnn, "resnet18": resnet18}
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
    # 2 CPU cores: ~1 minute in all. resnet18 trains at ~20 samples/s on one core: tiny epochs.
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


def dltrain_fit(case: str, c: Case, device: torch.device, workdir: Path, tag: str, progress):
    """`dltrain fit` in-process; samples/s of each epoch as the engine timed it (metrics.csv)."""
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
        "train": {"epochs": c.epochs},
    }
    recipe = resolve_with_context(raw, [], "bench recipe")
    run = RunFolder.for_recipe(recipe)
    fit(recipe, run, progress)
    with open(run.metrics_path, newline="") as f:
        return [float(row["samples_per_s"]) for row in csv.DictReader(f)]


def measure_case(case: str, c: Case, s: Settings, workdir: Path) -> dict:
    """All four variants for one model: medians in samples/s, paired ratio, every sample."""
    data = synthetic(seed=0, train_size=c.train_size, test_size=1).train
    x, y = data.x, data.y

    def make_model():
        return MODELS[case](SHAPE, CLASSES)

    samples: dict[str, list[float]] = {"dltrain": [], "handwritten": []}
    ratios = []
    for r in range(c.rounds):
        hand, hand_rates = Handwritten(x, y, make_model, c.batch_size, s), []
        progress = Interleaved(lambda h=hand, rates=hand_rates: rates.append(h.epoch()), BAR)
        dl_rates = dltrain_fit(case, c, s.device, workdir, f"r{r}", progress)
        del hand
        _free(s.device)
        # the first epoch of each is the warm-up
        samples["dltrain"] += dl_rates[1:]
        samples["handwritten"] += hand_rates[1:]
        ratios += [a / b for a, b in zip(dl_rates[1:], hand_rates[1:])]
        print(f"  {case} fit {r + 1}/{c.rounds}: dltrain     " + _fmt_rates(dl_rates[1:]))
        print(f"  {case} fit {r + 1}/{c.rounds}: handwritten " + _fmt_rates(hand_rates[1:]))
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


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt_rates(rates: list[float]) -> str:
    return " ".join(f"{r:,.0f}" for r in rates) + " samples/s"


def keep_freed_memory() -> bool:
    """dltrain's own allocator setting (dltrain.host), for every variant; BENCH_MALLOC=default
    leaves glibc as it is, to see its effect."""
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
    cases = [c for c in os.environ.get("BENCH_CASES", "seed_cnn,resnet18").split(",") if c]
    unknown = [c for c in cases if c not in MODELS]
    if unknown:
        print(f"BENCH_CASES: unknown {unknown}; choose from {list(MODELS)}", file=sys.stderr)
        return 2
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

    results, samples, paired = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="dltrain-bench-") as tmp:
        for case in cases:
            measured = measure_case(case, SCALES[scale][case], settings, Path(tmp))
            results[case], samples[case] = measured["medians"], measured["samples"]
            paired[case] = measured["paired_ratio"]

    batch_sizes = {case: SCALES[scale][case].batch_size for case in cases}
    load = {"before": load_before, "after": _load_average()}
    print()
    print(table(results, batch_sizes))
    print(
        "paired ratio dltrain/handwritten (median over adjacent epochs): "
        + ", ".join(f"{case} {ratio:.3f}" for case, ratio in paired.items())
    )
    document = {
        "device": device_name(device),
        "cases": results,
        "torch": torch.__version__,
        "scale": scale,
        "threads": torch.get_num_threads(),
        "batch_size": batch_sizes,
        "settings": {
            "dltrain_progress_bar": BAR,
            "malloc": "glibc heap kept (mmap/trim thresholds raised)" if malloc_kept else "default",
            "precision": settings.precision,
            "channels_last": settings.channels_last,
            "fused_adam": settings.fused,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "paired_ratio": paired,
        "load_average_1min": load,
        "samples": samples,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
