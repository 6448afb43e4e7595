"""SIGINT / SIGTERM during training: finish the step, save a checkpoint, stop.

A PPO step is not interruptible halfway without losing it (the rollout, the optimizer state and the RNGs move
together), so the first signal only asks the loop to stop at the next step boundary; the trainer then saves and
returns. A second Ctrl-C a second or more after the first is the user insisting: it interrupts at once. Under
torchrun there is no second Ctrl-C: the terminal signals every worker and torchrun forwards the same signal a moment
later, so a repeat is ignored there (and torchrun kills workers still running some time after forwarding, 30 s in
torch 2.13: a step plus a checkpoint must fit in that). SIGKILL cannot be caught; what protects a run from it is the
atomic checkpoint (see checkpoint.py) and `--resume`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time


class StopRequest:
    """Set by the handler; read by the training loop between steps."""

    def __init__(self):
        self.signum: int | None = None
        self.received_at = 0.0  # time.monotonic() of the first signal

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextlib.contextmanager
def stop_at_step_boundary():
    """Within the block, SIGINT and SIGTERM set the returned StopRequest instead of killing the process."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield request
        return

    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ

    def handle(signum, frame):
        if request.requested:
            insisting = signum == signal.SIGINT and time.monotonic() - request.received_at > 1.0
            if insisting and not under_torchrun:
                raise KeyboardInterrupt
            return
        request.signum, request.received_at = signum, time.monotonic()
        # os.write, not print: the signal may have interrupted a write to stdout (print would then raise).
        name = signal.Signals(signum).name
        os.write(2, f"\nfastppo: {name} received: stopping after this step, with a checkpoint\n".encode())

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
