"""SIGINT / SIGTERM during training: finish the step, save a checkpoint, stop.

A PPO step is not interruptible halfway without losing it (the rollout, the optimizer state and the RNGs move
together), so the first signal only asks the loop to stop at the next step boundary; the trainer then saves and
returns. A second Ctrl-C a second or more after the first is the user insisting: it interrupts at once. Under
torchrun there is no second Ctrl-C: the terminal signals every worker and torchrun forwards the same signal a moment
later, so a repeat is ignored there (and torchrun kills workers still running some time after forwarding, 30 s in
torch 2.13: a step plus a checkpoint must fit in that). SIGKILL cannot be caught; what protects a run from it is the
atomic checkpoint (see checkpoint.py) and `--resume`.

One wait inside a step is abandoned instead: a reward function still running when the signal comes (it may never
return; see rewards.FunctionReward). The waiting code calls `raise_if_stop_requested`, the step is dropped and the
trainer stops as at a boundary, with the weights of the last complete step; the dropped step's prompts are skipped
on resume. Under torchrun the other ranks may be inside a collective, so there the reward is waited for instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time


class StepInterrupted(Exception):
    """A stop signal came while the step waited on something it can drop (a reward function): the step is dropped."""


class StopRequest:
    """Set by the handler; read by the training loop between steps."""

    def __init__(self, may_drop_step: bool = False):
        self.signum: int | None = None
        self.received_at = 0.0  # time.monotonic() of the first signal
        self.may_drop_step = may_drop_step  # one process: no other rank waits for this one's step

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_active: list[StopRequest] = []  # the requests of the enclosing stop_at_step_boundary blocks, innermost last


def raise_if_stop_requested(what: str) -> None:
    """Raise StepInterrupted when a stop signal has come and the step may be dropped (see the module's docstring)."""
    if _active and _active[-1].requested and _active[-1].may_drop_step:
        raise StepInterrupted(f"{what} when {_active[-1].name} came: this step is dropped")


@contextlib.contextmanager
def stop_at_step_boundary():
    """Within the block, SIGINT and SIGTERM set the returned StopRequest instead of killing the process."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ
    request = StopRequest(may_drop_step=not under_torchrun)
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield request
        return

    def handle(signum, frame):
        if request.requested:
            insisting = signum == signal.SIGINT and time.monotonic() - request.received_at > 1.0
            if insisting and not under_torchrun:
                raise KeyboardInterrupt
            return
        request.signum, request.received_at = signum, time.monotonic()
        # os.write, not print: the signal may have interrupted a write to stdout (print would then raise).
        name = signal.Signals(signum).name
        with contextlib.suppress(OSError):  # stderr's reader gone: the stop goes on without the note
            os.write(2, f"\nfastppo: {name} received: stopping after this step, with a checkpoint\n".encode())

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    _active.append(request)
    try:
        yield request
    finally:
        _active.remove(request)
        for s, handler in previous.items():
            signal.signal(s, handler)
