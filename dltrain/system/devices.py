"""Device discovery: turn a recipe's `device:` string into a torch.device, and describe hardware.

`resolve_device` is strict: asking for a device this machine lacks is a `UserError` that says
what is available instead. `describe_devices` is lenient: every probing failure becomes a note,
because it backs a diagnostic command that must work on a half-broken install.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from types import ModuleType
from typing import Any, TypeVar

import torch

from dltrain.errors import UserError, did_you_mean

T = TypeVar("T")

_KINDS = ("auto", "cpu", "cuda", "mps", "xla")
_VALID_FORMS = "auto, cpu, cuda, cuda:N (N = GPU index, e.g. cuda:0), mps, xla"
# Names people type for a device we know under another name; did_you_mean would map 'gpu' to 'cpu'.
_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "tpu": "xla", "metal": "mps", "apple": "mps"}
_XLA_INSTALL = "pip install 'dltrain[xla]' (torch_xla needs its matching torch version)"


def resolve_device(spec: str) -> torch.device:
    """Return the torch.device for `spec` (auto | cpu | cuda | cuda:N | mps | xla).

    `auto` picks the first available of cuda, xla (an accelerator, not XLA-on-CPU), mps, cpu.
    Raises UserError for an unknown spec or for a device this machine does not have.
    """
    kind, index = parse_device_spec(spec)
    if kind == "auto":
        return _auto_device()
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        return _cuda_device(spec, index)
    if kind == "mps":
        return _mps_device(spec)
    return _xla_device(spec)


def describe_devices() -> dict[str, Any]:
    """Return JSON-serialisable facts about every device torch can use here.

    Keys: torch (version), auto (what `auto` resolves to), devices (one dict per device, each
    with at least type, index and name), notes (why a device is missing or a probe failed).
    Never raises: any probing failure is reported as a note instead.
    """
    notes: list[str] = []
    devices = [_describe_cpu(notes)]
    devices += _describe_cuda(notes)
    devices += _describe_mps(notes)
    devices += _describe_xla(notes)
    auto = _probe(notes, "auto device", lambda: str(resolve_device("auto")), "cpu")
    return {"torch": torch.__version__, "auto": auto, "devices": devices, "notes": notes}


# --- parsing and error messages -------------------------------------------------------------


def software_versions() -> str:
    """One line for `dltrain --version`: dltrain, torch (and the CUDA it was built for),
    torch_xla when installed (read from its metadata: importing it starts the XLA runtime),
    Python."""
    from importlib import metadata

    from dltrain import __version__

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    try:
        xla = f"torch_xla {metadata.version('torch_xla')}"
    except metadata.PackageNotFoundError:
        xla = "no torch_xla"
    return (
        f"dltrain {__version__} · torch {torch.__version__} ({cuda}) · {xla} · "
        f"Python {platform.python_version()}"
    )


def parse_device_spec(spec: object) -> tuple[str, int | None]:
    """Split a device spec into (kind, index), or raise a UserError naming the valid forms."""
    text = spec.strip().lower() if isinstance(spec, str) else ""
    if text in _KINDS:
        return text, None
    match = re.fullmatch(r"cuda:(\d{1,9})", text)  # bounded: a 5000-digit index is no index
    if match:
        return "cuda", int(match.group(1))
    alias = _ALIASES.get(text.partition(":")[0])
    hint = f" Did you mean '{alias}'?" if alias else did_you_mean(text, _KINDS)
    raise UserError(f"invalid device {spec!r}.{hint} Valid forms: {_VALID_FORMS}.")


def _unavailable(spec: str, reason: str) -> UserError:
    """Build the one error for a well-formed but missing device: what, why, what instead."""
    available = _available_names()
    choices = " or ".join(f"device: {name}" for name in ("auto", *available))
    return UserError(
        f"device {spec!r} is not available: {reason}. "
        f"Available: {', '.join(available)}. Use {choices}."
    )


def _available_names() -> list[str]:
    """List the device strings this machine can use, best-effort (a failed probe lists none)."""
    names = ["cpu"]
    names += [f"cuda:{i}" for i in range(_cuda_count())]
    if _mps_problem() is None:
        names.append("mps")
    names += [str(d) for d in _xla_devices_or_empty()]
    return names


# --- per-backend availability -----------------------------------------------------------------


def _auto_device() -> torch.device:
    """Pick the best available device: cuda > xla accelerator > mps > cpu."""
    if _cuda_count() > 0:
        return torch.device("cuda", 0)
    xla, _ = _import_xla()
    if xla is not None and _xla_is_accelerator(xla):
        with _keep_root_logging():
            return xla.device()
    if _mps_problem() is None:
        return torch.device("mps")
    return torch.device("cpu")


def _cuda_count() -> int:
    """Return how many CUDA GPUs torch can see; 0 when CUDA is missing or its probe fails."""
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver must read as "no GPU", not crash discovery
        return 0


def _cuda_problem() -> str:
    """Explain why no CUDA GPU is usable (only called when none is)."""
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} was built without CUDA (install a CUDA build of torch)"
    return (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but no CUDA GPU is "
        "visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    )


def _cuda_device(spec: str, index: int | None) -> torch.device:
    """Return cuda:index (cuda:0 for bare 'cuda') or raise if that GPU is not visible."""
    count = _cuda_count()
    if count == 0:
        raise _unavailable(spec, _cuda_problem())
    index = 0 if index is None else index
    if index >= count:
        visible = f"cuda:0..cuda:{count - 1}" if count > 1 else "cuda:0"
        gpus = "GPU is" if count == 1 else "GPUs are"
        raise _unavailable(spec, f"only {count} CUDA {gpus} visible ({visible})")
    # An explicit index, so logs and checkpoints say which GPU was used.
    return torch.device("cuda", index)


def _mps_problem() -> str | None:
    """Return why MPS is unusable, or None when it is available."""
    try:
        if torch.backends.mps.is_available():
            return None
        if not torch.backends.mps.is_built():
            return f"torch {torch.__version__} was built without MPS (MPS needs Apple silicon)"
        return "MPS is built into torch but not usable here (needs macOS 12.3+ on Apple silicon)"
    except Exception as exc:  # treat a failing probe as unavailable, and say why
        return f"probing MPS failed: {exc}"


def _mps_device(spec: str) -> torch.device:
    """Return the MPS device or raise if it is not usable here."""
    problem = _mps_problem()
    if problem is not None:
        raise _unavailable(spec, problem)
    return torch.device("mps")


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (None where it cannot be told)."""
    with contextlib.suppress(Exception):  # a probe: any failure means "unknown"
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def step_marker(device: torch.device) -> Callable[[], None] | None:
    """What ends a step on a lazy device: torch_xla.sync() cuts and runs the step's graph (so
    every step compiles to the same graph); None on eager devices."""
    if device.type != "xla":
        return None
    import torch_xla

    return torch_xla.sync


# --- XLA (optional dependency) ----------------------------------------------------------------


@contextlib.contextmanager
def _keep_root_logging() -> Iterator[None]:
    """Undo root-logger changes made inside the block.

    torch_xla calls logging.basicConfig() on import (and its logging.warning calls do the same
    on a handler-less root), which would make every library's log lines appear in our output.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def _xla_installed() -> bool:
    """True when torch_xla can be found, checked without importing it (importing is slow)."""
    try:
        return find_spec("torch_xla") is not None
    except (ImportError, ValueError):  # a half-removed install can make find_spec itself fail
        return False


def _import_xla() -> tuple[ModuleType | None, str | None]:
    """Import torch_xla if installed; return (module, None) or (None, why it is unusable)."""
    if not _xla_installed():
        return None, f"torch_xla is not installed; {_XLA_INSTALL}"
    try:
        with _keep_root_logging():
            import torch_xla
            import torch_xla.runtime  # noqa: F401  (imported for its side effect on torch_xla)
    except Exception as exc:  # e.g. built for another torch version: undefined symbols
        return None, f"torch_xla is installed but failed to import ({exc}); {_XLA_INSTALL}"
    return torch_xla, None


def _xla_devices(xla: ModuleType) -> list[torch.device]:
    """Return the XLA devices torch_xla reports for this process (may raise)."""
    with _keep_root_logging():
        return [torch.device(d) for d in xla.devices()]


def _xla_devices_or_empty() -> list[torch.device]:
    """Return the XLA devices, or [] when torch_xla is absent or its probe fails."""
    xla, _ = _import_xla()
    if xla is None:
        return []
    try:
        return _xla_devices(xla)
    except Exception:  # callers only need "which devices work"; describe_devices reports why
        return []


def xla_device_kind() -> str | None:
    """The PJRT device type behind `xla` ('TPU', 'CUDA', 'CPU', ...), None without torch_xla."""
    xla, _ = _import_xla()
    return None if xla is None else _xla_device_type(xla)


def _xla_device_type(xla: ModuleType) -> str | None:
    """Return the PJRT device type ('TPU', 'CUDA', 'CPU', ...) or None when unknown."""
    with _keep_root_logging():
        return xla.runtime.device_type()


def _xla_is_accelerator(xla: ModuleType) -> bool:
    """True when XLA runs on real accelerator hardware.

    torch_xla falls back to PJRT_DEVICE=CPU when it finds no TPU; `auto` must then prefer
    plain cpu, which is faster than XLA-on-CPU.
    """
    try:
        kind = _xla_device_type(xla)
        return kind not in (None, "CPU") and bool(_xla_devices(xla))
    except Exception:  # a runtime that cannot start is not a device auto should pick
        return False


def _xla_device(spec: str) -> torch.device:
    """Return torch_xla's default device or raise if torch_xla is missing or has no device."""
    xla, problem = _import_xla()
    if xla is None:
        raise _unavailable(spec, problem or "torch_xla is not usable")
    try:
        if not _xla_devices(xla):
            raise RuntimeError("no XLA device reported")
        with _keep_root_logging():
            return xla.device()
    except Exception as exc:
        raise _unavailable(spec, f"torch_xla reports no usable device ({exc})") from exc


# --- describe_devices helpers -----------------------------------------------------------------


def _probe(notes: list[str], what: str, fn: Callable[[], T], default: T) -> T:
    """Call fn; on any exception append a note about `what` and return default."""
    try:
        return fn()
    except Exception as exc:  # describe_devices must never raise
        notes.append(f"{what}: probe failed ({type(exc).__name__}: {exc})")
        return default


def _cpu_name() -> str:
    """Return the CPU model name from /proc/cpuinfo, else what platform knows."""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f,
    ):
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _total_memory() -> int | None:
    """Return total RAM in bytes from /proc/meminfo or sysconf, or None when neither works."""
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/meminfo", encoding="utf-8") as f,
    ):
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _describe_cpu(notes: list[str]) -> dict[str, Any]:
    """Describe the CPU: model, logical and usable cores, memory, torch threads."""
    cores = os.cpu_count()
    usable = _probe(notes, "CPU affinity", lambda: len(os.sched_getaffinity(0)), cores)
    memory = _total_memory()
    if memory is None:
        notes.append("CPU: total memory unknown (no /proc/meminfo and sysconf failed)")
    return {
        "type": "cpu",
        "index": None,
        "name": _probe(notes, "CPU name", _cpu_name, "unknown"),
        "cores": cores,
        "usable_cores": usable,
        "memory_bytes": memory,
        "torch_threads": _probe(notes, "torch threads", torch.get_num_threads, None),
    }


def _describe_gpu(notes: list[str], index: int) -> dict[str, Any]:
    """Describe one CUDA GPU; each field that fails to probe is None plus a note."""
    label = f"cuda:{index}"
    props = _probe(notes, label, lambda: torch.cuda.get_device_properties(index), None)
    free = _probe(notes, f"{label} free memory", lambda: torch.cuda.mem_get_info(index)[0], None)

    def bf16() -> bool:
        # Native support only: emulated bf16 is too slow to be worth choosing for training.
        with torch.cuda.device(index):
            return torch.cuda.is_bf16_supported(including_emulation=False)

    return {
        "type": "cuda",
        "index": index,
        "name": props.name if props else "unknown",
        "memory_bytes": props.total_memory if props else None,
        "free_memory_bytes": free,
        "compute_capability": f"{props.major}.{props.minor}" if props else None,
        "bf16": _probe(notes, f"{label} bf16 support", bf16, None),
        "multiprocessors": props.multi_processor_count if props else None,
    }


def _describe_cuda(notes: list[str]) -> list[dict[str, Any]]:
    """Describe every visible CUDA GPU, or note why there is none."""
    count = _cuda_count()
    if count == 0:
        notes.append(f"CUDA: not available: {_probe(notes, 'CUDA', _cuda_problem, 'unknown')}")
    return [_describe_gpu(notes, i) for i in range(count)]


def _describe_mps(notes: list[str]) -> list[dict[str, Any]]:
    """Describe the MPS device, or note why it is unusable on a torch built with MPS."""
    problem = _mps_problem()
    if problem is None:
        return [{"type": "mps", "index": None, "name": "Apple MPS (Metal)"}]
    # Off macOS torch is built without MPS, and saying so on every Linux box is noise.
    if _probe(notes, "MPS", torch.backends.mps.is_built, True):
        notes.append(f"MPS: not available: {problem}")
    return []


def _describe_xla(notes: list[str]) -> list[dict[str, Any]]:
    """Describe torch_xla's devices, or note that it is missing or failed."""
    if not _xla_installed():
        notes.append(f"XLA: not installed — {_XLA_INSTALL}")
        return []
    xla, problem = _import_xla()
    if xla is None:
        notes.append(f"XLA: {problem}")
        return []
    kind = _probe(notes, "XLA device type", lambda: _xla_device_type(xla), None)
    found = _probe(notes, "XLA devices", lambda: _xla_devices(xla), [])
    if not found:
        notes.append("XLA: torch_xla is installed but reports no device")
    return [
        {
            "type": "xla",
            "index": d.index,
            "name": f"{kind or 'XLA'}:{d.index}",
            "xla_device_type": kind,
            "count": len(found),
        }
        for d in found
    ]
