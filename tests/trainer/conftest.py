"""Tiny random models of several architectures, saved with a tokenizer built offline, for the trainer tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

WORDS = [f"w{i}" for i in range(90)]
SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + ["user:", "assistant:"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=3)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, **common)  # fmt: skip
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, **common)  # fmt: skip
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=128, **common)  # fmt: skip
    raise ValueError(arch)


def save_tiny_models(directory, arch: str = "llama", hidden: int = 32, layers: int = 2) -> tuple[str, str]:
    """(policy path, reward path): a causal LM and a 1-label classifier of `arch`, each with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = build_tokenizer()
    config = model_config(arch, len(tokenizer), hidden, layers)
    torch.manual_seed(0)
    policy, reward = directory / f"{arch}-policy", directory / f"{arch}-reward"
    AutoModelForCausalLM.from_config(config).save_pretrained(policy)
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(reward)
    for path in (policy, reward):
        tokenizer.save_pretrained(path)
    return str(policy), str(reward)


def prompt_list(n: int = 24, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=g).tolist())
            for k in torch.randint(2, 6, (n,), generator=g)]  # fmt: skip


def count_w7(prompts, responses):
    """Rule-based reward for the tests: how often the response says 'w7'."""
    return [float(r.split().count("w7")) for r in responses]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds OpenMP contention (measured here
    with other jobs running: a (160, 32) x (32, 64) linear takes 14 us on 1 thread, 7.7 ms on 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_models(directory, arch) for arch in ("llama", "qwen2", "gpt2", "gpt_neox")}


def small_config(tmp_path, **overrides):
    from fastppo.config import PPOConfig

    values = dict(output_dir=str(tmp_path / "run"), steps=2, rollout_batch_size=4, mini_batch_size=2,
                  micro_batch_size=1, max_new_tokens=6, max_prompt_length=16, learning_rate=1e-3, seed=0,
                  tensorboard=False)  # fmt: skip
    values.update(overrides)
    return PPOConfig(**values)


def cli_command(*args) -> tuple[list[str], dict]:
    """`fastppo ARGS` as a subprocess command line and environment (one thread: see the one_thread fixture)."""
    return [sys.executable, "-m", "fastppo", *args], {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    command, env = cli_command(*args)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
