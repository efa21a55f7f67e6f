"""The one out-of-memory handler: the message names the batch setting the recipe uses."""

from __future__ import annotations

import pytest
import torch

from dltrain.errors import RunFailure
from dltrain.system.out_of_memory import out_of_memory_is_a_run_failure

from helpers.training import TABULAR, make_recipe


def message_of(**kwargs) -> str:
    with pytest.raises(RunFailure) as failure, out_of_memory_is_a_run_failure("cuda:0", **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert failure.value.exit_code == 1
    return str(failure.value)


def test_a_global_batch_is_kept_and_the_accumulation_doubled(tmp_path):
    recipe = make_recipe(tmp_path, TABULAR, "g", "data.global_batch_size=128")
    message = message_of(recipe=recipe, precision="bf16")
    assert "data.global_batch_size=128" in message and "train.accumulate=2" in message
    assert "data.batch_size" not in message and "precision=bf16" not in message


def test_evaluation_names_the_evaluation_batch_and_fp32_suggests_bf16(tmp_path):
    recipe = make_recipe(tmp_path, TABULAR, "e", "data.batch_size=32")
    message = message_of(recipe=recipe, precision="fp32", eval_batch_size=64)
    assert "data.eval_batch_size=32" in message and "train.precision=bf16" in message


def test_the_last_checkpoint_is_named_only_when_it_exists(tmp_path):
    recipe = make_recipe(tmp_path, TABULAR, "c")
    saved = tmp_path / "last.pt"
    assert "Last checkpoint" not in message_of(recipe=recipe, saved=saved)
    saved.write_bytes(b"x")
    assert f"Last checkpoint: {saved}" in message_of(recipe=recipe, saved=saved)


def test_without_a_recipe_it_says_to_give_fewer_inputs():
    assert "fewer inputs" in message_of()
