"""LoRA as TRL users configure it: a peft LoraConfig passed as `PPOTrainer(config, peft_config=...)`, or the same
settings as lora_* keys; lora_dropout stays in the adapter's config and off in fastppo's forwards."""

import pytest
from peft import IA3Config, LoraConfig

from fastppo import PPOTrainer
from fastppo.ppo.config import PPOConfig
from fastppo.runtime.errors import InputError
from tests.tiny_models import count_w7, logprobs_repeat_exactly, prompt_list, small_config

TRL_STYLE = dict(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def adapted_modules(trainer) -> set[str]:
    return {name.split(".")[-1] for name, module in trainer.model.lm.named_modules() if hasattr(module, "lora_A")}


def test_a_lora_config_object_is_taken_as_trl_takes_it(tiny_llama, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_llama[0], steps=1, reference="adapter")
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list(), peft_config=LoraConfig(**TRL_STYLE))
    assert adapted_modules(trainer) == {"q_proj", "v_proj"}
    trained = {name for name, p in trainer.model.lm.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in name for name in trained)  # trained in full, beside the adapters
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.5)  # recorded: logs, resume
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.lora_modules_to_save == ["lm_head"]
    assert trainer.model.lm.peft_config["default"].lora_dropout == 0.5  # what adapter_config.json will say


def test_the_same_settings_as_yaml_keys(tiny_llama, tmp_path):
    values = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.5, lora_target_modules=["q_proj", "v_proj"])
    config = PPOConfig.from_dict({**small_config(tmp_path, policy_model=tiny_llama[0]).to_dict(), **values})
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert adapted_modules(trainer) == {"q_proj", "v_proj"}
    assert trainer.model.lm.peft_config["default"].lora_dropout == 0.5


def test_lora_dropout_leaves_the_old_and_reference_logprobs_exact(tiny_llama, tmp_path):
    config = small_config(
        tmp_path, policy_model=tiny_llama[0], reference="adapter", mini_batch_size=4, old_logprobs="recompute"
    )
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list(), peft_config=LoraConfig(**TRL_STYLE))
    assert trainer.step()["policy/kl"] == 0.0  # the adapters start at zero: the policy is its reference
    # lora_B has moved: a dropout on the adapters' input would now change every forward
    assert logprobs_repeat_exactly(trainer)
    metrics = trainer.step()  # one minibatch: the update sees exactly the rollout-time policy
    assert metrics["policy/ratio_max"] == 1.0 and metrics["policy/approx_kl"] == 0.0


@pytest.mark.parametrize(
    ("config", "peft_config", "named"),
    [
        ({"lora_rank": 8}, LoraConfig(r=4), "lora_rank"),
        ({"lora_dropout": 0.2}, LoraConfig(r=4, lora_dropout=0.1), "lora_dropout"),
        ({}, IA3Config(), "LoraConfig"),
        ({}, LoraConfig(r=4, task_type="SEQ_CLS"), "task_type"),
    ],
)
def test_conflicting_or_foreign_peft_configs_are_refused(tiny_llama, tmp_path, config, peft_config, named):
    with pytest.raises(InputError, match=named):
        PPOTrainer(small_config(tmp_path, policy_model=tiny_llama[0], **config), peft_config=peft_config)


@pytest.mark.parametrize("setting", [{"lora_dropout": 0.1}, {"lora_modules_to_save": ["lm_head"]}])
def test_lora_settings_without_lora_are_refused(tmp_path, setting):
    with pytest.raises(InputError, match="lora_rank is 0"):
        small_config(tmp_path, **setting).validate()
