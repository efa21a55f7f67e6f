"""Tests for dltrain.system.devices: device spec resolution and hardware description.

Availability is monkeypatched so the tests give the same answers on a laptop, a GPU box or CI.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dltrain.errors import UserError
from dltrain.system import devices


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a machine with no CUDA GPU, no MPS and no torch_xla."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(devices, "find_spec", lambda name: None)


@pytest.fixture
def one_broken_gpu(cpu_only: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate one visible CUDA GPU whose every property probe fails."""

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", fail)
    monkeypatch.setattr(torch.cuda, "mem_get_info", fail)


@pytest.fixture
def fake_xla(cpu_only: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Return a function that installs a fake torch_xla package with the given device type.

    The fake calls logging.basicConfig() on import, as the real one does.
    """

    def install(device_type: str = "TPU", broken: bool = False) -> None:
        package = tmp_path / "torch_xla"
        package.mkdir()
        (package / "__init__.py").write_text(
            textwrap.dedent(
                f"""
                import logging
                import torch
                if {broken!r}:
                    raise ImportError("undefined symbol: _ZN3c10")
                logging.basicConfig()
                from . import runtime
                def devices():
                    return [torch.device("xla", 0)]
                def device(index=None):
                    return torch.device("xla", 0)
                """
            )
        )
        (package / "runtime.py").write_text(f"def device_type():\n    return {device_type!r}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(devices, "find_spec", importlib.util.find_spec)
        importlib.invalidate_caches()

    yield install
    for name in [m for m in sys.modules if m == "torch_xla" or m.startswith("torch_xla.")]:
        del sys.modules[name]


@contextlib.contextmanager
def empty_root_logger() -> Iterator[logging.Logger]:
    """Run the block with no root handlers, restoring pytest's afterwards.

    During a test pytest's capture handlers sit on the root logger, and basicConfig() only acts
    on a root without handlers, so without this a logging check could never fail.
    """
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        yield root
    finally:
        root.handlers[:] = saved


def test_cpu_resolves_to_cpu(cpu_only: None) -> None:
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(" CPU ") == torch.device("cpu")


def test_auto_is_cpu_without_accelerators(cpu_only: None) -> None:
    assert devices.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "mps", "xla"])
def test_missing_device_is_user_error_listing_available(cpu_only: None, spec: str) -> None:
    with pytest.raises(UserError) as info:
        devices.resolve_device(spec)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert f"device '{spec}' is not available" in message
    assert "Available: cpu." in message
    assert "device: auto" in message


def test_missing_xla_says_how_to_install(cpu_only: None) -> None:
    with pytest.raises(UserError, match=r"pip install 'dltrain\[xla\]'"):
        devices.resolve_device("xla")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "cpu:0", "", "cuda0", 3])
def test_invalid_spec_is_user_error_with_valid_forms(cpu_only: None, spec: object) -> None:
    with pytest.raises(UserError, match="Valid forms: auto, cpu, cuda, cuda:N") as info:
        devices.resolve_device(spec)  # type: ignore[arg-type]
    assert info.value.exit_code == 2


def test_gpu_suggests_cuda_not_cpu(cpu_only: None) -> None:
    with pytest.raises(UserError, match="Did you mean 'cuda'"):
        devices.resolve_device("gpu")


def test_cuda_index_beyond_visible_gpus(one_broken_gpu: None) -> None:
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"only 1 CUDA GPU is visible.*Available: cpu, cuda:0"):
        devices.resolve_device("cuda:7")


def test_describe_devices_cpu_only(cpu_only: None) -> None:
    info = devices.describe_devices()
    json.dumps(info)
    assert info["torch"] == torch.__version__
    assert info["auto"] == "cpu"
    cpus = [d for d in info["devices"] if d["type"] == "cpu"]
    assert len(cpus) == 1 and len(info["devices"]) == 1
    cpu = cpus[0]
    assert cpu["index"] is None and cpu["name"]
    assert cpu["cores"] >= 1 and 1 <= cpu["usable_cores"] <= cpu["cores"]
    assert cpu["memory_bytes"] > 0
    assert cpu["torch_threads"] >= 1
    assert any(note.startswith("CUDA: not available") for note in info["notes"])


def test_describe_devices_notes_missing_xla(cpu_only: None) -> None:
    notes = devices.describe_devices()["notes"]
    assert "XLA: not installed — pip install 'dltrain[xla]'" in "\n".join(notes)


def test_describe_devices_on_real_machine_is_json() -> None:
    info = devices.describe_devices()
    json.loads(json.dumps(info))
    assert [d["type"] for d in info["devices"]].count("cpu") == 1
    assert isinstance(info["auto"], str)


def test_gpu_probe_failures_become_notes(one_broken_gpu: None) -> None:
    info = devices.describe_devices()
    json.dumps(info)
    assert info["auto"] == "cuda:0"
    (gpu,) = [d for d in info["devices"] if d["type"] == "cuda"]
    assert gpu["index"] == 0 and gpu["name"] == "unknown" and gpu["memory_bytes"] is None
    assert any("cuda:0" in n and "driver exploded" in n for n in info["notes"])


def test_xla_accelerator_wins_auto_and_keeps_logging(fake_xla) -> None:
    fake_xla("TPU")
    with empty_root_logger() as root:
        assert devices.resolve_device("auto") == torch.device("xla", 0)
        assert root.handlers == []  # the fake's import-time basicConfig() was undone
    assert devices.resolve_device("xla") == torch.device("xla", 0)
    info = devices.describe_devices()
    json.dumps(info)
    (xla,) = [d for d in info["devices"] if d["type"] == "xla"]
    assert xla["xla_device_type"] == "TPU" and xla["index"] == 0 and xla["count"] == 1


def test_xla_on_cpu_does_not_win_auto(fake_xla) -> None:
    fake_xla("CPU")
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("xla") == torch.device("xla", 0)


def test_broken_xla_install_is_a_note_and_user_error(fake_xla) -> None:
    fake_xla(broken=True)
    info = devices.describe_devices()
    assert info["auto"] == "cpu"
    assert any("failed to import" in n and "undefined symbol" in n for n in info["notes"])
    with pytest.raises(UserError, match="failed to import"):
        devices.resolve_device("xla")
