"""LM head + log-probs (+ entropy) without materializing the (N, V) logits: the tiled algorithm.

For N tokens, hidden size H and vocabulary V, the unfused path writes the logits (N, V), a float32 log-softmax of
the same size, and keeps them for the backward. Here the logits exist one (R, C) tile at a time, R rows by C
vocabulary columns, with C chosen so a tile is at most 1/16 of the logits (usually R = N: all rows, a slice of V):

  forward   for each vocabulary slice c and row block r: z = hidden_r @ W_c^T + b_c (scaled by 1/temperature);
            the chunk kernel reduces the tile to per-row (lse_c, H_c, logp_c), merged across slices online:
                lse = logaddexp(lse_A, lse_B)
                H   = w_A (H_A + lse - lse_A) + w_B (H_B + lse - lse_B),   w_X = exp(lse_X - lse)
            (each term >= 0, so no cancellation), and z_target = logp_c + lse_c from the slice holding the token.
  backward  with the saved per-row lse and H every tile's gradient is independent of the others:
                dz = [g_logp (onehot - p) - g_H p (log p + H)] / temperature,   p = exp(z - lse)
            grad_hidden += dz @ W_c   (an (N, H) float32 accumulator)
            grad_W_c     = dz^T @ hidden   (all N rows of slice c at once: no (V, H) float32 accumulator)
            grad_b_c     = sum_rows dz

Why recompute the logits in the backward instead of computing the gradients in the forward (as a fused
cross-entropy does): the log-probs feed the PPO loss, so the per-token upstream gradients g_logp, g_H are unknown
in the forward and do not factor out of grad_W = sum_n g_n (...). Storing the logits is what we avoid, so the
backward pays one extra matmul (4 instead of 3) and never holds more than one tile.

Why slices of V rather than blocks of rows: grad_W_c of a slice is then one matmul over all rows (fp32
accumulation inside the GEMM, one rounding, as in the unfused version) instead of a sum over row blocks that
needs a (V, H) float32 accumulator as big as half the bf16 logits at N = 8192, H = 2048. The accumulator we do need,
grad_hidden (N, H) float32, is 2H/V of the bf16 logits (2.7% for Qwen's V).

Products accumulate in float32 throughout. The per-tile reductions are pluggable (`ChunkKernels`): plain PyTorch
here (the torch backend of `linear_token_logprobs`), the C++ kernels in `fastppo.ops.native`, the Triton
token-logprob kernels in `kernels/linear_logprobs.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# A tile holds at most this many logits (and at most 1/TILE_FRACTION of them): 2^27 is 256 MiB in bf16. Narrower
# slices cost per-slice overhead (small GEMMs, one reduction launch each): 1/16 is where the fused forward + backward
# kept up with the materialized logits on the bench's CPU shapes (bench_ops' linear_token_logprobs rows).
MAX_TILE_ELEMENTS = 1 << 27
TILE_FRACTION = 16


class ChunkKernels(NamedTuple):
    # (logits (R, C), tokens (R,) in [0, C), temperature) -> (logprobs, entropy, logsumexp), each (R,) float32,
    # all of softmax(logits / temperature) over the tile's C columns.
    forward: callable
    # (logits (R, C), tokens (R,), lse, entropy, grad_logprobs, grad_entropy or None, temperature) -> dlogits
    # (R, C), with the row-wide lse and entropy; may overwrite `logits`.
    backward: callable
    # Run the tile matmuls in float32 (exact logits from bf16/fp16 inputs) rather than in the inputs' dtype (tensor
    # cores, logits rounded like the unfused model's).
    upcast: bool
    # The backward takes token -1 for "this row's target lies in another slice" (no onehot term). Without this
    # the driver passes the clamped index and subtracts the onehot term afterwards, exact only in a float32 tile.
    accepts_no_target: bool = False


def _as_float(logits):
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _torch_chunk_forward(logits, tokens, temperature):
    z = _as_float(logits) / temperature  # (R, C), a fresh tile that the steps below may overwrite
    target = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    m = z.amax(-1, keepdim=True)
    m.masked_fill_(m == float("-inf"), 0.0)  # an all -inf row: s = 0, lse = -inf
    z.sub_(m)  # relative to the row max, so the entropy sum loses no precision at large logits
    e = z.exp()
    s = e.sum(-1)
    a = e.mul_(z.masked_fill_(e == 0, 0.0)).sum(-1)  # sum e (z - m), with 0 * -inf taken as 0
    lse = m.squeeze(-1) + s.log()
    return target - lse, s.log() - a / s, lse


def _torch_chunk_backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, temperature):
    logp = (_as_float(logits) / temperature).sub_(lse.unsqueeze(-1))  # (R, C)
    grad = logp.exp()  # p, turned into the gradient in place
    if grad_entropy is not None:
        term = logp.add_(entropy.unsqueeze(-1)).masked_fill_(grad == 0, 0.0).mul_(grad)  # p (log p + H)
        grad.mul_(-grad_logprobs.unsqueeze(-1)).sub_(term.mul_(grad_entropy.unsqueeze(-1)))
    else:
        grad.mul_(-grad_logprobs.unsqueeze(-1))
    has_target = (tokens >= 0).to(grad.dtype)  # token -1: the target lies in another vocabulary slice
    grad.scatter_add_(-1, tokens.clamp(min=0).unsqueeze(-1), (grad_logprobs * has_target).unsqueeze(-1))
    return grad.div_(temperature)


TORCH_KERNELS = ChunkKernels(_torch_chunk_forward, _torch_chunk_backward, upcast=True, accepts_no_target=True)


def tile_shape(N: int, V: int) -> tuple[int, int]:
    """(rows, columns) of a logits tile: at most 1/TILE_FRACTION of the (N, V) logits and MAX_TILE_ELEMENTS; all
    rows when that leaves a useful width. Widths are multiples of 4096 (the Triton kernels' block) or of 128 when
    large enough, so weight slices stay aligned."""
    if N == 0:
        return 1, V
    budget = max(1, min(N * V // TILE_FRACTION, MAX_TILE_ELEMENTS))
    cols = max(1, budget // N)
    for granule in (4096, 128):
        if cols >= granule:
            cols -= cols % granule
            break
    cols = min(cols, V)
    rows = min(N, max(1, MAX_TILE_ELEMENTS // cols))
    return rows, cols


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, upcast: bool) -> torch.dtype:
    """The dtype of the tile matmuls: float32 (float64 for float64 inputs) when upcasting; else the autocast dtype
    when autocast is on, as the unfused `lm_head(hidden)` would use; else the inputs' promoted dtype."""
    promoted = torch.promote_types(hidden.dtype, weight.dtype)
    if upcast:
        return torch.promote_types(promoted, torch.float32)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return promoted


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 acc, without rounding the product to a's dtype first (summing bf16-rounded
    partial products over many slices would bias the gradient)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and torch.cuda.get_device_capability(acc.device)[0] >= 8:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # no fp32-output GEMM for these inputs (CPU): a rounded product, as the unfused version on CPU
        acc += (a @ b).to(acc.dtype)


def _merge(lse, entropy, lse_c, entropy_c):
    """Online merge of per-row (logsumexp, entropy) over two disjoint sets of columns; in place into lse, entropy."""
    total = torch.logaddexp(lse, lse_c)
    merged = torch.zeros_like(entropy)
    for lse_x, entropy_x in ((lse, entropy), (lse_c, entropy_c)):
        w = torch.exp(lse_x - total)  # 0 for a set with no mass yet (lse_x = -inf)
        merged += torch.where(w > 0, w * (entropy_x + (total - lse_x)), 0.0)
    lse.copy_(total)
    entropy.copy_(merged)


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, kernels):
        H = hidden.shape[-1]
        flat_hidden = hidden.reshape(-1, H)  # (N, H)
        flat_tokens = tokens.reshape(-1).long()  # (N,)
        N, V = flat_hidden.shape[0], weight.shape[0]
        dtype = compute_dtype(hidden, weight, kernels.upcast)
        stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        lse = torch.full((N,), float("-inf"), dtype=stats_dtype, device=hidden.device)
        entropy = torch.zeros_like(lse)
        target = torch.full_like(lse, float("nan"))  # z/T at the token; nan if a token is out of [0, V)
        R, C = tile_shape(N, V)
        # Autocast off: the tiles' dtype is chosen once (compute_dtype) so the backward recomputes the same logits.
        with torch.autocast(hidden.device.type, enabled=False):
            h = flat_hidden.to(dtype)
            for v0 in range(0, V, C):
                w_c = weight[v0 : v0 + C].to(dtype)  # (C, H): a float32 copy of one slice at most, never all of W
                b_c = None if bias is None else bias[v0 : v0 + C].to(dtype)
                local = flat_tokens - v0
                in_slice = (local >= 0) & (local < w_c.shape[0])
                local = local.clamp(0, w_c.shape[0] - 1)
                for r0 in range(0, N, R):
                    rows = slice(r0, r0 + R)
                    logits = torch.nn.functional.linear(h[rows], w_c, b_c)  # (R, C): the only logits alive
                    logp_c, entropy_c, lse_c = kernels.forward(logits, local[rows], temperature)
                    del logits
                    lse_c, entropy_c = lse_c.to(stats_dtype), entropy_c.to(stats_dtype)
                    target[rows] = torch.where(in_slice[rows], logp_c.to(stats_dtype) + lse_c, target[rows])
                    _merge(lse[rows], entropy[rows], lse_c, entropy_c)
        ctx.save_for_backward(flat_hidden, weight, bias, flat_tokens, lse, entropy)
        ctx.hidden_shape, ctx.temperature, ctx.kernels, ctx.dtype = hidden.shape, temperature, kernels, dtype
        # An entropy nobody differentiated (with_entropy=False) arrives as None, not zeros: the tile kernels skip it.
        ctx.set_materialize_grads(False)
        return (target - lse).view(tokens.shape), entropy.view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        flat_hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        kernels, dtype, temperature = ctx.kernels, ctx.dtype, ctx.temperature
        N, V = flat_hidden.shape[0], weight.shape[0]
        g_logp = torch.zeros_like(lse) if grad_logprobs is None else grad_logprobs.reshape(-1).to(lse.dtype)
        g_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).to(lse.dtype)
        acc_dtype = lse.dtype  # float32 (float64 for float64 inputs)
        grad_hidden = (
            torch.zeros(flat_hidden.shape, dtype=acc_dtype, device=flat_hidden.device) if need_hidden else None
        )
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.zeros(V, dtype=acc_dtype, device=weight.device) if need_bias else None
        R, C = tile_shape(N, V)
        with torch.autocast(flat_hidden.device.type, enabled=False):
            h = flat_hidden.to(dtype)
            for v0 in range(0, V, C):
                w_c = weight[v0 : v0 + C].to(dtype)
                b_c = None if bias is None else bias[v0 : v0 + C].to(dtype)
                width = w_c.shape[0]
                local = tokens - v0
                no_target = (local < 0) | (local >= width)
                local = local.masked_fill(no_target, -1) if kernels.accepts_no_target else local.clamp(0, width - 1)
                # One row block in the weight's own dtype (float32 weights, the usual case): the product goes straight
                # into grad_W's slice; else an accumulator over the row blocks, rounded to the weight's dtype once.
                direct = need_weight and 0 < N <= R and weight.dtype == acc_dtype == dtype
                acc_w = None
                if need_weight:
                    acc_w = (
                        grad_weight[v0 : v0 + width] if direct else h.new_zeros((width, h.shape[1]), dtype=acc_dtype)
                    )
                for r0 in range(0, N, R):
                    rows = slice(r0, r0 + R)
                    logits = torch.nn.functional.linear(h[rows], w_c, b_c)  # (R, C), recomputed
                    d_entropy = None if g_entropy is None else g_entropy[rows]
                    dz = kernels.backward(
                        logits, local[rows], lse[rows], entropy[rows], g_logp[rows], d_entropy, temperature
                    )
                    del logits
                    if not kernels.accepts_no_target:  # take back the onehot term added at the clamped column
                        fix = torch.where(no_target[rows], g_logp[rows] / temperature, 0.0).to(dz.dtype)
                        dz.scatter_add_(-1, local[rows].unsqueeze(-1), -fix.unsqueeze(-1))
                    dz = dz.to(dtype)
                    if need_hidden:
                        _addmm_fp32(grad_hidden[rows], dz, w_c)
                    if direct:
                        torch.mm(dz.t(), h[rows], out=acc_w)
                    elif need_weight:
                        _addmm_fp32(acc_w, dz.t(), h[rows])
                    if need_bias:
                        grad_bias[v0 : v0 + width] += dz.sum(0, dtype=acc_dtype)
                    del dz
                if need_weight and not direct:
                    grad_weight[v0 : v0 + width] = acc_w
        grad_hidden = grad_hidden.to(flat_hidden.dtype).view(ctx.hidden_shape) if need_hidden else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_token_logprobs_with(kernels: ChunkKernels, hidden, weight, tokens, temperature, bias, with_entropy):
    """`linear_token_logprobs` with the given per-tile kernels (torch, native or Triton)."""
    logprobs, entropy = LinearTokenLogprobsFunction.apply(hidden, weight, bias, tokens, float(temperature), kernels)
    return (logprobs, entropy) if with_entropy else logprobs


def linear_token_logprobs(hidden, weight, tokens, temperature=1.0, bias=None, with_entropy=False):
    return linear_token_logprobs_with(TORCH_KERNELS, hidden, weight, tokens, temperature, bias, with_entropy)
