"""LM head + log-probs (+ entropy) on the GPU without materializing the (N, V) logits.

The algorithm is the chunked one of `fastppo.ops.chunked` (read its docstring for the math): tokens go through in
chunks, each chunk's logits (C, V) come from one cuBLAS matmul in the weight's dtype (tensor cores, the same
rounding as the unfused model) and are reduced by the Triton token-logprob kernels of `token_logprobs.py`:

  forward   one pass over the chunk's logits: online logsumexp, target gather, entropy accumulator
  backward  the chunk's logits are recomputed, then overwritten in place by dlogits (each element is read, then
            written, by the same program), so the chunk needs no second (C, V) buffer; two matmuls give the
            hidden and weight gradients.

Peak extra memory is one (C, V) chunk in the model's dtype plus the weight-gradient accumulator, against the (N, V)
logits (and autograd's saved copy) of the unfused path.
"""

from __future__ import annotations

from fastppo.kernels.token_logprobs import _backward, _forward

from fastppo.ops.chunked import ChunkKernels, linear_token_logprobs_with


def _chunk_forward(logits, tokens, temperature):
    return _forward(logits, tokens, temperature)


def _chunk_backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, temperature):
    return _backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, temperature, out=logits)


TRITON_KERNELS = ChunkKernels(_chunk_forward, _chunk_backward, upcast=False)


def linear_token_logprobs(hidden, weight, tokens, temperature=1.0, bias=None, with_entropy=False):
    return linear_token_logprobs_with(TRITON_KERNELS, hidden, weight, tokens, temperature, bias, with_entropy)
