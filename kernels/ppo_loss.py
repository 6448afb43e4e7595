"""Triton kernels for PPO's clipped policy loss and clipped value loss, forward and backward in one pass.

Policy, per valid token (r = exp(logprobs - old_logprobs), A the advantage):

    loss_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))         then, with dual clip c and A < 0,
    loss_t = min(loss_t, -c A)
    d loss_t / d logprobs = -A r * s,   s = 1 if the unclipped branch wins, [r inside the clip range] if the
                                        clipped one does, and on a tie torch.maximum's split (1 + [inside]) / 2;
                                        0 where the dual clip caps the loss
    with a reference (KL in the loss), d = logprobs - ref_logprobs and kl one of `kl_penalty`'s estimators:
    loss_t += kl_loss_coef * kl(d),   d loss_t / d logprobs += kl_loss_coef * kl'(d)   (also where dual-clipped)

Value, per valid token (V_c = V_old + clip(V - V_old, +-clip), R the return):

    loss_t = max((V - R)^2, (V_c - R)^2) / 2
    d loss_t / d V = s_u (V - R) + s_c [|V - V_old| <= clip] (V_c - R),   (s_u, s_c) = (1, 0), (0, 1) or (1/2, 1/2)

The aggregated loss is sum_t w_t loss_t with w = mask * row_scale[b] (the reference's `loss_row_scales`, one scale
per row, computed from the mask before the launch), times the policy loss's optional per-token `token_weights` (the
rollout's off-policy correction). Since the loss is a weighted sum, its gradient is known in the forward pass: one
kernel writes the per-token gradient, the per-row partial loss and the per-row stats partials;
backward only multiplies the saved gradient by grad_output (as Liger's fused cross-entropy does). The gradient is
kept in the compute dtype and rounded to the input's dtype once, after that scaling. Compute is float32
(float64 for float64 inputs); padded positions never leak, whatever they hold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastppo.kernels.launch import FP_FUSION

from fastppo.ops.reference import loss_row_scales, named_policy_stats

from .kl import expm1, kl_from_log_ratio, kl_grad_from_log_ratio

# Per-row partials written by the kernels, in this order.
_POLICY_PARTIALS = ("loss", "n_valid", "clipped", "dual_clipped", "approx_kl", "ratio_sum", "ratio_max", "ref_kl")
_VALUE_PARTIALS = ("loss", "n_valid", "clipped")


@triton.jit
def _ppo_policy_kernel(
    lp_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    tw_ptr,
    mask_ptr,
    row_scale_ptr,
    grad_ptr,
    partials_ptr,
    B,
    T,
    stride_lp_b,
    stride_lp_t,
    stride_old_b,
    stride_old_t,
    stride_adv_b,
    stride_adv_t,
    stride_ref_b,
    stride_ref_t,
    stride_tw_b,
    stride_tw_t,
    stride_mask_b,
    stride_mask_t,
    ratio_low: tl.float64,
    ratio_high: tl.float64,
    dual_clip: tl.float64,
    kl_loss_coef: tl.float64,
    DUAL_CLIP: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,  # None: no reference, ref_ptr is never read; else the KL-in-loss estimator
    TOKEN_WEIGHTS: tl.constexpr,  # off: no load at all (tw_ptr is then a stand-in, never read)
    STORE_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per tile of BLOCK_B x BLOCK_T = 512 elements over 4 warps (4 per thread), with a dozen values live per element
    and seven per-row accumulators. Registers per thread as tests/ops/triton_aot.py measures them (Triton 3.9 and its
    ptxas; dual clip and gradient on, the most):

        tile                    fp32/bf16/fp16: sm_80, sm_90    fp64: sm_80, sm_90    spills
        2 x 256 (T >= 256)      64, 61                          144, 158              none
        32 x 16 (T = 16)        64, 64                          162, 164              none
        either, token_weights   up to 80, 74                    up to 162, 170        none
        1024 elements before    up to 116, 133                  255, 255              fp64: up to 208 bytes
    """
    compute_dtype = partials_ptr.dtype.element_ty
    low = tl.full([], ratio_low, compute_dtype)
    high = tl.full([], ratio_high, compute_dtype)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    row_ok = rows < B
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    cols = tl.arange(0, BLOCK_T)

    loss_sum = tl.zeros((BLOCK_B,), compute_dtype)
    n_valid = tl.zeros((BLOCK_B,), compute_dtype)
    n_clipped = tl.zeros((BLOCK_B,), compute_dtype)
    n_dual = tl.zeros((BLOCK_B,), compute_dtype)
    kl_sum = tl.zeros((BLOCK_B,), compute_dtype)
    ratio_sum = tl.zeros((BLOCK_B,), compute_dtype)
    ratio_max = tl.zeros((BLOCK_B,), compute_dtype)  # ratios are > 0, so 0 is "no valid token"
    ref_kl_sum = tl.zeros((BLOCK_B,), compute_dtype)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols  # (BLOCK_T,)
        inb = row_ok[:, None] & (t < T)[None, :]  # (BLOCK_B, BLOCK_T)
        m = tl.load(mask_ptr + rows[:, None] * stride_mask_b + t[None, :] * stride_mask_t, mask=inb, other=0)
        valid = m != 0
        lp = tl.load(lp_ptr + rows[:, None] * stride_lp_b + t[None, :] * stride_lp_t, mask=inb, other=0.0)
        old = tl.load(old_ptr + rows[:, None] * stride_old_b + t[None, :] * stride_old_t, mask=inb, other=0.0)
        adv = tl.load(adv_ptr + rows[:, None] * stride_adv_b + t[None, :] * stride_adv_t, mask=inb, other=0.0)
        # where(), not a multiply by the mask: nan/inf garbage at padded positions must not leak.
        log_ratio = tl.where(valid, lp.to(compute_dtype) - old.to(compute_dtype), 0.0)
        adv = tl.where(valid, adv.to(compute_dtype), 0.0)
        ratio = tl.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, low), high)
        clipped_wins = clipped > unclipped
        unclipped_wins = unclipped > clipped
        inside = ((ratio >= low) & (ratio <= high)).to(compute_dtype)
        per_token = tl.where(clipped_wins, clipped, unclipped)
        branch = tl.where(unclipped_wins, 1.0, tl.where(clipped_wins, inside, 0.5 * (1.0 + inside)))
        grad = unclipped * branch  # d per_token / d logprobs = -A r s
        if DUAL_CLIP:
            cap = -tl.full([], dual_clip, compute_dtype) * adv
            dual = (adv < 0) & (per_token > cap)
            per_token = tl.where(dual, cap, per_token)
            grad = tl.where(dual, 0.0, grad)
            n_dual += tl.sum((dual & valid).to(compute_dtype), axis=1)
        if TOKEN_WEIGHTS:  # the off-policy correction: a constant factor on each token's policy-gradient term
            tw = tl.load(tw_ptr + rows[:, None] * stride_tw_b + t[None, :] * stride_tw_t, mask=inb, other=0.0)
            tw = tl.where(valid, tw.to(compute_dtype), 0.0)
            per_token = per_token * tw
            grad = grad * tw
        if KL_ESTIMATOR is not None:
            ref = tl.load(ref_ptr + rows[:, None] * stride_ref_b + t[None, :] * stride_ref_t, mask=inb, other=0.0)
            ref_log_ratio = tl.where(valid, lp.to(compute_dtype) - ref.to(compute_dtype), 0.0)
            ref_kl = tl.where(valid, kl_from_log_ratio(ref_log_ratio, KL_ESTIMATOR), 0.0)
            coef = tl.full([], kl_loss_coef, compute_dtype)
            per_token += coef * ref_kl
            grad += coef * kl_grad_from_log_ratio(ref_log_ratio, KL_ESTIMATOR)
            ref_kl_sum += tl.sum(ref_kl, axis=1)
        weight = m.to(compute_dtype) * row_scale[:, None]
        loss_sum += tl.sum(tl.where(valid, weight * per_token, 0.0), axis=1)
        if STORE_GRAD:
            grad = tl.where(valid, weight * grad, 0.0)
            tl.store(grad_ptr + rows[:, None] * T + t[None, :], grad, mask=inb)
        n_valid += tl.sum(valid.to(compute_dtype), axis=1)
        n_clipped += tl.sum((clipped_wins & valid).to(compute_dtype), axis=1)
        kl_sum += tl.sum(tl.where(valid, expm1(log_ratio) - log_ratio, 0.0), axis=1)  # k3: (r - 1) - log r
        ratio_sum += tl.sum(tl.where(valid, ratio, 0.0), axis=1)
        ratio_max = tl.maximum(ratio_max, tl.max(tl.where(valid, ratio, 0.0), axis=1))

    out = partials_ptr + rows * 8
    tl.store(out + 0, loss_sum, mask=row_ok)
    tl.store(out + 1, n_valid, mask=row_ok)
    tl.store(out + 2, n_clipped, mask=row_ok)
    tl.store(out + 3, n_dual, mask=row_ok)
    tl.store(out + 4, kl_sum, mask=row_ok)
    tl.store(out + 5, ratio_sum, mask=row_ok)
    tl.store(out + 6, ratio_max, mask=row_ok)
    tl.store(out + 7, ref_kl_sum, mask=row_ok)


@triton.jit
def _ppo_value_kernel(
    v_ptr,
    old_ptr,
    ret_ptr,
    mask_ptr,
    row_scale_ptr,
    grad_ptr,
    partials_ptr,
    B,
    T,
    stride_v_b,
    stride_v_t,
    stride_old_b,
    stride_old_t,
    stride_ret_b,
    stride_ret_t,
    stride_mask_b,
    stride_mask_t,
    clip: tl.float64,
    CLIP: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """The policy kernel's tiles: at most 54 registers per thread in fp32/bf16/fp16 and 80 in fp64 on sm_80 and
    sm_90, no spills (tests/ops/triton_aot.py); the 1024-element tiles before spilled 4 bytes in
    one fp32 configuration on each."""
    compute_dtype = partials_ptr.dtype.element_ty
    bound = tl.full([], clip, compute_dtype)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    row_ok = rows < B
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    cols = tl.arange(0, BLOCK_T)

    loss_sum = tl.zeros((BLOCK_B,), compute_dtype)
    n_valid = tl.zeros((BLOCK_B,), compute_dtype)
    n_clipped = tl.zeros((BLOCK_B,), compute_dtype)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols  # (BLOCK_T,)
        inb = row_ok[:, None] & (t < T)[None, :]  # (BLOCK_B, BLOCK_T)
        m = tl.load(mask_ptr + rows[:, None] * stride_mask_b + t[None, :] * stride_mask_t, mask=inb, other=0)
        valid = m != 0
        v = tl.load(v_ptr + rows[:, None] * stride_v_b + t[None, :] * stride_v_t, mask=inb, other=0.0)
        old = tl.load(old_ptr + rows[:, None] * stride_old_b + t[None, :] * stride_old_t, mask=inb, other=0.0)
        ret = tl.load(ret_ptr + rows[:, None] * stride_ret_b + t[None, :] * stride_ret_t, mask=inb, other=0.0)
        # where(), not a multiply by the mask: nan/inf garbage at padded positions must not leak.
        v = tl.where(valid, v.to(compute_dtype), 0.0)
        old = tl.where(valid, old.to(compute_dtype), 0.0)
        ret = tl.where(valid, ret.to(compute_dtype), 0.0)
        error = v - ret
        unclipped = error * error
        if CLIP:
            step = v - old
            inside = (step >= -bound) & (step <= bound)
            # Inside the clip range V_c is V itself: old + (V - old) may round to a neighbour of V, and a
            # rounding-size difference must not count as clipping.
            v_clipped = tl.where(inside, v, old + tl.minimum(tl.maximum(step, -bound), bound))
            clipped_error = v_clipped - ret
            clipped = clipped_error * clipped_error
            clipped_wins = clipped > unclipped
            unclipped_wins = unclipped > clipped
            per_token = 0.5 * tl.where(clipped_wins, clipped, unclipped)
            s_clipped = tl.where(clipped_wins, 1.0, tl.where(unclipped_wins, 0.0, 0.5))
            grad = (1.0 - s_clipped) * error + tl.where(inside, s_clipped * clipped_error, 0.0)
            n_clipped += tl.sum((clipped_wins & valid).to(compute_dtype), axis=1)
        else:
            per_token = 0.5 * unclipped
            grad = error
        weight = m.to(compute_dtype) * row_scale[:, None]
        loss_sum += tl.sum(tl.where(valid, weight * per_token, 0.0), axis=1)
        n_valid += tl.sum(valid.to(compute_dtype), axis=1)
        if STORE_GRAD:
            grad = tl.where(valid, weight * grad, 0.0)
            tl.store(grad_ptr + rows[:, None] * T + t[None, :], grad, mask=inb)

    out = partials_ptr + rows * 3
    tl.store(out + 0, loss_sum, mask=row_ok)
    tl.store(out + 1, n_valid, mask=row_ok)
    tl.store(out + 2, n_clipped, mask=row_ok)


def _row_blocks(B: int, T: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_T): a program owns whole rows, several short ones at a time; 512 elements a tile, for the
    registers (see _ppo_policy_kernel)."""
    block_t = min(triton.next_power_of_2(max(T, 1)), 256)
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), 512 // block_t))
    return block_b, block_t


_NUM_WARPS = 4  # 4 elements of a 512-element tile per thread: one 16-byte load of each float32 input


def _launch(kernel, inputs, response_mask, agg, denominator, n_partials, store_grad, *scalars, **constexprs):
    """Runs a fused loss kernel; returns (loss, grad or None, per-row partials (B, n_partials))."""
    B, T = response_mask.shape
    compute_dtype = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    device = inputs[0].device
    row_scale = loss_row_scales(response_mask, agg, denominator, compute_dtype)
    partials = torch.empty((B, n_partials), dtype=compute_dtype, device=device)
    grad = torch.empty((B, T), dtype=compute_dtype, device=device) if store_grad else None
    if B > 0:
        block_b, block_t = _row_blocks(B, T)
        strides = [s for x in (*inputs, response_mask) for s in x.stride()]
        kernel[(triton.cdiv(B, block_b),)](
            *(x.detach() for x in inputs),
            response_mask,
            row_scale,
            grad if store_grad else partials,  # never written without STORE_GRAD
            partials,
            B,
            T,
            *strides,
            *scalars,
            **constexprs,
            STORE_GRAD=store_grad,
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            num_warps=_NUM_WARPS,
            enable_fp_fusion=FP_FUSION,
        )
    return partials[:, 0].sum(), grad, partials


def _masked_means(partials: torch.Tensor, columns: slice) -> torch.Tensor:
    """Sums of the per-row stats partials in `columns`, divided by the number of valid tokens (at least 1)."""
    totals = partials.sum(0)
    return (totals[columns] / totals[1].clamp(min=1)).float()


class _PPOPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_low,
        clip_high,
        dual_clip,
        agg,
        den,
        ref_logprobs,
        kl_loss_coef,
        kl_estimator,
        token_weights,
    ):
        clip_high = clip_low if clip_high is None else clip_high
        # Without a reference the kernel never reads it: any (B, T) tensor fills the slot.
        ref = logprobs if ref_logprobs is None else ref_logprobs
        loss, grad, partials = _launch(
            _ppo_policy_kernel,
            (logprobs, old_logprobs, advantages, ref, logprobs if token_weights is None else token_weights),
            response_mask,
            agg,
            den,
            len(_POLICY_PARTIALS),
            ctx.needs_input_grad[0],
            1.0 - clip_low,
            1.0 + clip_high,
            2.0 if dual_clip is None else float(dual_clip),
            float(kl_loss_coef),
            DUAL_CLIP=dual_clip is not None,
            KL_ESTIMATOR=None if ref_logprobs is None else kl_estimator,
            TOKEN_WEIGHTS=token_weights is not None,
        )
        clip_frac, dual_clip_frac, approx_kl, ratio_mean = _masked_means(partials, slice(2, 6)).unbind()
        ratio_max = partials[:, 6].amax().float() if partials.shape[0] > 0 else torch.zeros((), device=loss.device)
        (ref_kl,) = _masked_means(partials, slice(7, 8)).unbind()
        stats = torch.stack([clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_max, ref_kl])
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(grad)
        ctx.input_dtype = logprobs.dtype
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.input_dtype), *([None] * 12)


class _PPOValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, response_mask, clip, agg, denominator):
        loss, grad, partials = _launch(
            _ppo_value_kernel,
            (values, old_values, returns),
            response_mask,
            agg,
            denominator,
            len(_VALUE_PARTIALS),
            ctx.needs_input_grad[0],
            0.0 if clip is None else float(clip),
            CLIP=clip is not None,
        )
        stats = _masked_means(partials, slice(2, 3))
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(grad)
        ctx.input_dtype = values.dtype
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.input_dtype), *([None] * 6)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    denominator: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_loss_coef: float = 0.0,
    kl_estimator: str = "k3",
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, plus kl_loss_coef * KL to the reference with ref_logprobs (a 0-dim loss,
    differentiable wrt logprobs), and its detached float32 stats (ref_kl among them with ref_logprobs)."""
    loss, stats = _PPOPolicyLoss.apply(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_low,
        clip_high,
        dual_clip,
        agg,
        denominator,
        ref_logprobs,
        kl_loss_coef,
        kl_estimator,
        token_weights,
    )
    return loss, named_policy_stats(stats, ref_logprobs is not None)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss (a 0-dim loss, differentiable wrt values) and its detached float32 stats."""
    loss, stats = _PPOValueLoss.apply(values, old_values, returns, response_mask, clip, agg, denominator)
    return loss, {"value_clip_frac": stats[0]}
