"""What the supervised stages share: `fastppo sft`, `fastppo reward-model` and `fastppo dpo`.

Encoding (prompt + response + EOS, the response as the target), padding, the batch schedule (seeded epochs), the
update step (clip the gradient norm to 1), the learning-rate schedule (`fastppo.runtime.schedule`), and the checks their
commands run before anything loads.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

import torch

from fastppo import models
from fastppo.data import encode
from fastppo.runtime import validation
from fastppo.runtime.checkpoint import list_checkpoints
from fastppo.runtime.errors import InputError
from fastppo.runtime.fingerprints import prompts_digest
from fastppo.runtime.model_sources import resolve as resolve_model_source

# ----------------------------------------------------------------------------------------------
# encoding and batching
# ----------------------------------------------------------------------------------------------


def encode_prompt_response(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """(token ids of prompt + response + EOS truncated to `max_length`, number of prompt tokens). The prompt is
    encoded as PPO encodes it (`data.encode`: BOS in front once, even when a chat template rendered one), so the
    policy is fine-tuned on the token layout PPO then trains it on."""
    prompt_ids = encode(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return (prompt_ids + response_ids)[:max_length], len(prompt_ids)


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids and attention mask."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


def shuffled_batches(n_items: int, batch_size: int, total_steps: int, seed: int):
    """Index lists for `total_steps` steps: epochs of a seeded permutation (an epoch's last batch may be short)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(total_steps):
        if not order:
            order = torch.randperm(n_items, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def split_pairs(pairs: list[dict[str, str]], eval_fraction: float, seed: int):
    """(train, held-out) preference pairs: a seeded shuffle, at least one held out when any fraction is asked."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = int(len(pairs) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and len(pairs) > 1:
        n_eval = 1
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def without_ties(pairs: list, log=print) -> list:
    """Preference pairs whose chosen and rejected are the same text carry no preference: their loss is constant and
    its gradient zero, for DPO as for a reward model. They are dropped and counted; all of them is refused (a column
    copied twice?), naming the first one's file:line."""
    tied = [pair["chosen"].strip() == pair["rejected"].strip() for pair in pairs]
    ties = [pair for pair, tie in zip(pairs, tied, strict=True) if tie]
    if not ties:
        return pairs
    where = getattr(ties[0], "where", "?")
    if len(ties) == len(pairs):
        raise InputError(
            f"{where}: chosen and rejected are the same text, in every one of the {len(pairs)} pairs: there is no "
            "preference to learn. Check the data (a column copied into both?)"
        )
    log(
        f"fastppo: {len(ties)} of {len(pairs)} pairs have chosen == rejected (the first at {where}): dropped, "
        "they carry no preference"
    )
    return [pair for pair, tie in zip(pairs, tied, strict=True) if not tie]


def count_steps(n_items: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes (a fraction allowed) over `n_items` in batches of `batch_size`."""
    return max(1, round(epochs * math.ceil(n_items / batch_size)))


def is_report_step(step: int, total_steps: int) -> bool:
    """Whether 0-based `step` prints a progress line: ten in a run, and always the last."""
    return (step + 1) % max(1, total_steps // 10) == 0 or step + 1 == total_steps


def optimizer_step(model, optimizer, scheduler) -> None:
    """One update of the supervised stages, after their micro-batches' backwards: clip the accumulated gradients'
    norm to 1, step, zero."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# the checks `sft` and `reward-model` run before anything loads
# ----------------------------------------------------------------------------------------------

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def run_settings(texts: list[str], total_steps: int, batch_size: int, seed: int, max_length: int) -> dict:
    """What the seeded batch order of `sft` / `reward-model` depends on, recorded in their checkpoints: a resume
    with anything else would replay another order (`checkpointing.run_steps`)."""
    return {
        "data": prompts_digest(texts),
        "total_steps": total_steps,
        "batch_size": batch_size,
        "seed": seed,
        "max_length": max_length,
    }


def stopped(command: str, stop, step: int) -> int:
    """The line a stage stopped by a signal ends with, and its exit code (130 / 143)."""
    if step == 0:
        print(f"fastppo {command}: stopped by {stop.name} during the first step: nothing to save", file=sys.stderr)
    else:
        print(
            f"fastppo {command}: stopped by {stop.name} at step {step}, checkpoint saved; continue with the same "
            "command and --resume"
        )
    return stop.exit_code


def training_options(config) -> dict:
    """The options `train_sft` and `train_reward_model` share, from an SFTConfig or a RewardModelConfig."""
    names = ("epochs", "batch_size", "micro_batch_size", "micro_batch_tokens", "learning_rate", "max_length", "seed")
    names += ("output_dir",)
    return {name: getattr(config, name) for name in names}


def check_inputs(config, fields: Sequence[str]) -> list[dict[str, str]]:
    """What `fastppo sft` and `fastppo reward-model` check before loading anything: every field, the output
    directory (usable, and holding no model unless overwrite_output_dir), the model directory, and every line of
    the data, which is returned."""
    config.validate()
    for name in ("model", "data"):
        if getattr(config, name) is None:
            raise InputError(f"{name}: missing (pass --{name} or set it in --config)")
    validation.check_writable_dir("output_dir", config.output_dir)
    config.model = resolve_model_source(config.model, "model")  # a known name or a GGUF file: a directory
    if not config.overwrite_output_dir and os.path.isdir(config.output_dir):
        found = [name for name in MODEL_FILES if os.path.exists(os.path.join(config.output_dir, name))]
        how = "set overwrite_output_dir (--overwrite-output-dir) to replace it"
        validation.refuse_to_overwrite("output_dir", config.output_dir, "a model", found, how)
        if config.resume_from is None:  # checkpoints of a stopped run: continued with --resume, not mixed
            found = [os.path.basename(path) for _, path in list_checkpoints(config.output_dir)]
            how = "continue it with --resume, or set overwrite_output_dir to start over"
            validation.refuse_to_overwrite("output_dir", config.output_dir, "a stopped run's checkpoints", found, how)
    models.require_local(config.model, "model")
    validation.check_model_dir("model", config.model, need_weights=False)
    if config.tokenizer is not None:
        models.require_local(config.tokenizer, "tokenizer")
    return validation.read_records(config.data, fields)


def check_context(config, tokenizer, texts: list[tuple[str, str]]) -> None:
    """Refuse (prompt, response) pairs that max_length lets run past the model's position table."""
    context = validation.context_length(validation.read_model_config("model", config.model))
    if context is None or config.max_length <= context:
        return
    longest = max(len(encode_prompt_response(tokenizer, p, r, config.max_length)[0]) for p, r in texts)
    if longest > context:
        raise InputError(
            f"max_length {config.max_length} lets an example reach {longest} tokens, beyond the context of model "
            f"({context} positions): set max_length to {context} or less"
        )
