"""The decode loop's sampler on the GPU: the next token drawn from softmax(logits / T) by inverse CDF, a row per
program, with the caller's uniform number u in [0, 1) for the row (so every backend draws the same token).

With z = logits / T, m = max_j z_j and e_j = exp(z_j - m):

    pass 1  m
    pass 2  s = sum_j e_j
    pass 3  the first j with e_0 + ... + e_j > u s: each BLOCK_V-wide block's inclusive cumsum, plus the sum of the
            blocks before it; the smallest lane over the target is the token

The drawn token's log-prob, z_token - m - log s, comes from the m and s already at hand. A token of probability 0
(a -inf logit, from top-k / top-p masking) adds nothing, so it is never the first over the target. A row that is no
distribution (a nan or +inf logit, or only -inf) gets -1 (log-prob nan). The row is read three times and an int64
and a float are written, where softmax + cumsum + searchsorted write two (B, V) tensors and read them back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastppo.kernels.launch import FP_FUSION


@triton.jit
def _sample_kernel(
    logits_ptr,  # (B, V), last dim contiguous
    uniform_ptr,  # (B,) float32 in [0, 1)
    tokens_ptr,  # (B,) int64
    logprobs_ptr,  # (B,) float32
    V,
    stride,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)

    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    nans = tl.zeros((BLOCK_V,), tl.int32)  # max() may skip a nan, so nans are counted
    for start in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        z = z * inv_temperature
        m = tl.maximum(m, z)
        nans += (z != z).to(tl.int32)
    row_max = tl.max(m, axis=0)
    max_safe = tl.where((row_max == float("inf")) | (row_max == float("-inf")), 0.0, row_max)

    s = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        s += tl.exp(z * inv_temperature - max_safe)
    total = tl.sum(s, axis=0)
    target = tl.load(uniform_ptr + row) * total

    below = 0.0  # the sum of the blocks before this one
    token = V  # the first index over the target; V while none is
    last_positive = -1  # the fallback when rounding leaves the running sum just under the target at the very end
    for start in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        e = tl.exp(z * inv_temperature - max_safe)
        running = tl.cumsum(e, axis=0) + below
        token = tl.minimum(token, tl.min(tl.where(running > target, start + cols, V), axis=0))
        last_positive = tl.maximum(last_positive, tl.max(tl.where(e > 0, start + cols, -1), axis=0))
        below += tl.sum(e, axis=0)
    token = tl.where(token < V, token, last_positive)
    bad = (tl.sum(nans, axis=0) > 0) | (row_max == float("inf")) | (row_max == float("-inf"))
    tl.store(tokens_ptr + row, tl.where(bad, -1, token).to(tl.int64))
    z_token = tl.load(row_ptr + tl.maximum(token, 0)).to(tl.float32) * inv_temperature
    tl.store(logprobs_ptr + row, tl.where(bad, float("nan"), z_token - max_safe - tl.log(total)))


def sample_tokens(logits: torch.Tensor, uniform: torch.Tensor, temperature: float = 1.0):
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tokens, logprobs
    uniform = uniform.to(device=logits.device, dtype=torch.float32).contiguous()
    BLOCK_V = min(2048, triton.next_power_of_2(V))  # 4096 spilled registers (tests/ops/test_triton_compile.py)
    _sample_kernel[(B,)](
        logits,
        uniform,
        tokens,
        logprobs,
        V,
        logits.stride(0),
        1.0 / temperature,
        BLOCK_V=BLOCK_V,
        enable_fp_fusion=FP_FUSION,
    )
    return tokens, logprobs
