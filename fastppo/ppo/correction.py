"""Rollout correction: when the sampler's log-probs differ from the trainer's (vLLM's kernels, its precision),
the gap is measured and, with `rollout_correction`, each token's policy-gradient term reweighted (TIS) or whole
sequences masked (MIS), so the update stays on the trainer's own policy.
"""

from __future__ import annotations

import torch

from fastppo.runtime import distributed
from fastppo.runtime.metrics import Stats


def log_prob_gap(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, response_mask: torch.Tensor) -> dict:
    """How far the sampler's log-probs are from the trainer's recomputed old log-probs, over valid tokens: mean and
    max |difference|, and KL(sampler || trainer) estimated (k3) on the sampled tokens."""
    valid = response_mask.bool()
    diff = (trainer_logprobs.float() - sampler_logprobs.float())[valid]  # log pi_old - log pi_sampler
    if diff.numel() == 0:
        return {"rollout/logprob_diff_mean": 0.0, "rollout/logprob_diff_max": 0.0, "rollout/sampler_kl": 0.0}
    return {
        "rollout/logprob_diff_mean": float(diff.abs().mean()),
        "rollout/logprob_diff_max": float(diff.abs().max()),
        "rollout/sampler_kl": float((torch.expm1(diff) - diff).mean()),  # k3 of pi_old / pi_sampler
    }


def correction_weights(
    sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, response_mask: torch.Tensor, mode: str, cap: float
) -> tuple[torch.Tensor | None, float]:
    """The per-token weights `ppo_policy_loss` applies for `rollout_correction`, and the fraction of valid tokens
    (tis) or sequences (mis) corrected.

    tis: w_t = min(pi_old / pi_sampler, cap) per token (truncated importance sampling);
    mis: w = 0 for a whole sequence whose ratio prod_t pi_old / pi_sampler leaves [1 / cap, cap], else 1.
    """
    if mode == "none":
        return None, 0.0
    valid = response_mask.bool()
    log_ratio = torch.where(valid, trainer_logprobs.float() - sampler_logprobs.float(), 0.0)
    if mode == "tis":
        ratio = log_ratio.exp()
        weights = torch.where(valid, ratio.clamp(max=cap), 0.0)
        corrected = float(((ratio > cap) & valid).sum()) / max(float(valid.sum()), 1.0)
        return weights, corrected
    if mode == "mis":
        sequence_log_ratio = log_ratio.sum(-1)  # (B,)
        bound = torch.log(torch.tensor(cap, dtype=torch.float32))
        keep = (sequence_log_ratio.abs() <= bound).float()  # inside [1 / cap, cap]
        has_tokens = valid.any(-1)
        masked = float(((keep == 0) & has_tokens).sum()) / max(float(has_tokens.sum()), 1.0)
        return valid.float() * keep.unsqueeze(-1), masked
    raise ValueError(f"rollout_correction must be none, tis or mis, got {mode!r}")


def rollout_correction(batch, config) -> dict:
    """Set `batch.token_weights` for `rollout_correction` (tis / mis; the policy loss applies them per token) and
    return the gap between the sampler's log-probs and the trainer's recomputed old ones, over every rank's tokens."""
    batch.token_weights, corrected = correction_weights(
        batch.sampler_logprobs,
        batch.old_logprobs,
        batch.response_mask,
        config.rollout_correction,
        config.rollout_correction_cap,
    )
    sampler, old, mask = (
        distributed.all_gather_rows(x) for x in (batch.sampler_logprobs, batch.old_logprobs, batch.response_mask)
    )
    stats = log_prob_gap(sampler, old, mask)
    corrected_over_ranks = distributed.reduce_stats(Stats({"c": corrected}, Stats.SUM)).totals["c"]
    stats["rollout/corrected_frac"] = corrected_over_ranks / distributed.world_size()
    return stats
