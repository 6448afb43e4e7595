"""Plain-PyTorch references for every fused op: the specification the kernels must meet.

Each function here is written for clarity, not speed. Every backend (Triton in `kernels/`,
native C++ in `csrc/`) is tested against these, computed in float64, on random inputs.

Shapes: B sequences, T response positions, V vocabulary, H hidden size, N = any number of tokens.
Masks are `response_mask` (B, T): 1 for a generated token, 0 for padding. Responses are
right-padded, so a sequence's valid tokens are a prefix of its row.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# The fused backends return ppo_policy_loss's stats as one tensor in this order (ref_kl only with ref_logprobs).
POLICY_STAT_NAMES = ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max", "ref_kl")


def named_policy_stats(stats: torch.Tensor, with_ref: bool) -> dict[str, torch.Tensor]:
    """A fused backend's (6,) stats tensor as ppo_policy_loss's dict."""
    named = dict(zip(POLICY_STAT_NAMES, stats.unbind(), strict=True))
    if not with_ref:
        del named["ref_kl"]
    return named


# ----------------------------------------------------------------------------------------------
# 1. log-probs of the sampled tokens (and the entropy of the distribution)
# ----------------------------------------------------------------------------------------------


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[token] and the entropy of softmax(logits / temperature).

    logits: (..., V) float; tokens: (...) int64. Returns two (...) tensors in float32
    (float64 when the logits are float64).
    """
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scaled = logits.to(out_dtype) / temperature
    logp = torch.log_softmax(scaled, dim=-1)  # (..., V): the tensor the kernels never materialize
    token_logp = logp.gather(-1, tokens.unsqueeze(-1).long()).squeeze(-1)
    p = logp.exp()
    # p log p is 0 where p is 0 (a -inf logit): zero log p there first, so neither the value nor its gradient is nan.
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    return token_logp, entropy


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The log-prob half of `token_logprobs_and_entropy`, without paying for the entropy."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scaled = logits.to(out_dtype) if temperature == 1.0 else logits.to(out_dtype) / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1).long()).squeeze(-1)


def sample_tokens(logits: torch.Tensor, uniform: torch.Tensor, temperature: float = 1.0):
    """(tokens, logprobs): (B,) int64 tokens drawn from softmax(logits / temperature), logits (B, V), by inverse
    CDF: the first token whose cumulative probability exceeds uniform * total, with uniform (B,) in [0, 1) supplied
    by the caller (so every backend draws the same tokens from the same numbers); and (B,) each drawn token's
    log-prob under that distribution, float32 (float64 for float64 logits). A token of probability 0 is never
    drawn. A row that is no distribution (a nan or +inf logit, or every logit -inf) gets token -1, log-prob nan."""
    z = logits.double() / temperature
    bad = z.isnan().any(-1) | (z == float("inf")).any(-1) | (z == float("-inf")).all(-1)
    z = z.masked_fill(bad.unsqueeze(-1), 0.0)
    cdf = torch.softmax(z, dim=-1).cumsum(-1)  # (B, V)
    target = uniform.double().unsqueeze(-1) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=z.shape[-1] - 1)
    logprobs = torch.log_softmax(z, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return tokens.masked_fill(bad, -1), logprobs.masked_fill(bad, float("nan")).to(out_dtype)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    with_entropy: bool = False,
):
    """token_logprobs(hidden @ weight.T + bias, tokens): the LM head and the log-probs in one op.

    hidden: (..., H); weight: (V, H); bias: (V,) or None; tokens: (...). Returns (...) float32 log-probs,
    and the entropy too when `with_entropy`. The fused kernels compute this without the (..., V) logits.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logp, entropy = token_logprobs_and_entropy(logits, tokens, temperature)
    return (logp, entropy) if with_entropy else logp


def rotate_half_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding in the rotate-half layout (Llama, Mistral, Qwen2): x cos + cat(-x2, x1) sin for the halves
    x1, x2 of x's last dimension; cos and sin broadcast against x."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def decode_attention(qkv, cos, sin, keys, values, key_mask, heads: int, scale: float) -> torch.Tensor:
    """One decode step of rotary attention over a KV cache: each row's new token attends over its cached positions.

    qkv (B, (heads + 2 G) D): the new token's query, key and value projections, concatenated, before the rotary
    embedding (G = keys.shape[1] key/value heads, D = keys.shape[3]). cos, sin (B, D): the rotary embedding at each
    row's position, in the rotate-half layout (`rotate_half_embedding`). keys, values (B, G, L, D): the cache, n <=
    L positions in use with n = key_mask.shape[1]; the rotated key and the value are written at position n - 1, in
    place. key_mask (B, n) bool: the positions each row attends to. Returns (B, heads D) in qkv's dtype: head h
    reads key/value head h // (heads / G) (grouped-query attention), softmax(q k^T scale) v over the unmasked
    positions; a row with none gets zeros.
    """
    B, G, D, n = qkv.shape[0], keys.shape[1], keys.shape[3], key_mask.shape[1]
    q, k, v = qkv.double().split([heads * D, G * D, G * D], dim=-1)
    cos, sin = cos.double()[:, None], sin.double()[:, None]  # (B, 1, D)
    q, k = rotate_half_embedding(q.view(B, heads, D), cos, sin), rotate_half_embedding(k.view(B, G, D), cos, sin)
    keys[:, :, n - 1] = k.to(keys.dtype)
    values[:, :, n - 1] = v.view(B, G, D).to(values.dtype)
    past_k = keys[:, :, :n].double().repeat_interleave(heads // G, dim=1)  # (B, heads, n, D)
    past_v = values[:, :, :n].double().repeat_interleave(heads // G, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q, past_k) * scale
    scores = scores.masked_fill(~key_mask.bool()[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row: 0/0
    return torch.einsum("bhn,bhnd->bhd", weights, past_v).reshape(B, heads * D).to(qkv.dtype)


# ----------------------------------------------------------------------------------------------
# 2. per-token KL against the reference, and the shaped reward
# ----------------------------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    With d = logprobs - ref_logprobs (the log-ratio log pi/pi_ref of the sampled token):
      k1 = d                    unbiased, high variance, can be negative
      k2 = d^2 / 2              biased, low variance
      k3 = exp(-d) - 1 + d      unbiased, low variance, never negative (Schulman's estimator)
      abs = |d|
    """
    out_dtype = torch.float64 if torch.float64 in (logprobs.dtype, ref_logprobs.dtype) else torch.float32
    d = logprobs.to(out_dtype) - ref_logprobs.to(out_dtype)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def last_valid_index(response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last valid token; -1 for a row with none."""
    T = response_mask.shape[-1]
    positions = torch.arange(T, device=response_mask.device).expand_as(response_mask)
    return torch.where(response_mask.bool(), positions, torch.full_like(positions, -1)).amax(-1)


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO: -kl_coef * KL at every valid token, plus the sequence's score at its last one.

    scores: (B,); logprobs, ref_logprobs, response_mask: (B, T). Returns (rewards, kl), both (B, T) float32
    and 0 at padded positions. A row with no valid token gets all zeros (its score has nowhere to go).
    """
    out_dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    valid = response_mask.bool()
    kl = kl_penalty(logprobs.to(out_dtype), ref_logprobs.to(out_dtype), estimator)
    kl = torch.where(valid, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    last = last_valid_index(response_mask)  # (B,)
    is_last = torch.arange(rewards.shape[-1], device=rewards.device) == last.unsqueeze(-1)  # (B, T)
    rewards = rewards + torch.where(is_last, scores.to(out_dtype).unsqueeze(-1), torch.zeros_like(rewards))
    return rewards, kl


# ----------------------------------------------------------------------------------------------
# 3. generalized advantage estimation, and whitening
# ----------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float | torch.Tensor = 0.95,
    critic_lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) over right-padded responses: the reverse scan over time.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                                  (critic_lam None)
        R_t     = A'_t + V_t,  A'_t = delta_t + gamma * critic_lam * A'_{t+1}   (decoupled GAE)

    where V_{t+1} and A_{t+1} are 0 when t+1 is padding or past the end: nothing is bootstrapped past a
    sequence's last valid token. `lam` is a float or a (B,) tensor, one lambda per sequence (length-adaptive GAE).
    With `critic_lam` (VC-PPO / VAPO's decoupled GAE, usually 1.0) the critic's targets come from their own lambda,
    so the policy's lambda can trade bias for variance without biasing the value targets. rewards, values,
    response_mask: (B, T). Returns (advantages, returns), (B, T) float32, 0 at padded positions (whatever the inputs
    hold there, even nan).
    """
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    valid = response_mask.bool()
    zero = torch.zeros((), dtype=out_dtype, device=rewards.device)
    rewards = torch.where(valid, rewards.to(out_dtype), zero)
    values = torch.where(valid, values.to(out_dtype), zero)
    B, T = rewards.shape
    lam = torch.as_tensor(lam, dtype=out_dtype, device=rewards.device).expand(B)  # (B,)
    lams = (lam,) if critic_lam is None else (lam, torch.full_like(lam, critic_lam))
    scans = []
    for row_lam in lams:
        advantages = torch.zeros_like(rewards)
        next_value = torch.zeros(B, dtype=out_dtype, device=rewards.device)
        next_advantage = torch.zeros_like(next_value)
        for t in reversed(range(T)):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage = torch.where(valid[:, t], delta + gamma * row_lam * next_advantage, zero)
            advantages[:, t] = advantage
            next_value, next_advantage = values[:, t], advantage  # both 0 at padding: the episode ends there
        scans.append(advantages)
    returns = torch.where(valid, scans[-1] + values, zero)
    return scans[0], returns


def length_adaptive_lam(response_mask: torch.Tensor, alpha: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) per-sequence GAE lambda of VAPO: 1 - 1 / (alpha * length), clamped to [0, 1].

    length is the number of valid tokens of the row, so a long response gets a lambda near 1 (its reward reaches
    its first tokens undiscounted by lambda) and a short one a smaller lambda. A row of length 0 gets 0 (the limit
    of the clamp; its advantages are 0 whatever its lambda). alpha > 0 (VAPO: 0.05). Computed in float64 and
    returned in `dtype`, float32 for every backend (the tests ask the reference for float64).
    """
    length = response_mask.bool().sum(-1).to(torch.float64)  # (B,)
    return (1.0 - 1.0 / (alpha * length)).clamp(0.0, 1.0).to(dtype)


GROUP_ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # what `group_advantages` computes


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """(B,) per-sequence advantages of the critic-free estimators, from the scores of groups of responses.

    Rows are grouped consecutively: B = n_groups * group_size, rows [g * group_size, (g + 1) * group_size) are the
    responses to one prompt. With mean and std over the row's group (std unbiased, Bessel's n - 1, as TRL and the
    GRPO paper):
      grpo     (r - mean) / (std + eps)          a group of one has no std: its advantage is 0 (r - mean is 0)
      dr_grpo  r - mean                          Dr. GRPO drops the std, which over-weights easy / hard prompts
      rloo     r - (sum of the others) / (group_size - 1)    needs group_size >= 2
    scores: (B,) float. Computed in float64 (B numbers: a float32 mean would lose the spread of scores with a large
    common offset); returns float32 (float64 for float64 scores).
    """
    if estimator not in GROUP_ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {GROUP_ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if estimator == "rloo" and group_size < 2:
        raise ValueError("rloo needs group_size >= 2: a group of one has no other responses for its baseline")
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    groups = scores.to(torch.float64).view(-1, group_size)  # (n_groups, group_size)
    mean = groups.mean(-1, keepdim=True)
    if estimator == "dr_grpo":
        advantages = groups - mean
    elif estimator == "rloo":
        advantages = groups - (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    elif group_size == 1 or groups.numel() == 0:
        advantages = torch.zeros_like(groups)
    else:
        advantages = (groups - mean) / (groups.std(-1, keepdim=True) + eps)  # unbiased std
    return advantages.view(-1).to(out_dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1; 0 when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions; `shift_mean=False` adds the mean back.

    Mean and the unbiased variance (n - 1 in the denominator; plain n when n < 2) are taken over every position
    where mask is 1. Padded positions come back as 0. Returns float32 (float64 for float64 x).
    """
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    valid = mask.bool()
    zero = torch.zeros((), dtype=out_dtype, device=x.device)
    x = torch.where(valid, x.to(out_dtype), zero)
    count = valid.sum().to(out_dtype)
    mean = x.sum() / count.clamp(min=1)
    centered = torch.where(valid, x - mean, zero)
    var = (centered * centered).sum() / (count - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, zero)


# ----------------------------------------------------------------------------------------------
# 4. PPO's clipped policy loss and clipped value loss
# ----------------------------------------------------------------------------------------------


def loss_row_scales(
    response_mask: torch.Tensor, agg: str, denominator: float | None, dtype: torch.dtype
) -> torch.Tensor:
    """(B,) scales s such that the aggregated loss is sum_b s_b sum_t mask_bt per_token_loss_bt.

    token-mean:          every valid token counts the same: 1 / (number of valid tokens)
    seq-mean-token-mean: each non-empty sequence counts the same, its tokens averaged: 1 / (len_b * n_seqs)
    seq-mean-token-sum:  each non-empty sequence counts the same, its tokens summed: 1 / n_seqs

    `denominator` replaces the token count (token-mean) or the sequence count (seq-mean-*): with gradient
    accumulation or many ranks it is the count over the whole minibatch, so the sum of the micro-batch losses
    equals the loss of the whole minibatch. The Triton kernels take these scales; the C++ kernels compute the
    same in their pass over the mask (csrc/ppo_loss.cpp, row_scales).
    """
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"agg must be one of {LOSS_AGGREGATIONS}, got {agg!r}")
    lengths = response_mask.to(dtype).sum(-1)  # (B,)
    override = None if denominator is None else torch.tensor(float(denominator), dtype=dtype, device=lengths.device)
    if agg == "token-mean":
        total = lengths.sum() if override is None else override
        return (1.0 / total.clamp(min=1)).expand(lengths.shape).contiguous()
    n_seqs = ((lengths > 0).sum().to(dtype) if override is None else override).clamp(min=1)
    if agg == "seq-mean-token-mean":
        return 1.0 / (lengths.clamp(min=1) * n_seqs)
    return (1.0 / n_seqs).expand(lengths.shape).contiguous()


def loss_weights(response_mask: torch.Tensor, agg: str, denominator: float | None, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) weights w = mask * loss_row_scales[:, None]: the aggregated loss is sum(w * per_token_loss)."""
    return response_mask.to(dtype) * loss_row_scales(response_mask, agg, denominator, dtype)[:, None]


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
    """PPO's clipped surrogate, plus an optional KL penalty toward the reference, as a loss to minimize.

        ratio = exp(logprobs - old_logprobs)
        loss_t = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        dual clip (c > 1), for A < 0 only: loss_t = min(loss_t, -c * A)
        KL in the loss (GRPO, veRL's use_kl_loss, OpenRLHF): loss_t += kl_loss_coef * kl(logprobs - ref_logprobs)

    clip_high defaults to clip_low (asymmetric "clip-higher" when larger). kl is `kl_penalty`'s `kl_estimator`
    (k3 by default: unbiased and never negative); its gradient flows into logprobs like the surrogate's. All
    tensors (B, T); only `logprobs` gets a gradient. Returns the scalar loss (aggregated by `agg`, see
    `loss_weights`) and detached stats over valid tokens: clip_frac (the clipped branch won), dual_clip_frac,
    approx_kl (k3 of the ratio), ratio_mean, ratio_max, and with ref_logprobs given, ref_kl (the mean per-token
    kl against the reference, whatever kl_loss_coef).

    token_weights (B, T), constants (no gradient), multiply each token's policy-gradient term (not the KL term):
    the off-policy correction of a rollout engine's sampler (truncated importance sampling, or 0 for a masked
    sequence) enters here, so the fused kernels apply it in the same pass. The stats ignore it.
    """
    clip_high = clip_low if clip_high is None else clip_high
    valid = response_mask.bool()
    compute_dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    logprobs = logprobs.to(compute_dtype)
    zero = torch.zeros((), dtype=compute_dtype, device=logprobs.device)
    log_ratio = torch.where(valid, logprobs - old_logprobs.to(compute_dtype), zero)
    advantages = torch.where(valid, advantages.to(compute_dtype), zero)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(valid)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual_clipped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(dual_clipped, cap, per_token)
    if token_weights is not None:
        per_token = per_token * torch.where(valid, token_weights.detach().to(compute_dtype), zero)
    ref_kl = None
    if ref_logprobs is not None:
        # Selected to 0 before the estimator, not after: garbage at padding must not reach the value or the gradient.
        ref_log_ratio = torch.where(valid, logprobs - ref_logprobs.to(compute_dtype), zero)
        ref_kl = kl_penalty(ref_log_ratio, torch.zeros_like(ref_log_ratio), kl_estimator)
        per_token = per_token + kl_loss_coef * ref_kl
    weights = loss_weights(response_mask, agg, denominator, compute_dtype)
    loss = (weights * per_token).sum()

    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(compute_dtype), valid),
            "dual_clip_frac": masked_mean(dual_clipped.to(compute_dtype), valid),
            # k3 with samples from the old policy: E_old[(r - 1) - log r] = KL(old || new), never negative
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, valid),
            "ratio_mean": masked_mean(ratio, valid),
            "ratio_max": torch.where(valid, ratio, zero).amax() if valid.any() else zero.clone(),
        }
        if ref_kl is not None:
            stats["ref_kl"] = masked_mean(ref_kl, valid)
    return loss, {k: v.detach().float() for k, v in stats.items()}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, +-clip).

    `clip=None` gives the plain squared error. All tensors (B, T); only `values` gets a gradient. Returns the
    scalar loss (aggregated by `agg`) and detached stats: value_clip_frac (the clipped branch won).
    """
    valid = response_mask.bool()
    compute_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=compute_dtype, device=values.device)
    values = torch.where(valid, values.to(compute_dtype), zero)
    old_values = torch.where(valid, old_values.to(compute_dtype), zero)
    returns = torch.where(valid, returns.to(compute_dtype), zero)
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token, clipped = 0.5 * unclipped, unclipped
    else:
        # Inside the clip range the clipped value is V itself: old + (V - old) can round to a neighbour of V.
        inside = (values - old_values).abs() <= clip
        values_clipped = torch.where(inside, values, old_values + torch.clamp(values - old_values, -clip, clip))
        clipped = (values_clipped - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
    loss = (loss_weights(response_mask, agg, denominator, compute_dtype) * per_token).sum()
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped > unclipped).to(compute_dtype), valid)}
    return loss, {k: v.detach().float() for k, v in stats.items()}
