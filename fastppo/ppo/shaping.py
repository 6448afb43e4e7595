"""Steps 2 and 4: from the reward's scores to the per-token rewards PPO optimizes.

step 2  `shape_scores`: a score is penalized when its response was truncated (`missing_eos_penalty`) or ran
        into DAPO's overlong buffer, then optionally normalized by running moments and clipped.
step 4  `shape_rewards`: the sequence's score (against its group's, for the group estimators) at its last token,
        and -kl_coef * KL(policy || reference) on every token (`ops.shape_rewards`), with the coefficient
        `KLController` holds.
"""

from __future__ import annotations

import math

import torch

from fastppo import ops
from fastppo.runtime import distributed


class KLController:
    """The KL coefficient: fixed, or adapted toward a target KL per sequence (Ziegler et al. 2019)."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl_per_sequence: float, n_episodes: int) -> None:
        if self.target is None:
            return
        error = min(max(kl_per_sequence / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class RunningMoments:
    """Running mean and variance of the scores (Chan et al. merge), for optional reward normalization."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n, mean = x.numel(), float(x.double().mean())
        m2 = float(((x.double() - mean) ** 2).sum())
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.count - 1, 1)) or 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def shape_scores(scores: torch.Tensor, batch, config, moments: RunningMoments) -> torch.Tensor:
    """(B,) the scores PPO optimizes: `scores` with the missing-EOS and overlong penalties, then normalized by the
    running `moments` of every rank's scores (updated here) and clipped, as the config asks."""
    if config.missing_eos_penalty is not None:
        scores = torch.where(batch.truncated, scores - config.missing_eos_penalty, scores)
    if config.overlong_buffer:
        scores = scores - overlong_penalties(
            batch.response_mask, config.max_new_tokens, config.overlong_buffer, config.overlong_penalty
        )
    if config.reward_normalization:
        moments.update(distributed.all_gather_rows(scores))  # every rank's scores: the same moments
        scores = (scores - moments.mean) / moments.std
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    return scores


def overlong_penalties(response_mask: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """(B,) DAPO's soft overlong punishment, to subtract from the scores: 0 up to max_new_tokens - buffer tokens,
    then rising linearly to `penalty` at max_new_tokens."""
    lengths = response_mask.sum(-1).float()
    if buffer == 0:
        return torch.zeros_like(lengths)
    return penalty * ((lengths - (max_new_tokens - buffer)) / buffer).clamp(0.0, 1.0)


def sequence_scores(scores: torch.Tensor, estimator: str, group_size: int) -> torch.Tensor:
    """(B,) the score each sequence is shaped with: its group advantage for the group estimators, the group mean
    subtracted for reinforce++-baseline, the score itself for gae and reinforce++."""
    if estimator in ops.GROUP_ADVANTAGE_ESTIMATORS:
        return ops.group_advantages(scores, group_size, estimator)
    if estimator == "reinforce++-baseline":
        return ops.group_advantages(scores, group_size, "dr_grpo")
    return scores


def shape_rewards(batch, config, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rewards, kl), each (B, T) float32: the sequence score (see `sequence_scores`) at the last valid token and,
    with kl_in_reward, -kl_coef * KL(policy || reference) on every token. Without a reference (nothing uses one:
    `PPOConfig.uses_reference`) the rewards hold the scores alone and kl is None: not measured, rather than 0."""
    cfg, mask = config, batch.response_mask
    scores = sequence_scores(batch.scores.to(mask.device), cfg.advantage_estimator, cfg.samples_per_prompt)
    if batch.ref_logprobs is None:
        return ops.shape_rewards(scores, batch.old_logprobs, batch.old_logprobs, mask, 0.0, cfg.kl_estimator)[0], None
    return ops.shape_rewards(
        scores, batch.old_logprobs, batch.ref_logprobs, mask, kl_coef if cfg.kl_in_reward else 0.0, cfg.kl_estimator
    )


def kl_per_token(batch, estimator: str) -> torch.Tensor:
    """(B, T) float32 the per-token estimate of KL(policy || reference) from the batch's old and reference
    log-probs, 0 at padding."""
    zeros = torch.zeros(batch.response_mask.shape[0], device=batch.response_mask.device)
    return ops.shape_rewards(zeros, batch.old_logprobs, batch.ref_logprobs, batch.response_mask, 0.0, estimator)[1]
