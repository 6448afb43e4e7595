"""LM head + log-probs (+ entropy) on the GPU without materializing the (N, V) logits.

The algorithm is the tiled one of `fastppo.ops.linear_logprobs` (read its docstring for the math): the logits exist one
(R, C) tile at a time (all N rows by a slice of the vocabulary, at most 1/32 of the logits), each produced by one
cuBLAS matmul in the compute dtype (bf16 under autocast or for bf16 weights: tensor cores, the same rounding as the
unfused model) and reduced by the Triton token-logprob kernels of `token_logprobs.py`:

  forward   one pass over the tile: online logsumexp, entropy accumulator, the log-prob at the (clamped) token;
            the driver merges the slices' (lse, entropy) per row and keeps the target from the slice holding it.
  backward  the tile is recomputed, then overwritten in place by dlogits (each element is read, then written, by
            the same program), so the backward needs no second tile buffer; token -1 marks a row whose target lies
            in another slice (the kernel's onehot test never matches it). Two matmuls per tile give the hidden
            gradient (accumulated in float32 with cuBLAS's fp32-output GEMM) and the weight slice's gradient.

Tokens outside [0, V) are rejected by `fastppo.ops` on every backend; here the forward's token index is clamped to
each slice and the backward's is -1 or in the slice, so no kernel reads outside a tile even when called directly
(the target of an out-of-range token is then nan, as in `fastppo.ops.linear_logprobs`).

Why a hybrid rather than one Triton kernel doing the tl.dot too: the tile matmuls are 4 large GEMMs that cuBLAS
runs near peak, and they dominate the time; the kernels only add one read (forward) and one read + write
(backward) of each tile. Peak extra memory is one tile in the compute dtype, the (N, H) float32 hidden-gradient
accumulator and one (C, H) float32 weight-slice accumulator.
"""

from __future__ import annotations

from fastppo.kernels.token_logprobs import _backward, _forward

from fastppo.ops.linear_logprobs import ChunkKernels, linear_token_logprobs_with


def _chunk_forward(logits, tokens, temperature):
    return _forward(logits, tokens, temperature)


def _chunk_backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, temperature):
    return _backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, temperature, out=logits)


TRITON_KERNELS = ChunkKernels(_chunk_forward, _chunk_backward, upcast=False, accepts_no_target=True)


def linear_token_logprobs(hidden, weight, tokens, temperature=1.0, bias=None, with_entropy=False):
    return linear_token_logprobs_with(TRITON_KERNELS, hidden, weight, tokens, temperature, bias, with_entropy)
