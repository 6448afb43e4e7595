"""Faults a long production run meets: kills, signals, non-finite steps, bad input. None of them may lose work."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastppo import PPOTrainer
from fastppo.runtime.checkpoint import list_checkpoints, verify
from tests.tiny_models import build_tokenizer, cli_command, count_w7, prompt_list, run_cli, small_config

ROOT = Path(__file__).resolve().parents[2]  # the CLI imports the reward `tests.tiny_models:count_w7` from here
# Keys that measure the machine, not the run: they differ between two runs of the same computation.
MACHINE_KEYS = ("perf/",)


def write_config(tmp_path, tiny_models, name: str, **overrides) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompt_list()))
    config = {
        "policy_model": tiny_models["llama"][0],
        "reward_model": "tests.tiny_models:count_w7",
        "prompts": str(prompts),
        "output_dir": str(tmp_path / name),
        "steps": 4,
        "save_every": 1,
        "rollout_batch_size": 4,
        "mini_batch_size": 2,
        "max_new_tokens": 6,
        "learning_rate": 1e-3,
        "tensorboard": False,
        **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_cli(*args) -> subprocess.Popen:
    command, env = cli_command(*args)
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) first: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def signal_after_a_step(proc: subprocess.Popen, run_dir: Path, signum: int) -> tuple[str, str, int]:
    """Send `signum` to the run once it has logged a step; (stdout, stderr, steps logged) once it has ended."""
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and metric_lines(run_dir), proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    return out, err, len(metric_lines(run_dir))


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_facts(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(MACHINE_KEYS)} for m in metric_lines(run_dir)]


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tiny_models, tmp_path):
    whole = write_config(tmp_path, tiny_models, "whole")
    proc = run_cli("train", "--config", str(whole), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = start_cli("train", "--config", str(write_config(tmp_path, tiny_models, "killed")))
    wait_until(lambda: (killed_dir / "checkpoint-2" / "manifest.json").exists(), proc)  # the manifest comes last
    proc.kill()  # SIGKILL: no handler runs, whatever the run was doing (stepping, or writing checkpoint-3)
    proc.communicate()
    proc = run_cli("train", "--config", str(tmp_path / "killed.yaml"), "--resume", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout

    for name in ("model.safetensors", "value_head.safetensors"):
        expected, got = (
            load_file(tmp_path / "whole" / "checkpoint-4" / name),
            load_file(killed_dir / "checkpoint-4" / name),
        )
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}:{key}"
    assert run_facts(killed_dir) == run_facts(tmp_path / "whole")  # every step logged once, with the same numbers


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_the_step_boundary_with_a_checkpoint(tiny_models, tmp_path, signum):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, tiny_models, "run", steps=10_000, save_every=0)
    proc = start_cli("train", "--config", str(config))
    out, err, steps = signal_after_a_step(proc, run_dir, signum)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"stopped by {signal.Signals(signum).name} at step {steps}" in out
    assert [Path(path).name for _, path in list_checkpoints(str(run_dir))] == [f"checkpoint-{steps}"]
    assert verify(str(run_dir / f"checkpoint-{steps}")) is None


def poison_gradients(trainer) -> torch.utils.hooks.RemovableHandle:
    """A real non-finite gradient: every backward writes nan into the value head's weight gradient."""
    return trainer.model.value_head.weight.register_hook(lambda grad: grad * float("nan"))


def test_non_finite_gradient_skips_the_step_and_is_counted(tiny_models, tmp_path):
    config = small_config(
        tmp_path, policy_model=tiny_models["llama"][0], steps=3, mini_batch_size=4, micro_batch_size=2
    )
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hook = poison_gradients(trainer)
    metrics = trainer.step()  # one optimizer step per PPO step here: it is skipped
    assert metrics["optim/skipped_steps"] == 1
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), key  # skipped: no weight moved, no Adam state polluted
    hook.remove()
    metrics = trainer.step()
    assert metrics["optim/skipped_steps"] == 1 and trainer.skipped_in_a_row == 0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_too_many_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint(tiny_models, tmp_path):
    config = small_config(
        tmp_path, policy_model=tiny_models["llama"][0], steps=6, mini_batch_size=4, max_skipped_steps=2
    )
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    poison_gradients(trainer)
    with pytest.raises(FloatingPointError, match="in a row had a non-finite gradient.* no checkpoint of this run was"):
        trainer.train()  # "the last checkpoint is intact" only when there is one
    trainer.skipped_in_a_row = 0
    good = trainer.save()
    with pytest.raises(FloatingPointError, match=rf"2 optimizer steps in a row .* the last checkpoint, {good}, is"):
        trainer.train()
    assert [path for _, path in list_checkpoints(config.output_dir)] == [good] and verify(good) is None


def test_missing_model_path_exits_2_and_writes_nothing(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy_model": str(tmp_path / "no-such-model"),
                "reward_model": "math:fsum",
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 2 and f"policy_model: path {tmp_path / 'no-such-model'} does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_empty_prompt_file_exits_2_naming_it(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy_model": tiny_models["llama"][0],
                "reward_model": "math:fsum",
                "prompts": str(prompts),
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 2 and f"no prompts in {prompts}" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_tokenizer_without_pad_token_pads_with_eos(tiny_models, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=1)
    trainer = PPOTrainer(config, tokenizer=tokenizer, reward=count_w7, prompts=prompt_list())
    assert trainer.tokenizer.pad_token_id == trainer.tokenizer.eos_token_id
    assert torch.isfinite(torch.tensor(trainer.step()["policy/loss"]))


@pytest.mark.parametrize("tail", ['{"step": 3}', '{"step": 3, "reward/sc'], ids=["torn-before-newline", "torn-json"])
def test_resume_keeps_whole_records_one_per_line(tmp_path, tail):
    """A kill mid-write leaves a last record without its newline (kept, and ended) or cut short (dropped)."""
    from fastppo.runtime.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n' + tail)
    logger = MetricsLogger(str(tmp_path), report_to=[], append=True)
    logger.truncate_after(3)
    logger.log({"step": 4})
    logger.close()
    kept = [1, 2, 3] if tail.endswith("}") else [1, 2]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [*kept, 4]
