"""Checks of the reference itself (the specification every backend is compared with), by independent means:
float64 gradcheck of everything differentiable, and plain re-derivations of GAE, whitening, loss aggregation,
reward shaping and a few hand-computed PPO cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from fastppo.ops import reference
from tests.ops.helpers import randn, random_mask

F64 = torch.float64


def padded(x: torch.Tensor, mask: torch.Tensor, value: float = 50.0) -> torch.Tensor:
    """x with a finite but far-off value at padding (gradcheck needs finite inputs): the loss must ignore it."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ----------------------------------------------------------------------------------------------
# gradcheck in float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", reference.KL_ESTIMATORS)
def test_kl_penalty_gradcheck(estimator):
    logprobs = randn(3, 4, dtype=F64, seed=1).requires_grad_(True)
    ref = randn(3, 4, dtype=F64, seed=2).requires_grad_(True)
    assert gradcheck(lambda a, b: reference.kl_penalty(a, b, estimator), (logprobs, ref))


@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("dual_clip,clip_high,denominator", [(None, None, None), (3.0, 0.28, 11.0)])
def test_policy_loss_gradcheck(agg, dual_clip, clip_high, denominator):
    mask = random_mask(4, 6, seed=3, empty_rows=(1,))
    logprobs = padded(-randn(4, 6, dtype=F64, seed=3).abs(), mask)
    old = padded(logprobs + randn(4, 6, dtype=F64, scale=0.4, seed=4), mask)
    advantages = padded(randn(4, 6, dtype=F64, seed=5), mask)

    def loss(lp):
        return reference.ppo_policy_loss(lp, old, advantages, mask, 0.2, clip_high, dual_clip, agg, denominator)[0]

    assert gradcheck(loss, (logprobs.requires_grad_(True),))


@pytest.mark.parametrize("estimator", reference.KL_ESTIMATORS)
def test_policy_loss_with_kl_gradcheck(estimator):
    mask = random_mask(4, 6, seed=13, empty_rows=(1,))
    logprobs = padded(-randn(4, 6, dtype=F64, seed=13).abs(), mask)
    old = padded(logprobs + randn(4, 6, dtype=F64, scale=0.4, seed=14), mask)
    ref = padded(logprobs + randn(4, 6, dtype=F64, scale=0.4, seed=15) + 0.01, mask)  # abs: no kink at d = 0
    advantages = padded(randn(4, 6, dtype=F64, seed=16), mask)

    def loss(lp):
        return reference.ppo_policy_loss(
            lp, old, advantages, mask, 0.2, dual_clip=3.0, ref_logprobs=ref, kl_loss_coef=0.7, kl_estimator=estimator
        )[0]

    assert gradcheck(loss, (logprobs.requires_grad_(True),))


@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_gradcheck(agg, clip):
    mask = random_mask(4, 6, seed=6, empty_rows=(2,))
    values = padded(randn(4, 6, dtype=F64, seed=6), mask)
    old = padded(values + randn(4, 6, dtype=F64, scale=0.3, seed=7), mask)
    returns = padded(randn(4, 6, dtype=F64, seed=8), mask)
    assert gradcheck(
        lambda v: reference.ppo_value_loss(v, old, returns, mask, clip, agg)[0], (values.requires_grad_(True),)
    )


def test_token_logprobs_and_entropy_gradcheck():
    logits = randn(2, 3, 7, dtype=F64, scale=2.0, seed=9).requires_grad_(True)
    tokens = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(9)).to(logits.device)
    assert gradcheck(lambda x: reference.token_logprobs_and_entropy(x, tokens, 0.7), (logits,))


def test_linear_token_logprobs_gradcheck():
    hidden = randn(5, 4, dtype=F64, seed=10).requires_grad_(True)
    weight = randn(6, 4, dtype=F64, seed=11).requires_grad_(True)
    bias = randn(6, dtype=F64, seed=12).requires_grad_(True)
    tokens = torch.randint(0, 6, (5,), generator=torch.Generator().manual_seed(10)).to(hidden.device)
    assert gradcheck(
        lambda h, w, b: reference.linear_token_logprobs(h, w, tokens, 1.3, b, with_entropy=True), (hidden, weight, bias)
    )


# ----------------------------------------------------------------------------------------------
# GAE and whitening, re-derived
# ----------------------------------------------------------------------------------------------


def gae_by_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one sequence at a time over its valid prefix, with Python floats; `lam` a float or a list."""
    advantages = torch.zeros_like(rewards)
    for b, length in enumerate(lengths):
        r, v = rewards[b, :length].tolist(), values[b, :length].tolist()
        row_lam = lam[b] if isinstance(lam, list) else lam
        next_advantage = 0.0
        for t in reversed(range(length)):
            next_value = v[t + 1] if t + 1 < length else 0.0  # no bootstrap past the last token
            next_advantage = r[t] + gamma * next_value - v[t] + gamma * row_lam * next_advantage
            advantages[b, t] = next_advantage
    valid = (
        torch.arange(rewards.shape[1], device=rewards.device) < torch.tensor(lengths, device=rewards.device)[:, None]
    )
    return advantages, torch.where(valid, advantages + values, torch.zeros_like(values))


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (5, 17)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.0), (0.99, 1.0)])
def test_gae_matches_a_plain_loop(shape, gamma, lam):
    B, T = shape
    mask = random_mask(B, T, seed=B + T, empty_rows=(1,) if B > 2 else (), full_rows=(0,))
    rewards = torch.where(mask.bool(), randn(B, T, dtype=F64, seed=1), float("nan"))
    values = torch.where(mask.bool(), randn(B, T, dtype=F64, seed=2), float("inf"))
    advantages, returns = reference.gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = gae_by_loop(rewards, values, mask.sum(-1).tolist(), gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, expected_returns, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("critic_lam", [None, 1.0, 0.3])
def test_gae_per_row_lambda_and_decoupled_returns_match_plain_loops(critic_lam):
    """Per-row lambdas are each row's own GAE; decoupled returns are GAE(critic_lam) advantages + values."""
    mask = random_mask(6, 9, seed=4, empty_rows=(1,), full_rows=(0,), one_rows=(2,))
    rewards = torch.where(mask.bool(), randn(6, 9, dtype=F64, seed=5), float("nan"))
    values = torch.where(mask.bool(), randn(6, 9, dtype=F64, seed=6), float("inf"))
    lam = [0.0, 1.0, 0.5, 0.9, 0.95, 0.3]
    advantages, returns = reference.gae(rewards, values, mask, 0.98, torch.tensor(lam, dtype=F64), critic_lam)
    lengths = mask.sum(-1).tolist()
    expected_advantages, expected_returns = gae_by_loop(rewards, values, lengths, 0.98, lam)
    if critic_lam is not None:
        expected_returns = gae_by_loop(rewards, values, lengths, 0.98, critic_lam)[1]
    torch.testing.assert_close(advantages, expected_advantages, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, expected_returns, rtol=1e-12, atol=1e-12)


def test_length_adaptive_lam_by_hand():
    mask = torch.arange(100) < torch.tensor([0, 10, 20, 25, 100])[:, None]
    lam = reference.length_adaptive_lam(mask, 0.05, F64)
    torch.testing.assert_close(lam, torch.tensor([0.0, 0.0, 0.0, 0.2, 0.8], dtype=F64))


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(5, 17), (2, 3, 4)])
def test_masked_whiten_matches_torch_var(shape, shift_mean):
    x = randn(*shape, dtype=F64, scale=3.0, seed=3) + 2.0
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.6
    selected = x[mask]
    expected = (selected - selected.mean()) / torch.sqrt(torch.var(selected) + 1e-8)  # unbiased, n - 1
    if not shift_mean:
        expected = expected + selected.mean()
    out = reference.masked_whiten(torch.where(mask, x, float("nan")), mask, shift_mean)
    torch.testing.assert_close(out[mask], expected, rtol=1e-12, atol=1e-12)
    assert (out[~mask] == 0).all()


def test_masked_whiten_degenerate_masks():
    x = randn(3, 4, dtype=F64, seed=4)
    assert (reference.masked_whiten(x, torch.zeros(3, 4, dtype=torch.bool)) == 0).all()
    one = torch.zeros(3, 4, dtype=torch.bool)
    one[1, 2] = True  # n = 1: the variance divides by n, so it is 0, not nan
    assert (reference.masked_whiten(x, one) == 0).all()
    torch.testing.assert_close(reference.masked_whiten(x, one, shift_mean=False)[1, 2], x[1, 2])


# ----------------------------------------------------------------------------------------------
# loss aggregation, reward shaping and PPO cases, re-derived
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("denominator", [None, 23.0])
def test_loss_aggregations(denominator):
    """With clipping out of reach the per-token loss is -A * ratio; aggregate it by hand."""
    mask = random_mask(5, 7, seed=5, empty_rows=(3,), full_rows=(0,))
    logprobs, old, advantages = (randn(5, 7, dtype=F64, seed=s) for s in (5, 6, 7))
    per_token = -advantages * torch.exp(logprobs - old)
    rows = [per_token[b][mask[b].bool()] for b in range(5) if mask[b].any()]
    n_tokens = sum(len(r) for r in rows)
    expected = {
        "token-mean": sum(r.sum() for r in rows) / (denominator or n_tokens),
        "seq-mean-token-mean": sum(r.mean() for r in rows) / (denominator or len(rows)),
        "seq-mean-token-sum": sum(r.sum() for r in rows) / (denominator or len(rows)),
    }
    for agg, value in expected.items():
        loss, _ = reference.ppo_policy_loss(logprobs, old, advantages, mask, 1e9, 1e9, agg=agg, denominator=denominator)
        torch.testing.assert_close(loss, value, rtol=1e-12, atol=1e-12)


def test_shape_rewards_by_loop():
    mask = random_mask(4, 6, seed=8, empty_rows=(2,), full_rows=(1,))
    logprobs, ref = randn(4, 6, dtype=F64, seed=8), randn(4, 6, dtype=F64, seed=9)
    scores = randn(4, dtype=F64, seed=10)
    rewards, kl = reference.shape_rewards(scores, logprobs, ref, mask, 0.3, "k2")
    for b, length in enumerate(mask.sum(-1).tolist()):
        for t in range(6):
            expected_kl = 0.5 * (logprobs[b, t] - ref[b, t]).item() ** 2 if t < length else 0.0
            expected_reward = -0.3 * expected_kl + (scores[b].item() if t == length - 1 else 0.0)
            assert kl[b, t].item() == pytest.approx(expected_kl, abs=1e-12)
            assert rewards[b, t].item() == pytest.approx(expected_reward, abs=1e-12)


# (advantage, ratio, dual_clip) -> (loss, d loss / d logprobs, clip_frac, dual_clip_frac), clip range [0.8, 1.2]
PPO_CASES = [
    (1.0, 1.5, None, -1.2, 0.0, 1.0, 0.0),  # good action pushed too far: clipped, no gradient
    (-1.0, 1.5, None, 1.5, 1.5, 0.0, 0.0),  # bad action made likelier: the unclipped (pessimistic) branch wins
    (1.0, 0.5, None, -0.5, -0.5, 0.0, 0.0),  # good action made unlikelier: unclipped
    (-1.0, 0.5, None, 0.8, 0.0, 1.0, 0.0),  # bad action pushed down far enough: clipped
    (-1.0, 5.0, 3.0, 3.0, 0.0, 0.0, 1.0),  # dual clip caps the loss of a bad action at -c A
    (-1.0, 2.0, 3.0, 2.0, 2.0, 0.0, 0.0),  # below the cap: plain PPO
    (2.0, 1.1, None, -2.2, -2.2, 0.0, 0.0),  # inside the range the branches tie: the full gradient, not half
]


@pytest.mark.parametrize("advantage,ratio,dual_clip,loss,grad,clip_frac,dual_clip_frac", PPO_CASES)
def test_policy_loss_hand_computed(advantage, ratio, dual_clip, loss, grad, clip_frac, dual_clip_frac):
    logprobs = torch.tensor([[math.log(ratio) - 1.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.0]], dtype=F64)
    advantages = torch.tensor([[advantage]], dtype=F64)
    out, stats = reference.ppo_policy_loss(logprobs, old, advantages, torch.ones(1, 1), 0.2, dual_clip=dual_clip)
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-12)
    assert logprobs.grad.item() == pytest.approx(grad, abs=1e-12)
    assert stats["clip_frac"].item() == clip_frac and stats["dual_clip_frac"].item() == dual_clip_frac
    assert stats["ratio_max"].item() == pytest.approx(ratio)
