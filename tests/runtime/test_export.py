"""The final model (<output_dir>/final, `PPOTrainer.save_model`): one folder that plain `from_pretrained` loads as
fastppo trained it: the weights in the checkpoint's dtype, the tokenizer that tokenizes the same ids (a qwen2
config's included, for which transformers 5 picks another tokenizer class), the chat template, the generation
config; LoRA merged or as the adapter alone."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from fastppo import PPOTrainer
from fastppo.runtime.errors import InputError
from tests.refusal import run, write_yaml
from tests.tiny_models import END_OF_TURN, count_w7, prompt_list, small_config

CHAT = [{"role": "user", "content": "w1 w2 w3"}]


@pytest.fixture
def trained(tiny_models, tmp_path):
    """A qwen2 policy as released (bf16, chat template with BOS, two end-of-turn ids) after two PPO steps."""
    config = small_config(tmp_path, policy_model=tiny_models["qwen2"][0])
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    trainer.train()
    return trainer


def test_the_final_model_loads_and_tokenizes_as_trained(trained):
    final = trained.save_model()
    assert final == os.path.join(trained.config.output_dir, "final")
    assert not {"trainer_state.pt", "value_head.safetensors", "master_weights.safetensors"} & set(os.listdir(final))

    tokenizer = AutoTokenizer.from_pretrained(final)  # plain transformers, as a user loads it
    for text in [*prompt_list(), trained.tokenizer.apply_chat_template(CHAT, tokenize=False)]:
        assert tokenizer(text)["input_ids"] == trained.tokenizer(text)["input_ids"], text
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == trained.tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )

    lm = AutoModelForCausalLM.from_pretrained(final)
    assert lm.dtype == torch.bfloat16  # the checkpoint's dtype
    for name, p in lm.named_parameters():  # the trained float32 weights, rounded once
        torch.testing.assert_close(p, trained.model.lm.get_parameter(name).detach().to(torch.bfloat16), rtol=0, atol=0)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert GenerationConfig.from_pretrained(final).eos_token_id == [1, end_of_turn]


def test_without_the_fix_plain_transformers_would_tokenize_otherwise(tiny_models):
    """What the export guards against: the qwen2 release's own files load as Qwen2Tokenizer, which tokenizes this
    vocabulary wrongly (fastppo's load_tokenizer loads it as saved)."""
    plain = AutoTokenizer.from_pretrained(tiny_models["qwen2"][0])
    assert type(plain).__name__ == "Qwen2Tokenizer" and plain("w1 w2")["input_ids"] != [3, 6, 7]


def test_a_llama_export_needs_no_redirect(tiny_models, tmp_path):
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0], steps=1)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    final = trainer.save_model(str(tmp_path / "export"))
    assert "auto_map" not in json.load(open(os.path.join(final, "tokenizer_config.json")))
    assert AutoTokenizer.from_pretrained(final)("w1 w2")["input_ids"] == trainer.tokenizer("w1 w2")["input_ids"]


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "adapter"])
def test_lora_exports_merged_or_as_the_adapter(tiny_models, tmp_path, monkeypatch, merged):
    config = small_config(
        tmp_path, policy_model=tiny_models["llama"][0], steps=1, lora_rank=4, lora_dropout=0.1, save_merged_lora=merged
    )
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list())
    trainer.train()
    monkeypatch.chdir(tmp_path / "run")  # an adapter names its base by absolute path: it loads from anywhere
    final = trainer.save_model()
    files = set(os.listdir(final))
    assert ("model.safetensors" in files) == merged and ("adapter_model.safetensors" in files) != merged
    if not merged:
        assert json.load(open(os.path.join(final, "adapter_config.json")))["lora_dropout"] == 0.1  # as configured
        assert "generation_config.json" in files
    lm = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    ids = torch.tensor([[3, 6, 7, 8]])
    with torch.no_grad():
        expected = trainer.model.lm(input_ids=ids).logits
        tolerance = 3e-2 if merged else 1e-5  # merged: the weights rounded to the checkpoint's bf16
        torch.testing.assert_close(lm.eval()(input_ids=ids).logits, expected, atol=tolerance, rtol=0)


def test_save_model_replaces_its_own_export_and_nothing_else(trained, tmp_path):
    path = str(tmp_path / "mine")
    assert trained.save_model(path) == path
    trained.save_model(path)  # the same trainer's export: replaced
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        trained.save_model(str(theirs))
    assert os.listdir(theirs) == ["notes.txt"]


def test_fastppo_train_leaves_the_final_model(tiny_models, tmp_path, capsys):
    config = small_config(tmp_path, policy_model=tiny_models["llama"][0]).to_dict()
    config.update(reward_model="tests.tiny_models:count_w7", prompts=prompt_list(8))
    code, out, err = run(["train", "--config", write_yaml(tmp_path / "run.yaml", config)], capsys)
    assert code == 0, err[-2000:]
    final = tmp_path / "run" / "final"
    assert f"final model in {final}" in out
    assert AutoModelForCausalLM.from_pretrained(final).dtype == torch.bfloat16


def test_starting_over_removes_the_previous_runs_final_model(tmp_path):
    from fastppo.runtime.checkpoint import clear_previous_run

    for name in ("checkpoint-2", "final"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    clear_previous_run(str(tmp_path), None, overwrite=True)  # overwrite_output_dir, once everything has loaded
    assert os.listdir(tmp_path) == []  # a later run's final cannot be confused with the old one
