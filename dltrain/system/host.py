"""Process-wide numeric and memory settings that make training fast on the machine at hand.

They are set once per fit, before the model is built. Each has a recipe switch where it could
change results (TF32); the others only change speed.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def tune_for_training(device: torch.device, cudnn_benchmark: bool, tf32: bool) -> None:
    """Flush denormals, keep freed CPU memory, and pick the fast CUDA kernels."""
    # Optimizer state of dead units decays into denormal floats after a few hundred steps, and
    # x86 CPUs compute on denormals ~10× slower: flush them to zero (numerically irrelevant).
    torch.set_flush_denormal(True)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark  # fixed shapes: autotune once
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def keep_freed_memory() -> bool:
    """Stop glibc returning freed activations to the OS between steps.

    By default glibc unmaps large freed blocks, so every step page-faults its activations back
    in: measured 20k-60k faults an epoch and 10-20 % slower CPU training (bench/RESULTS.md).
    Raising the mmap and trim thresholds keeps those pages. True when applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # not glibc (e.g. musl)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1
