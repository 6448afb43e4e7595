"""Triton kernels for generalized advantage estimation (GAE) over right-padded responses, and VAPO's per-sequence
lambda.

The reverse scan over time, with r, V zeroed at padding and nothing bootstrapped past a row's last valid token:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + c_t * A_{t+1},     c_t = gamma * lam_b at a valid token, 0 at padding (A_t = 0 there)
    R_t     = A_t + V_t,   or decoupled: A'_t + V_t, A' the same scan with c'_t = gamma * critic_lam

lam_b is one float for the batch or one per row (length-adaptive GAE); the decoupled scan shares every load and
delta_t with the policy's, so one launch gives both.

Layout. The recurrence is first-order linear, so it is an associative scan: the map x -> d + c x of one step
composes as (c1, d1) after (c2, d2) = (c1 c2, d1 + c1 d2). A program owns BLOCK_B rows and walks the time axis in
(BLOCK_B, BLOCK_T) tiles from the end of the rows to their start; a tile is loaded with time along the lanes, so a
warp reads BLOCK_T consecutive elements of a row (coalesced; the previous kernel gave each lane a row and read
addresses T elements apart), scanned with `tl.associative_scan` in registers, and A at the tile's first time step
carries into the next tile (the earlier one) as the scan's input from outside. The tile's columns run backwards in
time (column j is t = T - 1 - (t0 + j)), so the scan is a forward one: the addresses a warp reads are still
contiguous, and the reverse scan (flip-scan-flip, whose non-commutative combine has had ordering bugs) is avoided.
V_{t+1} is a second, shifted load of the same cache lines rather than a shuffle. Memory traffic: rewards, values
and mask read once (the shifted load hits cache), advantages and returns written once.

Inputs may be any float dtype; the scan runs in float32 (float64 for float64 rewards), which is also the output
dtype. Rollout data: no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastppo.kernels.launch import FP_FUSION


@triton.jit
def _compose(c_later, d_later, c_now, d_now):
    """The step x -> d_now + c_now x applied after the later segment's x -> d_later + c_later x. A c of 0 (padding)
    must cut the chain even when the later part overflowed to inf: select, never multiply, 0 * inf is nan."""
    return c_now * c_later, d_now + tl.where(c_now == 0, 0.0, c_now * d_later)


@triton.jit
def _scan_from(c, d, carry):
    """A_t over one tile (BLOCK_B, BLOCK_T), columns backwards in time, given A just after the tile (BLOCK_B,)."""
    c_total, d_total = tl.associative_scan((c, d), 1, _compose)
    return d_total + tl.where(c_total == 0, 0.0, c_total * carry[:, None])


@triton.jit
def _gae_kernel(
    rewards_ptr,
    values_ptr,
    mask_ptr,
    lam_ptr,
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
    critic_lam: tl.float64,
    PER_ROW_LAM: tl.constexpr,  # lam_ptr holds (B,) lambdas; else `lam` is the whole batch's
    DECOUPLED: tl.constexpr,  # returns from their own scan with critic_lam
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    compute_dtype = adv_ptr.dtype.element_ty
    discount = tl.full([], gamma, compute_dtype)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    row_ok = rows < B
    if PER_ROW_LAM:
        decay = discount * tl.load(lam_ptr + rows, mask=row_ok, other=0.0).to(compute_dtype)  # (BLOCK_B,)
    else:
        decay = tl.zeros((BLOCK_B,), compute_dtype) + discount * tl.full([], lam, compute_dtype)
    critic_decay = discount * tl.full([], critic_lam, compute_dtype)
    steps_back = tl.arange(0, BLOCK_T)  # column j is j steps before the tile's last time step
    carry = tl.zeros((BLOCK_B,), compute_dtype)  # A just after the current tile: 0 past the end of the rows
    critic_carry = tl.zeros((BLOCK_B,), compute_dtype)
    for s0 in range(0, T, BLOCK_T):
        t = T - 1 - s0 - steps_back  # (BLOCK_T,) time steps, decreasing
        inb = row_ok[:, None] & (t >= 0)[None, :]  # (BLOCK_B, BLOCK_T)
        next_inb = row_ok[:, None] & (t + 1 < T)[None, :]
        valid = tl.load(mask_ptr + rows[:, None] * stride_m_b + t[None, :] * stride_m_t, mask=inb, other=0) != 0
        next_valid = (
            tl.load(mask_ptr + rows[:, None] * stride_m_b + (t + 1)[None, :] * stride_m_t, mask=next_inb, other=0) != 0
        )
        r = tl.load(rewards_ptr + rows[:, None] * stride_r_b + t[None, :] * stride_r_t, mask=inb, other=0.0)
        v = tl.load(values_ptr + rows[:, None] * stride_v_b + t[None, :] * stride_v_t, mask=inb, other=0.0)
        v_next = tl.load(
            values_ptr + rows[:, None] * stride_v_b + (t + 1)[None, :] * stride_v_t, mask=next_inb, other=0.0
        )
        # where(), not a multiply by the mask: nan/inf garbage at padded positions must not leak into the scan.
        v = tl.where(valid, v.to(compute_dtype), 0.0)
        v_next = tl.where(next_valid, v_next.to(compute_dtype), 0.0)
        delta = tl.where(valid, r.to(compute_dtype) + discount * v_next - v, 0.0)
        adv = _scan_from(tl.where(valid, decay[:, None], 0.0), delta, carry)
        out = rows[:, None] * T + t[None, :]
        tl.store(adv_ptr + out, adv, mask=inb)
        if DECOUPLED:
            critic_adv = _scan_from(tl.where(valid, critic_decay, 0.0), delta, critic_carry)
            tl.store(ret_ptr + out, tl.where(valid, critic_adv + v, 0.0), mask=inb)
            critic_carry = tl.sum(tl.where(steps_back == BLOCK_T - 1, critic_adv, 0.0), axis=1)
        else:
            tl.store(ret_ptr + out, tl.where(valid, adv + v, 0.0), mask=inb)
        # The tile's earliest step (last column): past the start of the rows it is 0, and no later tile reads it.
        carry = tl.sum(tl.where(steps_back == BLOCK_T - 1, adv, 0.0), axis=1)


def _blocks(B: int, T: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_T): a warp's 32 lanes along time, a few rows per program. The scan is latency-bound (T /
    BLOCK_T dependent tiles), so more, smaller programs keep more loads in flight than fewer wide ones."""
    block_t = min(triton.next_power_of_2(max(T, 1)), 128)
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), 512 // block_t))
    return block_b, block_t


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float | torch.Tensor = 0.95,
    critic_lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), (B, T) float32 (float64 for float64 rewards), 0 at padding. `lam` a float or (B,)
    tensor; `critic_lam` gives the returns their own lambda in the same launch. Not differentiable."""
    B, T = rewards.shape
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    advantages = torch.empty((B, T), dtype=out_dtype, device=rewards.device)
    returns = torch.empty_like(advantages)
    if B * T > 0:
        per_row = isinstance(lam, torch.Tensor)
        block_b, block_t = _blocks(B, T)
        _gae_kernel[(triton.cdiv(B, block_b),)](
            rewards.detach(),
            values.detach(),
            response_mask,
            lam.detach().contiguous() if per_row else advantages,  # never read without PER_ROW_LAM
            advantages,
            returns,
            B,
            T,
            *rewards.stride(),
            *values.stride(),
            *response_mask.stride(),
            float(gamma),
            0.0 if per_row else float(lam),
            0.0 if critic_lam is None else float(critic_lam),
            PER_ROW_LAM=per_row,
            DECOUPLED=critic_lam is not None,
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            num_warps=4,
            enable_fp_fusion=FP_FUSION,
        )
    return advantages, returns


# ----------------------------------------------------------------------------------------------
# length-adaptive lambda (VAPO)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _length_adaptive_lam_kernel(
    mask_ptr, lam_ptr, B, T, stride_m_b, stride_m_t, alpha: tl.float64, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr
):
    """lam_b = clamp(1 - 1 / (alpha * length_b), 0, 1), length_b = the row's valid tokens, counted tile by tile."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_T)
    length = tl.zeros((BLOCK_B,), tl.float32)  # exact: counts below 2^24
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols
        inb = row_ok[:, None] & (t < T)[None, :]
        m = tl.load(mask_ptr + rows[:, None] * stride_m_b + t[None, :] * stride_m_t, mask=inb, other=0)
        length += tl.sum((m != 0).to(tl.float32), axis=1)
    # In float64: 1 - 1/(alpha L) is then correctly rounded to float32 once. Length 0 gets 0, the limit of the clamp
    # (1 - inf), without dividing by 0.
    lam = 1.0 - 1.0 / (tl.full([], alpha, tl.float64) * tl.maximum(length, 1.0).to(tl.float64))
    lam = tl.where(length > 0, tl.minimum(tl.maximum(lam, 0.0), 1.0), 0.0)
    tl.store(lam_ptr + rows, lam.to(tl.float32), mask=row_ok)


def length_adaptive_lam(response_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B,) float32 lambdas 1 - 1 / (alpha * length), clamped to [0, 1]; 0 for a row with no valid token."""
    B, T = response_mask.shape
    lam = torch.empty(B, dtype=torch.float32, device=response_mask.device)
    if B > 0:
        block_b, block_t = _blocks(B, T)
        _length_adaptive_lam_kernel[(triton.cdiv(B, block_b),)](
            response_mask,
            lam,
            B,
            T,
            *response_mask.stride(),
            float(alpha),
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            enable_fp_fusion=FP_FUSION,
        )
    return lam
