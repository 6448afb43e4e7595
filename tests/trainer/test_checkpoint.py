import os

import pytest

from fastppo import PPOTrainer
from fastppo.checkpoint import find_resumable, verify
from fastppo.errors import InputError
from tests.trainer.conftest import count_w7, prompt_list, small_config


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
