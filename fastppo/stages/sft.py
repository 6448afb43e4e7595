"""`fastppo sft`: supervised fine-tuning of a causal LM on a JSONL of {"prompt", "response"}.

The first stage of classical RLHF: the policy PPO starts from (and the KL term pulls back to). Each example is
encoded as the prompt (BOS in front once, as PPO encodes it: `data.encode`) + the response + EOS, and the loss is
the cross-entropy of the response tokens only (the prompt is context, not a target). The result is a Hugging Face
checkpoint (safetensors) plus the tokenizer, which `fastppo train` takes as `policy_model`.

`train_sft` is the same stage as a function (the built-in demo calls it); what it shares with `fastppo reward-model`
and `fastppo dpo` (encoding, batch schedule, update step, checks) is in `fastppo.stages.common`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from fastppo.models import load_model, load_tokenizer, resolve_device
from fastppo.runtime import run_lock
from fastppo.runtime.checkpoint import save_model
from fastppo.runtime.errors import InputError
from fastppo.runtime.micro_batches import forward_overhead, sorted_micro_batches
from fastppo.runtime.schedule import adamw_with_schedule
from fastppo.stages.checkpointing import Checkpointing, run_steps
from fastppo.stages.common import (
    check_context,
    check_inputs,
    count_steps,
    encode_prompt_response,
    is_report_step,
    optimizer_step,
    pad_batch,
    run_settings,
    shuffled_batches,
    stopped,
    training_options,
)
from fastppo.stages.sft_config import SFTConfig

# ----------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------


def sft_batch(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T), from (token ids, number of prompt tokens) pairs.

    labels are the input ids on response tokens (EOS included) and -100 (ignored by the loss) on prompt and padding.
    """
    input_ids, attention_mask = pad_batch([ids for ids, _ in batch], pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for row, (_, n_prompt) in enumerate(batch):
        labels[row, :n_prompt] = -100
    return input_ids, attention_mask, labels


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def train_sft(
    model,
    tokenizer,
    examples: list[dict[str, str]],
    *,
    epochs: float = 3.0,
    batch_size: int = 16,
    micro_batch_size: int | None = None,
    micro_batch_tokens: int | None = None,
    learning_rate: float = 5e-5,
    max_length: int = 512,
    seed: int = 0,
    output_dir: str | None = None,
    log: Callable[[str], None] = print,
    checkpointing: Checkpointing | None = None,
) -> dict:
    """Fine-tune `model` in place on `examples`; save it and the tokenizer to `output_dir` if given. `checkpointing`
    (the command's) saves checkpoints, resumes, and stops at a step boundary on SIGINT/SIGTERM.

    Returns {"loss": mean response-token loss over the last tenth of steps, "steps", "examples", "seconds", "stop":
    the StopRequest (None without checkpointing; `.requested` when a signal stopped the run, nothing final saved)}.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    encoded = []
    for example in examples:
        ids, n_prompt = encode_prompt_response(tokenizer, example["prompt"], example["response"], max_length)
        if len(ids) > n_prompt:  # something of the response survived truncation
            encoded.append((ids, n_prompt))
    if not encoded:
        raise InputError(f"no example has a response token within max_length={max_length}")
    total_steps = count_steps(len(encoded), batch_size, epochs)

    device = resolve_device("auto")
    model.to(device).train()
    optimizer, scheduler = adamw_with_schedule(model.parameters(), learning_rate, total_steps)
    losses: list[float] = []
    overhead = forward_overhead(model)  # see runtime.micro_batches

    def train_step(step: int, rows: list[int]) -> None:
        examples = [encoded[i] for i in rows]
        # The loss is the mean over the step's response tokens (the first token predicts nothing): each micro-batch
        # adds its sum over that count, as transformers' `num_items_in_batch` does for gradient accumulation.
        targets = sum(len(ids) - max(n_prompt, 1) for ids, n_prompt in examples)
        loss, lengths = 0.0, [len(ids) for ids, _ in examples]
        for chunk in sorted_micro_batches(lengths, micro_batch_size, micro_batch_tokens, overhead):
            input_ids, attention_mask, labels = sft_batch([examples[i] for i in chunk], tokenizer.pad_token_id)
            part = model(
                input_ids=input_ids.to(device),  # (b, t)
                attention_mask=attention_mask.to(device),
                labels=labels.to(device),
                num_items_in_batch=targets,
            ).loss
            part.backward()
            loss += part.item()
        optimizer_step(model, optimizer, scheduler)
        losses.append(loss)
        if is_report_step(step, total_steps):
            log(f"sft step {step + 1}/{total_steps}  loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")

    settings = run_settings(
        [f"{e['prompt']}\0{e['response']}" for e in examples], total_steps, batch_size, seed, max_length
    )
    batches = shuffled_batches(len(encoded), batch_size, total_steps, seed)
    stop, done = run_steps(
        model, tokenizer, optimizer, scheduler, batches, train_step, total_steps, checkpointing, settings
    )
    model.eval()
    if output_dir is not None and not (stop and stop.requested):
        save_model(model, tokenizer, output_dir)
    tail = losses[-max(1, total_steps // 10) :]
    return {
        "loss": sum(tail) / len(tail) if tail else math.nan,
        "steps": done,
        "examples": len(encoded),
        "seconds": time.perf_counter() - start,
        "stop": stop,
    }


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def run(config: SFTConfig) -> dict | int:
    """`fastppo sft`: every input checked, then the model loaded, fine-tuned and saved to output_dir."""
    from transformers import AutoModelForCausalLM

    examples = check_inputs(config, ("prompt", "response"))
    tokenizer = load_tokenizer(config.tokenizer or config.model, need_eos=True)
    check_context(config, tokenizer, [(e["prompt"], e["response"]) for e in examples])
    run_lock.hold(config.output_dir, "sft")  # one run per output_dir; released when the command ends
    torch.manual_seed(config.seed)  # a directory with only a config.json is initialised here
    model = load_model(config.model, AutoModelForCausalLM)
    checkpointing = Checkpointing.from_config(config, "sft")
    summary = train_sft(model, tokenizer, examples, **training_options(config), checkpointing=checkpointing)
    if summary["stop"] and summary["stop"].requested:
        return stopped("sft", summary["stop"], summary["steps"])
    print(
        f"fastppo sft: {summary['examples']} examples, {summary['steps']} steps, final loss {summary['loss']:.4f}, "
        f"{summary['seconds']:.0f}s; checkpoint in {config.output_dir}"
    )
    return summary
