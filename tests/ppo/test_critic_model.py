"""A critic initialized from a reward model (TRL's and OpenRLHF's value_model): `critic: separate` with
`critic_model: <path>` takes the classifier's body as the critic's backbone and its score head as the value head;
a directory holding anything else is refused before anything loads."""

import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from fastppo import PPOTrainer
from fastppo.runtime.errors import InputError
from tests.tiny_models import build_tokenizer, count_w7, prompt_list, small_config


def critic_config(tmp_path, policy, critic_model, **overrides):
    return small_config(tmp_path, policy_model=policy, critic="separate", critic_model=critic_model, **overrides)


def test_the_critic_starts_as_the_reward_model(tiny_models, tmp_path):
    policy, _ = tiny_models["llama"]
    reward = tiny_models["qwen2"][1]  # another architecture, the same tokenizer: its body reads the policy's ids
    trainer = PPOTrainer(critic_config(tmp_path, policy, reward, steps=2), reward=count_w7, prompts=prompt_list())
    classifier = AutoModelForSequenceClassification.from_pretrained(reward, dtype=torch.float32)
    model = trainer.model
    assert torch.equal(model.value_head.weight, classifier.score.weight)
    body = classifier.model.state_dict()
    assert all(torch.equal(t, body[name]) for name, t in model.critic_backbone.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.critic_parameters())  # master weights, as the policy's
    before = model.value_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(model.value_head.weight, before)  # trained by the value loss
    resumed = critic_config(tmp_path, policy, reward, steps=2, resume_from=str(tmp_path / "run"))
    again = PPOTrainer(resumed, reward=count_w7, prompts=prompt_list())
    assert torch.equal(again.model.value_head.weight, model.value_head.weight)  # the checkpoint's, not the RM's


def reward_model_copy(tmp_path, source: str, name: str) -> str:
    path = tmp_path / name
    shutil.copytree(source, path)
    return str(path)


def test_a_directory_holding_something_else_is_refused(tiny_models, tmp_path):
    policy, reward = tiny_models["llama"]

    with pytest.raises(InputError, match="LlamaForCausalLM, not a sequence classifier"):
        PPOTrainer(critic_config(tmp_path, policy, policy), reward=count_w7, prompts=prompt_list())

    two_labels = reward_model_copy(tmp_path, reward, "two-labels")
    config = AutoConfig.from_pretrained(reward)
    config.num_labels = 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(two_labels)
    with pytest.raises(InputError, match="classifier of 2 labels"):
        PPOTrainer(critic_config(tmp_path, policy, two_labels), reward=count_w7, prompts=prompt_list())

    other_vocab = reward_model_copy(tmp_path, reward, "other-tokenizer")
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["w999"])
    tokenizer.save_pretrained(other_vocab)
    with pytest.raises(InputError, match="another tokenizer than the policy's"):
        PPOTrainer(critic_config(tmp_path, policy, other_vocab), reward=count_w7, prompts=prompt_list())

    no_tokenizer = reward_model_copy(tmp_path, reward, "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "no-tokenizer" / name).unlink()
    with pytest.raises(InputError, match="has no tokenizer"):
        PPOTrainer(critic_config(tmp_path, policy, no_tokenizer), reward=count_w7, prompts=prompt_list())


def test_critic_model_needs_a_separate_critic(tiny_models, tmp_path):
    config = small_config(tmp_path, critic_model=tiny_models["llama"][1])
    with pytest.raises(InputError, match="critic: separate"):
        config.validate()
    estimator = critic_config(tmp_path, None, tiny_models["llama"][1], advantage_estimator="grpo", samples_per_prompt=2)
    with pytest.raises(InputError, match="no critic"):
        estimator.validate()


def test_the_cli_checks_it_before_anything_loads(tiny_models, tmp_path, capsys):
    from tests.refusal import assert_refused, run, write_yaml

    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], critic="separate").to_dict()
    config.update(critic_model=str(tmp_path / "nope"), reward_model="tests.tiny_models:count_w7", prompts=["w1"])
    result = run(["train", "--config", write_yaml(tmp_path / "run.yaml", config)], capsys)
    assert_refused(result, "critic_model", "nope")
