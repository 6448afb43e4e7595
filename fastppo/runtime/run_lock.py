"""One run per output directory: an OS file lock on `<output_dir>/.fastppo.lock`.

Two runs writing into one directory would interleave their metrics.jsonl and mix their checkpoints. Every command
that writes a run directory (`train`, `demo`, `compare`, `sft`, `reward-model`, `dpo`, and PPOTrainer / DPOTrainer in
Python) holds this lock from before its first write; a second process asking for it stops at once with exit code 4,
naming the holder's pid and host (written into the file). The lock is flock(2): the kernel drops it when the holding
process ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock. The file is removed when
the run ends; one left behind by a killed run is harmless (nothing holds it).

Within one process the lock is re-entrant (a notebook building a second trainer on the same directory, a resumed
trainer after a finished one): it is released when its last holder lets go. Under torchrun only rank 0 takes it, the
one rank that writes.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import socket
import time
import warnings
import weakref

from fastppo.runtime.errors import EnvironmentProblem

LOCK_FILE = ".fastppo.lock"


class _Lock:
    def __init__(self, path: str, fd: int, created: list[str]):
        self.path, self.fd, self.created = path, fd, created  # created: directories made for it, innermost first
        self.holders = 0


_held: dict[str, _Lock] = {}  # directory (real path) -> its lock, held by this process


class Hold:
    """One holder's share of a directory's lock; `release()` (idempotent) lets go of it."""

    def __init__(self, directory: str):
        self.directory, self.released = directory, False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        lock = _held.get(self.directory)
        if lock is not None:
            lock.holders -= 1
            if lock.holders <= 0:
                _unlock(lock)


def hold(output_dir: str, command: str) -> Hold:
    """Hold the lock of `output_dir` (created if missing): an `EnvironmentProblem` naming the holder when another
    process holds it. `command` (e.g. "train") goes into the file, for the message another run prints."""
    directory = os.path.realpath(output_dir)
    lock = _held.get(directory)
    if lock is None:
        lock = _held[directory] = _lock(output_dir, directory, command)
    lock.holders += 1
    return Hold(directory)


@contextlib.contextmanager
def held_by(owner, output_dir: str, command: str, take: bool = True):
    """Within the block (a trainer setting itself up), hold the lock of `output_dir` (not when `take` is False: a
    rank other than 0); if the block fails, let go of it at once (nothing of the run was written), else when `owner`
    is garbage-collected (or at the end of the command, or of the process). Yields the `Hold`, or None."""
    lock = hold(output_dir, command) if take else None
    try:
        yield lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if lock is not None:
        weakref.finalize(owner, lock.release)


def release_all() -> None:
    """Let go of every lock this process holds (the end of a command; at exit)."""
    for lock in list(_held.values()):
        _unlock(lock)


def _lock(output_dir: str, directory: str, command: str) -> _Lock:
    created, parent = [], directory
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    path = os.path.join(directory, LOCK_FILE)
    try:
        os.makedirs(directory, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):  # a file system without locks
                    warnings.warn(
                        f"output_dir {output_dir}: its file system takes no locks ({error.strerror}): a second run "
                        "into it would not be noticed",
                        stacklevel=3,
                    )
                    break
                holder = _holder(fd)
                os.close(fd)
                raise EnvironmentProblem(
                    f"output_dir {output_dir} is in use by another run ({holder}; lock file {path}): two runs in "
                    "one directory would mix their metrics and checkpoints. Wait for it to end, stop it, or choose "
                    "another output_dir"
                ) from None
            if _same_file(fd, path):  # not a file its previous holder removed while we waited for it
                break
            os.close(fd)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, fastppo {command}, since {since}\n".encode())
    except OSError as error:
        _remove_created(created)
        raise EnvironmentProblem(f"output_dir: cannot create {path} ({error.strerror or error})") from None
    if not _held:
        atexit.register(release_all)
    return _Lock(directory, fd, created)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """What the holder wrote: its pid, host, command and start; it may not have written it yet."""
    for _ in range(20):
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "another process, starting"


def _unlock(lock: _Lock) -> None:
    """Remove the file while still holding it (a process waiting on it then sees it gone and retries), unlock, and
    remove the directories the lock created if nothing else was written into them."""
    _held.pop(lock.path, None)
    try:
        if _same_file(lock.fd, os.path.join(lock.path, LOCK_FILE)):
            os.unlink(os.path.join(lock.path, LOCK_FILE))
    finally:
        os.close(lock.fd)  # closing the descriptor drops the flock
    _remove_created(lock.created)


def _remove_created(created: list[str]) -> None:
    for directory in created:  # innermost first; stops at the first that holds something
        try:
            os.rmdir(directory)
        except OSError:
            return
