"""precision/logprob_gap: the policy's log-probs of the same rows under bf16 autocast against float32."""

import pytest
import torch

from fastppo.ppo.batch import RolloutBatch
from fastppo.ppo.precision_gap import GAP_ROWS, logprob_gap
from fastppo.ppo.trainer import PPOTrainer
from tests.tiny_models import count_w7, prompt_list, small_config


def _batch() -> RolloutBatch:
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [4, 4, 4]])
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=(prompt_ids > 0).long(),
        response_ids=torch.arange(12).view(3, 4) + 3,
        response_mask=response_mask,
        ended=torch.ones(3, dtype=torch.bool),
        prompts=["a", "b", "c"],
        responses=["", "", ""],
    )


def test_the_gap_compares_the_two_forwards_over_the_real_response_tokens():
    seen = []

    def model(input_ids, attention_mask, prompt_length, temperature):  # bf16 under autocast: 0, float32: the ids
        seen.append((input_ids.shape, torch.is_autocast_enabled("cpu")))
        response = input_ids[:, prompt_length:].double()
        return (torch.zeros_like(response) if torch.is_autocast_enabled("cpu") else response), None, None

    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = logprob_gap(model, _batch(), 1.0)
    assert [on for _, on in seen] == [True, False] and seen[0][0] == (GAP_ROWS, 3 + 3)  # 2 rows, trimmed to 3
    real = torch.tensor([3.0, 4, 7, 8, 9])  # rows 0 and 1 up to their ends
    assert stats["precision/logprob_gap_mean"] == pytest.approx(float(real.mean()))
    assert stats["precision/logprob_gap_max"] == 9.0


def test_a_bf16_run_reports_what_bf16_changed(tiny_models, tmp_path):
    runs = {}
    for choice in ("bf16", "float32"):
        config = small_config(tmp_path / choice, policy_model=tiny_models["llama"][0], precision=choice, steps=1)
        runs[choice] = PPOTrainer(config, reward=count_w7, prompts=prompt_list()).step()
    bf16 = runs["bf16"]
    assert 0 < bf16["precision/logprob_gap_mean"] <= bf16["precision/logprob_gap_max"] < 0.5
    assert not any(name.startswith("precision/") for name in runs["float32"])


def test_under_bf16_the_reward_model_scores_in_bf16_too(tiny_models, tmp_path, monkeypatch):
    from fastppo.ppo import rewards

    seen = []
    score = rewards.ModelReward._score
    monkeypatch.setattr(
        rewards.ModelReward,
        "_score",
        lambda self, ids, mask: seen.append((choice, torch.is_autocast_enabled("cpu"))) or score(self, ids, mask),
    )
    for choice in ("bf16", "float32"):
        policy, reward = tiny_models["llama"]
        config = small_config(tmp_path / choice, policy_model=policy, reward_model=reward, precision=choice, steps=1)
        PPOTrainer(config, prompts=prompt_list()).step()
    assert set(seen) == {("bf16", True), ("float32", False)}
