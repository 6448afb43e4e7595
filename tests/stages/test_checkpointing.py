"""`fastppo sft` and `fastppo reward-model` stopped by SIGTERM keep their progress: a checkpoint at the step boundary,
exit 143, and `--resume` ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from fastppo.cli import main
from tests.stages.test_reward_model import sentiment_pairs, write_jsonl

STOP_AFTER = 3  # the update after which SIGTERM comes


def sigterm_after(monkeypatch, module, updates: int) -> None:
    """SIGTERM to this process right after the `updates`-th optimizer step of `module` (sft or reward_model)."""
    original, count = module.optimizer_step, [0]

    def optimizer_step(*args):
        original(*args)
        count[0] += 1
        if count[0] == updates:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(module, "optimizer_step", optimizer_step)


def command_line(command: str, tmp_path, base_model, name: str) -> list[str]:
    rows = sentiment_pairs(32)
    if command == "sft":
        rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows]
    data = write_jsonl(tmp_path / f"{command}.jsonl", rows)
    out = str(tmp_path / name)
    return [command, "--model", base_model, "--data", data, "--output-dir", out, "--batch-size", "4", "--epochs", "1"]


@pytest.mark.parametrize("command", ["sft", "reward-model"])
def test_sigterm_saves_and_resume_ends_like_an_uninterrupted_run(command, tmp_path, base_model, monkeypatch, capsys):
    from fastppo.stages import reward_model, sft

    module = sft if command == "sft" else reward_model
    assert main(command_line(command, tmp_path, base_model, "whole")) == 0

    argv = command_line(command, tmp_path, base_model, "stopped")
    with monkeypatch.context() as patch:
        sigterm_after(patch, module, STOP_AFTER)
        assert main(argv) == 143
    out = capsys.readouterr().out
    assert (
        f"stopped by SIGTERM at step {STOP_AFTER}, checkpoint saved; continue with the same command and --resume" in out
    )
    stopped = tmp_path / "stopped"
    assert sorted(os.listdir(stopped)) == [f"checkpoint-{STOP_AFTER}"]  # no final model, the lock file gone
    assert main(argv) == 2  # the stopped run's checkpoints: continued with --resume, not mixed with a new run
    assert "a stopped run's checkpoints" in capsys.readouterr().err

    assert main([*argv, "--resume"]) == 0
    assert f"resumed from {stopped / f'checkpoint-{STOP_AFTER}'} at step {STOP_AFTER}" in capsys.readouterr().out
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_a_resume_with_another_batch_order_is_refused(tmp_path, base_model, monkeypatch, capsys):
    from fastppo.stages import sft

    argv = command_line("sft", tmp_path, base_model, "run")
    with monkeypatch.context() as patch:
        sigterm_after(patch, sft, 1)
        assert main(argv) == 143
    assert main([*argv, "--batch-size", "8", "--resume"]) == 2
    assert "batch_size 4 -> 8" in capsys.readouterr().err


def test_resume_before_any_checkpoint_starts_fresh(tmp_path, base_model, capsys):
    """A launcher can always pass --resume: a job preempted before its first checkpoint starts over."""
    argv = command_line("sft", tmp_path, base_model, "run")
    assert main([*argv, "--resume", "--save-every", "4"]) == 0
    out = capsys.readouterr().out
    assert f"no checkpoint in {tmp_path / 'run'} yet: starting a fresh run" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())  # the finished model
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint")) == ["checkpoint-4"]
