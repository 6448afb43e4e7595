"""The learning-rate schedule every fastppo training loop uses: linear warmup, then linear, cosine or constant.

PPO (`lr_scheduler`, `warmup_steps` in the config) and the supervised stages (sft, reward-model, DPO: 5% warmup,
then linear decay) read the same curve, so a schedule change happens in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(warmup_steps: int, total_steps: int, kind: str = "linear") -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each optimizer step (0-based), for LambdaLR.

    Warmup climbs (step + 1) / warmup_steps to 1; then the factor falls linearly to 0 at `total_steps`, follows half
    a cosine to 0, or stays 1 ("constant").
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def adamw_with_schedule(
    parameters,
    learning_rate: float,
    total_steps: int,
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    kind: str = "linear",
):
    """(AdamW over the trainable `parameters`, its LambdaLR on `lr_factor`). warmup_steps None is the supervised
    stages' default: 5% of the steps (at least one)."""
    # fused: one kernel reads each parameter, gradient and moment once, where foreach makes one pass over every tensor
    # per operation of the update (the optimizer's share of an iteration is in bench/README.md's phase table).
    optimizer = torch.optim.AdamW(
        [p for p in parameters if p.requires_grad], lr=learning_rate, weight_decay=weight_decay, fused=True
    )
    warmup = max(1, int(total_steps * 0.05)) if warmup_steps is None else warmup_steps
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(warmup, total_steps, kind))
