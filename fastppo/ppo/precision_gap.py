"""What bf16 changed: the policy's log-probs of the same tokens under bf16 autocast and in float32.

With `precision` bf16 (or 'auto' where it chose bf16) every log-prob PPO uses comes from bf16 matmuls. Once per
iteration step 3 recomputes a couple of the batch's rows both ways on the same weights and reports the gap, so a
user sees what the speed cost in accuracy: `precision/logprob_gap_mean` (mean |bf16 - float32| over their response
tokens) and `precision/logprob_gap_max`. For scale: PPO clips the ratio exp(new - old) at 1 +- clip_range.
"""

from __future__ import annotations

import torch

from fastppo.ppo.batch import RolloutBatch

GAP_ROWS = 2  # rows recomputed each iteration: a small fraction of step 3's forwards


@torch.no_grad()
def logprob_gap(model, batch: RolloutBatch, temperature: float) -> dict:
    """The gap on the first GAP_ROWS rows of `batch`, called under the trainer's bf16 autocast: the policy's forward
    there, and again with autocast off."""
    rows = batch.select(torch.arange(min(GAP_ROWS, len(batch.prompts)))).trimmed()
    input_ids, attention_mask, P = rows.input_ids, rows.attention_mask, rows.prompt_ids.shape[1]
    low, _, _ = model(input_ids, attention_mask, P, temperature)
    with torch.autocast(input_ids.device.type, enabled=False):
        full, _, _ = model(input_ids, attention_mask, P, temperature)
    gap = (low - full).abs()[rows.response_mask.bool()]
    if gap.numel() == 0:
        return {}
    return {"precision/logprob_gap_mean": float(gap.mean()), "precision/logprob_gap_max": float(gap.max())}
