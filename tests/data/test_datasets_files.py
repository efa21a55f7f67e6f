"""Datasets from user files (npz, csv, image folders), torchvision sets, and stratified splits.

Every test builds its tiny data under tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import datasets as tv_datasets

from dltrain.config.registry import DATASETS
from dltrain.data import arrays, csv_tables, images, torchvision_sets
from dltrain.data.base import ArraySplit
from dltrain.data.splits import stratified_split
from dltrain.errors import RecipeError, UserError

from helpers.cli import REPO, flat_image_folder, png

SHARED_MNIST = REPO.parent / "shared/data/mnist.npz"


# -- stratified_split -----------------------------------------------------------------------


def test_stratified_split_is_disjoint_complete_and_sorted():
    labels = np.repeat(np.arange(4), [10, 7, 2, 1])
    kept, carved = stratified_split(labels, 0.3, seed=0)
    assert kept.dtype == carved.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([kept, carved])), np.arange(len(labels)))
    assert not set(kept) & set(carved)
    assert np.all(np.diff(kept) > 0) and np.all(np.diff(carved) > 0)


def test_stratified_split_counts_per_class():
    labels = np.repeat(np.arange(4), [10, 7, 2, 1])
    _, carved = stratified_split(labels, 0.3, seed=0)
    counts = np.bincount(labels[carved], minlength=4)
    # round(3.0)=3, round(2.1)=2, round(0.6)=1, and a single-sample class stays kept.
    assert counts.tolist() == [3, 2, 1, 0]
    # A tiny fraction still carves one of each class with >= 2 samples, but never all of one.
    _, carved = stratified_split(labels, 0.01, seed=0)
    assert np.bincount(labels[carved], minlength=4).tolist() == [1, 1, 1, 0]
    kept, _ = stratified_split(labels, 0.99, seed=0)
    assert set(labels[kept]) == {0, 1, 2, 3}


def test_stratified_split_is_deterministic_for_a_seed():
    labels = np.array(["b", "a"] * 50)  # any sortable label type works
    first = stratified_split(labels, 0.2, seed=7)
    again = stratified_split(labels, 0.2, seed=7)
    other = stratified_split(labels, 0.2, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[1], other[1])
    assert len(first[1]) == 20


def test_stratified_split_edge_cases():
    kept, carved = stratified_split(np.array([0, 1, 1]), 0.0, seed=0)
    assert kept.tolist() == [0, 1, 2] and carved.tolist() == []
    kept, carved = stratified_split(np.array([], dtype=np.int64), 0.5, seed=0)
    assert kept.size == carved.size == 0
    with pytest.raises(ValueError):
        stratified_split(np.array([0, 1]), 1.0, seed=0)
    with pytest.raises(ValueError):
        stratified_split(np.zeros((2, 2)), 0.5, seed=0)


# -- npz ------------------------------------------------------------------------------------


def _save_npz(tmp_path: Path, **arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def _labels(n: int, classes: int = 3) -> np.ndarray:
    return np.arange(n) % classes


def _nchw(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("shape", "layout", "expected"),
    [
        ((6, 5, 7), "auto", lambda x: x[:, None]),  # grayscale N×H×W
        ((6, 3, 5, 7), "auto", lambda x: x),  # NCHW
        ((6, 5, 7, 3), "auto", _nchw),  # NHWC
        ((6, 5, 7, 1), "nhwc", _nchw),
        ((6, 4, 4, 4), "nhwc", _nchw),  # ambiguous shape, explicit layout
        ((6, 4, 4, 4), "nchw", lambda x: x),
    ],
)
def test_npz_image_layouts(tmp_path, shape, layout, expected):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = _save_npz(tmp_path, train_x=x, train_y=_labels(6), test_x=x[:2], test_y=_labels(2))
    loaded = arrays.npz(path, layout=layout)
    assert loaded.kind == "image"
    assert loaded.train.x.dtype == torch.uint8  # native uint8 kept, not scaled
    assert torch.equal(loaded.train.x, torch.from_numpy(np.ascontiguousarray(expected(x))))
    assert loaded.train.y.dtype == torch.int64
    assert loaded.classes == ["0", "1", "2"]
    assert loaded.val is None and len(loaded.test) == 2


def test_npz_tabular_with_val_and_classes(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(8, 3)
    path = _save_npz(
        tmp_path,
        train_x=x,
        train_y=_labels(8, 2),
        val_x=x[:2],
        val_y=np.array([0, 1]),
        test_x=x[:4],
        test_y=_labels(4, 2),
        classes=np.array(["cat", "dog"]),
    )
    loaded = arrays.npz(path)
    assert loaded.kind == "tabular"
    assert loaded.classes == ["cat", "dog"]
    assert loaded.train.x.dtype == torch.float32 and loaded.train.x.shape == (8, 3)
    assert len(loaded.val) == 2 and len(loaded.test) == 4


def test_npz_float_images_stay_float32(tmp_path):
    x = np.random.default_rng(0).random((4, 3, 2, 2))
    path = _save_npz(tmp_path, train_x=x, train_y=_labels(4), test_x=x, test_y=_labels(4))
    loaded = arrays.npz(path)
    assert loaded.train.x.dtype == torch.float32
    assert torch.allclose(loaded.train.x, torch.from_numpy(x).float())


def _npz_error(path: str, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        arrays.npz(path, **kwargs)
    assert info.value.exit_code == 2
    return str(info.value)


def test_npz_missing_keys_names_missing_and_found(tmp_path):
    x = np.zeros((4, 2), dtype=np.float32)
    path = _save_npz(tmp_path, train_x=x, train_y=_labels(4), x_test=x)
    message = _npz_error(path)
    assert "test_x, test_y" in message and "found: train_x, train_y, x_test" in message


def test_npz_labels_out_of_range(tmp_path):
    x = np.zeros((4, 2), dtype=np.float32)
    path = _save_npz(
        tmp_path,
        train_x=x,
        train_y=np.array([0, 1, 2, 5]),
        test_x=x,
        test_y=_labels(4),
        classes=np.array(["a", "b", "c"]),
    )
    message = _npz_error(path)
    assert "train_y" in message and "5" in message and "[0, 3)" in message
    path = _save_npz(
        tmp_path, train_x=x, train_y=np.array([0, -1, 0, 1]), test_x=x, test_y=_labels(4)
    )
    assert "train_y" in _npz_error(path) and "negative" in _npz_error(path)
    path = _save_npz(tmp_path, train_x=x, train_y=np.full(4, 0.5), test_x=x, test_y=_labels(4))
    assert "train_y" in _npz_error(path)


def test_npz_mismatched_lengths_and_shapes(tmp_path):
    x = np.zeros((4, 2), dtype=np.float32)
    path = _save_npz(tmp_path, train_x=x, train_y=_labels(4), test_x=x, test_y=_labels(3))
    message = _npz_error(path)
    assert "test_x" in message and "test_y" in message and "4" in message and "3" in message
    path = _save_npz(
        tmp_path, train_x=x, train_y=_labels(4), test_x=np.zeros((4, 5)), test_y=_labels(4)
    )
    assert "test_x" in _npz_error(path)


def test_npz_ambiguous_layout_asks_for_data_layout(tmp_path):
    x = np.zeros((4, 5, 5, 5), dtype=np.uint8)
    path = _save_npz(tmp_path, train_x=x, train_y=_labels(4), test_x=x, test_y=_labels(4))
    assert "data.layout" in _npz_error(path)


def test_npz_missing_or_unreadable_file(tmp_path):
    message = _npz_error(str(tmp_path / "nope.npz"))
    assert "data.path" in message and str((tmp_path / "nope.npz").resolve()) in message
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    assert "data.path" in _npz_error(str(bad))
    objects = np.array([{"a": 1}], dtype=object)
    path = _save_npz(tmp_path, train_x=objects, train_y=objects, test_x=objects, test_y=objects)
    assert "data.path" in _npz_error(path)  # pickled arrays are refused, never loaded


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason="shared MNIST copy not present")
def test_npz_loads_shared_mnist():
    loaded = arrays.npz(str(SHARED_MNIST))
    assert loaded.kind == "image"
    assert len(loaded.classes) == 10
    assert tuple(loaded.train.x.shape[1:]) == (1, 28, 28)
    assert loaded.train.x.dtype == torch.uint8
    assert len(loaded.train) == 60000


# -- csv ------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _species_csv(tmp_path: Path, rows_per_class: int = 10) -> str:
    lines = ["a,b,species"]
    for i in range(rows_per_class):
        for j, name in enumerate(["setosa", "virginica", "versicolor"]):
            lines.append(f"{i},{j + i / 10},{name}")
    return _write(tmp_path / "iris.csv", "\n".join(lines) + "\n")


def _csv_recipe(recipe: Path, output: Path, name: str, **data) -> Path:
    """A recipe file: an MLP for 2 epochs on a csv dataset whose label column is species."""
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "output": str(output),
                "device": "cpu",
                "data": {"name": "csv", "label": "species", **data},
                "model": {"name": "mlp", "hidden": [8]},
                "train": {"epochs": 2},
            }
        )
    )
    return recipe


def _rows(split: ArraySplit) -> set[tuple]:
    return {(*row.tolist(), int(y)) for row, y in zip(split.x, split.y, strict=True)}


def test_csv_single_file_carves_stratified_test_split(tmp_path):
    path = _species_csv(tmp_path)
    loaded = csv_tables.csv(path=path, label="species", test_split=0.2, seed=3)
    assert loaded.kind == "tabular"
    assert loaded.classes == ["setosa", "versicolor", "virginica"]
    assert loaded.train.x.dtype == torch.float64 and loaded.train.x.shape == (24, 2)  # raw layout
    assert torch.bincount(loaded.test.y).tolist() == [2, 2, 2]
    train_rows, test_rows = _rows(loaded.train), _rows(loaded.test)
    assert not train_rows & test_rows and len(train_rows | test_rows) == 30
    again = csv_tables.csv(path=path, label="species", test_split=0.2, seed=3)
    assert torch.equal(again.test.x, loaded.test.x)
    other = csv_tables.csv(path=path, label="species", test_split=0.2, seed=4)
    assert not torch.equal(other.test.x, loaded.test.x)


def test_csv_train_and_test_files_with_integer_labels(tmp_path):
    train = _write(tmp_path / "train.csv", "x1,x2,label\n1,2,10\n3,4,2\n\n5,6,10\n")
    test = _write(tmp_path / "test.csv", "label,x2,x1\n2,0.5,1.5\n010,1,1\n")
    loaded = csv_tables.csv(train=train, test=test, features=["x1", "x2"])
    assert loaded.classes == ["2", "10"]  # numeric order, not '10' < '2'
    assert loaded.train.y.tolist() == [1, 0, 1]
    assert loaded.test.x.tolist() == [[1.5, 0.5], [1.0, 1.0]]  # columns matched by name
    assert loaded.test.y.tolist() == [0, 1]
    assert csv_tables.csv(train=train).test is None


def test_a_fit_on_a_train_file_alone_reports_on_the_training_data_and_says_so(tmp_path, invoke):
    # no test file and no validation split: a final model trained on everything. It finishes
    # with a report labelled as what it is, never an error after the training is done.
    train = _species_csv(tmp_path)
    recipe = _csv_recipe(tmp_path / "all.yaml", tmp_path / "runs", "all", train=train, val_split=0)
    result = invoke("fit", str(recipe))
    assert result.exit_code == 0, result.output
    assert "the final report is on the training data" in " ".join(result.output.split())
    report = json.loads((tmp_path / "runs" / "all" / "report.json").read_text())
    assert report["split"] == "train" and report["num_samples"] == 30
    assert "train accuracy" in result.output


def test_csv_test_label_unseen_in_train(tmp_path):
    train = _write(tmp_path / "train.csv", "x,label\n1,a\n2,b\n")
    test = _write(tmp_path / "test.csv", "x,label\n1,a\n2,c\n")
    with pytest.raises(UserError, match=r"line 3 has label 'c'"):
        csv_tables.csv(train=train, test=test)


def test_csv_bad_numeric_cell_names_line_and_column(tmp_path):
    path = _write(tmp_path / "t.csv", "x1,x2,label\n1,2,a\n3,oops,b\n4,5,a\n")
    with pytest.raises(UserError) as info:
        csv_tables.csv(path=path)
    message = str(info.value)
    assert "line 3" in message and "'x2'" in message and "'oops'" in message
    assert "t.csv" in message and info.value.exit_code == 2


def test_csv_missing_label_column_suggests_nearest(tmp_path):
    path = _write(tmp_path / "t.csv", "x1,x2,labels\n1,2,a\n")
    with pytest.raises(UserError) as info:
        csv_tables.csv(path=path)
    message = str(info.value)
    assert "data.label" in message and "x1, x2, labels" in message
    assert "Did you mean 'labels'?" in message


def test_csv_path_and_train_are_exclusive(tmp_path):
    path = _species_csv(tmp_path)
    with pytest.raises(UserError, match="data.path"):
        csv_tables.csv(path=path, train=path, label="species")
    with pytest.raises(UserError, match="data.train"):
        csv_tables.csv(label="species")


# -- image_folder ---------------------------------------------------------------------------


def test_image_folder_flat_layout_carves_test_split(tmp_path):
    loaded = images.image_folder(
        str(flat_image_folder(tmp_path)), image_size=8, test_split=0.2, seed=0
    )
    assert loaded.kind == "image" and loaded.classes == ["cat", "dog"]
    assert isinstance(loaded.train, ArraySplit)  # small: decoded once, resident
    assert loaded.train.x.dtype == torch.uint8 and tuple(loaded.train.x.shape) == (8, 3, 8, 8)
    assert loaded.test.y.tolist() == [0, 1]
    assert loaded.val is None
    again = images.image_folder(str(tmp_path), image_size=8, test_split=0.2, seed=0)
    assert torch.equal(again.test.x, loaded.test.x)
    assert images.image_folder(str(tmp_path), image_size=8, test_split=0).test is None


def test_image_folder_split_layout_and_grayscale(tmp_path):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for name in ("a", "b", "c"):
            for i in range(n):
                png(tmp_path / split / name / f"{i}.png", (5, 3), 10 * i)
    loaded = images.image_folder(str(tmp_path), image_size=(4, 6), grayscale=True)
    assert loaded.classes == ["a", "b", "c"]
    assert tuple(loaded.train.x.shape) == (9, 1, 4, 6)
    assert len(loaded.val) == 3 and len(loaded.test) == 6
    assert loaded.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_image_folder_unknown_class_in_val(tmp_path):
    png(tmp_path / "train" / "a" / "0.png", (4, 4), 0)
    png(tmp_path / "val" / "zebra" / "0.png", (4, 4), 0)
    with pytest.raises(UserError, match="zebra"):
        images.image_folder(str(tmp_path))


def test_image_folder_empty_folder_explains_layout(tmp_path):
    with pytest.raises(UserError, match="one folder per class"):
        images.image_folder(str(tmp_path))
    with pytest.raises(UserError, match="data.path"):
        images.image_folder(str(tmp_path / "missing"))


def test_image_folder_corrupt_file_skip_or_error(tmp_path):
    flat_image_folder(tmp_path)
    bad = tmp_path / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match="skipping undecodable image .*broken.png"):
        loaded = images.image_folder(str(tmp_path), image_size=8, test_split=0)
    assert len(loaded.train) == 10
    with pytest.raises(UserError) as info:
        images.image_folder(str(tmp_path), image_size=8, on_bad_file="error")
    assert "broken.png" in str(info.value) and "on_bad_file: skip" in str(info.value)


def test_image_folder_lazy_split_matches_resident(tmp_path, monkeypatch):
    flat_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"junk")
    with pytest.warns(UserWarning):
        resident = images.image_folder(str(tmp_path), image_size=(5, 7), seed=1)
    monkeypatch.setattr(images, "RESIDENT_LIMIT_BYTES", 0)
    with pytest.warns(UserWarning):
        lazy = images.image_folder(str(tmp_path), image_size=(5, 7), seed=1)
    for name in ("train", "test"):
        split = getattr(lazy, name)
        assert isinstance(split, images.ImageFileSplit)
        assert split.targets == getattr(resident, name).y.tolist()
        items = [split[i] for i in range(len(split))]
        assert all(x.dtype == torch.uint8 for x, _ in items)
        assert torch.equal(torch.stack([x for x, _ in items]), getattr(resident, name).x)


def test_lazy_split_replaces_truncated_image(tmp_path, monkeypatch):
    flat_image_folder(tmp_path)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cat" / "0.PNG")
    whole = (tmp_path / "cat" / "0.PNG").read_bytes()
    (tmp_path / "cat" / "0.PNG").write_bytes(whole[: len(whole) // 2])  # header reads, pixels not
    monkeypatch.setattr(images, "RESIDENT_LIMIT_BYTES", 0)
    lazy = images.image_folder(str(tmp_path), image_size=4, test_split=0)
    assert len(lazy.train) == 10
    with pytest.warns(UserWarning, match="0.PNG"):
        x, y = lazy.train[0]
    assert y == 0 and torch.equal(x, lazy.train[1][0])  # the next image of the same class
    strict = images.image_folder(str(tmp_path), image_size=4, test_split=0, on_bad_file="error")
    with pytest.raises(UserError, match="0.PNG"):
        strict.train[0]


# -- torchvision datasets -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_torchvision_missing_files_mention_download(tmp_path, name):
    factory = getattr(torchvision_sets, name)
    with pytest.raises(UserError) as info:
        factory(root=str(tmp_path), download=False)
    message = str(info.value)
    assert f"{name} not found under '{tmp_path}'" in message and "data.download=true" in message
    assert info.value.exit_code == 2


def test_torchvision_failed_download(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(tv_datasets.CIFAR10, "download", offline)
    with pytest.raises(UserError) as info:
        torchvision_sets.cifar10(root=str(tmp_path), download=True)
    message = str(info.value)
    assert "failed" in message and "no network" in message
    assert str(tmp_path / "cifar-10-batches-py") in message


def _idx(path: Path, array: np.ndarray) -> None:
    """Write an MNIST-style big-endian IDX file of uint8 data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_local_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 4 * 5).reshape(3, 4, 5) % 256
    for prefix in ("train", "t10k"):
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.array([0, 9, 4]))
    loaded = torchvision_sets.mnist(root=str(tmp_path))
    assert loaded.kind == "image" and loaded.classes == [str(i) for i in range(10)]
    assert loaded.train.x.dtype == torch.uint8 and tuple(loaded.train.x.shape) == (3, 1, 4, 5)
    assert torch.equal(loaded.test.x[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert loaded.train.y.tolist() == [0, 9, 4] and loaded.train.y.dtype == torch.int64


# -- registry validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "section",
    [
        {"name": "npz", "path": "x.npz"},
        {"name": "csv", "path": "x.csv"},
        {"name": "csv", "train": "a.csv", "test": "b.csv", "features": ["f1"]},
        {"name": "image_folder", "path": "imgs", "image_size": [32, 48]},
        {"name": "cifar10"},
        {"name": "cifar100", "root": "d"},
        {"name": "mnist", "download": True},
        {"name": "fashion_mnist"},
    ],
)
def test_factories_validate(section):
    checked = DATASETS.validate(section, "data")
    assert checked["name"] == section["name"]
    assert DATASETS.summary(section["name"])  # `dltrain list datasets` shows a description


def test_validate_fills_defaults_and_suggests_keys():
    assert DATASETS.validate({"name": "npz", "path": "x.npz"}, "data") == {
        "name": "npz",
        "path": "x.npz",
        "layout": "auto",
    }
    # With `path` present too; a lone typo currently reports the missing `path` first (registry).
    with pytest.raises(RecipeError, match=r"data\.pth: unknown key\. Did you mean 'path'\?"):
        DATASETS.validate({"name": "npz", "path": "x.npz", "pth": "x.npz"}, "data")
    with pytest.raises(RecipeError, match="data.test_split"):
        DATASETS.validate({"name": "csv", "path": "x.csv", "test_split": 1.5}, "data")
    with pytest.raises(RecipeError, match="data.seed"):
        DATASETS.validate({"name": "csv", "path": "x.csv", "seed": 1}, "data")


def test_build_passes_seed_and_image_size_tuple(tmp_path):
    flat_image_folder(tmp_path)
    section = DATASETS.validate(
        {"name": "image_folder", "path": str(tmp_path), "image_size": [4, 6]}, "data"
    )
    loaded = DATASETS.build(section, seed=5)
    assert tuple(loaded.train.x.shape[1:]) == (3, 4, 6)


def test_a_recipe_beside_its_data_trains_from_any_folder_and_its_checkpoint_evaluates_anywhere(
    tmp_path, monkeypatch, invoke
):
    project = tmp_path / "project"
    project.mkdir()
    _species_csv(project)  # project/iris.csv, beside the recipe
    recipe = _csv_recipe(project / "iris.yaml", tmp_path / "runs", "iris", path="iris.csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert invoke("fit", str(recipe), "-q").exit_code == 0
    monkeypatch.chdir(tmp_path)  # another folder again: the checkpoint names the file absolutely
    best = tmp_path / "runs" / "iris" / "checkpoints" / "best.pt"
    result = invoke("eval", str(best), "--output", str(tmp_path / "eval"), "--json")
    assert result.exit_code == 0, result.output


def test_a_validation_file_is_the_val_split_and_val_split_is_not_used(tmp_path, invoke):
    train = _species_csv(tmp_path)
    val = _write(tmp_path / "val.csv", "b,a,species\n0.5,1,virginica\n1.5,2,setosa\n")
    loaded = csv_tables.csv(train=train, val=val, label="species")
    assert loaded.val.x.tolist() == [[1.0, 0.5], [2.0, 1.5]]  # columns matched by name
    assert loaded.val.y.tolist() == [2, 0]  # the training file's classes
    carved = csv_tables.csv(path=train, val=val, label="species", test_split=0.2)
    assert len(carved.val) == 2 and len(carved.test) == 6
    with pytest.raises(UserError, match=r"data.val.*line 2 has label 'tulip'"):
        csv_tables.csv(
            train=train,
            val=_write(tmp_path / "bad.csv", "a,b,species\n1,2,tulip\n"),
            label="species",
        )

    recipe = _csv_recipe(tmp_path / "r.yaml", tmp_path / "runs", "with-val", train=train, val=val)
    checked = invoke("check", str(recipe))
    assert "val ← data.val" in checked.stderr and "data.val_split is not used" in checked.stderr
    assert invoke("fit", str(recipe), "-q").exit_code == 0
    history = json.loads((tmp_path / "runs" / "with-val" / "report.json").read_text())
    assert history["split"] == "val" and history["num_samples"] == 2  # no test: the val file


# -- image_size: auto, and the cache of decoded folders -------------------------------------------


def _folder_of_sizes(root: Path, sizes: list[tuple[int, int]]) -> Path:
    for i, (width, height) in enumerate(sizes):
        png(root / ["cat", "dog"][i % 2] / f"{i}.png", (width, height), 20 * i)
    return root


def test_image_size_auto_keeps_the_images_own_size(tmp_path):
    root = _folder_of_sizes(tmp_path / "same", [(12, 10)] * 6)
    loaded = images.image_folder(str(root), test_split=0)
    assert loaded.train.x.shape == (6, 3, 10, 12)  # N×C×H×W: height 10, width 12


def test_image_size_auto_takes_the_most_common_size_and_says_so(tmp_path):
    root = _folder_of_sizes(tmp_path / "mixed", [(8, 8)] * 5 + [(16, 4)] * 2 + [(5, 5)])
    with pytest.warns(UserWarning, match=r"found 3 image sizes; using the most common, 8×8 \(5 of"):
        loaded = images.image_folder(str(root), test_split=0)
    assert loaded.train.x.shape[1:] == (3, 8, 8)


def test_a_decoded_folder_is_cached_and_a_changed_file_is_decoded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DLTRAIN_CACHE", str(tmp_path / "cache"))
    root = _folder_of_sizes(tmp_path / "imgs", [(6, 6)] * 8)
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    decoded = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *a: decoded.append(a[0]) or real(*a))

    with pytest.warns(UserWarning, match="skipping undecodable image .*broken.png"):
        first = images.image_folder(str(root), test_split=0.25, seed=1)
    assert len(decoded) == 9 and list((tmp_path / "cache" / "images").glob("*.npz"))
    decoded.clear()
    with pytest.warns(UserWarning, match="broken.png"):  # said again, from the cache
        again = images.image_folder(str(root), test_split=0.25, seed=1)
    assert decoded == []  # nothing decoded: every split came from the cache
    for split in ("train", "test"):
        assert torch.equal(getattr(first, split).x, getattr(again, split).x)
        assert torch.equal(getattr(first, split).y, getattr(again, split).y)

    png(root / "cat" / "0.png", (6, 6), 200)  # the same name, new pixels (and mtime)
    with pytest.warns(UserWarning):
        changed = images.image_folder(str(root), test_split=0.25, seed=1)
    assert decoded  # that split was decoded again: a stale entry is never read
    assert not torch.equal(changed.train.x, first.train.x) or not torch.equal(
        changed.test.x, first.test.x
    )


def test_the_cache_can_be_off_and_a_cache_that_cannot_be_written_only_warns(tmp_path, monkeypatch):
    root = _folder_of_sizes(tmp_path / "imgs", [(6, 6)] * 4)
    monkeypatch.setenv("DLTRAIN_CACHE", "off")
    assert len(images.image_folder(str(root), test_split=0).train) == 4
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("DLTRAIN_CACHE", str(blocked))  # cannot hold a folder
    with pytest.warns(UserWarning, match="could not cache the decoded images"):
        assert len(images.image_folder(str(root), test_split=0).train) == 4
