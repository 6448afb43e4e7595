"""fastppo's fused PPO ops: the public API.

Every op checks its inputs here, once, then runs the implementation that `dispatch` picks for the tensors' device
(Triton on CUDA, native C++ on CPU, the PyTorch reference otherwise). The semantics of each op are those of its
reference in `fastppo.ops.reference`; read that module for the math.
"""

from __future__ import annotations

import torch

from fastppo.ops import reference
from fastppo.ops.dispatch import BACKENDS, OPS, get_backend, implementation, report, select, set_backend, use_backend
from fastppo.ops.reference import GROUP_ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, masked_mean

__all__ = [
    "BACKENDS",
    "GROUP_ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "OPS",
    "decode_attention",
    "gae",
    "get_backend",
    "group_advantages",
    "kl_penalty",
    "length_adaptive_lam",
    "linear_token_logprobs",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reference",
    "report",
    "sample_tokens",
    "select",
    "set_backend",
    "shape_rewards",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "use_backend",
]


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, x in rest:
        if x.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {first_name} has {tuple(first.shape)}")


def _check_tokens(tokens: torch.Tensor, lead_shape: torch.Size, vocab_size: int, what: str) -> None:
    """dtype, shape, and every token in [0, vocab_size): one min/max reduction (a device sync on CUDA), so that no
    backend sees a token it would have to read outside the row for (the reference's gather raises, a GPU kernel
    would read garbage or fault)."""
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be int64 or int32, got {tokens.dtype}")
    if tokens.shape != lead_shape:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)} but {what} has leading shape {tuple(lead_shape)}")
    if tokens.numel() == 0 or tokens.device.type == "meta":
        return
    low, high = (int(x) for x in torch.aminmax(tokens))
    if low < 0 or high >= vocab_size:
        raise ValueError(f"tokens must lie in [0, V={vocab_size}), got values in [{low}, {high}]")


def _check_2d_mask(response_mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, x in tensors.items():
        if x.dim() != 2:
            raise ValueError(f"{name} must be (B, T), got shape {tuple(x.shape)}")
        _check_float(name, x)
    _check_same_shape(**tensors, response_mask=response_mask)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# ----------------------------------------------------------------------------------------------
# log-probs
# ----------------------------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 log softmax(logits / temperature)[tokens]. logits (..., V) fp32/bf16/fp16, tokens (...) -> (...).
    A token outside [0, V) raises ValueError, whatever the backend (the Triton kernel masks its load as well)."""
    _check_float("logits", logits)
    _check_tokens(tokens, logits.shape[:-1], logits.shape[-1], "logits")
    _check_temperature(temperature)
    return implementation("token_logprobs", logits.device.type, logits.dtype)(logits, tokens, temperature)


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy), both float32 (...), from one pass over logits (..., V). Both are differentiable; when
    only the log-probs get a gradient, the backward skips the entropy's term. A token outside [0, V) raises."""
    _check_float("logits", logits)
    _check_tokens(tokens, logits.shape[:-1], logits.shape[-1], "logits")
    _check_temperature(temperature)
    return implementation("token_logprobs_and_entropy", logits.device.type, logits.dtype)(logits, tokens, temperature)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    with_entropy: bool = False,
):
    """Log-probs (and entropy) of `tokens` under softmax((hidden @ weight.T + bias) / temperature),
    without materializing the (..., V) logits. hidden (..., H), weight (V, H), bias (V,), tokens (...). A token
    outside [0, V) raises ValueError, whatever the backend."""
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H={hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (V={weight.shape[0]},), got {tuple(bias.shape)}")
    _check_tokens(tokens, hidden.shape[:-1], weight.shape[0], "hidden")
    _check_temperature(temperature)
    impl = implementation("linear_token_logprobs", hidden.device.type, torch.promote_types(hidden.dtype, weight.dtype))
    return impl(hidden, weight, tokens, temperature, bias, with_entropy)


def sample_tokens(logits: torch.Tensor, uniform: torch.Tensor, temperature: float = 1.0):
    """(tokens, logprobs): (B,) int64 tokens drawn from softmax(logits / temperature), logits (B, V), one uniform
    (B,) number in [0, 1) per row, and (B,) float32 each drawn token's log-prob under that distribution (the
    sampler has the row's max and normalizer already: the decode's old log-probs cost nothing more); token -1 and
    log-prob nan for a row that is no distribution. Not differentiable: the decode loop's sampler."""
    _check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if uniform.shape != logits.shape[:1]:
        raise ValueError(f"uniform must be (B={logits.shape[0]},), got shape {tuple(uniform.shape)}")
    _check_temperature(temperature)
    return implementation("sample_tokens", logits.device.type, logits.dtype)(logits, uniform, temperature)


def decode_attention(qkv, cos, sin, keys, values, key_mask, heads: int, scale: float) -> torch.Tensor:
    """(B, heads D): one decode step of rotary attention for one new token per row, its rotated key and its value
    written into the cache (keys, values (B, G, L, D)) at position key_mask.shape[1] - 1 in place; qkv (B, (heads +
    2 G) D) unrotated, cos/sin (B, D), key_mask (B, n) bool. See `reference.decode_attention`. Not differentiable."""
    for name, x in (("qkv", qkv), ("cos", cos), ("sin", sin), ("keys", keys), ("values", values)):
        _check_float(name, x)
    if keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(f"keys and values must be (B, G, L, D) alike, got {tuple(keys.shape)}, {tuple(values.shape)}")
    B, G, L, D = keys.shape
    if heads <= 0 or heads % G or D % 2:
        raise ValueError(f"heads ({heads}) must be a positive multiple of G ({G}), and the head size ({D}) even")
    if qkv.shape != (B, (heads + 2 * G) * D):
        raise ValueError(f"qkv must be (B, (heads + 2 G) D) = {(B, (heads + 2 * G) * D)}, got {tuple(qkv.shape)}")
    if cos.shape[0] != B or cos.numel() != B * D or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must hold (B, D) = {(B, D)} values, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if key_mask.dim() != 2 or key_mask.shape[0] != B or not 1 <= key_mask.shape[1] <= L:
        raise ValueError(f"key_mask must be (B, n) with 1 <= n <= L = {L}, got {tuple(key_mask.shape)}")
    if not qkv.dtype == keys.dtype == values.dtype:
        raise ValueError(f"qkv, keys and values must share a dtype, got {qkv.dtype}, {keys.dtype}, {values.dtype}")
    impl = implementation("decode_attention", qkv.device.type, qkv.dtype)
    return impl(qkv, cos, sin, keys, values, key_mask, heads, scale)


# ----------------------------------------------------------------------------------------------
# KL and reward shaping
# ----------------------------------------------------------------------------------------------


def _check_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate: k1, k2, k3 or abs of d = logprobs - ref_logprobs."""
    _check_float("logprobs", logprobs)
    _check_float("ref_logprobs", ref_logprobs)
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    _check_estimator(estimator)
    return implementation("kl_penalty", logprobs.device.type, logprobs.dtype)(logprobs, ref_logprobs, estimator)


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both (B, T) float32: -kl_coef * kl per token plus each score at its row's last valid token."""
    _check_2d_mask(response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    _check_float("scores", scores)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be (B={logprobs.shape[0]},), got {tuple(scores.shape)}")
    _check_estimator(estimator)
    impl = implementation("shape_rewards", logprobs.device.type, logprobs.dtype)
    return impl(scores, logprobs, ref_logprobs, response_mask, float(kl_coef), estimator)


# ----------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float | torch.Tensor = 0.95,
    critic_lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), (B, T) float32, by GAE(gamma, lam) over right-padded responses; 0 at padding. `lam`
    is a float or a (B,) tensor (one per sequence); with `critic_lam` the returns are GAE(critic_lam) advantages +
    values, from the same single scan (decoupled GAE)."""
    _check_2d_mask(response_mask, rewards=rewards, values=values)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if critic_lam is not None and not 0.0 <= critic_lam <= 1.0:
        raise ValueError(f"critic_lam must lie in [0, 1] or be None, got {critic_lam}")
    if isinstance(lam, torch.Tensor):
        _check_float("lam", lam)
        if lam.shape != rewards.shape[:1]:
            raise ValueError(f"lam must be a float or (B={rewards.shape[0]},), got shape {tuple(lam.shape)}")
        if lam.device != rewards.device:
            raise ValueError(f"lam is on {lam.device} but rewards are on {rewards.device}")
        if lam.numel() and not bool(((lam >= 0) & (lam <= 1)).all()):
            raise ValueError("every lam must lie in [0, 1]")
    elif not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    else:
        lam = float(lam)
    critic_lam = None if critic_lam is None else float(critic_lam)
    return implementation("gae", rewards.device.type, rewards.dtype)(
        rewards, values, response_mask, float(gamma), lam, critic_lam
    )


def length_adaptive_lam(response_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B,) float32 per-sequence lambda 1 - 1 / (alpha * length), clamped to [0, 1] (0 for an empty row), length =
    the row's valid tokens: VAPO's length-adaptive GAE (alpha 0.05)."""
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (B, T), got shape {tuple(response_mask.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return implementation("length_adaptive_lam", response_mask.device.type)(response_mask, float(alpha))


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """(B,) float32 advantages from (B,) scores of consecutive groups of `group_size` responses to one prompt:
    grpo (r - mean) / (std + eps), dr_grpo r - mean, rloo r - mean of the others; see the reference."""
    _check_float("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got shape {tuple(scores.shape)}")
    if estimator not in GROUP_ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {GROUP_ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(f"scores ({scores.shape[0]} rows) must hold whole groups of group_size={group_size}")
    if estimator == "rloo" and group_size < 2:
        raise ValueError("rloo needs group_size >= 2: a group of one has no other responses for its baseline")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return implementation("group_advantages", scores.device.type, scores.dtype)(
        scores, group_size, estimator, float(eps)
    )


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance), 0 at padding; float32."""
    _check_float("x", x)
    _check_same_shape(x=x, mask=mask)
    return implementation("masked_whiten", x.device.type, x.dtype)(x, mask, shift_mean, float(eps))


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------


def _check_agg(agg: str, denominator: float | None) -> None:
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"agg must be one of {LOSS_AGGREGATIONS}, got {agg!r}")
    if denominator is not None and not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
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
    """PPO's clipped surrogate loss (scalar), plus kl_loss_coef * KL to the reference when ref_logprobs is given,
    and detached stats (ref_kl among them with ref_logprobs); see `reference.ppo_policy_loss`."""
    _check_2d_mask(response_mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    if token_weights is not None:
        _check_2d_mask(response_mask, token_weights=token_weights)
    if not clip_low >= 0 or (clip_high is not None and not clip_high >= 0):
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    _check_agg(agg, denominator)
    if ref_logprobs is not None:
        _check_2d_mask(response_mask, ref_logprobs=ref_logprobs)
    if not kl_loss_coef >= 0:
        raise ValueError(f"kl_loss_coef must be >= 0, got {kl_loss_coef}")
    if kl_loss_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_loss_coef > 0 needs ref_logprobs: the KL term is taken against the reference")
    _check_estimator(kl_estimator)
    impl = implementation("ppo_policy_loss", logprobs.device.type, logprobs.dtype)
    return impl(
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
        float(kl_loss_coef),
        kl_estimator,
        token_weights,
    )


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss (scalar) and detached stats; see `reference.ppo_value_loss`."""
    _check_2d_mask(response_mask, values=values, old_values=old_values, returns=returns)
    if clip is not None and not clip >= 0:
        raise ValueError(f"clip must be >= 0 or None, got {clip}")
    _check_agg(agg, denominator)
    impl = implementation("ppo_value_loss", values.device.type, values.dtype)
    return impl(values, old_values, returns, response_mask, clip, agg, denominator)
