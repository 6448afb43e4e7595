"""The native C++ kernels of `csrc/` (`fastppo._C`, registered as `torch.ops.fastppo.*`), with their autograd.

setup.py builds the extension when torch and a compiler are present at install time, else it is compiled on first
use (`fastppo.ops.native_build`); without either the dispatcher falls back to the PyTorch reference and says why
(`fastppo doctor`). The C++ kernels compute in float32, except those of FLOAT64_OPS: the dispatcher runs the
reference for the float64 inputs of the others.
"""

from __future__ import annotations

import torch

from fastppo.ops import native_build
from fastppo.ops.linear_logprobs import ChunkKernels, linear_token_logprobs_with
from fastppo.ops.reference import GROUP_ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, named_policy_stats

_NATIVE = native_build.load()  # prebuilt, compiled on first use, or None: the dispatcher then falls back
_C, IMPORT_ERROR = _NATIVE.module, None if _NATIVE.module is not None else _NATIVE.detail

NATIVE_OPS = (
    "token_logprobs",
    "token_logprobs_and_entropy",
    "linear_token_logprobs",
    "sample_tokens",
    "decode_attention",
    "kl_penalty",
    "shape_rewards",
    "gae",
    "length_adaptive_lam",
    "group_advantages",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
)
# The ops whose C++ kernels take float64 inputs and compute in float64 (see dispatch.implementation).
FLOAT64_OPS = ("kl_penalty", "masked_whiten")


def unavailable_reason(op: str, device_type: str) -> str | None:
    if _C is None:
        return IMPORT_ERROR
    if device_type != "cpu":
        return "the native extension was built for CPU only"
    if op not in NATIVE_OPS:
        return f"no native kernel for {op}"
    return None


# ----------------------------------------------------------------------------------------------
# log-probs
# ----------------------------------------------------------------------------------------------


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) view of (..., V) logits with unit stride along V (a copy only when unavoidable)."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        rows, flat_tokens = _rows(logits), tokens.reshape(-1).long()
        logprobs, entropy, lse = torch.ops.fastppo.token_logprobs_forward(rows, flat_tokens, 1.0 / temperature)
        ctx.save_for_backward(rows, flat_tokens, lse, entropy)
        ctx.temperature, ctx.shape = temperature, logits.shape
        ctx.set_materialize_grads(False)  # an entropy nobody differentiated arrives as None: its term is skipped
        return logprobs.view(tokens.shape), entropy.view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        rows, tokens, lse, entropy = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        grad = torch.ops.fastppo.token_logprobs_backward(
            rows,
            tokens,
            lse,
            entropy,
            grad_logprobs.reshape(-1),
            None if grad_entropy is None else grad_entropy.reshape(-1),
            1.0 / ctx.temperature,
        )
        return grad.view(ctx.shape), None, None


def token_logprobs_and_entropy(logits, tokens, temperature=1.0):
    return _TokenLogprobs.apply(logits, tokens, float(temperature))


def token_logprobs(logits, tokens, temperature=1.0):
    return _TokenLogprobs.apply(logits, tokens, float(temperature))[0]


def _chunk_forward(logits, tokens, temperature):
    logprobs, entropy, lse = torch.ops.fastppo.token_logprobs_forward(logits, tokens.long(), 1.0 / temperature)
    return logprobs, entropy, lse


def _chunk_backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, temperature):
    return torch.ops.fastppo.token_logprobs_backward(
        logits, tokens.long(), lse, entropy, grad_logprobs, grad_entropy, 1.0 / temperature
    )


# The chunked LM head + log-probs of fastppo.ops.linear_logprobs, with the native kernels on each (C, V) chunk.
NATIVE_CHUNK_KERNELS = ChunkKernels(_chunk_forward, _chunk_backward, upcast=True)


def linear_token_logprobs(hidden, weight, tokens, temperature=1.0, bias=None, with_entropy=False):
    return linear_token_logprobs_with(NATIVE_CHUNK_KERNELS, hidden, weight, tokens, temperature, bias, with_entropy)


def sample_tokens(logits, uniform, temperature=1.0):
    return tuple(torch.ops.fastppo.sample_tokens(_rows(logits), uniform, 1.0 / temperature))


def decode_attention(qkv, cos, sin, keys, values, key_mask, heads, scale):
    return torch.ops.fastppo.decode_attention(qkv, cos, sin, keys, values, key_mask, heads, scale)


# ----------------------------------------------------------------------------------------------
# KL and reward shaping
# ----------------------------------------------------------------------------------------------


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, estimator_index):
        ctx.save_for_backward(logprobs, ref_logprobs)
        ctx.estimator = estimator_index
        return torch.ops.fastppo.kl_penalty_forward(logprobs, ref_logprobs, estimator_index).view(logprobs.shape)

    @staticmethod
    def backward(ctx, grad):
        logprobs, ref_logprobs = ctx.saved_tensors
        d = torch.ops.fastppo.kl_penalty_backward(logprobs, ref_logprobs, grad, ctx.estimator).view(grad.shape)
        return d.to(logprobs.dtype), (-d).to(ref_logprobs.dtype), None


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    return _KLPenalty.apply(logprobs, ref_logprobs, KL_ESTIMATORS.index(estimator))


def shape_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef, estimator="k1"):
    rewards, kl = torch.ops.fastppo.shape_rewards(
        scores, logprobs, ref_logprobs, response_mask, kl_coef, KL_ESTIMATORS.index(estimator)
    )
    return rewards, kl


# ----------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------


def gae(rewards, values, response_mask, gamma=1.0, lam=0.95, critic_lam=None):
    per_row = isinstance(lam, torch.Tensor)
    advantages, returns = torch.ops.fastppo.gae(
        rewards,
        values,
        response_mask,
        gamma,
        lam if per_row else None,
        0.0 if per_row else float(lam),
        -1.0 if critic_lam is None else float(critic_lam),
    )
    return advantages, returns


def length_adaptive_lam(response_mask, alpha):
    return torch.ops.fastppo.length_adaptive_lam(response_mask, float(alpha))


def group_advantages(scores, group_size, estimator, eps=1e-6):
    return torch.ops.fastppo.group_advantages(
        scores, group_size, GROUP_ADVANTAGE_ESTIMATORS.index(estimator), float(eps)
    )


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    return torch.ops.fastppo.masked_whiten(x, mask, shift_mean, eps)


# ----------------------------------------------------------------------------------------------
# losses: the gradient comes out of the forward pass; backward scales it
# ----------------------------------------------------------------------------------------------


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, *args):
        loss, grad, stats = kernel(x, *args)
        ctx.save_for_backward(grad)
        ctx.input_dtype = x.dtype
        ctx.n_args = len(args)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.input_dtype), None, *([None] * ctx.n_args)


def _denominator(denominator):
    return -1.0 if denominator is None else float(denominator)


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    response_mask,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    denominator=None,
    ref_logprobs=None,
    kl_loss_coef=0.0,
    kl_estimator="k3",
    token_weights=None,
):
    clip_high = clip_low if clip_high is None else clip_high
    loss, stats = _FusedLoss.apply(
        logprobs,
        torch.ops.fastppo.ppo_policy_loss,
        old_logprobs,
        advantages,
        response_mask,
        float(clip_low),
        float(clip_high),
        -1.0 if dual_clip is None else float(dual_clip),
        LOSS_AGGREGATIONS.index(agg),
        _denominator(denominator),
        ref_logprobs,
        float(kl_loss_coef),
        KL_ESTIMATORS.index(kl_estimator),
        None if token_weights is None else token_weights.detach(),
    )
    return loss, named_policy_stats(stats, ref_logprobs is not None)


def ppo_value_loss(values, old_values, returns, response_mask, clip=0.2, agg="token-mean", denominator=None):
    loss, stats = _FusedLoss.apply(
        values,
        torch.ops.fastppo.ppo_value_loss,
        old_values,
        returns,
        response_mask,
        -1.0 if clip is None else float(clip),
        LOSS_AGGREGATIONS.index(agg),
        _denominator(denominator),
    )
    return loss, {"value_clip_frac": stats[0]}
