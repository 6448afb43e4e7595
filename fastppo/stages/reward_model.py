"""`fastppo reward-model`: train a reward model on a JSONL of {"prompt", "chosen", "rejected"}.

The reward-modelling stage PPO depends on. The model is a sequence classifier with one output
(`AutoModelForSequenceClassification`, `num_labels=1`), initialised from a local causal LM (usually the SFT
checkpoint: its body is kept, the score head is new) or from a classifier. It is trained with the pairwise
Bradley-Terry loss -log sigmoid(r(prompt, chosen) - r(prompt, rejected)), and its pairwise accuracy (how often
r(chosen) > r(rejected)) is reported on a held-out split. A text is scored exactly as `fastppo sft` encodes it:
the prompt (as PPO encodes it) + the response + EOS, read at the last attended token (`models.score_at_last_token`,
as PPO reads it). The result is a Hugging Face checkpoint plus tokenizer, which `fastppo train` takes as `reward_model`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastppo.models import load_model, load_tokenizer, resolve_device, score_at_last_token
from fastppo.runtime import run_lock
from fastppo.runtime.checkpoint import save_model
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
    split_pairs,
    stopped,
    training_options,
    without_ties,
)
from fastppo.stages.reward_model_config import RewardModelConfig


def load_reward_model(path: str, tokenizer):
    """A one-output sequence classifier from `path` (a causal LM gets a new score head); pad id set for pooling."""
    from transformers import AutoModelForSequenceClassification

    model = load_model(path, AutoModelForSequenceClassification, num_labels=1)
    # A head without `score` pools on its own, at the last non-pad token, so it must know which token is padding.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def score_tokens(model, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Rewards (B,) of already-encoded sequences."""
    input_ids, attention_mask = pad_batch(sequences, pad_id)
    device = next(model.parameters()).device
    return score_at_last_token(model, input_ids.to(device), attention_mask.to(device)).float()


@torch.no_grad()
def score(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 64, max_length: int = 512):
    """Rewards (B,) of `responses` to `prompts`, as a list of floats."""
    was_training = model.training
    model.eval()
    rewards: list[float] = []
    for i in range(0, len(prompts), batch_size):
        sequences = [
            encode_prompt_response(tokenizer, p, r, max_length)[0]
            for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size], strict=True)
        ]
        rewards += score_tokens(model, sequences, tokenizer.pad_token_id).tolist()
    model.train(was_training)
    return rewards


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, pairs: list[dict[str, str]], max_length: int = 512) -> float:
    prompts = [p["prompt"] for p in pairs]
    chosen = score(model, tokenizer, prompts, [p["chosen"] for p in pairs], max_length=max_length)
    rejected = score(model, tokenizer, prompts, [p["rejected"] for p in pairs], max_length=max_length)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(1, len(pairs))


def train_reward_model(
    model,
    tokenizer,
    pairs: list[dict[str, str]],
    *,
    epochs: float = 1.0,
    batch_size: int = 16,
    micro_batch_size: int | None = None,
    micro_batch_tokens: int | None = None,
    learning_rate: float = 1e-5,
    max_length: int = 512,
    eval_fraction: float = 0.1,
    seed: int = 0,
    output_dir: str | None = None,
    log: Callable[[str], None] = print,
    checkpointing: Checkpointing | None = None,
) -> dict:
    """Train `model` in place with the Bradley-Terry loss on `pairs`; save it and the tokenizer if `output_dir`.
    `checkpointing` (the command's) saves checkpoints, resumes, and stops at a step boundary on SIGINT/SIGTERM.

    Returns {"loss", "train_accuracy", "eval_accuracy" (nan with no held-out split), "pairs", "steps", "seconds",
    "stop" (as `train_sft`'s)}.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    train_pairs, eval_pairs = split_pairs(pairs, eval_fraction, seed)
    encoded = [
        (
            encode_prompt_response(tokenizer, p["prompt"], p["chosen"], max_length)[0],
            encode_prompt_response(tokenizer, p["prompt"], p["rejected"], max_length)[0],
        )
        for p in train_pairs
    ]
    total_steps = count_steps(len(encoded), batch_size, epochs)

    device = resolve_device("auto")
    model.to(device).train()
    optimizer, scheduler = adamw_with_schedule(model.parameters(), learning_rate, total_steps)
    losses: list[float] = []
    overhead = forward_overhead(model)  # see runtime.micro_batches
    correct: list[float] = []

    def train_step(step: int, rows: list[int]) -> None:
        batch = [encoded[i] for i in rows]
        loss, right = 0.0, 0
        # Pairs of similar length together; each micro-batch adds its pairs' losses over the step's pair count.
        lengths = [max(len(c), len(r)) for c, r in batch]
        for chunk in sorted_micro_batches(lengths, micro_batch_size, micro_batch_tokens, overhead):
            pairs = [batch[i] for i in chunk]
            # chosen and rejected in one forward: rows [0, b) are chosen, [b, 2b) rejected.
            rewards = score_tokens(model, [c for c, _ in pairs] + [r for _, r in pairs], tokenizer.pad_token_id)
            margin = rewards[: len(pairs)] - rewards[len(pairs) :]  # (b,)
            part = -F.logsigmoid(margin).sum() / len(batch)
            part.backward()
            loss, right = loss + part.item(), right + int((margin > 0).sum())
        optimizer_step(model, optimizer, scheduler)
        losses.append(loss)
        correct.append(right / len(batch))
        if is_report_step(step, total_steps):
            window = slice(-20, None)
            log(
                f"reward-model step {step + 1}/{total_steps}  loss {sum(losses[window]) / len(losses[window]):.4f}"
                f"  accuracy {sum(correct[window]) / len(correct[window]):.3f}"
            )

    texts = [f"{p['prompt']}\0{p['chosen']}\0{p['rejected']}" for p in pairs]
    settings = run_settings(texts, total_steps, batch_size, seed, max_length) | {"eval_fraction": eval_fraction}
    batches = shuffled_batches(len(encoded), batch_size, total_steps, seed)
    stop, done = run_steps(
        model, tokenizer, optimizer, scheduler, batches, train_step, total_steps, checkpointing, settings
    )
    model.eval()
    if stop and stop.requested:
        return {"pairs": len(train_pairs), "steps": done, "stop": stop}
    tail = slice(-max(1, total_steps // 10), None)
    summary = {
        "loss": sum(losses[tail]) / len(losses[tail]) if losses else math.nan,
        "train_accuracy": sum(correct[tail]) / len(correct[tail]) if correct else math.nan,
        "eval_accuracy": pairwise_accuracy(model, tokenizer, eval_pairs, max_length) if eval_pairs else math.nan,
        "pairs": len(train_pairs),
        "steps": done,
        "stop": stop,
    }
    if output_dir is not None:
        save_model(model, tokenizer, output_dir)
    summary["seconds"] = time.perf_counter() - start
    return summary


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def run(config: RewardModelConfig) -> dict | int:
    """`fastppo reward-model`: every input checked, then the model loaded, trained and saved to output_dir."""
    pairs = without_ties(check_inputs(config, ("prompt", "chosen", "rejected")))
    tokenizer = load_tokenizer(config.tokenizer or config.model, need_eos=True)
    check_context(config, tokenizer, [(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")])
    run_lock.hold(config.output_dir, "reward-model")  # one run per output_dir; released when the command ends
    torch.manual_seed(config.seed)  # the new score head is drawn as the model loads: the same seed, the same run
    model = load_reward_model(config.model, tokenizer)
    summary = train_reward_model(
        model,
        tokenizer,
        pairs,
        eval_fraction=config.eval_fraction,
        **training_options(config),
        checkpointing=Checkpointing.from_config(config, "reward-model"),
    )
    if summary["stop"] and summary["stop"].requested:
        return stopped("reward-model", summary["stop"], summary["steps"])
    print(
        f"fastppo reward-model: {summary['pairs']} pairs, {summary['steps']} steps, "
        f"held-out pairwise accuracy {summary['eval_accuracy']:.3f}, {summary['seconds']:.0f}s; "
        f"checkpoint in {config.output_dir}"
    )
    return summary
