"""Triton kernel for the critic-free estimators' per-sequence advantages, from the scores of groups of responses.

Rows are grouped consecutively (group g is rows [g G, (g + 1) G)); with mean and unbiased std over a group:

    grpo     A = (r - mean) / (std + eps)        (0 for a group of one: no std, and r - mean = 0)
    dr_grpo  A = r - mean
    rloo     A = r - (sum - r) / (G - 1) = G / (G - 1) * (r - mean)

A program owns BLOCK_GROUPS whole groups as a (BLOCK_GROUPS, BLOCK_G) tile, one group a row, so the mean and the std
are two row reductions in registers, in one launch: the scores are read once and the advantages written once.
The arithmetic is float64 whatever the input: a float32 mean loses the spread of scores with a large common offset
(around 1e4 with a spread of 1: 3 digits gone), and float32 squares overflow for scores past 1e19. There are B
numbers, so float64's lower throughput costs nothing measurable. Output float32 (float64 for float64 scores).
Rollout data: no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastppo.kernels.launch import FP_FUSION


@triton.jit
def _group_advantages_kernel(
    scores_ptr,
    out_ptr,
    n_groups,
    stride,
    eps: tl.float64,
    GROUP_SIZE: tl.constexpr,
    ESTIMATOR: tl.constexpr,  # "grpo", "dr_grpo" or "rloo"
    BLOCK_GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    groups = tl.program_id(0).to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)  # (BLOCK_GROUPS,)
    members = tl.arange(0, BLOCK_G)
    inb = (groups < n_groups)[:, None] & (members < GROUP_SIZE)[None, :]
    rows = groups[:, None] * GROUP_SIZE + members[None, :]  # (BLOCK_GROUPS, BLOCK_G)
    r = tl.load(scores_ptr + rows * stride, mask=inb, other=0.0).to(tl.float64)
    centered = tl.where(inb, r - tl.sum(r, axis=1)[:, None] / GROUP_SIZE, 0.0)
    if ESTIMATOR == "grpo":
        if GROUP_SIZE == 1:
            adv = tl.zeros_like(centered)
        else:
            std = tl.sqrt(tl.sum(centered * centered, axis=1) / (GROUP_SIZE - 1))
            adv = centered / (std + tl.full([], eps, tl.float64))[:, None]
    elif ESTIMATOR == "dr_grpo":
        adv = centered
    else:
        adv = centered * (GROUP_SIZE / (GROUP_SIZE - 1))
    tl.store(out_ptr + rows, adv.to(out_ptr.dtype.element_ty), mask=inb)


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """(B,) advantages, float32 (float64 for float64 scores), of consecutive groups of `group_size` scores."""
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    out = torch.empty(scores.shape[0], dtype=out_dtype, device=scores.device)
    n_groups = scores.shape[0] // group_size
    if n_groups > 0:
        block_g = triton.next_power_of_2(group_size)
        block_groups = max(1, min(triton.next_power_of_2(n_groups), 1024 // block_g))
        _group_advantages_kernel[(triton.cdiv(n_groups, block_groups),)](
            scores.detach(),
            out,
            n_groups,
            scores.stride(0),
            float(eps),
            GROUP_SIZE=group_size,
            ESTIMATOR=estimator,
            BLOCK_GROUPS=block_groups,
            BLOCK_G=block_g,
            enable_fp_fusion=FP_FUSION,
        )
    return out
