"""Log-probs of the sampled tokens, and the entropy, straight from the logits: one read of the logits forward.

With z = logits / temperature over a row of V entries and the sampled token t:

    logp_t  = z_t - logsumexp(z)
    H       = -sum_j p_j log p_j = log s - a / s,   s = sum_j e^{z_j - m},  a = sum_j e^{z_j - m} (z_j - m)

where m is the row max. The forward kernel keeps, per lane of a BLOCK_V-wide vector, a running max, s and a
(rescaled whenever the max grows: the online logsumexp), so the row is read once and no (N, V) float32
log-softmax is ever written; a is kept relative to the max so a row of +-1e4 logits loses no precision.

The backward reads the row once more and writes, in the logits' dtype,

    dL/dlogits_j = [g_logp (onehot_j - p_j) - g_H p_j (log p_j + H)] / temperature

Tokens must lie in [0, V). `fastppo.ops` raises for any other (on every backend); the forward kernel also masks
the target's load, so that a direct call with such a token gives a nan log-prob instead of reading outside the row.
In the backward a token outside [0, V) (the fused linear op passes -1) contributes no one-hot term.

Memory traffic: forward N*V*b read, backward N*V*b read + N*V*b written (b = bytes per logit), against 3-5 such
passes and an (N, V) float32 intermediate for `log_softmax(logits.float()).gather(...)` and its autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastppo.kernels.launch import FP_FUSION


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,  # (L0, L1, V), last dim contiguous
    tokens_ptr,  # (N,) with N = L0 * L1
    logprobs_ptr,  # (N,) float32
    entropy_ptr,  # (N,) float32
    lse_ptr,  # (N,) float32: logsumexp(z), saved for the backward
    L1,
    V,
    stride_0,
    stride_1,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at 16384 x 151936
    row_ptr = logits_ptr + (row // L1) * stride_0 + (row % L1) * stride_1
    cols = tl.arange(0, BLOCK_V)

    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per-lane running max
    s = tl.zeros((BLOCK_V,), tl.float32)  # per-lane sum of e^{z - m}
    a = tl.zeros((BLOCK_V,), tl.float32)  # per-lane sum of e^{z - m} (z - m)
    for start in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        z = z * inv_temperature
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that have seen only -inf stay at s = a = 0
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        # Moving the reference point of a from m to m_new shifts every term by (m - m_new); 0 where s is still 0.
        shift = tl.where(s > 0, (m - m_safe) * s, 0.0)
        a = alpha * (a + shift) + tl.where(e > 0, e * (z - m_safe), 0.0)
        s = alpha * s + e
        m = m_new

    # Merge the lanes.
    row_max = tl.max(m, axis=0)
    row_max_safe = tl.where(row_max == float("-inf"), 0.0, row_max)
    scale = tl.exp(m - row_max_safe)
    a = tl.where(s > 0, scale * (a + (m - row_max_safe) * s), 0.0)
    s = scale * s
    s_row = tl.sum(s, axis=0)
    a_row = tl.sum(a, axis=0)
    lse = row_max_safe + tl.log(s_row)
    entropy = tl.log(s_row) - a_row / s_row

    # The public op rejects tokens outside [0, V); the mask makes a direct call with one give nan, never a read
    # outside the row (on a GPU: garbage, or an illegal address that kills the CUDA context).
    token = tl.load(tokens_ptr + row).to(tl.int64)
    in_vocab = (token >= 0) & (token < V)
    z_token = tl.load(row_ptr + token, mask=in_vocab, other=float("nan")).to(tl.float32) * inv_temperature
    tl.store(logprobs_ptr + row, z_token - lse)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,  # (L0, L1, V), last dim contiguous
    grad_logits_ptr,  # (N, V) contiguous, logits dtype
    tokens_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprobs_ptr,  # (N,) float32
    grad_entropy_ptr,  # (N,) float32
    L1,
    V,
    stride_0,
    stride_1,
    inv_temperature,
    HAS_GRAD_ENTROPY: tl.constexpr,  # skip the entropy term's loads and math when only log-probs need a gradient
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // L1) * stride_0 + (row % L1) * stride_1
    grad_row_ptr = grad_logits_ptr + row * V
    cols = tl.arange(0, BLOCK_V)

    token = tl.load(tokens_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g_logp = tl.load(grad_logprobs_ptr + row) * inv_temperature
    if HAS_GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        g_entropy = tl.load(grad_entropy_ptr + row) * inv_temperature
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        z = tl.load(row_ptr + start + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        logp = z - lse
        p = tl.exp(logp)
        grad = tl.where(start + cols == token, g_logp, 0.0) - g_logp * p
        if HAS_GRAD_ENTROPY:
            grad -= tl.where(p > 0, g_entropy * p * (logp + entropy), 0.0)  # p log p -> 0 at a -inf logit
        tl.store(grad_row_ptr + start + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _block_v(V: int) -> int:
    # 4096 lanes keep 3 fp32 accumulators in registers with 8 warps (16 floats of each per thread) and give each
    # program long contiguous loads; a smaller row only needs its own size.
    return min(triton.next_power_of_2(V), 4096)


def _as_rows(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """View logits (..., V) as (L0, L1, V) with strides, copying only when that's impossible."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    V = logits.shape[-1]
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    if logits.dim() > 3:
        logits = logits.reshape(-1, V)
    if logits.dim() == 2:
        return logits, 1, V, logits.stride(0), 0
    # A slice like logits[:, :-1] of a (B, T+1, V) tensor is (B, T, V) with row strides ((T+1) V, V): no copy.
    L0, L1, _ = logits.shape
    return logits, L1, V, logits.stride(0), logits.stride(1)


def _forward(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    rows, L1, V, stride_0, stride_1 = _as_rows(logits)
    N = tokens.numel()
    flat_tokens = tokens.reshape(-1)
    logprobs = torch.empty(N, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logprobs)
    lse = torch.empty_like(logprobs)
    if N > 0:
        _token_logprobs_fwd_kernel[(N,)](
            rows,
            flat_tokens,
            logprobs,
            entropy,
            lse,
            L1,
            V,
            stride_0,
            stride_1,
            1.0 / temperature,
            BLOCK_V=_block_v(V),
            num_warps=8,
            enable_fp_fusion=FP_FUSION,
        )
    return logprobs, entropy, lse


def _backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, temperature, out=None):
    """dL/dlogits (N, V) in the logits' dtype; `out` may be the logits themselves (each element is read, then
    overwritten by the same program), which the fused linear op uses to keep one chunk buffer."""
    rows, L1, V, stride_0, stride_1 = _as_rows(logits)
    N = tokens.numel()
    grad_logits = torch.empty((N, V), dtype=logits.dtype, device=logits.device) if out is None else out
    if grad_logprobs is None:
        grad_logprobs = torch.zeros(N, dtype=torch.float32, device=logits.device)
    has_grad_entropy = grad_entropy is not None
    grad_entropy = grad_entropy if has_grad_entropy else grad_logprobs  # unread placeholder
    if N > 0:
        _token_logprobs_bwd_kernel[(N,)](
            rows,
            grad_logits,
            tokens.reshape(-1),
            lse,
            entropy,
            grad_logprobs.reshape(-1).float().contiguous(),
            grad_entropy.reshape(-1).float().contiguous(),
            L1,
            V,
            stride_0,
            stride_1,
            1.0 / temperature,
            HAS_GRAD_ENTROPY=has_grad_entropy,
            BLOCK_V=_block_v(V),
            num_warps=8,
            enable_fp_fusion=FP_FUSION,
        )
    return grad_logits


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        logprobs, entropy, lse = _forward(logits, tokens, temperature)
        ctx.save_for_backward(logits, tokens, lse, entropy)
        # An output nobody differentiated (the entropy, when only `token_logprobs` was called) then reaches backward
        # as None rather than as zeros, and the kernel skips its term (HAS_GRAD_ENTROPY=False).
        ctx.set_materialize_grads(False)
        ctx.temperature = temperature
        return logprobs.view(tokens.shape), entropy.view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, tokens, lse, entropy = ctx.saved_tensors
        grad_logits = _backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, ctx.temperature)
        return grad_logits.view(logits.shape), None, None


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    return TokenLogprobsFunction.apply(logits, tokens, float(temperature))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return TokenLogprobsFunction.apply(logits, tokens, float(temperature))[0]
