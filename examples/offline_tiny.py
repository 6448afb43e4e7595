"""Tiny random models built offline, so that the examples run in seconds with `--tiny` (CI runs them so): a word-level
tokenizer with a chat template, a Qwen2-style policy saved in bf16 as Qwen releases it, and a GPT-2-style reward model
with a tokenizer of its own. Nothing is downloaded; what they generate is noise, which is all a smoke run needs."""

from __future__ import annotations

import os

import torch

END_OF_TURN = "<|im_end|>"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer(words: list[str]):
    """A word-level tokenizer over `words` (split at spaces and punctuation), `<answer>` tags kept whole."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", END_OF_TURN, "<answer>", "</answer>"]
    roles = ["system:", "user:", "assistant:"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *roles, *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_TURN]})
    tokenizer.add_tokens(["<answer>", "</answer>"])  # not special: a response's tags survive decoding
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def save_policy(directory: str, words: list[str]) -> str:
    """A 2-layer Qwen2 causal LM with `tiny_tokenizer(words)`, its generation config ending turns at <|im_end|>."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    tokenizer = tiny_tokenizer(words)
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    return _save(model, tokenizer, os.path.join(directory, "tiny-policy"))


def save_reward_model(directory: str, words: list[str]) -> str:
    """A 2-layer GPT-2 sequence classifier (1 label) with a tokenizer of its own: `words` in another order."""
    from transformers import AutoModelForSequenceClassification, GPT2Config

    tokenizer = tiny_tokenizer(list(reversed(words)))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config)
    return _save(model, tokenizer, os.path.join(directory, "tiny-reward-model"))


def _save(model, tokenizer, path: str) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
