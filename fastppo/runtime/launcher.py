"""`fastppo train --nproc N`: N processes on this machine, started and watched by fastppo, so that the run ends as
one process would: the same exit codes (0, 2, 3, 4, 130, 143), one message, the command that continues it.

Each worker gets the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) and runs `fastppo train` again, where `distributed.init` joins the process group. The launcher

- forwards SIGTERM (and a SIGINT not from its terminal, whose Ctrl-C reaches every worker itself) to the workers,
  which stop together at a step boundary with a checkpoint; a second Ctrl-C a second or more after the first kills
  them (the user insists);
- when a worker fails, kills the others at once: they could only wait for it in their next collective, or fail there
  with a traceback of their own that says nothing about the cause;
- prints the failing rank's message last, alone: each worker writes its one-line error (or its traceback) into a file
  of the launcher's instead of onto the shared stderr, and the launcher picks the first failure that is a reported
  error (bad input, numerics, the environment, an interrupt) over tracebacks, which are collateral more often than
  not (a collective whose peer died).

Workers die with their launcher whatever kills it (`die_with_parent`: the parent-death signal on Linux, a watchdog
thread elsewhere): a SIGKILL of the launcher stops them at their next step boundary, with a checkpoint, instead of
leaving them training and writing into output_dir. Runs across machines use torchrun (docs/distributed.md), whose
workers get the parent-death signal too.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from fastppo.runtime.errors import EXIT_BUG

OUTCOMES = "FASTPPO_OUTCOMES"  # the environment variable naming the launcher's directory of outcome files
POLL_S = 0.05


def worker_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "fastppo", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `fastppo <argv>` on `nproc` local processes; return the run's exit code (see the module's docstring)."""
    outcomes = tempfile.mkdtemp(prefix="fastppo-ranks-")
    environment = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        OUTCOMES: outcomes,
    }
    sys.stdout.flush()
    workers = [
        subprocess.Popen(worker_command(argv), env={**environment, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(nproc)
    ]
    signalled: list[float] = []  # when each signal came
    terminal = _in_terminal_foreground()  # a Ctrl-C there reaches every worker itself

    def forward(signum, frame):
        insisting = signum == signal.SIGINT and signalled and time.monotonic() - signalled[0] > 1.0
        signalled.append(time.monotonic())
        if signum == signal.SIGINT and terminal and not insisting:
            return
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL if insisting else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        killed = _watch(workers)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    try:
        return _report(workers, outcomes, killed, bool(signalled))
    finally:
        shutil.rmtree(outcomes, ignore_errors=True)


def _watch(workers: list[subprocess.Popen]) -> set[int]:
    """Wait for every worker; once one fails (an exit code other than 0, 130 or 143), kill the others. Returns the
    ranks killed here."""
    killed: set[int] = set()
    while [worker.poll() for worker in workers].count(None):  # every worker polled: its returncode is current
        if any(worker.returncode not in (None, 0, 130, 143) for worker in workers):
            for rank, worker in enumerate(workers):
                if worker.poll() is None:
                    worker.kill()
                    killed.add(rank)
        time.sleep(POLL_S)
    return killed


def _report(workers: list[subprocess.Popen], outcomes: str, killed: set[int], signalled: bool) -> int:
    """Print the one failure that explains the run's end and return its exit code; the workers' code when they all
    ended the same way (done, or stopped by a signal)."""
    recorded = []
    for name in os.listdir(outcomes):
        with open(os.path.join(outcomes, name), encoding="utf-8") as f:
            recorded.append(json.load(f))
    if recorded:  # a reported error first (the cause), the earliest; else the earliest traceback (a bug)
        cause = min(recorded, key=lambda o: (o["code"] == EXIT_BUG, o["time"], o["rank"]))
        where = f"(rank {cause['rank']}) " if cause["code"] == EXIT_BUG else ""
        print(f"{where}{cause['message'].rstrip()}", file=sys.stderr)
        return cause["code"]
    for rank, worker in enumerate(workers):
        if worker.returncode < 0 and rank not in killed:  # killed by a signal nobody here sent (out of memory?)
            name = signal.Signals(-worker.returncode).name
            print(f"fastppo: rank {rank} was killed by {name}; the other ranks were stopped", file=sys.stderr)
            return 128 - worker.returncode
    codes = [worker.returncode for worker in workers if worker.returncode >= 0]
    if signalled and not codes:
        return 130
    return max(codes, default=EXIT_BUG) if any(codes) else 0


def _in_terminal_foreground() -> bool:
    """Whether this process runs in its terminal's foreground process group (where Ctrl-C signals every process)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the worker's side ---------------------------------------------------------------------------------------------


def is_worker() -> bool:
    """Whether this process is one of `launch`'s workers (which reports its failure to the launcher)."""
    return bool(os.environ.get(OUTCOMES))


def record_outcome(code: int, message: str) -> None:
    """A worker's failure, for the launcher to print (or not, when it is collateral): its exit code and message."""
    rank = int(os.environ.get("RANK", "0"))
    path = os.path.join(os.environ[OUTCOMES], f"rank-{rank}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "code": code, "message": message, "time": time.time()}, f)
    os.replace(path + ".tmp", path)


_PR_SET_PDEATHSIG = 1
_watched: list[int] = []  # the parent this process dies with, once set


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Get `signum` when the parent process (torchrun, `launch`) dies, however it dies: SIGTERM stops a worker at its
    next step boundary with a checkpoint. Linux: prctl(PR_SET_PDEATHSIG); elsewhere a thread polling the parent.
    Idempotent."""
    parent = os.getppid()
    if _watched:
        return
    _watched.append(parent)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0:
            if os.getppid() != parent:  # it died before the call
                os.kill(os.getpid(), signum)
            return

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="fastppo parent watchdog", daemon=True).start()
