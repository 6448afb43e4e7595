"""Tiny random models of several architectures, saved like released checkpoints with a tokenizer built offline,
and the small configs and command lines the tests run them with."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

WORDS = [f"w{i}" for i in range(90)]
SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>", "<|im_end|>"]
END_OF_TURN = "<|im_end|>"  # a chat model's end of turn, beside the base EOS (like Qwen's <|im_end|>)
# Llama-3 style: the template renders BOS itself, and the tokenizer adds BOS to plain text too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# How each architecture is released: its dtype on the hub (Pythia and OPT in fp16, Llama/Qwen in bf16, GPT-2 fp32)
# and its stock dropout (GPT-2 0.1 everywhere, OPT 0.1 applied functionally); the others' stock is 0.
RELEASE_DTYPE = {
    "llama": torch.bfloat16,
    "qwen2": torch.bfloat16,
    "gpt2": torch.float32,
    "gpt_neox": torch.float16,
    "opt": torch.float16,
    "granite": torch.bfloat16,
}


def build_tokenizer(words: list[str] = WORDS):
    """The tests' word-level tokenizer; other `words` give another vocabulary (other ids, another size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(words) + ["user:", "assistant:"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
        additional_special_tokens=[END_OF_TURN],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=3)
    llama_like = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "granite":  # logits divided by logits_scaling in the model's forward (granite-3.x: 8)
        return tf.GraniteConfig(
            logits_scaling=8.0,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0078125,
            **llama_like,
        )
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            **common,
        )
    if arch == "opt":  # facebook/opt-*: dropout 0.1, applied with nn.functional.dropout
        return tf.OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            word_embed_proj_dim=hidden,
            max_position_embeddings=128,
            dropout=0.1,
            **common,
        )
    raise ValueError(arch)


def save_tiny_models(directory, arch: str = "llama", hidden: int = 32, layers: int = 2, **config_overrides):
    """(policy path, reward path): a causal LM and a 1-label classifier of `arch`, each with the tokenizer, saved
    the way the architecture's checkpoints are released: in its hub dtype, with its stock dropout, a chat template
    that renders BOS, and a generation_config.json whose eos_token_id lists the end of turn beside the EOS."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    tokenizer = build_tokenizer()
    config = model_config(arch, len(tokenizer), hidden, layers)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    dtype = RELEASE_DTYPE[arch]
    torch.manual_seed(0)
    suffix = "".join(f"-{k}{v}" for k, v in config_overrides.items())
    policy, reward = directory / f"{arch}{suffix}-policy", directory / f"{arch}{suffix}-reward"
    lm = AutoModelForCausalLM.from_config(config).to(dtype)
    lm.generation_config = GenerationConfig(
        bos_token_id=3, pad_token_id=0, eos_token_id=[1, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    )
    lm.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    if arch == "granite":  # no sequence-classification head in transformers
        return str(policy), None
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).to(dtype).save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    return str(policy), str(reward)


def save_reward_model(directory, arch: str, words: list[str]) -> str:
    """A 1-label classifier of `arch` with a tokenizer of its own over `words` (another vocabulary than the
    policies': other ids for the same words, another size), saved as released; its path."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = build_tokenizer(words)
    config = model_config(arch, len(tokenizer))
    config.num_labels = 1
    torch.manual_seed(1)
    path = directory / f"{arch}-reward-{len(tokenizer)}-tokens"
    AutoModelForSequenceClassification.from_config(config).to(RELEASE_DTYPE[arch]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def prompt_list(n: int = 24, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=g).tolist())
        for k in torch.randint(2, 6, (n,), generator=g)
    ]


def count_w7(prompts, responses):
    """Rule-based reward for the tests: how often the response says 'w7'."""
    return [float(r.split().count("w7")) for r in responses]


def logprobs_repeat_exactly(trainer) -> bool:
    """Whether two `compute_logprobs` passes over one rollout give bitwise the same old log-probs, reference
    log-probs and values: no dropout (or other noise) anywhere in the forwards PPO compares."""
    import torch

    batch = trainer.rollout(prompt_list()[:4])
    trainer.score(batch)
    fields = ("old_logprobs", "ref_logprobs", "old_values")
    trainer.compute_logprobs(batch)
    first = [getattr(batch, name) for name in fields]
    trainer.compute_logprobs(batch)
    return all(a is None or torch.equal(a, getattr(batch, name)) for a, name in zip(first, fields, strict=True))


def small_config(tmp_path, **overrides):
    from fastppo.ppo.config import PPOConfig

    values = dict(
        output_dir=str(tmp_path / "run"),
        steps=2,
        rollout_batch_size=4,
        mini_batch_size=2,
        micro_batch_size=1,
        max_new_tokens=6,
        max_prompt_length=16,
        learning_rate=1e-3,
        seed=0,
        report_to=[],
    )
    values.update(overrides)
    return PPOConfig(**values)


def tiny_run_yaml(tmp_path, policy: str, **overrides) -> str:
    """A YAML run file of a PPO run that takes seconds: `policy`, the count_w7 reward, 8 prompts, into
    tmp_path/run; `overrides` replace any of it."""
    import yaml

    values = {
        "policy_model": policy,
        "reward_model": "tests.tiny_models:count_w7",
        "prompts": prompt_list(8),
        "output_dir": str(tmp_path / "run"),
        "steps": 2,
        "rollout_batch_size": 2,
        "mini_batch_size": 2,
        "max_new_tokens": 2,
        "report_to": [],
        **overrides,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def cli_command(*args) -> tuple[list[str], dict]:
    """`fastppo ARGS` as a subprocess command line and environment (one thread: see the one_thread fixture)."""
    return [sys.executable, "-m", "fastppo", *args], {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    command, env = cli_command(*args)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
