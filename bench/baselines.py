"""What RLHF code runs today, written the way the peers write it: the baselines every fastppo op is timed against.

- log-probs: `log_softmax(logits) + gather` (most trainers) and TRL's `selective_log_softmax` (if trl is installed).
- GAE: the one-step-per-iteration Python loop over time of TRL's PPOTrainer, OpenRLHF and veRL (it lives in
  `fastppo.cli.selfcheck`, which times it too on an installed package).
- reward shaping and the PPO losses: unfused PyTorch with autograd (fastppo's reference is exactly that).
- the LM head with log-probs and entropy: the logits materialized, then a float32 log-softmax (veRL's torch path).

`sequence_inputs` and `policy_and_value_loss_backward` are the inputs and the loss step both bench_ops.py and
gpu_ops.py time these on.
"""

from __future__ import annotations

import torch

from fastppo.cli.selfcheck import python_loop_gae
from fastppo.ops import reference

__all__ = [
    "log_softmax_gather",
    "materialized_linear_logprobs",
    "policy_and_value_loss_backward",
    "python_loop_gae",
    "sequence_inputs",
    "trl_selective_log_softmax",
    "unfused_shape_rewards",
]


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
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last.clamp(min=0)] += scores
    return rewards, kl


unfused_policy_loss = reference.ppo_policy_loss
unfused_value_loss = reference.ppo_value_loss
materialized_linear_logprobs = reference.linear_token_logprobs


def sequence_inputs(B: int, T: int, device) -> dict:
    """(B, T) rollout tensors for the sequence ops: right-padded masks of lengths in [T/4, T], random values."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).float()

    def randn():
        return torch.randn(B, T, generator=g).to(device)

    return {
        "mask": mask.to(device),
        "rewards": randn(),
        "values": randn(),
        "returns": randn(),
        "advantages": randn(),
        "logprobs": -randn().abs(),
        "old_logprobs": -randn().abs(),
        "scores": torch.randn(B, generator=g).to(device),
    }


def policy_and_value_loss_backward(policy_loss, value_loss, x: dict, logprobs, values) -> None:
    """What one PPO micro-batch asks of the losses: policy loss + 0.5 x value loss, forward and backward."""
    logprobs.grad = values.grad = None
    pg, _ = policy_loss(logprobs, x["old_logprobs"], x["advantages"], x["mask"])
    vf, _ = value_loss(values, x["values"], x["returns"], x["mask"])
    (pg + 0.5 * vf).backward()
