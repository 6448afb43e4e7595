"""From the reward's scores to the scores PPO optimizes, and the KL coefficient that weighs them against the KL.

A score is penalized when its response was truncated (`missing_eos_penalty`) or ran into DAPO's overlong buffer,
then optionally normalized by running moments and clipped. The per-token KL penalty itself is applied by
`ops.shape_rewards` (see `advantages.estimate_advantages`) with the coefficient `KLController` holds.
"""

from __future__ import annotations

import math

import torch

from fastppo.ppo.advantages import overlong_penalties
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
