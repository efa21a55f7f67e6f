"""data/npy_headers.py: an .npy header (alone, or in an .npz) that declares more data than its
file holds is refused before numpy allocates it — a few hundred bytes never ask for terabytes."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dltrain.config.registry import DATASETS
from dltrain.data.npy_headers import DamagedArray, check_npy_file, check_npz_file
from dltrain.errors import UserError


def lying_npy(shape: tuple[int, ...], dtype: str = "<f4", data: int = 256) -> bytes:
    """An .npy file whose header declares `shape` but which holds `data` bytes."""
    out = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + b"\0" * data


def test_a_header_larger_than_its_file_is_damaged(tmp_path):
    path = tmp_path / "bomb.npy"
    path.write_bytes(lying_npy((10**11, 8, 8)))
    assert path.stat().st_size < 400
    with pytest.raises(DamagedArray, match=r"declares a 100000000000×8×8 float32 array"):
        check_npy_file(path)


def test_true_files_pass(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.int64).reshape(3, 4))
    np.save(tmp_path / "empty.npy", np.zeros((0, 5), dtype=np.float32))
    np.savez_compressed(tmp_path / "z.npz", x=np.zeros((50, 50)), y=np.arange(50))
    check_npy_file(tmp_path / "a.npy")
    check_npy_file(tmp_path / "empty.npy")
    check_npz_file(tmp_path / "z.npz")


def bomb_npz(path: Path) -> Path:
    true = io.BytesIO()
    np.save(true, np.zeros(6, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train_x.npy", lying_npy((10**11, 1, 4, 4), "|u1"))
        archive.writestr("train_y.npy", true.getvalue())
    return path


def test_an_npz_dataset_that_lies_is_one_message_before_any_allocation(tmp_path):
    path = bomb_npz(tmp_path / "d.npz")
    with pytest.raises(UserError, match="train_x.npy declares a 100000000000×1×4×4 uint8 array"):
        DATASETS.build({"name": "npz", "path": str(path)}, seed=0)


def test_predict_on_an_npy_that_lies_exits_2(trained_run, invoke, tmp_path):
    from helpers.training import quickstart_recipe

    run, _ = trained_run(quickstart_recipe(), "quickstart", "device=cpu", "train.epochs=1")
    path = tmp_path / "digit.npy"
    path.write_bytes(lying_npy((10**11, 8, 8)))
    result = invoke("predict", str(run.best_path), str(path))
    assert result.exit_code == 2, result.output
    assert "declares a 100000000000×8×8 float32 array" in " ".join(result.output.split())


# -- any header: refused exactly when its file cannot back it -----------------------------------

DTYPES = ("<f4", "<f8", "|u1", "<i8", "<c16", "|b1", "<U3")


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    shape=st.lists(st.one_of(st.integers(0, 9), st.integers(0, 10**12)), max_size=4),
    dtype=st.sampled_from(DTYPES),
    data=st.integers(0, 4096),
    version=st.sampled_from([(1, 0), (2, 0)]),
)
def test_any_header_is_refused_exactly_when_its_file_is_too_small(
    tmp_path_factory, shape, dtype, data, version
):
    out = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    writer = {(1, 0): np.lib.format.write_array_header_1_0}.get(
        version, np.lib.format.write_array_header_2_0
    )
    writer(out, header)
    path = tmp_path_factory.mktemp("npy") / "a.npy"
    path.write_bytes(out.getvalue() + b"\1" * data)
    declared = math.prod(shape) * np.dtype(dtype).itemsize
    impossible = math.prod(d for d in shape if d) * np.dtype(dtype).itemsize >= 2**63
    if declared > data or impossible:
        with pytest.raises(DamagedArray, match="declares a"):
            check_npy_file(path)
        return
    check_npy_file(path)
    loaded = np.load(path, allow_pickle=False)  # what passes is what numpy reads at its size
    assert loaded.shape == tuple(shape) and loaded.nbytes == declared
