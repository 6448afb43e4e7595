"""No reference when nothing uses it: without a KL in the reward (kl_coef 0, or kl_in_reward false) and in the loss
(kl_loss_coef 0), TRL's GRPO default, no reference model is built and none runs; the KL metrics are then absent
(not measured), never a 0 that looks measured."""

import pytest

from fastppo import PPOTrainer
from fastppo.ppo import setup as ppo_setup
from fastppo.ppo import trainer as trainer_module
from tests.tiny_models import count_w7, prompt_list, small_config

NO_KL = [{"kl_coef": 0.0}, {"kl_in_reward": False}]


def forbid(monkeypatch, name, module=trainer_module):
    def called(*args, **kwargs):
        raise AssertionError(f"{name} was called")

    monkeypatch.setattr(module, name, called)


@pytest.mark.parametrize("no_kl", NO_KL, ids=["kl_coef=0", "kl_in_reward=false"])
def test_no_reference_is_loaded_or_run(tiny_llama, tmp_path, monkeypatch, no_kl):
    forbid(monkeypatch, "frozen_reference", ppo_setup)  # no reference model object
    forbid(monkeypatch, "reference_logprobs")  # no reference forward
    config = small_config(tmp_path, policy_model=tiny_llama[0], **no_kl)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert trainer.reference is None and not trainer.uses_reference
    metrics = trainer.step()
    assert "policy/kl" not in metrics  # not measured: absent, not 0
    assert metrics["kl/coef"] == 0.0 and metrics["kl/loss_coef"] == 0.0  # the settings


def test_a_lora_policy_runs_no_adapter_disabled_forward(tiny_llama, tmp_path, monkeypatch):
    forbid(monkeypatch, "reference_logprobs")
    config = small_config(tmp_path, policy_model=tiny_llama[0], kl_coef=0.0, lora_rank=4, reference="adapter")
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).step()


def test_the_rewards_are_the_scores_alone(tiny_llama, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_llama[0], kl_coef=0.0, steps=1)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    batch, _ = trainer.sample()
    trainer.compute_logprobs(batch)
    trainer.shape_rewards(batch)
    assert batch.ref_logprobs is None and batch.kl is None
    assert batch.rewards.sum(-1).tolist() == batch.scores.tolist()


def test_any_kl_keeps_the_reference(tiny_llama, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_llama[0], kl_coef=0.0, kl_loss_coef=0.01)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert trainer.reference is not None
    metrics = trainer.step()
    assert metrics["policy/kl"] == pytest.approx(0.0, abs=1e-5)  # measured: the policy has not moved yet
    assert "policy/ref_kl" in metrics


def test_measure_kl_keeps_the_reference_as_a_diagnostic(tiny_llama, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_llama[0], kl_coef=0.0, measure_kl=True)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    batch, _ = trainer.sample()
    trainer.compute_logprobs(batch)
    trainer.shape_rewards(batch)
    assert batch.kl is not None and batch.rewards.sum(-1).tolist() == batch.scores.tolist()  # measured, not used
    assert "policy/kl" in trainer.step()


def test_a_reference_given_but_unused_is_named(tiny_llama, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_llama[0], kl_coef=0.0)
    with pytest.warns(UserWarning, match="reference: not loaded, nothing uses it"):
        PPOTrainer(config, reward=count_w7, prompts=prompt_list(), reference=tiny_llama[0])


def test_evaluation_reports_no_kl_without_a_reference(tiny_llama, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_llama[0], kl_coef=0.0, eval_every=1)
    metrics = PPOTrainer(config, reward=count_w7, prompts=prompt_list(), eval_prompts=["w1", "w2"]).step()
    assert "eval/score_mean" in metrics and "eval/kl" not in metrics
