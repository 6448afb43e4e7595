"""One run per output directory: a second process is refused (exit 4) naming the holder; the lock dies with its
holder, SIGKILL included; a refused or finished run leaves no lock file (nor a directory it created)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastppo.runtime import run_lock
from fastppo.runtime.errors import EnvironmentProblem
from tests.refusal import run
from tests.tiny_models import cli_command, tiny_run_yaml

# Another run's side of the lock, as run_lock.hold takes it (without importing fastppo: torch takes seconds).
HOLD = """
import fcntl, os, socket, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".fastppo.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, fastppo train, since now".encode())
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run (the way a running `fastppo train` does)."""
    command, env = cli_command()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_process_is_refused_naming_the_holder(holder, tmp_path):
    with pytest.raises(EnvironmentProblem, match=rf"in use by another run \(pid {holder.pid} on host "):
        run_lock.hold(str(tmp_path / "run"), "train")
    assert socket.gethostname() in (tmp_path / "run" / run_lock.LOCK_FILE).read_text()


def test_the_lock_dies_with_its_holder_even_killed(holder, tmp_path):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / run_lock.LOCK_FILE).exists()  # the file a killed run leaves holds nothing
    lock = run_lock.hold(str(tmp_path / "run"), "train")
    assert f"pid {os.getpid()} " in (tmp_path / "run" / run_lock.LOCK_FILE).read_text()
    lock.release()
    assert not (tmp_path / "run" / run_lock.LOCK_FILE).exists()


def test_reentrant_in_one_process_and_leaves_nothing_behind(tmp_path):
    """A notebook's second trainer on the same directory; the directory the lock created goes with it."""
    first = run_lock.hold(str(tmp_path / "a" / "run"), "train")
    second = run_lock.hold(str(tmp_path / "a" / "run"), "train")
    first.release()
    assert (tmp_path / "a" / "run" / run_lock.LOCK_FILE).exists()
    second.release()
    assert not (tmp_path / "a").exists()


def write_run(tmp_path, tiny_models, **overrides) -> str:
    return tiny_run_yaml(tmp_path, tiny_models["llama"][0], **overrides)


@pytest.mark.parametrize("command", ["train", "dpo", "sft", "reward-model", "demo", "compare"])
def test_every_command_that_writes_a_run_directory_takes_the_lock(holder, tmp_path, tiny_models, capsys, command):
    """Exit 4 before any model loads, the holder named, its directory untouched."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "w1", "response": "w2", "chosen": "w2", "rejected": "w3"}\n' * 4)
    policy = tiny_models["llama"][0]
    out = ["--output-dir", str(tmp_path / "run")]
    argv = {
        "train": ["train", "--config", write_run(tmp_path, tiny_models)],
        "dpo": ["dpo", "--model", policy, "--data", data, *out],
        "sft": ["sft", "--model", policy, "--data", data, *out],
        "reward-model": ["reward-model", "--model", policy, "--data", data, *out],
        "demo": ["demo", "--quick", *out],
        "compare": ["compare", "--quick", *out],
    }[command]
    before = sorted(os.listdir(tmp_path / "run"))
    code, _, err = run(argv, capsys)
    assert code == 4, err[-2000:]
    assert f"is in use by another run (pid {holder.pid} on host" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path / "run")) == before


def test_two_runs_into_one_output_dir(tmp_path, tiny_models):
    """The second `fastppo train` exits 4 while the first trains on, and the first one's run is whole."""
    config = write_run(tmp_path, tiny_models, steps=10_000)
    command, env = cli_command("train", "--config", config)
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / run_lock.LOCK_FILE).exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 4, second.stderr[-2000:]
        assert f"in use by another run (pid {first.pid} on host" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_a_file_system_without_locks_is_said_not_refused(tmp_path, monkeypatch):
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="takes no locks .* a second run into it would not be noticed"):
        lock = run_lock.hold(str(tmp_path / "run"), "train")
    lock.release()
