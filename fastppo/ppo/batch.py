"""The rollout batch: what one PPO iteration's steps read and fill, row by row.

The rollout creates it (prompt and response ids, masks, the texts); each later step fills its own fields (scores,
old and reference log-probs, rewards, advantages) and returns its statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from fastppo.runtime import distributed
from fastppo.runtime.micro_batches import cut_sorted

# The (B, T) fields: aligned with the response positions, cut with them by `RolloutBatch.trimmed`.
RESPONSE_FIELDS = (
    "response_ids",
    "response_mask",
    "old_logprobs",
    "ref_logprobs",
    "old_values",
    "rewards",
    "kl",
    "advantages",
    "returns",
    "sampler_logprobs",
    "sampler_values",
    "token_weights",
)


@dataclass
class RolloutBatch:
    """One PPO batch. B sequences, P prompt positions (left-padded), T response positions (right-padded)."""

    prompt_ids: torch.Tensor  # (B, P) long
    prompt_mask: torch.Tensor  # (B, P) long, 1 = real prompt token
    response_ids: torch.Tensor  # (B, T) long, pad after the end
    response_mask: torch.Tensor  # (B, T) long, 1 = generated token (the end-of-turn token included)
    ended: torch.Tensor  # (B,) bool: an end-of-turn id or a stop string ended the response
    prompts: list  # B prompt strings (`ChatPrompt` for rendered chat messages)
    responses: list  # B response strings (decoded, without EOS/pad)
    scores: torch.Tensor | None = None  # (B,) float32 scores PPO optimizes (penalized, normalized, clipped)
    raw_scores: torch.Tensor | None = None  # (B,) float32 what the rewards returned, weighted and summed
    reward_scores: torch.Tensor | None = None  # (B, K) float32 each reward's scores (NaN: it does not apply)
    old_logprobs: torch.Tensor | None = None  # (B, T) float32, policy at rollout time
    ref_logprobs: torch.Tensor | None = None  # (B, T) float32, reference
    old_values: torch.Tensor | None = None  # (B, T) float32, critic at rollout time
    rewards: torch.Tensor | None = None  # (B, T) float32 shaped rewards
    kl: torch.Tensor | None = None  # (B, T) float32 per-token KL estimate
    advantages: torch.Tensor | None = None  # (B, T) float32
    returns: torch.Tensor | None = None  # (B, T) float32
    sampler_logprobs: torch.Tensor | None = None  # (B, T) float32, the rollout engine's own log-probs
    sampler_values: torch.Tensor | None = None  # (B, T) float32, values the hf engine computed while decoding
    token_weights: torch.Tensor | None = None  # (B, T) float32 rollout correction per token (None: all 1)

    @property
    def truncated(self) -> torch.Tensor:  # (B,) bool: cut at max_new_tokens before it ended
        return ~self.ended

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def select(self, index: torch.Tensor) -> RolloutBatch:
        """The sub-batch of rows `index` (tensors and lists alike)."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[index.to(value.device)]
            elif isinstance(value, list):
                value = [value[i] for i in index.tolist()]
            values[f.name] = value
        return RolloutBatch(**values)

    def trimmed(self) -> RolloutBatch:
        """The same rows without the columns none of them uses: the prompts' leading pad columns (they are
        left-padded) and the response columns after the last real token of any row. A forward over it costs what
        its rows' tokens cost, not the whole rollout's widest row; `widen` puts its (b, t) results back at T."""
        prompt_used = self.prompt_mask.any(dim=0).nonzero()
        response_used = self.response_mask.any(dim=0).nonzero()
        start = int(prompt_used[0]) if len(prompt_used) else 0
        end = int(response_used[-1]) + 1 if len(response_used) else 1
        if start == 0 and end == self.response_ids.shape[1]:
            return self
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["prompt_ids"], values["prompt_mask"] = self.prompt_ids[:, start:], self.prompt_mask[:, start:]
        for name in RESPONSE_FIELDS:
            if values[name] is not None:
                values[name] = values[name][:, :end]
        return RolloutBatch(**values)

    def real_and_computed_tokens(self) -> tuple[int, int]:
        """(real tokens, tokens a forward over this batch computes): the padding a forward pays for."""
        return int(self.prompt_mask.sum() + self.response_mask.sum()), self.input_ids.numel()


def micro_batches(
    batch: RolloutBatch, rows: torch.Tensor, size: int, tokens: int | None = None, overhead: int | None = None
) -> Iterator[tuple[torch.Tensor, RolloutBatch]]:
    """(rows, trimmed sub-batch) for each micro-batch of `rows` (`plan_micro_batches`; with `overhead`, the model's
    `forward_overhead`, the cut that computes the fewest tokens). Where the count depends on the lengths, each rank
    cuts its own rows, then all take the largest count: FSDP's collectives in every forward need as many on each
    rank. Order does not change a sum of gradients or a row's result: callers put the rows' results back."""
    chunks = plan_micro_batches(batch, rows, size, tokens, overhead)
    if (tokens is not None or overhead is not None) and distributed.world_size() > 1:
        count = distributed.max_over_ranks(len(chunks))
        chunks = plan_micro_batches(batch, rows, size, tokens, overhead, count=count)
    for chunk in chunks:
        yield chunk, batch.select(chunk).trimmed()


def plan_micro_batches(
    batch: RolloutBatch,
    rows: torch.Tensor,
    size: int,
    tokens: int | None = None,
    overhead: int | None = None,
    count: int = 1,
) -> list[torch.Tensor]:
    """`rows` sorted by length (response, then prompt) and cut by `cut_sorted`: a micro-batch of rows x (their
    longest prompt + longest response) computed tokens. Then, while there are fewer than `count` (every rank must
    run as many forwards under FSDP), the costliest one is halved."""
    response_length = batch.response_mask.sum(dim=1).cpu()
    prompt_length = batch.prompt_mask.sum(dim=1).cpu()
    key = response_length * (batch.prompt_ids.shape[1] + 1) + prompt_length  # (B,)
    ordered = rows[torch.argsort(key[rows], stable=True)].tolist()
    lengths = [(int(prompt_length[i]), max(1, int(response_length[i]))) for i in ordered]  # trimmed keeps T >= 1
    chunks = cut_sorted(lengths, size, tokens, overhead)

    def cost(chunk: list[int]) -> int:
        return len(chunk) * (max(lengths[i][0] for i in chunk) + max(lengths[i][1] for i in chunk))

    while len(chunks) < count:
        costliest = max((c for c in chunks if len(c) > 1), key=cost, default=None)
        if costliest is None:
            break
        i, half = chunks.index(costliest), len(costliest) // 2
        chunks[i : i + 1] = [costliest[:half], costliest[half:]]
    return [torch.tensor([ordered[i] for i in chunk], dtype=rows.dtype) for chunk in chunks]


def widen(x: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """(b, t) results of a trimmed micro-batch at the batch's width T (zeros where no row of it had a token)."""
    return None if x is None else F.pad(x, (0, width - x.shape[1]))


def in_row_order(parts: list[torch.Tensor | None], rows: list[torch.Tensor]) -> torch.Tensor | None:
    """Results computed micro-batch by micro-batch (`micro_batches`' order), back in the batch's row order."""
    if parts[0] is None:
        return None
    order = torch.cat(rows)
    result = torch.cat(parts)
    out = torch.empty_like(result)
    out[order.to(result.device)] = result
    return out
