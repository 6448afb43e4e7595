"""What fastppo saves is the model the user gave it, trained: the released dropout in config.json (fastppo turns it off
in its own forwards only), tied embeddings once, the tokenizer without the pad token fastppo set for batching; and
save_total_limit removes the oldest checkpoints only once a newer one verifies."""

import json
import os

import pytest
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastppo import PPOTrainer
from fastppo.models import load_tokenizer
from fastppo.runtime.checkpoint import list_checkpoints, prune_checkpoints, save_model
from tests.tiny_models import build_tokenizer, count_w7, prompt_list, save_tiny_models, small_config


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A Qwen2.5-like release: bf16, tied embeddings, attention_dropout 0.1; and a tokenizer without a pad token."""
    directory = tmp_path_factory.mktemp("released")
    policy, _ = save_tiny_models(directory, "qwen2", attention_dropout=0.1, tie_word_embeddings=True)
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    no_pad = directory / "no-pad-tokenizer"
    tokenizer.save_pretrained(no_pad)
    return policy, str(no_pad)


def tensor_names(path: str) -> set[str]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


def saved_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_a_checkpoint_keeps_the_released_dropout_and_ties(released, tmp_path, lora):
    policy, _ = released
    config = small_config(tmp_path, policy_model=policy, steps=1, lora_rank=4 if lora else 0)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert trainer.model.lm.config.attention_dropout == 0.0  # off in fastppo's forwards
    saved = trainer.save()
    assert saved_config(saved)["attention_dropout"] == 0.1  # as released
    assert saved_config(saved)["tie_word_embeddings"] is True
    assert "lm_head.weight" not in tensor_names(saved)  # the embedding, saved once
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert reloaded.config.attention_dropout == 0.1
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_the_saved_tokenizer_has_no_pad_token_fastppo_added(released, tmp_path):
    policy, no_pad = released
    config = small_config(tmp_path, policy_model=policy, tokenizer=no_pad, steps=1)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    assert trainer.tokenizer.pad_token == trainer.tokenizer.eos_token  # batching pads with EOS
    saved = trainer.save()
    assert AutoTokenizer.from_pretrained(saved).pad_token is None  # as it was given
    assert json.load(open(os.path.join(saved, "tokenizer_config.json"))).get("pad_token") is None
    assert trainer.tokenizer.pad_token == trainer.tokenizer.eos_token  # and still set in memory


def test_the_supervised_stages_save_the_tokenizer_as_given(released, tmp_path):
    _, no_pad = released
    tokenizer = load_tokenizer(no_pad, need_eos=True)  # as `fastppo sft` and `fastppo reward-model` load it
    lm = AutoModelForCausalLM.from_pretrained(released[0])
    save_model(lm, tokenizer, str(tmp_path / "sft"))
    assert AutoTokenizer.from_pretrained(tmp_path / "sft").pad_token is None


def test_save_total_limit_keeps_the_newest_checkpoints(tiny_models, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=4, save_every=1, save_total_limit=2)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [3, 4]


def test_a_checkpoint_that_does_not_verify_removes_nothing(tiny_models, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=2, save_every=1)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    newest = os.path.join(config.output_dir, "checkpoint-2")
    weights = os.path.join(newest, "model.safetensors")
    with open(weights, "r+b") as f:  # damaged after it was written (a full disk, a bad sector)
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    with pytest.warns(UserWarning, match="does not verify"):
        assert prune_checkpoints(config.output_dir, 1, newest) == []
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [1, 2]  # checkpoint-1: the last good one
