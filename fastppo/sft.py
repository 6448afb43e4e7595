"""`fastppo sft`: supervised fine-tuning of a causal LM on a JSONL of {"prompt", "response"}.

The first stage of classical RLHF: the policy PPO starts from (and the KL term pulls back to). Each example is
encoded as `tokenizer(prompt)` (with the tokenizer's special tokens) + `tokenizer(response)` + EOS, and the loss is
the cross-entropy of the response tokens only (the prompt is context, not a target). The result is a Hugging Face
checkpoint (safetensors) plus the tokenizer, which `fastppo train` takes as `policy_model`.

`train_sft` is the same stage as a function (the built-in demo calls it); the loaders here (`read_jsonl`,
`load_tokenizer`, `load_model`) are shared with `fastppo reward-model`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import torch

from fastppo import validation
from fastppo.errors import InputError

# ----------------------------------------------------------------------------------------------
# loading: data, tokenizer, model (errors name the file and line)
# ----------------------------------------------------------------------------------------------


def read_jsonl(path: str, fields: Sequence[str], name: str = "--data") -> list[dict[str, str]]:
    """The records of a JSONL file, each an object with a non-empty string for every one of `fields`; blank lines
    skipped; any other line (not UTF-8, not JSON, a field missing or empty) stops with file:line."""
    records = []
    for line_number, record in validation.read_jsonl(path, name):
        where = f"{path}:{line_number}"
        records.append({field: validation.require_text(where, field, record.get(field)) for field in fields})
    if not records:
        raise InputError(f"{path}: no records")
    return records


def require_local(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such {what} directory (models are local: a checkpoint or a config.json)")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    require_local(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except validation.LOAD_ERRORS as error:
        raise InputError(f"{path}: cannot load a tokenizer from it ({validation.clip(error)})") from None
    if tokenizer.eos_token_id is None:
        raise InputError(f"{path}: the tokenizer has no eos token, so a response's end cannot be learned")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_weights(path: str) -> bool:
    return os.path.isdir(path) and any(name.endswith((".safetensors", ".bin")) for name in os.listdir(path))


def load_model(path: str, auto_class, **kwargs):
    """`auto_class` from a checkpoint directory, or freshly initialised when the directory holds only a config."""
    from transformers import AutoConfig

    require_local(path, "model")
    try:
        if has_weights(path):
            return auto_class.from_pretrained(path, **kwargs)
        config = AutoConfig.from_pretrained(path, **kwargs)
        return auto_class.from_config(config)
    except validation.LOAD_ERRORS as error:
        raise InputError(f"{path}: cannot load a model from it ({validation.clip(error)})") from None


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


def sft_batch(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T), from (token ids, number of prompt tokens) pairs.

    labels are the input ids on response tokens (EOS included) and -100 (ignored by the loss) on prompt and padding.
    """
    input_ids, attention_mask = pad_batch([ids for ids, _ in batch], pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for row, (_, n_prompt) in enumerate(batch):
        labels[row, :n_prompt] = -100
    return input_ids, attention_mask, labels


def warmup_then_linear_decay(optimizer, total_steps: int, warmup_fraction: float = 0.05):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    learning_rate: float = 5e-5,
    max_length: int = 512,
    seed: int = 0,
    output_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Fine-tune `model` in place on `examples`; save it and the tokenizer to `output_dir` if given.

    Returns {"loss": mean response-token loss over the last tenth of steps, "steps", "examples", "seconds"}.
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
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    total_steps = max(1, round(epochs * steps_per_epoch))

    device = default_device()
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = warmup_then_linear_decay(optimizer, total_steps)
    losses: list[float] = []
    for step, rows in enumerate(shuffled_batches(len(encoded), batch_size, total_steps, seed)):
        input_ids, attention_mask, labels = sft_batch([encoded[i] for i in rows], tokenizer.pad_token_id)  # (B, T)
        loss = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), labels=labels.to(device)
        ).loss
        update(loss, model, optimizer, scheduler)
        losses.append(loss.item())
        if (step + 1) % max(1, total_steps // 10) == 0 or step + 1 == total_steps:
            log(f"sft step {step + 1}/{total_steps}  loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    model.eval()
    if output_dir is not None:
        save_checkpoint(model, tokenizer, output_dir)
    tail = losses[-max(1, total_steps // 10) :]
    return {
        "loss": sum(tail) / len(tail),
        "steps": total_steps,
        "examples": len(encoded),
        "seconds": time.perf_counter() - start,
    }


def save_checkpoint(model, tokenizer, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="local checkpoint directory, or a directory with a config.json")
    parser.add_argument("--data", required=True, help='JSONL file, one {"prompt": ..., "response": ...} per line')
    parser.add_argument("--output-dir", required=True, help="where the fine-tuned checkpoint and tokenizer go")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="AdamW peak learning rate (default 5e-5)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per example, prompt included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite-output-dir", action="store_true", help="replace a model already in --output-dir")


def shuffled_batches(n_items: int, batch_size: int, total_steps: int, seed: int):
    """Index lists for `total_steps` steps: epochs of a seeded permutation (an epoch's last batch may be short)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(total_steps):
        if not order:
            order = torch.randperm(n_items, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def update(loss: torch.Tensor, model, optimizer, scheduler) -> None:
    """One update of the supervised stages: backward, clip the gradient norm to 1, step, zero."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def training_options(args) -> dict:
    """The options `fastppo sft` and `fastppo reward-model` share, from their parsed command lines."""
    names = ("epochs", "batch_size", "learning_rate", "max_length", "seed", "output_dir")
    return {name: getattr(args, name) for name in names}


# The values the options shared by `fastppo sft` and `fastppo reward-model` accept; True: an integer option.
OPTION_RANGES = {"epochs": (validation.POSITIVE, False), "batch_size": (validation.POSITIVE, True),
                 "learning_rate": (validation.POSITIVE, False), "max_length": (validation.POSITIVE, True),
                 "seed": (validation.NON_NEGATIVE, True)}  # fmt: skip
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
    require_local(args.model, "model")
    validation.check_model_dir("--model", args.model, need_weights=False)
    if args.tokenizer is not None:
        require_local(args.tokenizer, "tokenizer")
    return read_jsonl(args.data, fields)


def check_context(args, tokenizer, texts: list[tuple[str, str]]) -> None:
    """Refuse (prompt, response) pairs that --max-length lets run past --model's position table."""
    context = validation.context_length(validation.read_model_config("--model", args.model))
    if context is None or args.max_length <= context:
        return
    longest = max(len(encode_prompt_response(tokenizer, p, r, args.max_length)[0]) for p, r in texts)
    if longest > context:
        raise InputError(f"--max-length {args.max_length} lets an example reach {longest} tokens, beyond the "
                         f"context of --model ({context} positions): pass --max-length {context} or less")  # fmt: skip


def run(args) -> int:
    from transformers import AutoModelForCausalLM

    examples = check_command(args, ("prompt", "response"))
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    check_context(args, tokenizer, [(e["prompt"], e["response"]) for e in examples])
    model = load_model(args.model, AutoModelForCausalLM)
    summary = train_sft(model, tokenizer, examples, **training_options(args))
    print(
        f"fastppo sft: {summary['examples']} examples, {summary['steps']} steps, final loss {summary['loss']:.4f}, "
        f"{summary['seconds']:.0f}s; checkpoint in {args.output_dir}"
    )
    return 0
