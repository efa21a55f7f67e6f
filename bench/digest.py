"""`python bench/digest.py`: what the checkpoint digest costs on ResNet-50-sized weights.

Saves and loads one checkpoint shaped like a ResNet-50 last.pt (torchvision resnet50 weights,
25.6 M parameters, plus AdamW's two moments per parameter: what `fit` writes each epoch) three
ways, each the median of BENCH_REPEATS runs on the same tmp file:

  digest      contents_digest alone (SHA-256 over every tensor's bytes and every value)
  save        dltrain.runs.checkpoint.save_checkpoint (digest + torch.save + fsync + rename)
  load        dltrain.runs.checkpoint.load_checkpoint (torch.load weights_only + checks + digest)
  torch_save  a bare torch.save of the same state (no digest, no fsync)
  torch_load  a bare torch.load(weights_only=True)

Prints one JSON object; figures go into bench/RESULTS.md with the machine named.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from run import device_name  # bench/run.py, beside this file

from dltrain.runs.checkpoint import contents_digest, load_checkpoint, save_checkpoint

REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))


def resnet50_last_pt() -> dict:
    model = torchvision.models.resnet50(weights=None)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()  # creates the moments, as after a real epoch
    return {
        "recipe": {"model": {"name": "resnet50"}},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data_meta": {
            "kind": "image",
            "input_shape": [3, 224, 224],
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "classes": [str(i) for i in range(1000)],
        },
        "classes": [str(i) for i in range(1000)],
    }


def median_seconds(work) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    state = resnet50_last_pt()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "last.pt"
        bare = Path(folder) / "bare.pt"
        figures = {
            "digest": median_seconds(lambda: contents_digest(state)),
            "save": median_seconds(lambda: save_checkpoint(path, state)),
            "load": median_seconds(lambda: load_checkpoint(path)),
            "torch_save": median_seconds(lambda: torch.save(state, bare)),
            "torch_load": median_seconds(lambda: torch.load(bare, weights_only=True)),
        }
        megabytes = path.stat().st_size / 2**20
    print(
        json.dumps(
            {
                "machine": device_name(torch.device("cpu")),
                "torch": torch.__version__,
                "checkpoint_mb": round(megabytes, 1),
                "seconds": {k: round(v, 3) for k, v in figures.items()},
                "digest_mb_per_s": round(megabytes / figures["digest"]),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
