"""Trust at the seams: a checkpoint never runs code, is checked against its digest, and is never
replaced by an output; torch's advice to load with weights_only=False is never passed on.

One tiny tabular run is trained per module; each test works on copies of its checkpoint.
"""

from __future__ import annotations

import functools
import re
import shutil
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dltrain.errors import UserError
from dltrain.runs.checkpoint import contents_digest, load_checkpoint, save_checkpoint

from helpers.cli import QUICKSTART
from helpers.training import TABULAR, make_recipe, train


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    run, _ = trained_run(TABULAR, "tab", "train.epochs=1")
    return run.best_path


def copy_of(checkpoint: Path, folder: Path, name: str = "model.pt") -> Path:
    target = folder / name
    shutil.copyfile(checkpoint, target)
    return target


# -- a checkpoint never runs code ----------------------------------------------------------------

PLANTED = """
from pathlib import Path
Path({marker!r}).write_text("the checkpoint's module ran")
"""


def planted_checkpoint(checkpoint: Path, folder: Path, model: str = "mlp") -> tuple[Path, Path]:
    """A copy of the checkpoint whose recipe lists `imports:` of a module that, if ever
    imported, writes a marker file (and, for an unknown model name, would register it)."""
    marker = folder / "marker.txt"
    module = folder / "planted_module.py"
    module.write_text(textwrap.dedent(PLANTED.format(marker=str(marker))), encoding="utf-8")
    state = load_checkpoint(checkpoint)
    state["recipe"] = {
        **state["recipe"],
        "imports": [str(module), "planted_module"],
        "model": {**state["recipe"]["model"], "name": model},
    }
    target = folder / "planted.pt"
    save_checkpoint(target, {k: v for k, v in state.items() if k not in ("format", "digest")})
    return target, marker


def test_no_command_imports_what_a_checkpoint_names(invoke, checkpoint, tmp_path):
    planted, marker = planted_checkpoint(checkpoint, tmp_path)
    np.save(tmp_path / "rows.npy", np.zeros((2, 8), dtype=np.float32))
    for args in (
        ["eval", str(planted)],
        ["predict", str(planted), "rows.npy"],
        ["export", str(planted), "--format", "torchscript", "--output", "m.torchscript.pt"],
    ):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
        assert not marker.exists(), f"{args[0]} ran the checkpoint's code"


def test_a_checkpoint_whose_model_needs_user_code_says_to_pass_imports(
    invoke,
    checkpoint,
    tmp_path,
):
    planted, marker = planted_checkpoint(checkpoint, tmp_path, model="planted_net")
    (tmp_path / "image.npy").write_bytes(b"")
    for args in (
        ["eval", str(planted)],
        ["predict", str(planted), "image.npy"],
        ["export", str(planted), "--format", "torchscript"],
        ["explain", str(planted), "image.npy"],
    ):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        message = " ".join(result.stderr.split())
        assert "model 'planted_net'" in message and "never runs code" in message, message
        assert f"--imports {tmp_path / 'planted_module.py'}" in message, message
        assert not marker.exists(), f"{args[0]} ran the checkpoint's code"


def test_resume_from_a_checkpoint_never_imports_its_modules(checkpoint, tmp_path):
    planted, marker = planted_checkpoint(checkpoint, tmp_path)
    with pytest.raises(UserError, match="cannot resume"):
        train(tmp_path, TABULAR, "again", "train.epochs=2", resume=planted)
    assert not marker.exists()


# -- integrity: every load checks the digest saved with the checkpoint ---------------------------


def flip_bytes_in_tensor_data(path: Path, count: int = 16) -> None:
    """Invert `count` bytes in the middle of the largest tensor's data (torch stores tensor
    data uncompressed, and torch.load does not check the zip's CRCs)."""
    with zipfile.ZipFile(path) as archive:
        entry = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    data = bytearray(path.read_bytes())
    name_and_extra = int.from_bytes(
        data[entry.header_offset + 26 : entry.header_offset + 28], "little"
    )
    name_and_extra += int.from_bytes(
        data[entry.header_offset + 28 : entry.header_offset + 30], "little"
    )
    start = entry.header_offset + 30 + name_and_extra + entry.file_size // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_weights_are_refused_as_corrupted(invoke, checkpoint, tmp_path):
    corrupted = copy_of(checkpoint, tmp_path)
    flip_bytes_in_tensor_data(corrupted)
    torch.load(corrupted, weights_only=True)  # torch itself does not notice
    result = invoke("eval", str(corrupted))
    assert result.exit_code == 2
    assert f"{corrupted} is corrupted" in " ".join(result.stderr.split())
    assert not (tmp_path / "eval-test").exists()


def test_a_changed_value_or_a_dropped_digest_is_corrupted(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["metrics"]["best_epoch"] = 7  # metadata counts too
    torch.save(state, tmp_path / "changed.pt")
    with pytest.raises(UserError, match="does not match its digest"):
        load_checkpoint(tmp_path / "changed.pt")
    del state["digest"]
    torch.save(state, tmp_path / "dropped.pt")
    with pytest.raises(UserError, match="has no digest"):
        load_checkpoint(tmp_path / "dropped.pt")


def test_a_checkpoint_of_the_first_format_still_loads(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state = {**{k: v for k, v in state.items() if k != "digest"}, "format": 1}
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["format"] == 1


@pytest.mark.parametrize("format_", [True, -5, 0, "1", 2.0, None])
def test_a_format_no_dltrain_writes_is_damaged(checkpoint, tmp_path, format_):
    state = {**torch.load(checkpoint, weights_only=True), "format": format_}
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(UserError, match=f"its checkpoint format is {format_!r}, which no dltrain"):
        load_checkpoint(tmp_path / "odd.pt")


def shared_bomb(depth: int) -> list:
    """[a, a] nested `depth` deep: a few bytes per level in the file, 2^depth values walked."""
    level: list = ["x"]
    for _ in range(depth):
        level = [level, level]
    return level


def self_referencing() -> list:
    loop: list = ["x"]
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    "planted, problem",
    [
        (self_referencing, "holds a value that contains itself"),
        (lambda: shared_bomb(60), "holds more than 2,000,000 values"),
        (lambda: functools.reduce(lambda inner, _: [inner], range(200), []), "nests deeper"),
    ],
)
def test_a_crafted_structure_is_damaged_without_walking_it_forever(
    checkpoint, tmp_path, planted, problem
):
    for format_ in (1, 2):  # with a digest to check or without
        state = torch.load(checkpoint, weights_only=True)
        state = {**state, "format": format_, "recipe": {**state["recipe"], "notes": planted()}}
        torch.save(state, tmp_path / "crafted.pt")
        assert (tmp_path / "crafted.pt").stat().st_size < 1_000_000
        with pytest.raises(UserError, match=f"is damaged: it {problem}"):
            load_checkpoint(tmp_path / "crafted.pt")


def test_a_compressed_member_is_refused_before_it_is_inflated(checkpoint, tmp_path):
    # torch.save never compresses; a DEFLATEd data member could inflate to any size on reading
    target = tmp_path / "deflated.pt"
    with zipfile.ZipFile(checkpoint) as source, zipfile.ZipFile(target, "w") as packed:
        for info in source.infolist():
            packed.writestr(info.filename, source.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(UserError, match="is damaged: its member .* is compressed"):
        load_checkpoint(target)


def test_the_digest_covers_dtype_shape_and_structure():
    base = {"w": torch.zeros(2, 3), "n": [1, 2]}
    variants = [
        {"w": torch.zeros(3, 2), "n": [1, 2]},
        {"w": torch.zeros(2, 3, dtype=torch.float64)[:, :].float().half(), "n": [1, 2]},
        {"w": torch.zeros(2, 3), "n": (1, 2)},
        {"w": torch.zeros(2, 3), "n": [1, 2.0]},
    ]
    assert len({contents_digest(v) for v in [base, *variants]}) == 5
    assert contents_digest(base) == contents_digest({"w": torch.zeros(2, 3), "n": [1, 2]})


# -- outputs never replace inputs ------------------------------------------------------------


def test_export_and_explain_refuse_to_write_over_a_checkpoint(invoke, checkpoint, tmp_path):
    target = copy_of(checkpoint, tmp_path)
    other = copy_of(checkpoint, tmp_path, "other.pt")
    before = target.read_bytes()
    for args in (
        ["export", str(target), "--format", "torchscript", "--output", str(target)],
        ["export", str(target), "--format", "torchscript", "--output", str(other)],
        ["explain", str(target), "x.npy", "--output", str(target)],
    ):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "would replace its weights" in " ".join(result.stderr.split())
    assert target.read_bytes() == before
    assert other.read_bytes() == before
    # --force says the user means it (over a copy: the input is read before the write)
    forced = invoke("export", str(target), "--format", "torchscript", "-o", str(other), "--force")
    assert forced.exit_code == 0, forced.output
    # an export written before may be written again without --force (it is not a checkpoint)
    again = invoke("export", str(target), "--format", "torchscript", "-o", str(other))
    assert again.exit_code == 0, again.output


def test_eval_refuses_to_write_its_report_into_a_run_folder(invoke, checkpoint, tmp_path):
    run = checkpoint.parent.parent
    before = (run / "report.json").read_bytes()
    result = invoke("eval", str(checkpoint), "--output", str(run))
    assert result.exit_code == 2
    assert "holds a training run" in " ".join(result.stderr.split())
    assert (run / "report.json").read_bytes() == before


def test_torchs_advice_to_load_with_weights_only_false_is_never_passed_on(
    invoke,
    tmp_path,
):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(tmp_path / "best.pt"))  # e.g. an export written over it
    result = invoke("eval", str(tmp_path / "best.pt"))
    assert result.exit_code == 2
    assert "is a TorchScript export, not a dltrain checkpoint" in " ".join(result.stderr.split())
    assert "weights_only" not in result.output and "weights only" not in result.output.lower()


# -- large, not wrong: refused fast, before any allocation -------------------------------------

BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 10) if prev else ', '.join(['1'] * 10)}]\n"
    for prev, name in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh")
)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    from dltrain.config.loading import load_recipe

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + "data: {name: digits}\nmodel: mlp\ntrain: {epochs: *h}\n")
    started = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than 100,000 values"):
        load_recipe(path)
    with pytest.raises(UserError):  # the same bomb as an override value
        load_recipe(
            QUICKSTART,
            ["train.epochs=" + "{" + BOMB.replace("\n", ", ") + "}"],
        )
    assert time.perf_counter() - started < 10


def test_a_recipe_that_is_not_a_small_regular_file_is_refused(tmp_path):
    from dltrain.config.loading import MAX_RECIPE_BYTES, load_recipe

    with pytest.raises(UserError, match="not a regular file"):
        load_recipe("/dev/zero")
    with pytest.raises(UserError, match="not a regular file"):
        load_recipe(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_RECIPE_BYTES + 1))
    with pytest.raises(UserError, match="a recipe is a small YAML file"):
        load_recipe(big)


def test_an_npz_label_far_beyond_the_data_is_one_message_before_any_allocation(tmp_path):
    from dltrain.config.registry import DATASETS

    x = np.zeros((6, 1, 4, 4), dtype=np.uint8)
    for label in (3_000_000_000, 50):
        y = np.array([0, 1, 2, 0, 1, label])
        np.savez(tmp_path / "d.npz", train_x=x, train_y=y, test_x=x, test_y=y % 3)
        with pytest.raises(UserError, match=f"label {label}"):
            DATASETS.build({"name": "npz", "path": str(tmp_path / "d.npz")}, seed=0)


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path):
    from dltrain.training.build import build_setup

    recipe = make_recipe(tmp_path, TABULAR, "huge", "model.hidden=[1000000000, 1000000000]")
    with pytest.raises(UserError, match=r"weights alone need .* GB free\. Make the model smaller"):
        build_setup(recipe)


def test_random_crop_padding_larger_than_the_images_is_refused(tmp_path):
    from dltrain.training.build import build_setup

    recipe = make_recipe(
        tmp_path,
        TABULAR,
        "crop",
        "data.name=digits",
        "model.name=seed_cnn",
        "data.augment=[{random_crop: {padding: 100000}}]",
    )
    with pytest.raises(UserError, match="padding 100000 is larger than the images"):
        build_setup(recipe)


# -- no internal error for input ----------------------------------------------------------------


def test_nan_features_and_an_empty_test_split_are_named(tmp_path):
    from dltrain.training.build import build_setup

    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = np.arange(40) % 2
    test_x = x[:6].copy()
    test_x[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", train_x=x, train_y=y, test_x=test_x, test_y=y[:6])
    np.savez(tmp_path / "empty.npz", train_x=x, train_y=y, test_x=x[:0], test_y=y[:0])
    for file, expected in (
        ("nan.npz", r"test split .* NaN or infinite input values in 1 sample\(s\) \(rows \[3\]"),
        ("empty.npz", "the test split of dataset 'npz' is empty"),
    ):
        recipe = make_recipe(
            tmp_path, TABULAR, "bad", "data.name=npz", f"data.path={tmp_path / file}"
        )
        with pytest.raises(UserError, match=expected):
            build_setup(recipe)


def test_a_resumed_optimizer_state_of_the_wrong_shape_is_refused(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    moments = state["optimizer"]["state"][0]
    key = next(k for k, v in moments.items() if isinstance(v, torch.Tensor) and v.dim())
    moments[key] = torch.zeros(3, 3)
    save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in state.items() if k != "digest"})
    with pytest.raises(UserError, match=f"its optimizer state does not fit this run .*'{key}'"):
        train(tmp_path, TABULAR, "resumed", "train.epochs=2", resume=tmp_path / "bad.pt")


def test_weights_of_the_wrong_shape_name_the_layer_and_both_shapes(checkpoint, tmp_path):
    from dltrain.use.inference import load_for_inference

    state = load_checkpoint(checkpoint)
    name, tensor = next((k, v) for k, v in state["model"].items() if v.dim() == 2)
    state["model"][name] = torch.zeros(tensor.shape[0] + 1, tensor.shape[1])
    save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in state.items() if k != "digest"})
    wrong, right = (tensor.shape[0] + 1, tensor.shape[1]), tuple(tensor.shape)
    said = f"{name} is {wrong} in the checkpoint but {right} in the model"
    with pytest.raises(UserError, match=re.escape(said)):
        load_for_inference(tmp_path / "bad.pt")
