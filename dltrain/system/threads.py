"""How many CPU threads torch's kernels use, chosen by measurement (`train.threads: auto`).

torch's default is one intra-op thread per core. On a machine where other work holds cores
(CI runners, shared servers, laptops) its threads spin-wait for each other and small steps
collapse: measured 14.6× slower for a table MLP at batch 64 and 11× for the tutorial CNN at
batch 4 with 2 threads instead of 1 on a busy 2-core VM (issue 24). So `auto` times a few real
optimizer steps at 1 thread and at every core this process may use (windows of steps long
enough to catch the stalls other work causes), on copies of the model and
optimizer (the run's weights and random streams are untouched: `threads: auto` trains exactly as
the count it picks), and keeps the faster; within 5 % it keeps fewer threads, which leave the
cores to other work. When an epoch's steps later take over twice as long (or half as long) as
the first epoch's after the choice, the load changed: the counts are timed again. `threads: N`
is honoured as given.

The one rule for sharing cores: each of `fit --nproc`'s processes gets usable cores / processes
(`cores_per_process`), and auto measures within that; DataLoader workers run one thread each
(torch's own default in workers). On a GPU the host threads that feed it are left to torch and
said so: its steps wait on the device, not on them.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dltrain.errors import UserError
from dltrain.system.host import usable_cores

WARMUP_STEPS = 2  # untimed, at each count: the first steps allocate and pick kernels
# A count's step time is the mean over a window of steps at least WINDOW_SECONDS long (and of
# at least WINDOW_STEPS steps), so that it spans several of the OS scheduler's time slices: a
# thread that other work holds up stalls the whole step now and then, and the mean counts those
# stalls where a median of single steps would hide them. Counts alternate over ROUNDS windows
# (load that comes and goes hits each) and the median window is the count's time.
WINDOW_SECONDS = 0.03
WINDOW_STEPS = 2
ROUNDS = 3
# Timing takes 2 counts × (WARMUP_STEPS + ROUNDS × WINDOW_STEPS) = 16 steps at least: a job of
# fewer than ten times that (a short eval or predict) is not timed
MIN_WORK_STEPS = 160
FEWER_IF_WITHIN = 1.05  # fewer threads win unless the other count is >5 % faster
THREADS_VARIABLE = "OMP_NUM_THREADS"  # an explicit count from the environment wins over auto


@dataclass
class ThreadChoice:
    """The intra-op thread count in use and how it was chosen."""

    threads: int
    how: str  # "auto" (measured), "recipe" (a number given), "environment", "short", "device"
    step_ms: dict[int, float] = field(default_factory=dict)  # measured: count → ms a step

    def describe(self) -> str:
        """'threads 1 (auto: 1 → 3.1 ms, 2 → 44.0 ms a step)' for the run's header."""
        if self.how == "auto":
            timed = ", ".join(f"{n} → {_ms(ms)} ms" for n, ms in sorted(self.step_ms.items()))
            return f"threads {self.threads} (auto: {timed} a step)"
        said = {
            "recipe": "as set",
            "environment": THREADS_VARIABLE,
            "short": "torch's: too little work to time",
            "device": "torch's, for the GPU",
        }[self.how]
        return f"threads {self.threads} ({said})"

    def chosen_ms(self) -> float | None:
        """The measured ms a step at the chosen count (None when nothing was timed)."""
        return self.step_ms.get(self.threads)

    def event(self) -> dict:
        """What events.jsonl's start event records."""
        timed = {str(n): round(ms, 3) for n, ms in self.step_ms.items()}
        return {"threads": self.threads, "threads_chosen": self.how, "step_ms_by_threads": timed}


def _ms(ms: float) -> str:
    """Sub-millisecond steps keep two decimals: 0.63 against 0.60, not 0.6 against 0.6."""
    return f"{ms:.2f}" if ms < 1 else f"{ms:.1f}"


# An epoch whose steps take this many times longer (or shorter) than the first epoch's after a
# choice means the machine's load changed: auto times the counts again
DRIFT = 2.0


# Epochs shorter than this are not judged: a few steps' time is noise, and timing the counts
# again (~0.2 s) would cost a tenth of such an epoch
RECHECK_MIN_EPOCH_SECONDS = 2.0


def drifted(ms_per_step: float, baseline_ms: float) -> bool:
    """Whether an epoch's step time moved by more than DRIFT against the baseline."""
    return not baseline_ms / DRIFT <= ms_per_step <= baseline_ms * DRIFT


def cores_per_process(processes: int) -> int:
    """The cores each of `processes` local processes may use: the one rule for sharing them."""
    return max(1, usable_cores() // max(1, processes))


def choose_threads(
    setting: str | int,
    device: torch.device,
    make_step: Callable[[], Callable[[], None]],
    work_steps: int | None = None,
) -> ThreadChoice:
    """Set torch's intra-op thread count as `setting` says and return the choice. `make_step`
    builds a closure that runs one step (an optimizer step on copies, or a forward pass) and is
    called once, only for auto. `work_steps`: how many such steps the job has (eval, predict),
    when known: auto does not time a job too short to repay it (torch's count stays)."""
    if device.type != "cpu":
        return ThreadChoice(torch.get_num_threads(), "device")
    if setting != "auto":
        torch.set_num_threads(int(setting))
        return ThreadChoice(int(setting), "recipe")
    if os.environ.get(THREADS_VARIABLE, "").strip().isdigit():
        count = max(1, int(os.environ[THREADS_VARIABLE]))
        torch.set_num_threads(count)
        return ThreadChoice(count, "environment")
    if work_steps is not None and work_steps < MIN_WORK_STEPS:
        return ThreadChoice(torch.get_num_threads(), "short")
    return _measured(make_step)


def parse_threads(text: str, where: str) -> str | int:
    """`auto` or a positive count, from the command line (`--threads`)."""
    if text.strip() == "auto":
        return "auto"
    if text.strip().isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"{where}: '{text}' is not a thread count; give auto or a number ≥ 1.")


def _measured(make_step: Callable[[], Callable[[], None]]) -> ThreadChoice:
    most = min(usable_cores(), _launched_share())
    counts = [1] if most == 1 else [1, most]
    if len(counts) == 1:
        torch.set_num_threads(1)
        return ThreadChoice(1, "auto", {})
    with _random_streams_kept():
        timed = _timed_counts(make_step(), counts)
    fastest = min(timed, key=timed.get)
    chosen = 1 if timed[1] <= timed[fastest] * FEWER_IF_WITHIN else fastest
    torch.set_num_threads(chosen)
    return ThreadChoice(chosen, "auto", timed)


def _timed_counts(step: Callable[[], None], counts: list[int]) -> dict[int, float]:
    """ms a step at each count: warm-up at each, then ROUNDS windows alternating the counts."""
    for count in counts:
        torch.set_num_threads(count)
        for _ in range(WARMUP_STEPS):
            step()
    windows: dict[int, list[float]] = {count: [] for count in counts}
    for _ in range(ROUNDS):
        for count in counts:
            windows[count].append(_window_ms(step, count))
    return {count: statistics.median(times) for count, times in windows.items()}


def _launched_share() -> int:
    """Under `fit --nproc` / torchrun: this process's share of the cores."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return cores_per_process(processes)


def _window_ms(step: Callable[[], None], threads: int) -> float:
    """Mean ms a step over one window of steps at `threads` (stalls included)."""
    torch.set_num_threads(threads)
    steps, start = 0, time.perf_counter()
    while steps < WINDOW_STEPS or time.perf_counter() - start < WINDOW_SECONDS:
        step()
        steps += 1
    return 1000 * (time.perf_counter() - start) / steps


class _random_streams_kept:
    """The measurement's dropout and augmentation draw from the global random streams: they are
    put back as they were, so a run with auto draws what a run with a fixed count draws."""

    def __enter__(self) -> None:
        self.states = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    def __exit__(self, *exc) -> None:
        torch_state, numpy_state, python_state = self.states
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
