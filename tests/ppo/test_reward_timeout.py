"""A reward function that never returns: `reward_timeout` stops the run naming it (exit 2) with the last checkpoint
intact, and SIGTERM / SIGINT while it runs stop the run at once instead of waiting for the step to end. Then the real
command line, once, as a user runs it: the `fastppo` script finds a reward module in the working directory, and an
error goes to stderr with exit code 2 and no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastppo.runtime.checkpoint import list_checkpoints, verify
from tests.refusal import good_line, run, write_lines, write_yaml

CALLS = {"n": 0}
STUCK, RELEASE = threading.Event(), threading.Event()


def stuck_from_the_second_call(prompts, responses):
    """Scores the first batch, then hangs (until the test releases it, or 60 s)."""
    CALLS["n"] += 1
    if CALLS["n"] >= 2:
        STUCK.set()
        RELEASE.wait(60)
    return [float(r.split().count("w7")) for r in responses]


@pytest.fixture
def stuck_reward():
    CALLS["n"] = 0
    STUCK.clear()
    RELEASE.clear()
    yield f"{__name__}:stuck_from_the_second_call"
    RELEASE.set()  # the abandoned call returns, and its thread ends


def config_for(tmp_path, tiny_llama, reward: str, **overrides) -> Path:
    prompts = write_lines(tmp_path / "prompts.jsonl", [good_line(("prompt",))] * 4)
    config = {
        "policy_model": tiny_llama[0],
        "reward_model": reward,
        "prompts": str(prompts),
        "output_dir": str(tmp_path / "run"),
        "steps": 3,
        "save_every": 1,
        "rollout_batch_size": 2,
        "mini_batch_size": 2,
        "max_new_tokens": 4,
        "max_prompt_length": 16,
        "tensorboard": False,
        **overrides,
    }
    return write_yaml(tmp_path / "run.yaml", config)


def test_reward_timeout_stops_the_run_naming_the_reward(stuck_reward, tmp_path, tiny_llama, capsys):
    config = config_for(tmp_path, tiny_llama, stuck_reward, reward_timeout=0.5)
    start = time.monotonic()
    code, _, err = run(["train", "--config", config], capsys)
    assert code == 2 and "Traceback" not in err
    assert stuck_reward in err and "reward_timeout=0.5" in err
    assert time.monotonic() - start < 60
    checkpoints = [Path(path).name for _, path in list_checkpoints(str(tmp_path / "run"))]
    assert checkpoints == ["checkpoint-1"] and verify(str(tmp_path / "run" / "checkpoint-1")) is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_stuck_reward_stops_the_run_at_once(signum, stuck_reward, tmp_path, tiny_llama, capsys):
    config = config_for(tmp_path, tiny_llama, stuck_reward)  # the default reward_timeout: 600 s

    def signal_when_stuck():  # our handler is installed then: the trainer is inside its step loop
        if STUCK.wait(120):
            os.kill(os.getpid(), signum)

    threading.Thread(target=signal_when_stuck, daemon=True).start()
    start = time.monotonic()
    code, out, err = run(["train", "--config", config], capsys)
    assert code == 128 + signum, err[-2000:]
    assert time.monotonic() - start < 60  # not reward_timeout's 600 s
    assert f"stopped by {signal.Signals(signum).name} at step 1" in out and "this step is dropped" in err
    checkpoints = [Path(path).name for _, path in list_checkpoints(str(tmp_path / "run"))]
    assert checkpoints == ["checkpoint-1"] and verify(str(tmp_path / "run" / "checkpoint-1")) is None
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_the_fastppo_script_finds_a_reward_in_the_working_directory_and_reports_on_stderr(tmp_path, tiny_llama):
    script = Path(sys.executable).parent / "fastppo"
    if not script.exists():
        pytest.skip("the fastppo script is not installed beside this Python")
    (tmp_path / "my_reward.py").write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    config = config_for(tmp_path, tiny_llama, "my_reward:score")
    prompts = write_lines(tmp_path / "prompts.jsonl", [good_line(("prompt",)), b'{"prompt": "   "}'])
    proc = subprocess.run(
        [str(script), "train", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f'{prompts}:2: field "prompt" is empty' in proc.stderr  # checked after the reward module was imported
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "run").exists()
