"""Ctrl-C and SIGTERM as requests: finish the current step, save, then stop.

The first SIGINT/SIGTERM only sets a flag that the training loop reads at each step boundary (a
Python bool: no cost, no device sync). The loop then writes last.pt and raises `Interrupted`.
A second signal stops at once (StopNow): every file dltrain writes is atomic, so nothing is
corrupted. A stop requested before anything was saved says so.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType

from dltrain.errors import DltrainError

SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138}
LAUNCHER_ECHO_SECONDS = 2.0  # under torchrun: see GracefulStop.echo_seconds


def stop_signals() -> list[int]:
    """The signals that request a stop: SIGINT and SIGTERM; under SLURM also SIGUSR1, its
    warning before the time limit (system/slurm.py). Elsewhere SIGUSR1 keeps its default."""
    under_slurm = bool(os.environ.get("SLURM_JOB_ID"))
    return [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if under_slurm else [])


class Interrupted(DltrainError):
    """Stopped on a signal at a safe point; `checkpoint` is what was saved to resume from
    (None: nothing was saved yet)."""

    same_on_every_process = True  # under DDP all processes agree to stop at the same step

    def __init__(
        self, signum: int, checkpoint: str | None, when: str = "", saved: str | None = None
    ):
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = SIGNAL_EXIT_CODES.get(signum, 130)
        name = signal.Signals(signum).name
        if saved is None:
            saved = f"progress saved to {checkpoint}" if checkpoint else "nothing was saved"
        super().__init__(f"stopped by {name}{f' {when}' if when else ''}; {saved}")


class StopNow(KeyboardInterrupt):
    """A second signal: stop at once. Every file dltrain writes is replaced atomically (and
    an epoch's files together), so what is on disk is the last complete save."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = SIGNAL_EXIT_CODES.get(signum, 130)
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")


class GracefulStop:
    """Context manager: while active, SIGINT/SIGTERM request a stop instead of killing.

    Re-entrant: `dltrain fit` enters it at start-up (so that an early Ctrl-C is a request too,
    never a KeyboardInterrupt inside torch's C++), and the training loop enters it again.
    """

    def __init__(self, echo_seconds: float = 0.0) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._depth = 0
        self.program = False  # STARTUP: set when dltrain runs as the program (not a library)
        # Under torchrun, Ctrl-C reaches each process from the terminal and again from the
        # launcher, which forwards it: the same signal within this window is that echo, not a
        # second request.
        self.echo_seconds = echo_seconds
        self._first_at = 0.0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, checkpoint: str | None, when: str = "") -> None:
        """At a safe point: raise Interrupted if a stop was requested."""
        if self.signum is not None:
            raise Interrupted(self.signum, checkpoint, when)

    def end(self) -> None:
        """Put the previous handlers back now, however deeply entered."""
        if self._depth > 0:
            self._depth = 1
            self.__exit__(None, None, None)

    def __enter__(self) -> GracefulStop:
        self._depth += 1
        if self._depth > 1:
            return self
        if threading.current_thread() is threading.main_thread():  # signals only go there
            for signum in stop_signals():
                if signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # ignored on purpose (e.g. a background job's SIGINT): keep it so
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._handle:  # unless replaced meanwhile on purpose
                signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            return
        if signum == self.signum and time.monotonic() - self._first_at < self.echo_seconds:
            return
        # The second signal: stop now. The program ends at once, as a kill would but saying
        # so (an exception raised here could surface inside torch's C++ as another error); a
        # library caller gets StopNow, which unwinds through the atomic writers. Either way the
        # files on disk are the last complete save (transaction.py).
        if STARTUP.program:
            _exit_now(signum, str(StopNow(signum)))
        raise StopNow(signum)


def exit_at_once_on_signals() -> None:
    """For the program once it is ending after a stop: a further SIGINT/SIGTERM ends it at
    once with that signal's exit code, its output flushed (instead of a traceback, or a
    silent kill by the default SIGTERM handler)."""
    if not STARTUP.program or threading.current_thread() is not threading.main_thread():
        return  # a library call or a test: the caller's handlers stay

    for signum in stop_signals():
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _exit_at_once)
    # Python's own shutdown puts SIG_DFL back for the signals it handles, so a second signal
    # landing while the interpreter tears down would kill the process (-15, not 143): once
    # everything is said, ignore them (the exit code is already the first signal's)
    atexit.register(_ignore_stop_signals)


def _ignore_stop_signals() -> None:
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)


def _exit_at_once(signum: int, frame) -> None:
    # the program is already ending after a first stop: this one is a second signal
    _exit_now(signum, f"stopped at once by a second {signal.Signals(signum).name}")


def _exit_now(signum: int, message: str = "") -> None:
    """End the process with the signal's exit code, its output flushed first."""
    with contextlib.suppress(Exception):
        if message:
            sys.stderr.write(
                f"{message} (the last complete save is on disk; an unfinished write was dropped)\n"
            )
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(SIGNAL_EXIT_CODES[signum])


# Entered by the program's entry point (dltrain/__main__.py) before typer, rich or torch are
# imported, so that a Ctrl-C during start-up is a request too; the command boundary ends it.
STARTUP = GracefulStop()
