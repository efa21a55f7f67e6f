"""Pre-emptible clusters: under SLURM (its job id in the environment), SIGUSR1 — which
`sbatch --signal=B:USR1@90` sends some seconds before the time limit — is a stop request like
SIGTERM: the run finishes its step and saves a mid-epoch last.pt; then, as Lightning's
auto-requeue does, the job is put back in the queue with `scontrol requeue $SLURM_JOB_ID`, and
the process exits with 138 (128 + SIGUSR1; clusters that requeue by exit code list it in
RequeueExit). The requeued job runs the same `dltrain fit … --resume auto`, which continues
exactly. SIGTERM (scancel, or pre-emption's first warning) saves the same way and exits 143
without requeueing: the scheduler's own policy decides.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

REQUEUE_SIGNAL = signal.SIGUSR1
SCONTROL_SECONDS = 30


def job_id() -> str | None:
    """This SLURM job's id, or None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def requeue(signum: int, saved: bool) -> str:
    """After a stop on `signum`: put the job back in the queue when SLURM asked for it
    (SIGUSR1) and progress was saved; returns a line saying what happened ('' if nothing)."""
    job = job_id()
    if job is None or signum != REQUEUE_SIGNAL:
        return ""
    if not saved:
        return f"SLURM job {job}: nothing was saved yet, so it is not requeued."
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"SLURM job {job}: scontrol is not on PATH; requeue it yourself (--resume auto)."
    try:
        done = subprocess.run(
            [scontrol, "requeue", job], capture_output=True, text=True, timeout=SCONTROL_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"SLURM job {job}: scontrol requeue failed ({exc}); requeue it yourself."
    if done.returncode:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no message"]
        return f"SLURM job {job}: scontrol requeue failed ({why[0]}); requeue it yourself."
    return f"SLURM job {job} requeued (scontrol requeue): it continues with --resume auto."
