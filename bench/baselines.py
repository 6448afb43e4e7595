"""What RLHF code runs today, written the way the peers write it: the baselines every fastppo op is timed against.

- log-probs: `log_softmax(logits) + gather` (most trainers) and TRL's `selective_log_softmax` (if trl is installed).
- GAE: the one-step-per-iteration Python loop over time of TRL's PPOTrainer, OpenRLHF and veRL (it lives in
  `fastppo.cli.selfcheck`, which times it too on an installed package).
- reward shaping and the PPO losses: unfused PyTorch with autograd (fastppo's reference is exactly that).
"""

from __future__ import annotations

import torch

from fastppo.cli.selfcheck import python_loop_gae
from fastppo.ops import reference

__all__ = ["log_softmax_gather", "python_loop_gae", "trl_selective_log_softmax", "unfused_shape_rewards"]


def log_softmax_gather(logits, tokens):
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def trl_selective_log_softmax():
    """TRL's implementation, or None with the reason when trl is not installed (`pip install -e .[bench]`)."""
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError as error:
        return None, f"trl not installed ({error})"
    return selective_log_softmax, None


def unfused_shape_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef):
    """KL, then rewards, then a scatter of the score at each row's last valid token: three separate passes."""
    kl = (logprobs - ref_logprobs) * response_mask
    rewards = -kl_coef * kl
    last = response_mask.sum(-1).long() - 1
    rows = torch.arange(rewards.shape[0])
    rewards[rows, last.clamp(min=0)] += scores
    return rewards, kl


unfused_policy_loss = reference.ppo_policy_loss
unfused_value_loss = reference.ppo_value_loss
