"""`fastppo train --set rollout_engine=vllm` end to end, as a user runs it: TIS correction, resume."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.engines.vllm.conftest import HAVE_VLLM
from tests.tiny_models import run_cli

pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here: run .ci/vllm_tests.sh")


def test_train_with_vllm_and_tis_then_resume(vllm_policy, tmp_path):
    policy, _ = vllm_policy
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) for i in range(8)) + "\n")
    config = {
        "policy_model": policy,
        "reward_model": "tests.tiny_models:count_w7",
        "prompts": str(prompts),
        "output_dir": str(tmp_path / "run"),
        "steps": 2,
        "rollout_batch_size": 4,
        "mini_batch_size": 2,
        "max_new_tokens": 6,
        "learning_rate": 1e-3,
        "tensorboard": False,
        "stop_strings": ["w7"],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    overrides = ("--set", "rollout_engine=vllm", "--set", "rollout_correction=tis")
    proc = run_cli("train", "--config", str(path), *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "done: 2 steps" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2
    # Step 1 samples from the initial weights, step 2 from the synced ones: the sampler and the trainer agree.
    for row in rows:
        assert row["rollout/logprob_diff_max"] < 1e-3, row
        assert 0.0 <= row["rollout/corrected_frac"] <= 1.0 and abs(row["rollout/sampler_kl"]) < 1e-4
    assert rows[1]["perf/weight_sync_s"] > 0  # the first optimizer steps were pushed before step 2's rollout

    proc = run_cli("train", "--config", str(path), *overrides, "--set", "steps=3", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout and "done: 3 steps" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["rollout/logprob_diff_max"] < 1e-3, "resume pushes the resumed weights into the engine"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_train_under_torchrun_every_rank_its_engine(vllm_policy, tmp_path, parallel):
    """`fastppo train --nproc 2`: each rank builds its engine with the external launcher in the trainer's process
    group, generates its share, and syncs the (gathered, under FSDP) weights after the first step."""
    policy, _ = vllm_policy
    config = {
        "policy_model": policy,
        "reward_model": "tests.tiny_models:count_w7",
        "parallel": parallel,
        "prompts": [f"w{i} w{i + 1}" for i in range(8)],
        "output_dir": str(tmp_path / "run"),
        "steps": 2,
        "rollout_batch_size": 4,
        "mini_batch_size": 4,
        "micro_batch_size": 1,
        "max_new_tokens": 4,
        "learning_rate": 1e-3,
        "tensorboard": False,
        "rollout_engine": "vllm",
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli("train", "--nproc", "2", "--config", str(path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2
    for row in rows:
        assert row["rollout/logprob_diff_max"] < 1e-3, row


def test_sigint_with_the_engine_in_process_stops_at_a_step_with_a_checkpoint(vllm_policy, tmp_path):
    """The in-process engine must not take over the trainer's signals: Ctrl-C finishes the step, saves, exits 130."""
    import signal

    from fastppo.runtime.checkpoint import list_checkpoints, verify
    from tests.ppo.test_robustness import metric_lines, start_cli, wait_until

    policy, _ = vllm_policy
    run_dir = tmp_path / "run"
    config = {
        "policy_model": policy,
        "reward_model": "tests.tiny_models:count_w7",
        "output_dir": str(run_dir),
        "prompts": [f"w{i} w{i + 1}" for i in range(8)],
        "steps": 10_000,
        "rollout_batch_size": 2,
        "mini_batch_size": 2,
        "max_new_tokens": 4,
        "tensorboard": False,
        "rollout_engine": "vllm",
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = start_cli("train", "--config", str(path))
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and metric_lines(run_dir), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    steps = len(metric_lines(run_dir))
    assert f"stopped by SIGINT at step {steps}" in out
    assert [p for _, p in list_checkpoints(str(run_dir))] == [str(run_dir / f"checkpoint-{steps}")]
    assert verify(str(run_dir / f"checkpoint-{steps}")) is None
