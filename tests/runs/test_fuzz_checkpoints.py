"""Fuzzing checkpoints: a field dropped, retyped, reshaped or made NaN, anywhere in a real
checkpoint, saved whole (a valid digest, so the change reaches the code past the load), then
`eval`, `predict` and `fit --resume` on it. Every outcome is success or one message with exit 1
or 2 — never "internal error", never a traceback."""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dltrain.errors import UserError
from dltrain.runs.checkpoint import MAX_DEPTH, MAX_NODES, load_checkpoint, save_checkpoint

from helpers.training import TABULAR

MUTATIONS = ("drop", "none", "text", "list", "number", "nan", "reshape")
EXAMPLES = 60  # each runs three commands on a tiny model: about 40 s in all


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_run) -> tuple[dict, Path]:
    """A real checkpoint (tabular MLP, Adam) and the recipe file it was trained from."""
    run, _ = trained_run({**TABULAR, "optimizer": {"name": "adam"}}, "base", "train.epochs=1")
    recipe = tmp_path_factory.mktemp("fuzz") / "base.yaml"
    recipe.write_text((run.root / "recipe.yaml").read_text())
    return load_checkpoint(run.last_path), recipe


def paths(value: Any, prefix: tuple = (), depth: int = 4) -> list[tuple]:
    """Every key path into nested dicts and lists, down to `depth` levels."""
    found = [prefix] if prefix else []
    if depth == 0:
        return found
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))[:3]
    else:
        return found
    for key, item in items:
        found += paths(item, (*prefix, key), depth - 1)
    return found


def mutate(state: dict, path: tuple, how: str) -> None:
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    key, old = path[-1], parent[path[-1]]
    if how == "drop":
        del parent[key]
    elif how == "reshape" and isinstance(old, torch.Tensor):
        parent[key] = torch.cat([old.flatten(), old.flatten()[:1] + 1]) if old.numel() else old
    elif how == "nan" and isinstance(old, torch.Tensor) and old.is_floating_point():
        parent[key] = torch.full_like(old, math.nan)
    else:
        parent[key] = {"none": None, "text": "x", "list": [1, "a"], "number": 3}.get(how, math.nan)


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases in every run: CI is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_damaged_checkpoint_is_used_or_refused_with_one_message(
    invoke,
    trained,
    data,
):
    state, recipe = trained
    damaged = copy.deepcopy({k: v for k, v in state.items() if k not in ("format", "digest")})
    path = data.draw(st.sampled_from(paths(damaged)), label="path")
    how = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    mutate(damaged, path, how)
    folder = Path(tempfile.mkdtemp(dir=Path.cwd()))
    try:
        checkpoint = folder / "damaged.pt"
        save_checkpoint(checkpoint, damaged)
        np.save(folder / "rows.npy", np.zeros((2, 8), dtype=np.float32))
        out = yaml.safe_dump({"output": str(folder / "runs")})
        for args in (
            ["eval", str(checkpoint), "--output", str(folder / "eval")],
            ["predict", str(checkpoint), str(folder / "rows.npy")],
            ["fit", str(recipe), f"output={yaml.safe_load(out)['output']}", "train.epochs=2"]
            + ["--resume", str(checkpoint), "-q"],
        ):
            result = invoke(*args)
            said = result.output
            assert result.exit_code in (0, 1, 2), (path, how, args[0], said)
            assert "internal error" not in said and "Traceback" not in said, (path, how, said)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- nested structures: depth, shared references, cycles ---------------------------------------

LEVELS = ("list", "shared", "dict", "tuple")  # one level of nesting; "shared": [inner, inner]


@st.composite
def nested(draw) -> tuple[Any, int, int, bool]:
    """(structure, its depth, its values counted as a walk reaches them, whether it holds
    itself): a leaf wrapped in up to 90 levels, shared ones doubling the values reached."""
    value: Any = draw(st.one_of(st.integers(), st.text(max_size=4), st.none(), st.booleans()))
    depth, count = 0, 1
    levels = draw(st.integers(0, 90))
    kinds = st.sampled_from(LEVELS) if draw(st.booleans()) else st.just("shared")
    for level in draw(st.lists(kinds, min_size=levels, max_size=levels)):
        if level == "shared" and count > 2 * MAX_NODES:
            level = "list"  # already far past the bound: keep the count a number we can hold
        value = {"shared": [value, value], "list": [value], "dict": {"k": value}}.get(
            level, (value,)
        )
        depth += 1
        count = 1 + {"shared": 2 * count, "dict": count + 1}.get(level, count)
    cycle = draw(st.booleans())
    if cycle:
        value = [value]
        value.append(value)  # a list that holds itself (pickle keeps the reference)
    return value, depth, count, cycle


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=nested())
def test_any_nesting_loads_within_its_bounds_or_is_damaged(trained, tmp_path, case):
    """Within the bounds, a checkpoint with the structure inside loads and holds it; beyond
    them (deeper than MAX_DEPTH, more values than MAX_NODES, a cycle), "damaged", exit 2, found
    by one bounded walk (never a RecursionError, never a walk of 2^90 values)."""
    structure, depth, count, cycle = case
    state, _ = trained
    path = tmp_path / f"nested-{depth}-{count}-{cycle}.pt"
    # the structure sits at state["notes"], one level below the top
    beyond = cycle or depth + 1 > MAX_DEPTH or count > MAX_NODES
    if beyond:  # no digest can be computed for it: saved as a crafted file would be
        torch.save({**state, "notes": structure}, path)
        with pytest.raises(UserError, match="is damaged: it"):
            load_checkpoint(path)
    elif count < MAX_NODES // 2:  # well inside (the model's own values need room too)
        save_checkpoint(
            path, {k: v for k, v in state.items() if k != "digest"} | {"notes": structure}
        )
        assert load_checkpoint(path)["notes"] == structure
