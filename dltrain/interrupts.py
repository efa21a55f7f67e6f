"""Ctrl-C and SIGTERM as requests: finish the current step, save, then stop.

The first SIGINT/SIGTERM only sets a flag that the training loop reads at each step boundary (a
Python bool: no cost, no device sync). The loop then writes last.pt and raises `Interrupted`.
A second signal stops at once: every file dltrain writes is atomic, so nothing is corrupted.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from dltrain.errors import DltrainError

SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(DltrainError):
    """Training stopped on a signal after saving a checkpoint to resume from."""

    same_on_every_process = True  # under DDP all processes agree to stop at the same step

    def __init__(self, signum: int, checkpoint: str):
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = SIGNAL_EXIT_CODES.get(signum, 130)
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; progress saved to {checkpoint}")


class GracefulStop:
    """Context manager: while active, SIGINT/SIGTERM request a stop instead of killing."""

    def __init__(self, echo_seconds: float = 0.0) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        # Under torchrun, Ctrl-C reaches each process from the terminal and again from the
        # launcher, which forwards it: the same signal within this window is that echo, not a
        # second request.
        self.echo_seconds = echo_seconds
        self._first_at = 0.0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals only go there
            for signum in SIGNAL_EXIT_CODES:
                if signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # ignored on purpose (e.g. a background job's SIGINT): keep it so
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            return
        if signum == self.signum and time.monotonic() - self._first_at < self.echo_seconds:
            return
        # The second signal: stop now. SystemExit/KeyboardInterrupt unwind through the atomic
        # writers, which delete their temp files and leave the previous files intact.
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(SIGNAL_EXIT_CODES[signum])
