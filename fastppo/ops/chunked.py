"""LM head + log-probs (+ entropy) without materializing the (N, V) logits: the chunked algorithm.

For N tokens, hidden size H and vocabulary V, the unfused path writes the logits (N, V) and autograd keeps them
(and often a float32 log-softmax of the same size) until the backward. Here the tokens are processed in chunks of
C rows, so at most one (C, V) logits buffer lives at a time:

  forward   for each chunk: z = hidden_c @ W^T + b;  keep only logsumexp, entropy and the log-prob per token  (N,)
  backward  for each chunk: recompute z; dz = [g_logp (onehot - p) - g_H p (log p + H)] / temperature  (C, V)
            grad_hidden_c = dz @ W,   grad_W += dz^T @ hidden_c,   grad_b += sum_rows dz

The backward recomputes the chunk's logits instead of storing them: one extra (C, H) x (H, V) matmul per chunk buys
memory O(C V) instead of O(N V). Products accumulate in float32 (matmuls in the weight's dtype accumulate in fp32
inside BLAS; the logits are upcast before the softmax).

The per-chunk softmax steps are pluggable: `ChunkKernels` here are plain PyTorch (this module is the torch
backend of `linear_token_logprobs`); `kernels/linear_logprobs.py` plugs in the Triton token-logprob kernels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Largest chunk of logits held at once, in elements: 2^22 float32 = 16 MiB, small against any activation budget.
MAX_CHUNK_ELEMENTS = 1 << 22


class ChunkKernels(NamedTuple):
    # (logits (C, V) float32, tokens (C,), temperature) -> (logprobs, entropy, logsumexp), each (C,) float32
    forward: callable
    # (logits (C, V), tokens, logsumexp, entropy, grad_logprobs, grad_entropy or None, temperature) -> dlogits (C, V)
    backward: callable
    # Run the chunk matmuls in float32 (exact fp32 logits from bf16/fp16 weights, at the cost of one float32 copy of
    # the weight) rather than in the weight's dtype (tensor cores, logits rounded like the unfused version's).
    upcast: bool


def _torch_chunk_forward(logits, tokens, temperature):
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse.unsqueeze(-1))
    entropy = lse - (p * z.masked_fill(p == 0, 0.0)).sum(-1)
    logprobs = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    return logprobs, entropy, lse


def _torch_chunk_backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, temperature):
    z = logits.float() / temperature
    logp = z - lse.unsqueeze(-1)
    p = torch.exp(logp)
    grad = -grad_logprobs.unsqueeze(-1) * p
    grad.scatter_add_(-1, tokens.unsqueeze(-1), grad_logprobs.unsqueeze(-1))
    if grad_entropy is not None:
        grad -= grad_entropy.unsqueeze(-1) * p * (logp + entropy.unsqueeze(-1)).masked_fill(p == 0, 0.0)
    return grad / temperature


TORCH_KERNELS = ChunkKernels(_torch_chunk_forward, _torch_chunk_backward, upcast=True)


def chunk_size(N: int, V: int) -> int:
    """Rows per chunk: at most MAX_CHUNK_ELEMENTS logits, and at most 1/8 of the rows so the buffer stays well
    under the materialized logits even for small N."""
    return max(1, min(math.ceil(N / 8), MAX_CHUNK_ELEMENTS // V))


def _matmul_operands(weight, bias, upcast):
    if upcast:
        return weight.float(), None if bias is None else bias.float()  # no copy when already float32
    return weight, bias


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, kernels):
        H = hidden.shape[-1]
        flat_hidden = hidden.reshape(-1, H)
        flat_tokens = tokens.reshape(-1)
        N, V = flat_hidden.shape[0], weight.shape[0]
        logprobs = torch.empty(N, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        lse = torch.empty_like(logprobs)
        W, b = _matmul_operands(weight, bias, kernels.upcast)
        C = chunk_size(N, V)
        for start in range(0, N, C):
            rows = slice(start, start + C)
            logits = torch.nn.functional.linear(flat_hidden[rows].to(W.dtype), W, b)  # (C, V): the only logits alive
            logprobs[rows], entropy[rows], lse[rows] = kernels.forward(logits, flat_tokens[rows], temperature)
            del logits
        ctx.save_for_backward(flat_hidden, weight, bias, flat_tokens, lse, entropy)
        ctx.hidden_shape, ctx.temperature, ctx.kernels = hidden.shape, temperature, kernels
        return logprobs.view(tokens.shape), entropy.view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        flat_hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        N, V = flat_hidden.shape[0], weight.shape[0]
        grad_logprobs = (
            torch.zeros(N, device=lse.device) if grad_logprobs is None else grad_logprobs.reshape(-1).float()
        )
        grad_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).float()
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(flat_hidden) if need_hidden else None
        # float32 accumulators: many chunks add into the weight gradient.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_bias else None
        W, b = _matmul_operands(weight, bias, ctx.kernels.upcast)
        C = chunk_size(N, V)
        for start in range(0, N, C):
            rows = slice(start, start + C)
            hidden_c = flat_hidden[rows].to(W.dtype)
            logits = torch.nn.functional.linear(hidden_c, W, b)
            g_entropy = None if grad_entropy is None else grad_entropy[rows]
            dlogits = ctx.kernels.backward(
                logits, tokens[rows], lse[rows], entropy[rows], grad_logprobs[rows], g_entropy, ctx.temperature
            )
            del logits
            dlogits = dlogits.to(W.dtype)
            if need_hidden:
                grad_hidden[rows] = (dlogits @ W).to(grad_hidden.dtype)
            if need_weight:
                grad_weight += (dlogits.t() @ hidden_c).float()
            if need_bias:
                grad_bias += dlogits.float().sum(0)
        grad_hidden = grad_hidden.view(ctx.hidden_shape) if need_hidden else None
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_token_logprobs_with(kernels: ChunkKernels, hidden, weight, tokens, temperature, bias, with_entropy):
    logprobs, entropy = LinearTokenLogprobsFunction.apply(hidden, weight, bias, tokens, float(temperature), kernels)
    return (logprobs, entropy) if with_entropy else logprobs


def linear_token_logprobs(hidden, weight, tokens, temperature=1.0, bias=None, with_entropy=False):
    return linear_token_logprobs_with(TORCH_KERNELS, hidden, weight, tokens, temperature, bias, with_entropy)
