"""Step 5, advantage estimation: PPO's GAE and the critic-free estimators, every one built on the fused ops.

    gae                    the shaped rewards (step 4, `shaping.shape_rewards`: -kl_coef KL per token, the score at
                           the last token; for the group estimators, the score against its group's), then GAE with the
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
# The estimators that compare the responses to one prompt: they need samples_per_prompt >= 2.
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce++-baseline")


def uses_critic(estimator: str) -> bool:
    """Only GAE needs values; the critic-free estimators build no value head at all."""
    return estimator == "gae"


def estimate_advantages(batch, config) -> tuple[torch.Tensor, torch.Tensor | None]:
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
