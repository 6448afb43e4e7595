import os

import pytest

from fastppo import PPOTrainer
from fastppo.runtime.checkpoint import find_resumable, verify
from fastppo.runtime.errors import InputError
from tests.tiny_models import count_w7, prompt_list, small_config


@pytest.fixture
def run_with_checkpoints(tiny_models, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=2, save_every=1)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    return tmp_path / "run"


def test_checkpoints_are_complete_and_verified(run_with_checkpoints):
    for step in (1, 2):
        checkpoint = run_with_checkpoints / f"checkpoint-{step}"
        assert verify(str(checkpoint)) is None
        assert {"manifest.json", "trainer_state.pt", "value_head.safetensors", "config.json"} <= set(
            os.listdir(checkpoint)
        )
    assert not [p for p in os.listdir(run_with_checkpoints) if p.startswith(".tmp")]
    assert find_resumable(str(run_with_checkpoints)).endswith("checkpoint-2")


def test_damaged_checkpoint_falls_back_to_the_previous(run_with_checkpoints):
    weights = run_with_checkpoints / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    assert "checksum" in verify(str(run_with_checkpoints / "checkpoint-2"))
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert find_resumable(str(run_with_checkpoints)).endswith("checkpoint-1")
    os.remove(run_with_checkpoints / "checkpoint-1" / "manifest.json")
    with pytest.raises(InputError, match="no valid checkpoint"), pytest.warns(UserWarning):
        find_resumable(str(run_with_checkpoints))


def test_fresh_run_refuses_to_overwrite_checkpoints(run_with_checkpoints, tiny_models, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0])
    before = sorted(os.listdir(run_with_checkpoints))
    with pytest.raises(InputError, match="already holds checkpoints"):
        PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert sorted(os.listdir(run_with_checkpoints)) == before


def test_resuming_another_runs_checkpoint_refuses_an_output_dir_with_a_run(run_with_checkpoints, tiny_models, tmp_path):
    """A checkpoint of run A resumed into run B's directory would write over B: refused, B untouched."""
    other = tmp_path / "other"
    config = small_config(other, policy_model=tiny_models["llama"][0], steps=1)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    before = {p: (other / "run" / p).stat().st_mtime_ns for p in os.listdir(other / "run")}
    resume = small_config(
        other, policy_model=tiny_models["llama"][0], steps=3, resume_from=str(run_with_checkpoints / "checkpoint-1")
    )
    with pytest.raises(InputError, match="another run's"):
        PPOTrainer(resume, reward=count_w7, prompts=prompt_list())
    assert {p: (other / "run" / p).stat().st_mtime_ns for p in os.listdir(other / "run")} == before
    # into a new directory it is a new run that starts from that checkpoint
    fresh = small_config(
        tmp_path / "fresh",
        policy_model=tiny_models["llama"][0],
        steps=3,
        resume_from=str(run_with_checkpoints / "checkpoint-1"),
    )
    assert PPOTrainer(fresh, reward=count_w7, prompts=prompt_list()).step_count == 1


def test_overwrite_removes_the_previous_runs_checkpoints(run_with_checkpoints, tiny_models, tmp_path):
    """Starting over with overwrite_output_dir: a later --resume must find the new run's checkpoint, not the old
    run's newer one."""
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=1, overwrite_output_dir=True)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    assert sorted(p for p in os.listdir(run_with_checkpoints) if p.startswith("checkpoint")) == ["checkpoint-1"]
    resumed = small_config(
        tmp_path, policy_model=tiny_models["llama"][0], steps=2, resume_from=str(run_with_checkpoints)
    )
    assert PPOTrainer(resumed, reward=count_w7, prompts=prompt_list()).step_count == 1


@pytest.mark.parametrize(
    "changed, named",
    [
        ({"lora_rank": 4}, "lora_rank 0 -> 4"),
        ({"advantage_estimator": "grpo", "samples_per_prompt": 2}, "critic 'shared' -> 'none'"),
        ({"critic": "separate"}, "critic 'shared' -> 'separate'"),
    ],
)
def test_resume_refuses_settings_that_change_the_model(run_with_checkpoints, tiny_models, tmp_path, changed, named):
    resume = str(run_with_checkpoints)
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=3, resume_from=resume, **changed)
    with pytest.raises(InputError, match=named):
        PPOTrainer(config, reward=count_w7, prompts=prompt_list())


def test_resume_warns_about_settings_the_checkpoint_overrides(run_with_checkpoints, tiny_models, tmp_path):
    resume = str(run_with_checkpoints)
    config = small_config(
        tmp_path, policy_model=tiny_models["llama"][0], steps=3, resume_from=resume, learning_rate=1e-6
    )
    with pytest.warns(UserWarning, match="learning_rate: 1e-06 has no effect on resume"):
        trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert trainer.optimizer.param_groups[0]["lr"] != 1e-6


def test_resume_into_another_architecture_names_the_checkpoint(run_with_checkpoints, tiny_models, tmp_path):
    config = small_config(
        tmp_path, policy_model=tiny_models["qwen2"][0], steps=3, resume_from=str(run_with_checkpoints)
    )
    with (
        pytest.warns(UserWarning, match="same architecture"),
        pytest.raises(InputError, match="cannot load the weights"),
    ):
        PPOTrainer(config, reward=count_w7, prompts=prompt_list())
