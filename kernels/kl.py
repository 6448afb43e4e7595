"""Triton kernels for the per-token KL penalty and the KL-shaped reward.

With d = logprobs - ref_logprobs (the log-ratio log pi/pi_ref of each sampled token):

    k1 = d,   k2 = d^2 / 2,   k3 = expm1(-d) + d,   abs = |d|
    dk/dd:    1,   d,   -expm1(-d),   sign(d)

    rewards[b, t] = -kl_coef * kl[b, t] + (score[b] if t is the last valid token of row b else 0)

`kl_penalty` is elementwise over any shape and differentiable wrt both log-prob tensors (a backward kernel
recomputes d from the saved inputs rather than saving a third tensor). `shape_rewards` produces rollout data, so it
has no backward: one launch computes the KL, finds each row's last valid token and adds the score there. Everything
is computed in float32 (float64 for float64 inputs) whatever the input dtype, and returned in that dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastppo.kernels.launch import FP_FUSION

from fastppo.ops.reference import KL_ESTIMATORS


@triton.jit
def expm1(x):
    """exp(x) - 1, accurate near 0 where exp(x) - 1 cancels: a Taylor series (to x^9, < 3e-15 relative error)
    for |x| < 1/8. Shared with the PPO loss kernels; Triton has no expm1 that also runs in the interpreter."""
    small = tl.abs(x) < 0.125
    s = tl.where(small, x, 0.0)
    series = 1.0 + s * (1.0 / 9)
    series = 1.0 + s * (1.0 / 8) * series
    series = 1.0 + s * (1.0 / 7) * series
    series = 1.0 + s * (1.0 / 6) * series
    series = 1.0 + s * (1.0 / 5) * series
    series = 1.0 + s * (1.0 / 4) * series
    series = 1.0 + s * (1.0 / 3) * series
    series = 1.0 + s * (1.0 / 2) * series
    return tl.where(small, s * series, tl.exp(x) - 1.0)


@triton.jit
def kl_from_log_ratio(d, ESTIMATOR: tl.constexpr):
    if ESTIMATOR == "k1":
        kl = d
    elif ESTIMATOR == "k2":
        kl = 0.5 * d * d
    elif ESTIMATOR == "k3":
        kl = expm1(-d) + d
    else:
        kl = tl.abs(d)
    return kl


@triton.jit
def kl_grad_from_log_ratio(d, ESTIMATOR: tl.constexpr):
    """d kl / d d, with torch's conventions (sign(0) = 0 for abs)."""
    if ESTIMATOR == "k1":
        grad = tl.zeros_like(d) + 1.0
    elif ESTIMATOR == "k2":
        grad = d
    elif ESTIMATOR == "k3":
        grad = -expm1(-d)
    else:
        grad = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)
    return grad


@triton.jit
def _kl_fwd_kernel(lp_ptr, ref_ptr, kl_ptr, N, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    compute_dtype = kl_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    d = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(compute_dtype) - tl.load(ref_ptr + offs, mask=inb, other=0.0).to(
        compute_dtype
    )
    tl.store(kl_ptr + offs, kl_from_log_ratio(d, ESTIMATOR), mask=inb)


@triton.jit
def _kl_bwd_kernel(
    lp_ptr, ref_ptr, grad_kl_ptr, grad_lp_ptr, grad_ref_ptr, N, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr
):
    compute_dtype = grad_kl_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    d = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(compute_dtype) - tl.load(ref_ptr + offs, mask=inb, other=0.0).to(
        compute_dtype
    )
    grad = tl.load(grad_kl_ptr + offs, mask=inb, other=0.0) * kl_grad_from_log_ratio(d, ESTIMATOR)
    tl.store(grad_lp_ptr + offs, grad, mask=inb)
    tl.store(grad_ref_ptr + offs, -grad, mask=inb)


@triton.jit
def _shape_rewards_kernel(
    scores_ptr,
    lp_ptr,
    ref_ptr,
    mask_ptr,
    rewards_ptr,
    kl_ptr,
    B,
    T,
    stride_scores,
    stride_lp_b,
    stride_lp_t,
    stride_ref_b,
    stride_ref_t,
    stride_mask_b,
    stride_mask_t,
    kl_coef: tl.float64,
    ESTIMATOR: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """A program owns BLOCK_B whole rows: a first sweep over the mask finds each row's last valid token (masks are
    usually right-padded prefixes, but any mask works), a second computes and writes the KL and the rewards.

    Tiles of BLOCK_B x BLOCK_T = 512 elements over 4 warps: 4 per thread, one 16-byte load of float32 log-probs.
    Registers per thread as tests/ops/triton_aot.py measures them (Triton 3.9 and its ptxas, k3: the most):

        tile                    fp32/bf16/fp16: sm_80, sm_90    fp64: sm_80, sm_90    spills
        1 x 512 (T >= 512)      32, 32                          68, 60                none
        32 x 16 (T = 16)        40, 34                          90, 96                none
        2048 elements before    up to 120, 113                  230, 255              fp64 on sm_90: 288 bytes
    """
    compute_dtype = kl_ptr.dtype.element_ty
    coef = tl.full([], kl_coef, compute_dtype)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_T)

    last = tl.full((BLOCK_B,), -1, tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols  # (BLOCK_T,)
        inb = row_ok[:, None] & (t < T)[None, :]
        m = tl.load(mask_ptr + rows[:, None] * stride_mask_b + t[None, :] * stride_mask_t, mask=inb, other=0)
        last = tl.maximum(last, tl.max(tl.where(m != 0, t[None, :], -1), axis=1))

    score = tl.load(scores_ptr + rows * stride_scores, mask=row_ok, other=0.0).to(compute_dtype)  # (BLOCK_B,)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols
        inb = row_ok[:, None] & (t < T)[None, :]
        valid = tl.load(mask_ptr + rows[:, None] * stride_mask_b + t[None, :] * stride_mask_t, mask=inb, other=0) != 0
        lp = tl.load(lp_ptr + rows[:, None] * stride_lp_b + t[None, :] * stride_lp_t, mask=inb, other=0.0)
        ref = tl.load(ref_ptr + rows[:, None] * stride_ref_b + t[None, :] * stride_ref_t, mask=inb, other=0.0)
        # where(), not a multiply by the mask: nan/inf garbage at padded positions must not leak.
        kl = tl.where(valid, kl_from_log_ratio(lp.to(compute_dtype) - ref.to(compute_dtype), ESTIMATOR), 0.0)
        rewards = -coef * kl + tl.where(t[None, :] == last[:, None], score[:, None], 0.0)
        out = rows[:, None] * T + t[None, :]
        tl.store(kl_ptr + out, kl, mask=inb)
        tl.store(rewards_ptr + out, rewards, mask=inb)


_BLOCK = 1024


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _check_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def _row_blocks(B: int, T: int, max_block_t: int = 512, max_elements: int = 512) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_T) for kernels whose programs own whole rows: short rows are batched several to a program.
    512 elements keep the shape-rewards kernel's registers low (see its docstring) and give long rows a program
    each: B programs, as many as there are rows, for the small batches of RLHF."""
    block_t = min(triton.next_power_of_2(max(T, 1)), max_block_t)
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), max_elements // block_t))
    return block_b, block_t


_SHAPE_REWARDS_WARPS = 4  # 4 elements of a 512-element tile per thread (see _shape_rewards_kernel)


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
        lp, ref = logprobs.contiguous().view(-1), ref_logprobs.contiguous().view(-1)
        kl = torch.empty(lp.shape, dtype=_out_dtype(logprobs, ref_logprobs), device=lp.device)
        if lp.numel() > 0:
            grid = (triton.cdiv(lp.numel(), _BLOCK),)
            _kl_fwd_kernel[grid](lp, ref, kl, lp.numel(), estimator, BLOCK=_BLOCK, enable_fp_fusion=FP_FUSION)
        ctx.save_for_backward(lp, ref)
        ctx.estimator = estimator
        ctx.shape = logprobs.shape
        return kl.view(logprobs.shape)

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        lp, ref = ctx.saved_tensors
        grad_kl = grad_kl.contiguous().view(-1).to(_out_dtype(lp, ref))  # often an expanded 0-stride view
        # Written in the compute dtype and cast to each input's dtype by torch (round to nearest; Triton's
        # interpreter truncates float32 -> bfloat16).
        grad_lp, grad_ref = torch.empty_like(grad_kl), torch.empty_like(grad_kl)
        if lp.numel() > 0:
            grid = (triton.cdiv(lp.numel(), _BLOCK),)
            _kl_bwd_kernel[grid](
                lp, ref, grad_kl, grad_lp, grad_ref, lp.numel(), ctx.estimator, BLOCK=_BLOCK, enable_fp_fusion=FP_FUSION
            )
        needs_lp, needs_ref, _ = ctx.needs_input_grad
        return (
            grad_lp.to(lp.dtype).view(ctx.shape) if needs_lp else None,
            grad_ref.to(ref.dtype).view(ctx.shape) if needs_ref else None,
            None,
        )


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate (float32; float64 for float64 inputs), differentiable wrt both inputs."""
    _check_estimator(estimator)
    return _KLPenalty.apply(logprobs, ref_logprobs, estimator)


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both (B, T) float32 (float64 for float64 logprobs), 0 at padding. Not differentiable."""
    _check_estimator(estimator)
    B, T = logprobs.shape
    out_dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    rewards = torch.empty((B, T), dtype=out_dtype, device=logprobs.device)
    kl = torch.empty_like(rewards)
    if B * T > 0:
        block_b, block_t = _row_blocks(B, T)
        _shape_rewards_kernel[(triton.cdiv(B, block_b),)](
            scores.detach(),
            logprobs.detach(),
            ref_logprobs.detach(),
            response_mask,
            rewards,
            kl,
            B,
            T,
            scores.stride(0),
            *logprobs.stride(),
            *ref_logprobs.stride(),
            *response_mask.stride(),
            float(kl_coef),
            estimator,
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            num_warps=_SHAPE_REWARDS_WARPS,
            enable_fp_fusion=FP_FUSION,
        )
    return rewards, kl
