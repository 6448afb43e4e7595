"""What the supervised stages share: `fastppo sft`, `fastppo reward-model` and `fastppo dpo`.

Encoding (prompt + response + EOS, the response as the target), padding, the batch schedule (seeded epochs), the
update step (clip the gradient norm to 1), the learning-rate schedule (`fastppo.runtime.schedule`), and the checks their
commands run before anything loads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from fastppo import models
from fastppo.runtime import validation
from fastppo.runtime.errors import InputError

# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def load_tokenizer(path):
    """`models.load_tokenizer` (a path or the object), refusing a tokenizer without EOS: every response is trained
    to end with it."""
    tokenizer = models.load_tokenizer(path)
    if tokenizer.eos_token_id is None:
        where = path if isinstance(path, str) else "tokenizer"
        raise InputError(f"{where}: the tokenizer has no eos token, so a response's end cannot be learned")
    return tokenizer


# ----------------------------------------------------------------------------------------------
# encoding and batching
# ----------------------------------------------------------------------------------------------


def encode_prompt_response(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """(token ids of prompt + response + EOS truncated to `max_length`, number of prompt tokens)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
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


def count_steps(n_items: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes (a fraction allowed) over `n_items` in batches of `batch_size`."""
    return max(1, round(epochs * math.ceil(n_items / batch_size)))


def is_report_step(step: int, total_steps: int) -> bool:
    """Whether 0-based `step` prints a progress line: ten in a run, and always the last."""
    return (step + 1) % max(1, total_steps // 10) == 0 or step + 1 == total_steps


def update(loss: torch.Tensor, model, optimizer, scheduler) -> None:
    """One update of the supervised stages: backward, clip the gradient norm to 1, step, zero."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# the commands' shared options and checks
# ----------------------------------------------------------------------------------------------


def training_options(args) -> dict:
    """The options `fastppo sft` and `fastppo reward-model` share, from their parsed command lines."""
    names = ("epochs", "batch_size", "learning_rate", "max_length", "seed", "output_dir")
    return {name: getattr(args, name) for name in names}


# The values the options shared by `fastppo sft` and `fastppo reward-model` accept; True: an integer option.
OPTION_RANGES = {
    "epochs": (validation.POSITIVE, False),
    "batch_size": (validation.POSITIVE, True),
    "learning_rate": (validation.POSITIVE, False),
    "max_length": (validation.POSITIVE, True),
    "seed": (validation.NON_NEGATIVE, True),
}
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def check_command(args, fields: Sequence[str]) -> list[dict[str, str]]:
    """What `fastppo sft` and `fastppo reward-model` check before loading anything: every option, the output
    directory (usable, and holding no model unless --overwrite-output-dir), the model directory, and every line of
    the data, which is returned."""
    for name, (interval, integer) in OPTION_RANGES.items():
        validation.check_number("--" + name.replace("_", "-"), getattr(args, name), interval, integer)
    validation.check_output_dir("--output-dir", args.output_dir)
    if not args.overwrite_output_dir and os.path.isdir(args.output_dir):
        found = [name for name in MODEL_FILES if os.path.exists(os.path.join(args.output_dir, name))]
        how = "pass --overwrite-output-dir to replace it"
        validation.refuse_to_overwrite("--output-dir", args.output_dir, "a model", found, how)
    models.require_local(args.model, "model")
    validation.check_model_dir("--model", args.model, need_weights=False)
    if args.tokenizer is not None:
        models.require_local(args.tokenizer, "tokenizer")
    return validation.read_records(args.data, fields)


def check_context(args, tokenizer, texts: list[tuple[str, str]]) -> None:
    """Refuse (prompt, response) pairs that --max-length lets run past --model's position table."""
    context = validation.context_length(validation.read_model_config("--model", args.model))
    if context is None or args.max_length <= context:
        return
    longest = max(len(encode_prompt_response(tokenizer, p, r, args.max_length)[0]) for p, r in texts)
    if longest > context:
        raise InputError(
            f"--max-length {args.max_length} lets an example reach {longest} tokens, beyond the "
            f"context of --model ({context} positions): pass --max-length {context} or less"
        )
