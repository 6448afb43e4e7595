"""The rollout batch: what one PPO iteration's steps read and fill, row by row.

The rollout creates it (prompt and response ids, masks, the texts); each later step fills its own fields (scores,
old and reference log-probs, rewards, advantages) and returns its statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


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
