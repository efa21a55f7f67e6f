"""`dltrain fit --nproc N`: torchrun's own launcher, started from dltrain.

It is torch.distributed.run (the code behind `torchrun`): on one machine with a standalone
rendezvous, so the processes are exactly those `torchrun --standalone --nproc-per-node N -m
dltrain fit ...` starts; on several (`--nnodes M --rdzv-endpoint HOST:PORT`, the same command
on each machine) with torchrun's c10d rendezvous at that endpoint, as `torchrun --nnodes M
--rdzv-backend c10d --rdzv-endpoint HOST:PORT` would.
What it adds: a thread count per process that shares the CPU instead of oversubscribing it,
quiet launcher logs (each process prints its own errors), and torchrun's failure summary
turned into one line and the failed process's exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from dataclasses import dataclass

from rich.console import Console

from dltrain.system.slurm import REQUEUE_SIGNAL, job_id
from dltrain.system.threads import cores_per_process


@dataclass(frozen=True)
class Nodes:
    """Several machines (`fit --nnodes`): each runs the same command, and they meet at the
    c10d rendezvous on `endpoint` (HOST:PORT, one of the machines); `run_id` names the job."""

    count: int
    endpoint: str
    run_id: str
    rank: int | None = None  # --node-rank: passed on (c10d orders the nodes itself)

    def torchrun_args(self) -> list[str]:
        args = [f"--nnodes={self.count}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}"]
        args.append(f"--rdzv-id={self.run_id}")
        return args + ([f"--node-rank={self.rank}"] if self.rank is not None else [])


def launch_local(
    nproc: int, fit_args: list[str], max_restarts: int = 0, nodes: Nodes | None = None
) -> int:
    """Run `dltrain <fit_args>` in `nproc` processes under torchrun's launcher (on this machine
    alone, or as one of `nodes`); its exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # each process's share of the cores (the one rule: system/threads.py)
    os.environ.setdefault("OMP_NUM_THREADS", str(cores_per_process(nproc)))
    if nodes is not None:
        # torchrun's agents would share their rendezvous store with the processes, keyed by a
        # restart count each node keeps for itself: after one node's restart the nodes' counts
        # differ and the restarted group never meets (pytorch#135712). Unshared, each
        # attempt's rank 0 serves a new store.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    _quiet_launcher_logs()
    # torchrun makes a log folder per run in the system temp folder and leaves it there; its
    # files hold nothing the processes do not print, so it goes when the launch ends
    with tempfile.TemporaryDirectory(prefix="dltrain-torchrun-") as logs:
        args = get_args_parser().parse_args(
            [
                *(["--standalone"] if nodes is None else nodes.torchrun_args()),
                f"--nproc-per-node={nproc}",
                f"--max-restarts={max_restarts}",
                f"--log-dir={logs}",
                "--module",
                "dltrain",
                *fit_args,
            ]
        )
        if job_id() is not None:  # SLURM's warning before the time limit reaches the launcher
            signal.signal(REQUEUE_SIGNAL, _pass_on_to_the_processes)
        try:
            run(args)
        except ChildFailedError as failed:
            return _report_failure(failed)
        except SignalException as stopped:  # Ctrl-C / SIGTERM / SLURM's SIGUSR1: forwarded,
            # the processes save
            return 128 + int(stopped.sigval)
    return 0


def _pass_on_to_the_processes(signum: int, frame) -> None:
    """Raise what torchrun's own handlers raise for SIGTERM: its agent then sends the same
    signal to every process of this machine (they run in sessions of their own, so a signal
    to the launcher alone would not reach them) and waits for them: they save, rank 0
    requeues the job (system/slurm.py), and the launcher exits 128 + signum."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"launcher got {signal.Signals(signum).name}", signal.Signals(signum))


def _quiet_launcher_logs() -> None:
    # torchrun's modules set their own logger levels when imported; the processes print what
    # matters (and _report_failure what they could not)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _report_failure(failed) -> int:
    """The exit code of the process that failed first (the others were stopped because of it),
    and one line for it when it died without a word of its own (a signal, os._exit)."""
    rank, failure = failed.get_first_failure()
    code = failure.exitcode
    if code in SPEAKING_EXIT_CODES:
        return code  # dltrain printed the error itself
    if code < 0:
        sig = -code
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        how, code = f"was killed by {name}", 128 + sig
    else:
        how = f"exited with code {code}"
    Console(stderr=True).print(
        f"[bold red]error:[/] process rank {rank} {how}; the other processes were "
        "stopped. Last saved progress resumes with --resume auto.",
        highlight=False,
        soft_wrap=True,
    )
    return code


# dltrain's own exits, which print their reason (77: a sweep trial's processes, pruned together:
# experiments/sweep_processes.py)
SPEAKING_EXIT_CODES = (1, 2, 77, 130, 143)
