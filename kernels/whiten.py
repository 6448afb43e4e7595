"""Triton kernels for masked whitening: (x - mean) / sqrt(var + eps) over the positions where the mask is set.

    mean = sum(x_i) / n,   var = sum((x_i - mean)^2) / (n - 1)   (n when n < 2),   i over the n masked positions

A global reduction, in two launches over the flattened tensor (any shape):
  1. each program reduces one block to (count, shift, S1, S2): the sums of (x - shift) and (x - shift)^2 with
     the shift near the block's mean. Never sum(x^2) - n * mean^2, which cancels catastrophically when
     |mean| >> std; about the shift, S2 - S1^2 / n loses nothing since S1 is tiny.
  2. the partials are merged (Chan et al.: M2 = sum M2_b + sum n_b (mean_b - mean)^2; a few tiny float64 torch ops
     on the (n_blocks,) partials), and a second kernel writes the normalized values, 0 at padding.
No gradient: whitening is applied to detached advantages.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastppo.kernels.launch import FP_FUSION


@triton.jit
def _block_moments_kernel(x_ptr, mask_ptr, partials_ptr, N, BLOCK: tl.constexpr):
    compute_dtype = partials_ptr.dtype.element_ty
    block = tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(mask_ptr + offs, mask=offs < N, other=0) != 0
    # where(), not a multiply by the mask: nan/inf garbage at padded positions must not leak.
    x = tl.where(valid, tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(compute_dtype), 0.0)
    count = tl.sum(valid.to(compute_dtype), axis=0)
    shift = tl.sum(x, axis=0) / tl.maximum(count, 1.0)  # the block mean, up to rounding: S1 absorbs the rest
    centered = tl.where(valid, x - shift, 0.0)
    tl.store(partials_ptr + block * 4 + 0, count)
    tl.store(partials_ptr + block * 4 + 1, shift)
    tl.store(partials_ptr + block * 4 + 2, tl.sum(centered, axis=0))
    tl.store(partials_ptr + block * 4 + 3, tl.sum(centered * centered, axis=0))


@triton.jit
def _normalize_kernel(x_ptr, mask_ptr, stats_ptr, out_ptr, N, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    compute_dtype = out_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    mean_hi = tl.load(stats_ptr)
    mean_lo = tl.load(stats_ptr + 1)
    rstd = tl.load(stats_ptr + 2)
    valid = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(compute_dtype)
    # x - mean_hi is exact when x is near the mean, so |mean| >> std loses nothing to the rounding of the mean.
    whitened = ((x - mean_hi) - mean_lo) * rstd
    if not SHIFT_MEAN:
        whitened = whitened + mean_hi + mean_lo
    tl.store(out_ptr + offs, tl.where(valid, whitened, 0.0), mask=inb)


_BLOCK = 2048


def _merge_moments(partials: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """(n_blocks, 4) per-block (count, shift, S1, S2) -> (mean_hi, mean_lo, 1 / sqrt(var + eps)) in `dtype`.

    S1, S2 are the sums of (x - shift) and (x - shift)^2 over the block's valid elements. The mean travels as a
    float64 split into hi + lo parts of `dtype`, for the normalize kernel to subtract without rounding it first.
    """
    count, shift, s1, s2 = partials.double().unbind(1)
    per_count = count.clamp(min=1)
    block_mean = shift + s1 / per_count
    block_m2 = s2 - s1 * s1 / per_count
    n = count.sum()
    mean = (count * block_mean).sum() / n.clamp(min=1)
    m2 = (block_m2 + count * (block_mean - mean) ** 2).sum()
    var = m2 / (n - 1).clamp(min=1)
    mean_hi = mean.to(dtype)
    return torch.stack([mean_hi.double(), (mean - mean_hi.double()), torch.rsqrt(var + eps)]).to(dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whitened x over the masked positions (unbiased variance), 0 at padding; float32 (float64 for float64 x)."""
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat_x, flat_mask = x.detach().contiguous().view(-1), mask.contiguous().view(-1)
    N = flat_x.numel()
    out = torch.empty(N, dtype=out_dtype, device=x.device)
    if N == 0:
        return out.view(x.shape)
    n_blocks = triton.cdiv(N, _BLOCK)
    partials = torch.empty((n_blocks, 4), dtype=out_dtype, device=x.device)
    _block_moments_kernel[(n_blocks,)](flat_x, flat_mask, partials, N, BLOCK=_BLOCK, enable_fp_fusion=FP_FUSION)
    stats = _merge_moments(partials, eps, out_dtype)
    _normalize_kernel[(n_blocks,)](
        flat_x, flat_mask, stats, out, N, SHIFT_MEAN=shift_mean, BLOCK=_BLOCK, enable_fp_fusion=FP_FUSION
    )
    return out.view(x.shape)
