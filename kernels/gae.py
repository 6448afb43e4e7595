"""Triton kernel for generalized advantage estimation (GAE) over right-padded responses.

The reverse scan over time, with r, V zeroed at padding and nothing bootstrapped past a row's last valid token:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}       (A_t = 0 at padding, so the scan restarts there)
    R_t     = A_t + V_t

Time is sequential but rows are independent, so a program owns BLOCK_B rows (one per lane) and walks t = T-1..0
in a single launch, carrying (V_{t+1}, A_{t+1}) in registers. Inputs may be any float dtype; the scan runs in float32
(float64 for float64 rewards), which is also the output dtype. Rollout data: no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gae_kernel(
    rewards_ptr,
    values_ptr,
    mask_ptr,
    adv_ptr,
    ret_ptr,
    B,
    T,
    stride_r_b,
    stride_r_t,
    stride_v_b,
    stride_v_t,
    stride_m_b,
    stride_m_t,
    gamma: tl.float64,
    lam: tl.float64,
    BLOCK_B: tl.constexpr,
):
    compute_dtype = adv_ptr.dtype.element_ty
    discount = tl.full([], gamma, compute_dtype)
    trace_decay = discount * tl.full([], lam, compute_dtype)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    row_ok = rows < B
    next_value = tl.zeros((BLOCK_B,), compute_dtype)
    next_adv = tl.zeros((BLOCK_B,), compute_dtype)
    for i in range(0, T):
        t = T - 1 - i
        valid = tl.load(mask_ptr + rows * stride_m_b + t * stride_m_t, mask=row_ok, other=0) != 0
        r = tl.load(rewards_ptr + rows * stride_r_b + t * stride_r_t, mask=row_ok, other=0.0).to(compute_dtype)
        v = tl.load(values_ptr + rows * stride_v_b + t * stride_v_t, mask=row_ok, other=0.0).to(compute_dtype)
        # where(), not a multiply by the mask: nan/inf garbage at padded positions must not leak into the scan.
        r = tl.where(valid, r, 0.0)
        v = tl.where(valid, v, 0.0)
        adv = tl.where(valid, r + discount * next_value - v + trace_decay * next_adv, 0.0)
        tl.store(adv_ptr + rows * T + t, adv, mask=row_ok)
        tl.store(ret_ptr + rows * T + t, tl.where(valid, adv + v, 0.0), mask=row_ok)
        next_value = v
        next_adv = adv


def _block_rows(B: int) -> int:
    # One warp holds 32 rows. The scan is latency-bound (T dependent steps), so more, smaller programs keep more
    # loads in flight than fewer wide ones; the loads across rows are strided by T either way.
    return min(triton.next_power_of_2(max(B, 1)), 32)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), (B, T) float32 (float64 for float64 rewards), 0 at padding. Not differentiable."""
    B, T = rewards.shape
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    advantages = torch.empty((B, T), dtype=out_dtype, device=rewards.device)
    returns = torch.empty_like(advantages)
    if B * T > 0:
        block_b = _block_rows(B)
        _gae_kernel[(triton.cdiv(B, block_b),)](
            rewards.detach(),
            values.detach(),
            response_mask,
            advantages,
            returns,
            B,
            T,
            *rewards.stride(),
            *values.stride(),
            *response_mask.stride(),
            float(gamma),
            float(lam),
            BLOCK_B=block_b,
            num_warps=1,
        )
    return advantages, returns
