"""Data-parallel runs: the process group torchrun describes, and the few collectives dltrain needs.

torchrun (or `dltrain fit --nproc N`, which runs torchrun's launcher) starts one process per
device and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address. Each process builds the
same model from the same seed, DistributedDataParallel averages the gradients, and every
process reads its own slice of each batch (data/loaders.py). Outside torchrun, `World()` is a
single process and every helper here is a no-op, so the fit loop has one code path.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dltrain.errors import RunFailure, UserError
from dltrain.system.devices import xla_device_kind

BACKENDS = {"cuda": "nccl", "cpu": "gloo", "xla": "xla"}  # backend: auto, per device type


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank among `size` processes, GPU index on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launched: bool = False  # started by torchrun (even with one process): use DDP

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, and writes the run folder."""
        return self.rank == 0

    def tag(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # -- collectives (no-ops in a single process) --------------------------------------------

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all processes, in place."""
        if self.launched:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The largest value over all processes, elementwise, in place."""
        if self.launched:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when `flag` is true on any one (one tiny all-reduce)."""
        if not self.launched:
            return flag
        votes = torch.tensor([int(flag)], device=device)
        return bool(self.all_reduce_sum_(votes).item())

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's rows in rank order (shards may differ by a row)."""
        if not self.launched:
            return tensor
        counts = torch.tensor([len(tensor)], device=tensor.device)
        sizes = [torch.zeros_like(counts) for _ in range(self.size)]
        dist.all_gather(sizes, counts)
        longest = max(int(n) for n in sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)])

    def broadcast_object(self, value: Any, device: torch.device) -> Any:
        """Rank 0's `value`, on every process (a decision, a path, a checkpoint); it travels
        through `device`, the one the backend communicates on."""
        if not self.launched:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=device)
        return box[0]

    def broadcast_weights_(self, module: torch.nn.Module) -> None:
        """Give every process rank 0's parameters and buffers, in place."""
        if not self.launched:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.launched:
            dist.barrier()


def world_from_environment(environ: dict[str, str] | None = None) -> World:
    """The World torchrun describes in the environment, or a single process without it."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return World()
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_size = int(env.get("LOCAL_WORLD_SIZE", size))
    except ValueError:
        raise UserError(
            "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (they are set by "
            "torchrun; unset them to train in one process)."
        ) from None
    if not 0 <= rank < size or not 0 <= local_rank < local_size:
        raise UserError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank}: out of range.")
    return World(rank, size, local_rank, local_size, launched=True)


def process_device(spec: str, world: World) -> str:
    """The device spec for this process: under torchrun, GPU `LOCAL_RANK` when on CUDA."""
    if not world.launched or spec not in ("auto", "cuda", "gpu"):
        if world.launched and spec.startswith("cuda:") and world.local_size > 1:
            raise UserError(
                f"device: {spec} under torchrun with {world.local_size} processes per node: "
                "each process takes the GPU of its LOCAL_RANK. Use device: cuda (or auto)."
            )
        return spec
    if not torch.cuda.is_available():
        return spec  # auto → cpu (gloo), or resolve_device explains why cuda is unusable
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise UserError(
            f"LOCAL_RANK {world.local_rank} has no GPU: this node has {count}. Start at most "
            f"{count} processes per node (torchrun --nproc-per-node {count})."
        )
    return f"cuda:{world.local_rank}"


def backend_for(choice: str, device: torch.device) -> str:
    """`distributed.backend`: auto picks nccl on CUDA, gloo on CPU, xla on XLA devices."""
    backend = BACKENDS.get(device.type) if choice == "auto" else choice
    if backend is None:
        raise UserError(
            f"distributed training on {device.type} is not supported; use device: cuda, cpu or xla."
        )
    if backend == "xla" and device.type != "xla":
        raise UserError(
            f"distributed.backend: xla needs device: xla, but this run is on {device}. "
            "Use distributed.backend: auto."
        )
    if backend == "xla" and xla_device_kind() == "CPU":
        raise UserError(
            "data-parallel training on XLA needs TPU (or GPU) XLA devices: with PJRT_DEVICE=CPU, "
            "XLA's collectives do not reach across processes. For data parallelism on the CPU "
            "use device: cpu (gloo)."
        )
    if backend == "nccl" and device.type != "cuda":
        raise UserError(
            f"distributed.backend: nccl needs CUDA devices, but this run is on {device}. "
            "Use distributed.backend: gloo (or auto)."
        )
    return backend


@contextlib.contextmanager
def process_group(world: World, device: torch.device, section) -> Iterator[None]:
    """Join torchrun's process group for the run (nothing to do in a single process)."""
    if not world.launched:
        yield
        return
    backend = backend_for(section.backend, device)
    timeout = timedelta(seconds=section.timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with lost_peers_are_run_failures(world, section.timeout_s):
        if backend == "xla":
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the backend)

            dist.init_process_group("xla", init_method="xla://", timeout=timeout)
        else:
            store = _attempt_store(world, timeout)
            dist.init_process_group(
                backend,
                timeout=timeout,
                # the GPU this process owns (else NCCL guesses it from the rank, and warns)
                device_id=device if device.type == "cuda" else None,
                **({"store": store, "rank": world.rank, "world_size": world.size} if store else {}),
            )
    try:
        with lost_peers_are_run_failures(world, section.timeout_s):
            yield
    finally:
        with contextlib.suppress(Exception):  # after a lost peer the group cannot be torn down
            dist.destroy_process_group()


def _attempt_store(world: World, timeout: timedelta) -> dist.Store | None:
    """torchrun's key-value store, seen through a prefix of its own per restart attempt, when
    torchrun's agent hosts it; None otherwise (plain env://).

    The agent's store (TORCHELASTIC_USE_AGENT_STORE) outlives the attempts, so a restarted
    process could read the address a dead process of the previous attempt left there and fail
    to connect; a prefix per attempt keeps the attempts apart. The attempt count is each
    node's own, though (pytorch#135712): on several nodes it may differ between them, so
    `fit --nnodes` turns the shared store off (launch.py), and each attempt's rank 0 then
    serves a new store on the port its agent chose for that round — nothing stale to avoid.
    """
    env = os.environ
    attempt = env.get("TORCHELASTIC_RESTART_COUNT")
    agent_hosts_it = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if attempt is None or not agent_hosts_it or "MASTER_PORT" not in env:
        return None
    store = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"dltrain/attempt_{attempt}", store)


@contextlib.contextmanager
def lost_peers_are_run_failures(world: World, timeout_s: float) -> Iterator[None]:
    """A collective that fails (a process died, a node is gone, a timeout) is a run failure:
    one message naming this process, instead of a traceback from the communication library."""
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        if not _is_communication_failure(exc):
            raise
        raise RunFailure(
            f"{world.tag()} lost contact with the other processes ({_gist(exc)}). Another "
            f"process probably died (its own error says why). Waits give up after "
            f"distributed.timeout_s={timeout_s:g}s. Resume with --resume auto (torchrun "
            "--max-restarts N does that by itself)."
        ) from None


def _gist(exc: BaseException) -> str:
    """The communication library's message without its source path, first sentence only."""
    text = re.sub(r"^\s*\[[^\]]*\]\s*", "", str(exc).strip()) or type(exc).__name__
    return re.split(r"(?<=[a-z])\. ", text.splitlines()[0])[0][:200]


_COMMUNICATION_HINTS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


def _is_communication_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    return any(hint in str(exc).lower() for hint in _COMMUNICATION_HINTS)
