"""Advantage estimation: PPO's GAE and the critic-free estimators, every one built on the fused ops.

    gae                    shape_rewards (-kl_coef KL per token, the score at the last token), then GAE with the
                           critic's values, whitened over the global batch. VAPO's additions: one lambda per sequence
                           (`lam_length_alpha`: 1 - 1/(alpha * length), long answers get lambda near 1) and the
                           critic's returns from their own lambda (`critic_lam`, decoupled GAE), in the same scan.
    grpo, dr_grpo, rloo    the sequence's score against its group's (`ops.group_advantages`) on each of its tokens
                           (Shao et al. 2024; Liu et al. 2025; Ahmadian et al. 2024).
    reinforce++            per-token returns of the shaped rewards, whitened over the global batch (Hu et al. 2025);
    reinforce++-baseline   the same after subtracting the group mean from the scores.

The critic-free estimators share one path: the sequence score (transformed by the group where the estimator says so)
is shaped like PPO's, and the advantage of token t is the return to go of the shaped rewards, sum_{k >= t}
gamma^(k-t) r_k: GAE with values 0 and lambda 1. With the KL in the loss instead of the reward (kl_in_reward
false) and gamma 1 that is the sequence's advantage on each of its valid tokens; with the KL in the reward each
token also carries the KL penalty still to come (as OpenRLHF does), so every KL placement works with every
estimator. Group statistics are taken where the group lives: the trainer keeps each group on one rank.
"""

from __future__ import annotations

import torch

from fastppo import ops
from fastppo.runtime import distributed

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++-baseline")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce++-baseline")  # need samples_per_prompt >= 2


def uses_critic(estimator: str) -> bool:
    """Only GAE needs values; the critic-free estimators build no value head at all."""
    return estimator == "gae"


def sequence_scores(scores: torch.Tensor, estimator: str, group_size: int) -> torch.Tensor:
    """(B,) the score each sequence is shaped with: its group advantage for the group estimators, the group mean
    subtracted for reinforce++-baseline, the score itself for gae and reinforce++."""
    if estimator in ops.GROUP_ESTIMATORS:
        return ops.group_advantages(scores, group_size, estimator)
    if estimator == "reinforce++-baseline":
        return ops.group_advantages(scores, group_size, "dr_grpo")
    return scores


def overlong_penalties(response_mask: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """(B,) DAPO's soft overlong punishment, to subtract from the scores: 0 up to max_new_tokens - buffer tokens,
    then rising linearly to `penalty` at max_new_tokens."""
    lengths = response_mask.sum(-1).float()
    if buffer == 0:
        return torch.zeros_like(lengths)
    return penalty * ((lengths - (max_new_tokens - buffer)) / buffer).clamp(0.0, 1.0)


def shaped_rewards(batch, config, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), each (B, T) float32: the sequence score (see `sequence_scores`) at the last valid token and,
    with kl_in_reward, -kl_coef * KL(policy || reference) on every token."""
    cfg, mask = config, batch.response_mask
    scores = sequence_scores(batch.scores.to(mask.device), cfg.advantage_estimator, cfg.samples_per_prompt)
    return ops.shape_rewards(
        scores, batch.old_logprobs, batch.ref_logprobs, mask, kl_coef if cfg.kl_in_reward else 0.0, cfg.kl_estimator
    )


def advantages_and_returns(batch, config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages, returns), (B, T) float32 (returns None without a critic), of the shaped `batch.rewards`:
    GAE against the old values, or the critic-free returns to go; whitened over the global batch where the
    estimator says so."""
    cfg, mask, rewards = config, batch.response_mask, batch.rewards
    if uses_critic(cfg.advantage_estimator):
        lam = cfg.lam if cfg.lam_length_alpha is None else ops.length_adaptive_lam(mask, cfg.lam_length_alpha)
        advantages, returns = ops.gae(rewards, batch.old_values, mask, cfg.gamma, lam, cfg.critic_lam)
        if cfg.whiten_advantages:
            advantages = distributed.masked_whiten(advantages, mask)  # global statistics under torchrun
        return advantages, returns
    advantages, _ = ops.gae(rewards, torch.zeros_like(rewards), mask, cfg.gamma, 1.0)  # returns to go
    if cfg.advantage_estimator.startswith("reinforce++"):
        advantages = distributed.masked_whiten(advantages, mask)
    return advantages, None


def estimate_advantages(batch, config, kl_coef: float):
    """(rewards, kl, advantages, returns) of a scored rollout batch with its old log-probs, reference log-probs and
    (gae) old values: `shaped_rewards` then `advantages_and_returns`. Sets batch.rewards."""
    batch.rewards, kl = shaped_rewards(batch, config, kl_coef)
    return (batch.rewards, kl, *advantages_and_returns(batch, config))
