"""Texts as a Hugging Face model's own token ids (`data.tokenizer: hf`, with `model: {name: hf}`).

The tokenizer is the model checkpoint's (`AutoTokenizer.from_pretrained` on the hub id or
folder that `model.checkpoint` names): truncation at `max_length`, ids padded with the
tokenizer's pad id to the longest training text. Its files (tokenizer.json and its config, all
text) and the model's config travel in the checkpoint's data_meta, so `eval`, `predict` and
`explain` rebuild both from the run folder alone, offline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dltrain.errors import UserError
from dltrain.system.hub import load_pretrained, transformers_module


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer as {file name: text}: what save_pretrained writes, all JSON or text."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(folder).iterdir()}


def tokenizer_from_files(files: dict[str, str]):
    """The tokenizer that `tokenizer_files` wrote, loaded from a temporary folder (offline)."""
    transformers = transformers_module("a Hugging Face tokenizer")
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / Path(name).name).write_text(text, encoding="utf-8")
        return transformers.AutoTokenizer.from_pretrained(folder)


def encode(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """N×length int64 ids: truncated to `length`, padded with the tokenizer's pad id."""
    pad = pad_id(tokenizer)
    ids = tokenizer(list(texts), truncation=True, max_length=length)["input_ids"]
    out = np.full((len(ids), length), pad, dtype=np.int64)
    for row, sequence in zip(out, ids):
        row[: len(sequence)] = sequence[:length]
    return torch.from_numpy(out)


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise UserError(
            "data.tokenizer: hf: the model's tokenizer has no pad token, so texts of different "
            "lengths cannot share a batch. Use a checkpoint whose tokenizer defines one."
        )
    return int(tokenizer.pad_token_id)


def hf_meta(checkpoint: str, tokenizer, length: int) -> dict[str, Any]:
    """What a checkpoint needs to encode texts and rebuild the model without the network."""
    transformers = transformers_module("model: {name: hf}")
    config = load_pretrained(transformers.AutoConfig, checkpoint, "config")
    return {
        "hf_tokenizer": tokenizer_files(tokenizer),
        "hf_config": config.to_dict(),
        "pad_id": pad_id(tokenizer),
        "max_length": length,
    }


def encode_with_meta(texts: list[str], meta: dict[str, Any]) -> torch.Tensor:
    """Raw texts as the ids a model trained with `data.tokenizer: hf` saw (predict)."""
    tokenizer = tokenizer_from_files(meta["hf_tokenizer"])
    return encode(tokenizer, texts, int(meta["max_length"]))
