"""From a recipe's data section to ready splits: load, carve validation, normalisation stats.

The same function serves `fit` and `eval`, so a checkpoint's evaluation sees exactly the
splits training saw (the validation split is carved with the recipe's seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dltrain.config.registry import DATASETS
from dltrain.config.schema import DataSection
from dltrain.data.base import ArraySplit, DatasetSplits, Split
from dltrain.data.repeated_rows import repeated_rows_by_split
from dltrain.data.splits import (
    random_split,
    singleton_classes,
    stratified_folds,
    stratified_split,
)
from dltrain.data.table_columns import Dropped, column_summary
from dltrain.data.table_encoding import RawColumn, TableEncoding, fit_encoding
from dltrain.errors import UserError
from dltrain.models.pretrained import pretrained_input_size, pretrained_statistics

STATS_SAMPLE = 4096  # lazily decoded splits: estimate normalisation from this many samples


@dataclass
class PreparedData:
    """Splits plus what a model and a checkpoint need to know about the input."""

    kind: str
    classes: list[str]
    input_shape: tuple[int, ...]
    mean: list[float]
    std: list[float]
    splits: dict[str, Split] = field(default_factory=dict)
    task: str = "classification"
    extra: dict[str, Any] = field(default_factory=dict)  # the dataset's own meta (vocab, ...)
    as_sequence: str | None = None

    @property
    def num_classes(self) -> int:
        """The model's output width: classes (seq2seq: target vocabulary), 1 for regression."""
        return 1 if self.task == "regression" else len(self.classes)

    @property
    def model_kind(self) -> str:
        """The input kind the model sees (images fed row by row are sequences)."""
        return "sequence" if self.as_sequence else self.kind

    @property
    def model_input_shape(self) -> tuple[int, ...]:
        if self.as_sequence:  # C×H×W → H steps of C·W features
            channels, height, width = self.input_shape
            return (height, channels * width)
        return self.input_shape

    @property
    def vocab_size(self) -> int | None:
        vocab = self.extra.get("vocab")
        return len(vocab) if vocab is not None else None

    def meta(self) -> dict[str, Any]:
        """The data_meta stored in checkpoints: enough to rebuild the model and preprocessing."""
        return {
            **self.extra,
            "kind": self.kind,
            "task": self.task,
            "as_sequence": self.as_sequence,
            "classes": list(self.classes),
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def class_counts(self) -> torch.Tensor | None:
        """Training samples per class (for balanced loss weights); classification only."""
        if self.task != "classification":
            return None
        return torch.bincount(_targets(self.splits["train"]), minlength=self.num_classes)


def prepare_data(
    data: DataSection,
    seed: int,
    meta: dict[str, Any] | None = None,
    pretrained_on: dict[str, Any] | None = None,
) -> PreparedData:
    """Load the dataset, carve the validation split, and fix the normalisation.

    With `meta` (from a checkpoint) the stored normalisation is reused instead of recomputed.
    With `pretrained_on` (the model section), `normalize: auto` for a pretrained torchvision
    model is the statistics its weights were trained with, not the dataset's.
    With `data.fold` (cross-validation) the validation split is that fold of the dataset's train
    split; `val_split` and any validation split the dataset has are then not used. Splits are
    carved with `seed` (the run's), or `data.split_seed` when the recipe fixes it.
    """
    seed = seed if data.split_seed is None else data.split_seed  # what carves the splits
    args = _sized_for_the_model(data.dataset_args, pretrained_on, meta)
    loaded: DatasetSplits = DATASETS.build(
        args, seed=seed, task=data.task, model=pretrained_on, saved_meta=meta
    )
    task = _task(data, loaded)
    if data.as_sequence and loaded.kind != "image":
        raise UserError(
            f"data.as_sequence: rows turns images into sequences, but '{data.name}' gives "
            f"{loaded.kind} input; remove data.as_sequence."
        )
    splits = _assign_splits(data, loaded, task, seed)
    extra = dict(loaded.meta)
    layout = extra.pop("table_layout", None)
    if layout is not None:  # a table: features encoded as learned from the train split
        encoding = _table_encoding(layout, splits["train"], meta)
        if meta is None:  # counted where a run reads its data (not by eval and predict)
            extra["repeated_rows"] = repeated_rows_by_split(splits)
        extra["table_columns"] = _column_summary(layout, encoding, splits["train"])
        splits = {name: _encoded(split, encoding, layout) for name, split in splits.items()}
        extra["table"] = encoding.to_dict()
    _check_splits(data.name, splits)
    if task == "regression":
        extra["target_scale"] = (
            meta.get("target_scale") if meta is not None else _target_scale(splits["train"])
        )
    input_shape = tuple(_first_input(splits["train"]).shape)
    table = extra["table"] if layout is not None else None
    mean, std = _input_normalisation(data, loaded, splits, input_shape, meta, pretrained_on, table)
    return PreparedData(
        loaded.kind,
        loaded.classes,
        input_shape,
        mean,
        std,
        splits,
        task,
        extra,
        data.as_sequence,
    )


def _assign_splits(
    data: DataSection, loaded: DatasetSplits, task: str, seed: int
) -> dict[str, Split]:
    """train, val (the fold, the dataset's own, or carved from train) and test, in that order."""
    splits = {"train": loaded.train}
    if data.fold is not None:
        fold, of = data.fold.index, data.fold.of
        splits["train"], splits["val"] = _fold(loaded.train, fold, of, seed, task)
    elif loaded.val is not None:
        splits["val"] = loaded.val
    elif data.val_split > 0:
        splits["train"], splits["val"] = _carve(loaded.train, data.val_split, seed, task)
    if loaded.test is not None:
        splits["test"] = loaded.test
    return splits


def _input_normalisation(
    data: DataSection,
    loaded: DatasetSplits,
    splits: dict[str, Split],
    input_shape: tuple[int, ...],
    meta: dict[str, Any] | None,
    pretrained_on: dict[str, Any] | None,
    table: dict[str, Any] | None,
) -> tuple[list[float], list[float]]:
    """The input mean and std: the checkpoint's (once its input is known to match), or fixed
    from the training split; a table's one-hot and indicator features keep 0 and 1."""
    if meta is not None:
        _check_compatible(meta, loaded, input_shape)
        return meta["mean"], meta["std"]
    mean, std = _normalisation(data, loaded.kind, splits["train"], input_shape, pretrained_on)
    if table is not None and data.normalize == "auto":  # one-hot and indicators stay 0/1
        mean, std = _only_scaled(mean, std, TableEncoding.from_dict(table))
    return mean, std


def _table_encoding(
    layout: dict[str, Any], train: ArraySplit, meta: dict[str, Any] | None
) -> TableEncoding:
    """The checkpoint's encoding (eval), or one learned from the training split's rows."""
    columns = [RawColumn(**column) for column in layout["columns"]]
    if meta is None:
        return fit_encoding(train.x.double().numpy(), columns, layout["max_categories"])
    if "table" not in meta:
        raise UserError(
            "the checkpoint was trained on numeric arrays, not a csv table; point the data "
            "section at the dataset the model was trained on."
        )
    encoding = TableEncoding.from_dict(meta["table"])
    if encoding.names != [column.name for column in columns]:
        raise UserError(
            f"the table's feature columns ({', '.join(c.name for c in columns)}) are not the "
            f"ones the checkpoint was trained on ({', '.join(encoding.names)}); set "
            "data.features to those columns."
        )
    return encoding


def _column_summary(
    layout: dict[str, Any], encoding: TableEncoding, train: ArraySplit
) -> list[dict[str, Any]]:
    """What each of the file's feature columns became (the header's and check's table)."""
    return column_summary(
        [RawColumn(**column) for column in layout["columns"]],
        [Dropped(**column) for column in layout.get("dropped", [])],
        encoding,
        train.x.double().numpy(),
        layout.get("features") or [column["name"] for column in layout["columns"]],
    )


def _encoded(split: ArraySplit, encoding: TableEncoding, layout: dict[str, Any]) -> ArraySplit:
    columns = [RawColumn(**column) for column in layout["columns"]]
    return ArraySplit(torch.from_numpy(encoding.encode(split.x.double().numpy(), columns)), split.y)


def _only_scaled(
    mean: list[float], std: list[float], encoding: TableEncoding
) -> tuple[list[float], list[float]]:
    """Mean/std for the numeric value features; 0/1 (left as they are) for the others."""
    scaled = encoding.scaled_features()
    return (
        [m if s else 0.0 for m, s in zip(mean, scaled)],
        [d if s else 1.0 for d, s in zip(std, scaled)],
    )


def _target_scale(train: Split) -> dict[str, float] | None:
    """Regression targets' training mean and std: the model learns them standardised (so that
    a price in the hundreds of thousands trains like a value near 0) and answers in their units."""
    if not isinstance(train, ArraySplit):
        return None
    y = train.y.double()
    std = float(y.std()) if len(y) > 1 else 1.0
    return {"mean": float(y.mean()), "std": std if std > 1e-12 else 1.0}


def _check_splits(name: str, splits: dict[str, Split]) -> None:
    """Every split has samples, and float inputs held in memory are finite (a NaN feature
    would only surface later, as a NaN loss or a metric that cannot be computed)."""
    for split_name, split in splits.items():
        if len(split) == 0:
            raise UserError(
                f"the {split_name} split of dataset '{name}' is empty; give it samples (or, for "
                "validation, set data.val_split=0)."
            )
        if isinstance(split, ArraySplit) and split.x.is_floating_point():
            bad = (~torch.isfinite(split.x)).reshape(len(split), -1).any(dim=1)
            if bool(bad.any()):
                rows = torch.nonzero(bad).flatten()[:5].tolist()
                raise UserError(
                    f"the {split_name} split of dataset '{name}' has NaN or infinite input "
                    f"values in {int(bad.sum())} sample(s) (rows {rows}…, counted from 0). "
                    "Fill or drop them before training."
                )


def _sized_for_the_model(
    args: dict[str, Any], model: dict[str, Any] | None, meta: dict[str, Any] | None
) -> dict[str, Any]:
    """`image_size: auto` with a pretrained model: the size its weights were trained at (a
    checkpoint's own size when rebuilding from one), not the images' own."""
    if args.get("image_size") != "auto" or model is None:
        return args
    if meta is not None:  # eval: the images as the model was trained on them
        shape = meta.get("input_shape")
        return {**args, "image_size": list(shape[1:])} if shape and len(shape) == 3 else args
    size = pretrained_input_size(model)
    return {**args, "image_size": list(size)} if size else args


def _task(data: DataSection, loaded: DatasetSplits) -> str:
    """The dataset decides the task; the recipe may only confirm it."""
    if data.task not in ("auto", loaded.task):
        raise UserError(
            f"data.task: '{data.name}' is a {loaded.task} dataset; data.task={data.task} is not "
            f"possible for it. Use data.task=auto."
        )
    return loaded.task


def _carve(split: Split, fraction: float, seed: int, task: str) -> tuple[Split, Split]:
    """Split off a validation part (stratified by class for classification), reproducibly."""
    carve = stratified_split if task == "classification" else random_split
    keep, carved = carve(_targets(split).numpy(), fraction, seed)
    if len(carved) == 0:
        raise UserError(
            f"data.val_split={fraction} leaves no validation samples from {len(keep)} training "
            f"samples{_why_nothing_carved(split, task)}; raise it or set data.val_split=0."
        )
    return _subset(split, keep), _subset(split, carved)


def _why_nothing_carved(split: Split, task: str) -> str:
    """For classification: the classes too small to give a sample, when they are the cause."""
    if task != "classification":
        return ""
    single, classes = singleton_classes(_targets(split).numpy())
    if single == 0:
        return ""
    return (
        f": {single:,} of its {classes:,} classes have a single sample, which a stratified "
        "split keeps for training (a label with a value per row is rarely a class: for a "
        "quantity set data.task=regression)"
    )


def _fold(split: Split, index: int, of: int, seed: int, task: str) -> tuple[Split, Split]:
    """Fold `index` (1-based) of `of` folds as validation, the rest as training: stratified by
    class for classification; for a regression or seq2seq target, one stratum — at random."""
    strata = _targets(split).numpy() if task == "classification" else np.zeros(len(split))
    try:
        folds = stratified_folds(strata, of, seed)
    except ValueError as exc:
        raise UserError(
            f"data.fold: cannot make {of} folds of {len(split)} training samples ({exc}); "
            "use fewer folds."
        ) from None
    validate = folds[index - 1]
    train = np.sort(np.concatenate([f for i, f in enumerate(folds) if i != index - 1]))
    return _subset(split, train), _subset(split, validate)


def first_samples(split: Split, count: int) -> Split:
    """The first `count` samples of a split (all of a smaller one)."""
    return _subset(split, np.arange(min(count, len(split))))


def _subset(split: Split, indices: np.ndarray) -> Split:
    index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    if isinstance(split, ArraySplit):
        return ArraySplit(split.x[index], split.y[index])
    return LazySubset(split, index.tolist())


class LazySubset:
    """A subset of a lazily decoded split that keeps the `targets` attribute."""

    def __init__(self, base: Split, indices: list[int]):
        self.base, self.indices = base, indices
        self.targets = [base.targets[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


def _targets(split: Split) -> torch.Tensor:
    targets = split.targets
    return targets if isinstance(targets, torch.Tensor) else torch.as_tensor(targets)


def _first_input(split: Split) -> torch.Tensor:
    if len(split) == 0:
        raise UserError("the dataset's training split is empty; check data.path / the files.")
    return split.x[0] if isinstance(split, ArraySplit) else split[0][0]


def _normalisation(
    data: DataSection,
    kind: str,
    train: Split,
    input_shape: tuple[int, ...],
    model: dict[str, Any] | None = None,
) -> tuple[list[float], list[float]]:
    """Mean/std per channel (images) or feature (tabular, sequence steps): given, none, the
    pretrained weights' own, or from the train split. Token ids are never normalised."""

    if kind == "tokens":
        return [], []
    pretrained = pretrained_statistics(model or {}, input_shape[0]) if kind == "image" else None
    if data.normalize == "auto" and pretrained is not None:
        return pretrained
    width = input_shape[-1] if kind == "sequence" else input_shape[0]
    if data.normalize == "none":
        return [0.0] * width, [1.0] * width
    if data.normalize != "auto":
        mean, std = data.normalize.mean, data.normalize.std
        if not len(mean) == len(std) == width:
            unit = "channels" if kind == "image" else "features"
            raise UserError(
                f"data.normalize: mean and std need {width} values (the input has {width} "
                f"{unit}); got {len(mean)} and {len(std)}."
            )
        return list(mean), list(std)
    return _mean_std(_sample_inputs(train), kind)


def _mean_std(x: torch.Tensor, kind: str) -> tuple[list[float], list[float]]:
    """Per-channel/feature mean and std in float64, a chunk at a time (CIFAR as float64 whole
    would take over a gigabyte). uint8 pixels are scaled to [0, 1] first, as training sees them."""
    dims = {"image": [0, 2, 3], "sequence": [0, 1]}.get(kind, [0])
    channel_axis = -1 if kind == "sequence" else 1
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    total = total_sq = 0.0
    for chunk in torch.split(x, 4096):
        chunk = chunk.double() / scale
        total = total + chunk.sum(dim=dims)
        total_sq = total_sq + chunk.square().sum(dim=dims)
    count = x.numel() / x.shape[channel_axis]
    mean = total / count
    var = (total_sq - count * mean.square()) / max(count - 1, 1)  # unbiased, like Tensor.std
    std = var.clamp_min(0).sqrt()
    std[std < 1e-8] = 1.0  # constant features: leave them as they are
    return mean.tolist(), std.tolist()


def _sample_inputs(split: Split) -> torch.Tensor:
    if isinstance(split, ArraySplit):
        return split.x
    picks = np.random.default_rng(0).permutation(len(split))[:STATS_SAMPLE]
    return torch.stack([split[int(i)][0] for i in picks])


def _check_compatible(meta: dict[str, Any], loaded: DatasetSplits, shape: tuple[int, ...]) -> None:
    """The data given to `eval` must be shaped like the data the checkpoint was trained on."""
    if list(shape) != list(meta["input_shape"]) or len(loaded.classes) != len(meta["classes"]):
        raise UserError(
            f"the data (input {list(shape)}, {len(loaded.classes)} classes) does not match the "
            f"checkpoint (input {meta['input_shape']}, {len(meta['classes'])} classes); point "
            "the data section at the dataset the model was trained on."
        )


def split_sources(data: DataSection) -> str:
    """Where each split comes from, as far as the recipe says (for `dltrain check`, which
    reads no data: a dataset's own validation or test split shows as the dataset's)."""
    args = data.dataset_args
    named = f"the {data.name} dataset"
    if args.get("train"):
        train = f"data.train ({args['train']})"
        test = f"data.test ({args['test']})" if args.get("test") else "none"
    elif args.get("path"):
        train = f"data.path ({args['path']})"
        test = (
            f"{args['test_split']:g} of data.path, carved with the seed"
            if args.get("test_split")
            else f"{named}'s own"
        )
    else:
        train, test = named, f"{named}'s own, if it has one"
    if data.fold is not None:
        val = f"fold {data.fold.index} of {data.fold.of} of the training data"
    elif args.get("val"):
        val = f"data.val ({args['val']}); data.val_split is not used"
    elif data.val_split > 0:
        val = f"{named}'s own, if it has one; else {data.val_split:g} of train, carved"
    else:
        val = "none (data.val_split is 0)"
    return f"splits: train ← {train} · val ← {val} · test ← {test}"
