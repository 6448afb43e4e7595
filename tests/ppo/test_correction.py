"""rollout_correction's weights and metrics (plain torch), and rollout_engine: vllm without vLLM installed."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import yaml

from fastppo.ppo.correction import correction_weights, log_prob_gap
from tests.tiny_models import run_cli

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])


def test_tis_truncates_each_token_ratio_at_the_cap():
    sampler = torch.zeros(3, 4)
    old = torch.tensor([[math.log(3.0), math.log(0.5), 0.0, 9.0], [math.log(1.5), 0.0, 0.0, 0.0], [1.0] * 4])
    weights, corrected = correction_weights(sampler, old, MASK, "tis", cap=2.0)
    expected = torch.tensor([[2.0, 0.5, 1.0, 0.0], [1.5, 1.0, 0.0, 0.0], [0.0] * 4])
    assert torch.allclose(weights, expected)
    assert corrected == pytest.approx(1 / 5)  # one of the five valid tokens was truncated


def test_mis_masks_whole_sequences_outside_the_bounds():
    sampler = torch.zeros(3, 4)
    old = torch.tensor([[math.log(1.5), math.log(1.5), 0.0, 0.0], [math.log(1.2), 0.0, 0.0, 5.0], [0.0] * 4])
    weights, masked = correction_weights(sampler, old, MASK, "mis", cap=2.0)  # row 0: ratio 2.25 > 2
    assert weights.tolist() == [[0.0] * 4, [1.0, 1.0, 0.0, 0.0], [0.0] * 4]
    assert masked == pytest.approx(1 / 2)  # of the two non-empty sequences
    assert correction_weights(sampler, old, MASK, "none", 2.0) == (None, 0.0)


def test_log_prob_gap_over_valid_tokens_only():
    sampler = torch.tensor([[-1.0, -2.0, 7.0]])
    trainer = torch.tensor([[-1.1, -2.0, -9.0]])
    gap = log_prob_gap(sampler, trainer, torch.tensor([[1, 1, 0]]))
    assert gap["rollout/logprob_diff_max"] == pytest.approx(0.1, abs=1e-6)
    assert gap["rollout/logprob_diff_mean"] == pytest.approx(0.05, abs=1e-6)
    assert gap["rollout/sampler_kl"] == pytest.approx((math.expm1(-0.1) + 0.1) / 2, abs=1e-6)


def test_rollout_correction_needs_the_vllm_engine(tmp_path):
    from fastppo.ppo.config import PPOConfig
    from fastppo.runtime.errors import InputError

    with pytest.raises(InputError, match="rollout_correction .* needs rollout_engine: vllm"):
        PPOConfig(output_dir=str(tmp_path / "run"), rollout_correction="tis").validate()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_exits_2_naming_the_install(tiny_llama, tmp_path):
    config = {
        "policy_model": tiny_llama[0],
        "reward_model": "tests.tiny_models:count_w7",
        "prompts": ["w1 w2", "w3"],
        "output_dir": str(tmp_path / "run"),
        "rollout_engine": "vllm",
        "rollout_batch_size": 2,
        "mini_batch_size": 2,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli("train", "--config", str(path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'pip install "fastppo[vllm]"' in proc.stderr
    assert not (tmp_path / "run").exists()  # stopped before anything was loaded or written
