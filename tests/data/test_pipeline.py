"""The data path: seeded batch order (resident and worker loaders), augmentations, normalisation,
the carved validation split, and data_meta reuse.

Everything is in memory (synthetic or the bundled digits); nothing is written or downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dltrain.config.registry import AUGMENTATIONS, DATASETS
from dltrain.config.schema import resolve
from dltrain.data import prepare as prepare_module
from dltrain.data.base import ArraySplit
from dltrain.data.loaders import ResidentBatches, WorkerBatches, epoch_permutation, make_batches
from dltrain.data.pipeline import BatchPipeline
from dltrain.data.prepare import prepare_data
from dltrain.errors import UserError

CPU = torch.device("cpu")


def data_section(**data):
    """A validated data section, as `fit` would see it."""
    return resolve({"name": "t", "data": data, "model": {"name": "mlp"}}).data


def id_split(n: int) -> ArraySplit:
    """Rows whose features are their own index, so a batch says which samples it holds."""
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return ArraySplit(x, torch.arange(n) % 5)


def ids(batches, epoch: int) -> list[list[int]]:
    out = []
    for x, y in batches.epoch(epoch):
        assert torch.equal(y, x[:, 0].long() % 5)  # labels travel with their rows
        out.append(x[:, 0].long().tolist())
    return out


# -- batch order ------------------------------------------------------------------------------

N, BATCH, SEED = 103, 16, 7


@pytest.fixture(scope="module")
def loaders():
    """Resident, in-process workers and two worker processes, over the same 103 rows."""
    split = id_split(N)
    common = dict(batch_size=BATCH, device=CPU, shuffle=True, drop_last=False, seed=SEED)
    built = {
        "resident": ResidentBatches(split, **common),
        "workers0": WorkerBatches(split, **common, num_workers=0),
        "workers2": WorkerBatches(split, **common, num_workers=2),
    }
    yield built
    del built


def test_all_paths_give_the_same_batches_in_the_same_order(loaders):
    for epoch in (1, 2, 5):
        reference = ids(loaders["resident"], epoch)
        assert ids(loaders["workers0"], epoch) == reference
        assert ids(loaders["workers2"], epoch) == reference


def test_each_epoch_visits_every_sample_once_in_a_new_order(loaders):
    orders = []
    for epoch in (1, 2, 3):
        batches = ids(loaders["workers2"], epoch)
        assert [len(b) for b in batches] == [BATCH] * (N // BATCH) + [N % BATCH]
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(N))
        orders.append(flat)
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert orders[0] != list(range(N))  # actually shuffled
    # The same (seed, epoch) replays exactly; another seed gives another order.
    assert [i for b in ids(loaders["resident"], 2) for i in b] == orders[1]
    other_seed = ResidentBatches(id_split(N), BATCH, CPU, shuffle=True, drop_last=False, seed=8)
    assert [i for b in ids(other_seed, 2) for i in b] != orders[1]


def test_every_seed_and_epoch_pair_has_its_own_order():
    # (seed 3, epoch 2) and (seed 4, epoch 1) must differ: a derivation such as seed + epoch
    # would make runs of neighbouring seeds replay each other's epochs
    orders = {
        (seed, epoch): tuple(epoch_permutation(50, seed, epoch).tolist())
        for seed in range(8)
        for epoch in range(8)
    }
    assert len(set(orders.values())) == len(orders)


def test_loading_batches_leaves_the_global_rng_alone(loaders):
    # Dropout and augmentations draw from torch's global generator; if loading a batch drew
    # from it too, results would depend on the data path and a resumed run would diverge.
    torch.manual_seed(0)
    expected = torch.rand(4)
    for name in ("resident", "workers0", "workers2"):
        torch.manual_seed(0)
        ids(loaders[name], 9)
        assert torch.equal(torch.rand(4), expected), name


@pytest.mark.parametrize("path", ["resident", "workers"])
def test_drop_last_and_sequential_order(path):
    def build(shuffle, drop_last):
        return make_batches(
            id_split(N),
            BATCH,
            CPU,
            loader=path,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=SEED,
            num_workers=0,
        )

    dropped = build(True, True)
    assert len(dropped) == N // BATCH and dropped.num_samples == N
    batches = ids(dropped, 1)
    assert len(batches) == N // BATCH and all(len(b) == BATCH for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) == N // BATCH * BATCH
    # drop_last only cuts the tail of the same permutation.
    kept = [i for b in ids(build(True, False), 1) for i in b]
    assert flat == kept[: len(flat)]
    # Without shuffling (evaluation) the order is the split's own, whatever the epoch.
    sequential = build(False, False)
    assert len(sequential) == -(-N // BATCH)
    assert [i for b in ids(sequential, 3) for i in b] == list(range(N))


def test_auto_loader_keeps_in_memory_splits_resident_on_cpu():
    batches = make_batches(
        id_split(10), 4, CPU, loader="auto", shuffle=False, drop_last=False, seed=0
    )
    assert isinstance(batches, ResidentBatches)


# -- augmentations ----------------------------------------------------------------------------


def augmentation(name: str, kind: str = "image", **kwargs):
    section = AUGMENTATIONS.validate({"name": name, **kwargs}, "data.augment[0]")
    return AUGMENTATIONS.build(section, input_kind=kind)


def images(b=32, c=3, h=6, w=9, dtype=torch.float32) -> torch.Tensor:
    # Strictly positive, all-distinct values: every crop offset gives a different picture.
    g = torch.Generator().manual_seed(0)
    return (torch.randperm(b * c * h * w, generator=g).view(b, c, h, w) + 1).to(dtype) / (
        b * c * h * w
    )


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("hflip", {}), ("vflip", {}), ("random_crop", {"padding": 2}), ("gaussian_noise", {})],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augmentations_keep_shape_and_dtype(name, kwargs, dtype):
    x = images(dtype=dtype)
    out = augmentation(name, **kwargs)(x)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device


@pytest.mark.parametrize(("name", "dim"), [("hflip", -1), ("vflip", -2)])
def test_flips_follow_their_probability(name, dim):
    x = images()
    assert torch.equal(augmentation(name, p=1.0)(x), x.flip(dim))
    assert torch.equal(augmentation(name, p=0.0)(x), x)
    torch.manual_seed(0)
    out = augmentation(name, p=0.5)(images(b=200, h=4, w=4))
    reference = images(b=200, h=4, w=4)
    flipped = [torch.equal(o, r.flip(dim)) for o, r in zip(out, reference)]
    kept = [torch.equal(o, r) for o, r in zip(out, reference)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is whole: flipped or not
    assert 60 < sum(flipped) < 140


@pytest.mark.parametrize("padding", [1, 3])
def test_random_crop_is_a_crop_of_the_zero_padded_image(padding):
    x = images(b=24, c=3, h=6, w=9)
    torch.manual_seed(1)
    out = augmentation("random_crop", padding=padding)(x)
    offsets = []
    for image, crop in zip(x, out):  # the slow reference: try every offset of every image
        padded = F.pad(image, (padding,) * 4)
        matches = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(crop, padded[:, dy : dy + 6, dx : dx + 9])
        ]
        assert len(matches) == 1, "each output must be exactly one crop of its own padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 3  # offsets are drawn per image, not once per batch


def test_image_augmentations_refuse_tabular_data():
    with pytest.raises(UserError, match="hflip"):
        augmentation("hflip", kind="tabular")


def test_pipeline_scales_uint8_normalises_and_augments_only_in_training():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)  # 1×1×2×2
    pipeline = BatchPipeline("image", [0.2], [0.5], CPU, [{"hflip": {"p": 1.0}}])
    expected = (x.float() / 255 - 0.2) / 0.5
    assert torch.allclose(pipeline.eval(x), expected)
    assert torch.allclose(pipeline.train(x), expected.flip(-1))


# -- prepare_data: normalisation, validation split, data_meta ---------------------------------


def test_image_normalisation_matches_numpy_on_the_training_split():
    prepared = prepare_data(data_section(name="digits", val_split=0.1), seed=0)
    train = prepared.splits["train"].x.numpy().astype(np.float64) / 255.0
    assert len(train) == 1438 - len(prepared.splits["val"])  # val carved out before the stats
    np.testing.assert_allclose(prepared.mean, train.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(prepared.std, train.std(axis=(0, 2, 3)), rtol=1e-5)


def test_per_channel_and_per_feature_normalisation_match_numpy():
    images = prepare_data(
        data_section(name="synthetic", shape=[3, 4, 4], train_size=3000, val_split=0.2), seed=1
    )
    x = images.splits["train"].x.numpy().astype(np.float64) / 255.0
    assert len(images.mean) == len(images.std) == 3
    np.testing.assert_allclose(images.mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(images.std, x.std(axis=(0, 2, 3)), rtol=1e-4)

    rows = prepare_data(
        data_section(name="synthetic", shape=[5], train_size=20000, val_split=0.2), seed=1
    )
    x = rows.splits["train"].x.numpy().astype(np.float64)
    np.testing.assert_allclose(rows.mean, x.mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rows.std, x.std(axis=0), rtol=1e-4)


def test_given_or_no_normalisation():
    none = prepare_data(data_section(name="synthetic", shape=[3], normalize="none"), seed=0)
    assert none.mean == [0.0] * 3 and none.std == [1.0] * 3
    given = prepare_data(
        data_section(name="synthetic", shape=[2], normalize={"mean": [1, 2], "std": [3, 4]}), seed=0
    )
    assert given.mean == [1, 2] and given.std == [3, 4]
    with pytest.raises(UserError, match="2 values"):
        prepare_data(
            data_section(name="synthetic", shape=[2], normalize={"mean": [1], "std": [3]}), seed=0
        )


def rows_of(split: ArraySplit) -> set[tuple[float, ...]]:
    return {tuple(r) for r in split.x.tolist()}


def test_val_split_is_reproducible_disjoint_and_complete():
    section = data_section(name="synthetic", shape=[4], train_size=500, val_split=0.2)
    first = prepare_data(section, seed=3)
    again = prepare_data(section, seed=3)
    for name in ("train", "val"):
        assert torch.equal(first.splits[name].x, again.splits[name].x)
        assert torch.equal(first.splits[name].y, again.splits[name].y)
    train, val = first.splits["train"], first.splits["val"]
    assert len(train) + len(val) == 500 and abs(len(val) - 100) <= 5  # rounded per class
    assert not rows_of(train) & rows_of(val)
    original = DATASETS.build(section.dataset_args, seed=3).train
    assert rows_of(train) | rows_of(val) == rows_of(original)
    # Stratified: the class mix of val follows train's.
    ratio = torch.bincount(val.y, minlength=10) / torch.bincount(original.y, minlength=10)
    assert torch.all((ratio - 0.2).abs() < 0.06)
    # The test split is the dataset's own, untouched.
    assert len(first.splits["test"]) == 500
    other = prepare_data(section, seed=4)
    assert not torch.equal(other.splits["val"].y, val.y) or not torch.equal(
        other.splits["val"].x, val.x
    )


def test_no_val_split_when_val_split_is_zero():
    prepared = prepare_data(data_section(name="synthetic", shape=[4], val_split=0), seed=0)
    assert set(prepared.splits) == {"train", "test"} and len(prepared.splits["train"]) == 2000


def test_data_meta_from_a_checkpoint_is_reused_not_recomputed(monkeypatch):
    section = data_section(name="digits", val_split=0.1)
    meta = prepare_data(section, seed=0).meta()
    assert meta["input_shape"] == [1, 8, 8] and meta["classes"] == [str(i) for i in range(10)]
    meta = {**meta, "mean": [0.123], "std": [0.456]}  # as if trained on other statistics

    def must_not_run(*args, **kwargs):
        raise AssertionError("normalisation recomputed although data_meta was given")

    monkeypatch.setattr(prepare_module, "_normalisation", must_not_run)
    reused = prepare_data(section, seed=0, meta=meta)
    assert reused.mean == [0.123] and reused.std == [0.456]
    assert reused.meta() == meta


def test_data_meta_of_other_data_is_refused():
    meta = prepare_data(data_section(name="digits"), seed=0).meta()
    with pytest.raises(UserError, match="does not match the checkpoint"):
        prepare_data(data_section(name="synthetic", shape=[3, 8, 8]), seed=0, meta=meta)


def _val_images(seed: int, *overrides: str) -> torch.Tensor:
    raw = {"name": "s", "seed": seed, "data": {"name": "digits"}, "model": {"name": "mlp"}}
    for override in overrides:
        key, value = override.split("=")
        raw["data"][key] = int(value)
    recipe = resolve(raw)
    return prepare_data(recipe.data, recipe.seed).splits["val"].x


def test_split_seed_fixes_the_held_out_images_across_run_seeds():
    assert not torch.equal(_val_images(1), _val_images(2))  # by default the run's seed carves
    assert torch.equal(_val_images(1, "split_seed=7"), _val_images(2, "split_seed=7"))
    assert torch.equal(_val_images(7), _val_images(3, "split_seed=7"))
    assert (
        "split_seed"
        not in resolve(
            {"name": "s", "data": {"name": "digits"}, "model": {"name": "mlp"}}
        ).to_dict()["data"]
    )
