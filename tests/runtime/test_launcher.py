"""`fastppo train --nproc N`'s launcher: the run ends as one process would (its exit code, one message, the failing
rank's last and alone), signals reach every worker, and workers die with their launcher.

Most tests run stand-in workers (a few lines of Python, no torch) through `launcher.launch`; two run the real
`fastppo train --nproc 2` end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastppo.runtime import launcher
from tests.tiny_models import cli_command, tiny_run_yaml

# A stand-in worker: what `fastppo train` does with the launcher's environment, per `mode` (argv[1]).
WORKER = r"""
import json, os, signal, sys, time
rank, mode, out = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]

def outcome(code, message):  # what fastppo.cli.main hands the launcher (launcher.record_outcome)
    with open(os.path.join(os.environ["FASTPPO_OUTCOMES"], f"rank-{rank}.json"), "w") as f:
        json.dump({"rank": rank, "code": code, "message": message, "time": time.time()}, f)

keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
with open(os.path.join(out, f"worker-{rank}.json"), "w") as f:
    json.dump({"pid": os.getpid(), **{k: os.environ[k] for k in keys}}, f)
if mode == "die-with-parent":
    sys.path.insert(0, os.getcwd())
    from fastppo.runtime.launcher import die_with_parent
    die_with_parent()
    open(os.path.join(out, f"ready-{rank}"), "w").close()
if mode == "sigterm":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # stops at the step boundary, saves: 143
    open(os.path.join(out, f"ready-{rank}"), "w").close()
if mode == "fail" and rank == 1:
    time.sleep(0.3)
    outcome(2, "fastppo train: error: reward function f raised ValueError: boom")
    sys.exit(2)
if mode == "bug" and rank == 1:
    outcome(1, "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n")
    sys.exit(1)
if mode == "both-fail":
    outcome(2, "fastppo train: error: reward function f raised ValueError: boom")
    sys.exit(2)
time.sleep(60 if mode != "done" else 0)
"""


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """Run `launch` with the stand-in workers in `mode`; (exit code, stderr, seconds)."""

    def launch(mode: str, capfd):
        monkeypatch.setattr(launcher, "worker_command", lambda argv: [sys.executable, "-c", WORKER, *argv])
        start = time.monotonic()
        code = launcher.launch(2, [mode, str(tmp_path)])
        return code, capfd.readouterr().err, time.monotonic() - start

    return launch


def test_workers_get_torchruns_environment(stand_in, tmp_path, capfd):
    code, err, _ = stand_in("done", capfd)
    assert code == 0 and err == ""
    workers = [json.loads((tmp_path / f"worker-{r}.json").read_text()) for r in (0, 1)]
    assert [(w["RANK"], w["LOCAL_RANK"], w["WORLD_SIZE"], w["LOCAL_WORLD_SIZE"]) for w in workers] == [
        ("0", "0", "2", "2"),
        ("1", "1", "2", "2"),
    ]
    assert workers[0]["MASTER_PORT"] == workers[1]["MASTER_PORT"] and workers[0]["MASTER_ADDR"] == "127.0.0.1"


def test_the_failing_ranks_message_comes_last_and_alone(stand_in, capfd):
    """Rank 1 fails; rank 0, which would wait for it forever, is stopped at once."""
    code, err, seconds = stand_in("fail", capfd)
    assert code == 2 and seconds < 30
    assert err.strip().splitlines()[-1] == "fastppo train: error: reward function f raised ValueError: boom"
    assert err.count("boom") == 1


def test_the_same_failure_on_every_rank_is_said_once(stand_in, capfd):
    code, err, _ = stand_in("both-fail", capfd)
    assert code == 2 and err.count("boom") == 1


def test_a_bug_shows_its_traceback_once_with_its_rank(stand_in, capfd):
    code, err, _ = stand_in("bug", capfd)
    assert code == 1 and err.startswith("(rank 1) Traceback") and err.count("Traceback") == 1


LAUNCH = """
import sys
from fastppo.runtime import launcher
launcher.worker_command = lambda argv: [sys.executable, "-c", sys.argv[1], *argv]
sys.exit(launcher.launch(2, sys.argv[2:]))
"""


def start_launcher(mode: str, tmp_path) -> subprocess.Popen:
    _, env = cli_command()
    command = [sys.executable, "-c", LAUNCH, WORKER, mode, str(tmp_path)]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


def wait_for(paths, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)


def test_sigterm_to_the_launcher_reaches_every_worker(tmp_path):
    """A scheduler signals the launcher's pid only: each worker stops (143), and so does the run."""
    proc = start_launcher("sigterm", tmp_path)
    wait_for([tmp_path / f"ready-{r}" for r in (0, 1)], proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143, proc.stderr.read()[-2000:]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") if os.path.exists(f"/proc/{pid}/stat") else open(os.devnull) as f:
        return " Z " not in f.read()  # a zombie has ended


def test_workers_die_with_a_killed_launcher(tmp_path):
    """SIGKILL of the launcher: its workers get the parent-death signal instead of training on into output_dir."""
    proc = start_launcher("die-with-parent", tmp_path)
    wait_for([tmp_path / f"ready-{r}" for r in (0, 1)], proc)
    pids = [json.loads((tmp_path / f"worker-{r}.json").read_text())["pid"] for r in (0, 1)]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "a worker outlived its launcher"
        time.sleep(0.1)


# --- `fastppo train --nproc 2`, end to end ---------------------------------------------------------------------

RANK_REWARD = """
import os


def reward(prompts, responses):
    if os.environ.get("RANK") == "1":
        raise ValueError("rank 1's reward failed")
    return [1.0] * len(responses)
"""


def nproc_run(tmp_path, tiny_models, **overrides) -> str:
    sizes = {"steps": 1, "rollout_batch_size": 4, "mini_batch_size": 4}  # 2 sequences per rank
    return tiny_run_yaml(tmp_path, tiny_models["llama"][0], **(sizes | overrides))


@pytest.mark.slow
def test_a_reward_failing_on_one_rank_ends_the_run_with_its_message(tmp_path, tiny_models):
    (tmp_path / "rank_reward.py").write_text(RANK_REWARD)
    config = nproc_run(tmp_path, tiny_models, reward_model="rank_reward:reward")
    command, env = cli_command("train", "--nproc", "2", "--config", config)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.getcwd()])
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fastppo train: error: reward function rank_reward:reward raised ValueError")
    assert proc.stderr.count("rank 1's reward failed") == 1 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sigterm_stops_every_rank_with_a_checkpoint_and_the_resume_command(tmp_path, tiny_models):
    from tests.ppo.test_robustness import signal_after_a_step, start_cli

    proc = start_cli("train", "--nproc", "2", "--config", nproc_run(tmp_path, tiny_models, steps=10_000))
    run_dir = tmp_path / "run"
    out, err, steps = signal_after_a_step(proc, run_dir, signal.SIGTERM)
    assert proc.returncode == 143, err[-3000:]
    assert f"stopped by SIGTERM at step {steps}, checkpoint saved; continue with: fastppo train" in out
    assert out.strip().endswith("--nproc 2 --resume") and "Traceback" not in err
    assert (run_dir / f"checkpoint-{steps}" / "manifest.json").exists()
