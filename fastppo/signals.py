"""SIGINT / SIGTERM during training: finish the step, save a checkpoint, stop.

A PPO step is not interruptible halfway without losing it (the rollout, the optimizer state and the RNGs move
together), so the first signal only asks the loop to stop at the next step boundary; the trainer then saves and
returns. A second Ctrl-C is the user insisting: it interrupts at once. SIGKILL cannot be caught; what protects a
run from it is the atomic checkpoint (see checkpoint.py) and `--resume`.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class StopRequest:
    """Set by the handler; read by the training loop between steps."""

    def __init__(self):
        self.signum: int | None = None

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

    def handle(signum, frame):
        if request.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        request.signum = signum
        print(f"\nfastppo: {signal.Signals(signum).name} received: stopping after this step, with a checkpoint")

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
