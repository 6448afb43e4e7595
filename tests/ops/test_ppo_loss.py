"""ppo_policy_loss and ppo_value_loss (loss, stats and gradient) on every backend, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from fastppo import ops
from fastppo.ops import reference
from tests.ops.helpers import (
    DEVICE,
    FLOAT_DTYPES,
    assert_close,
    assert_grad_close,
    backend_params,
    f64,
    poisoned_outputs,
    randn,
    random_mask,
    run_with,
    transposed_copy,
    with_garbage,
)

# gpu: on a GPU these run the compiled kernels on CUDA tensors (bench/gpu_proof.py selects `-m gpu`).
# The interpreter evaluates the discarded branch of where() on the nan/inf padding too.
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

POLICY_STATS = ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max")
# A power of two for 16-bit gradients, so that scaling by it is exact there.
GRAD_SCALE = {torch.float32: 0.37, torch.bfloat16: 0.5, torch.float16: 0.5}


def mask_with_empty_and_full_rows(B: int, T: int, seed: int) -> torch.Tensor:
    return random_mask(B, T, seed=seed, empty_rows=(1,) if B > 2 else (), full_rows=(2,) if B > 2 else ())


def policy_inputs(B, T, dtype, seed, extreme=False):
    """(logprobs, old_logprobs, advantages, mask): ratios around [0.5, 2] so that both clip bounds are hit, some
    log-ratios of +-30 when `extreme`, nan/inf garbage at padding."""
    mask = mask_with_empty_and_full_rows(B, T, seed)
    logprobs = -randn(B, T, dtype=torch.float64, scale=2.0, seed=seed).abs() - 0.1
    old = logprobs + randn(B, T, dtype=torch.float64, scale=0.3, seed=seed + 1)
    if extreme:
        pick = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        old = torch.where(pick < 0.1, logprobs + 30, torch.where(pick > 0.9, logprobs - 30, old))
    advantages = randn(B, T, dtype=torch.float64, seed=seed + 2)
    inputs = [with_garbage(x.to(dtype), mask) for x in (logprobs, old, advantages)]
    return (*inputs, mask)


def value_inputs(B, T, dtype, seed):
    """(values, old_values, returns, mask). Values and old values lie in [1, 2], so V - V_old is exact in every
    float format and V_old + (V - V_old) == V: inside the clip range the two branches tie exactly in any precision,
    and value_clip_frac cannot depend on rounding."""
    mask = mask_with_empty_and_full_rows(B, T, seed)
    old = 1.0 + torch.rand(B, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
    values = (old + randn(B, T, dtype=torch.float64, scale=0.3, seed=seed)).clamp(1.0, 2.0)
    returns = 1.5 + randn(B, T, dtype=torch.float64, seed=seed + 1)
    inputs = [with_garbage(x.to(dtype), mask) for x in (values, old, returns)]
    return (*inputs, mask)


def check_loss(backend, op, reference_op, stat_names, dtype, inputs, **kwargs):
    """Runs `op` on `backend` and the float64 reference on the same inputs; compares loss, stats and gradient."""
    x, *rest, mask = inputs
    x = x.detach().requires_grad_(True)
    loss, stats = run_with(backend, op, x, *rest, mask, **kwargs)
    x64 = f64(x).requires_grad_(True)
    expected_loss, expected_stats = reference_op(x64, *map(f64, rest), mask, **{k: f64(v) for k, v in kwargs.items()})

    assert loss.dtype == torch.float32 and loss.shape == () and loss.requires_grad
    assert_close(loss, expected_loss, dtype, name=f"{op.__name__} loss")
    assert tuple(stats) == stat_names
    for name in stat_names:
        assert stats[name].dtype == torch.float32 and stats[name].shape == () and not stats[name].requires_grad
        assert_close(stats[name], expected_stats[name], dtype, name=f"{op.__name__} {name}")

    scale = GRAD_SCALE[dtype]
    with poisoned_outputs():
        (grad,) = torch.autograd.grad(loss * scale, x)
    (expected_grad,) = torch.autograd.grad(expected_loss * scale, x64)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    weight = reference.loss_weights(mask, kwargs.get("agg", "token-mean"), kwargs.get("denominator"), torch.float64)
    assert_grad_close(grad, expected_grad, dtype, f"d {op.__name__} / d input", scale=scale * weight.max().item())


def check_policy(backend, dtype, inputs, **kwargs):
    check_loss(backend, ops.ppo_policy_loss, reference.ppo_policy_loss, POLICY_STATS, dtype, inputs, **kwargs)


def check_policy_with_kl(backend, dtype, inputs, **kwargs):
    check_loss(
        backend, ops.ppo_policy_loss, reference.ppo_policy_loss, (*POLICY_STATS, "ref_kl"), dtype, inputs, **kwargs
    )


def check_value(backend, dtype, inputs, **kwargs):
    check_loss(backend, ops.ppo_value_loss, reference.ppo_value_loss, ("value_clip_frac",), dtype, inputs, **kwargs)


def shape_dtype_cases():
    return [
        pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}")
        for shape in ((1, 1), (3, 1), (5, 17), (64, 129), (3, 600))  # 600: three 256-wide tiles per row
        for dtype in FLOAT_DTYPES
    ]


# ----------------------------------------------------------------------------------------------
# policy loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("denominator", [None, 37.0])
@pytest.mark.parametrize("dual_clip,clip_high", [(None, None), (3.0, 0.28)])
def test_policy_loss_options(backend, agg, denominator, dual_clip, clip_high):
    inputs = policy_inputs(5, 17, torch.float32, seed=1)
    check_policy(
        backend, torch.float32, inputs, clip_high=clip_high, dual_clip=dual_clip, agg=agg, denominator=denominator
    )


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("dual_clip,clip_high,denominator", [(None, 0.28, 0.5), (2.0, None, None)])
def test_policy_loss_more_options(backend, dual_clip, clip_high, denominator):
    inputs = policy_inputs(6, 11, torch.float32, seed=2)
    check_policy(
        backend, torch.float32, inputs, clip_low=0.1, clip_high=clip_high, dual_clip=dual_clip, denominator=denominator
    )


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("shape,dtype", shape_dtype_cases())
def test_policy_loss_shapes_dtypes(backend, shape, dtype):
    inputs = policy_inputs(*shape, dtype, seed=sum(shape))
    check_policy(backend, dtype, inputs, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean")


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_extreme_log_ratios(backend, dtype, dual_clip):
    """exp(+-30) overflows float16 (and the gradient does too: it must come back inf, not nan)."""
    inputs = policy_inputs(5, 17, dtype, seed=3, extreme=True)
    check_policy(backend, dtype, inputs, dual_clip=dual_clip)


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
def test_policy_loss_noncontiguous_bool_mask(backend):
    logprobs, old, advantages, mask = policy_inputs(7, 10, torch.float32, seed=4)
    inputs = [transposed_copy(x) for x in (logprobs, old, advantages, mask.bool())]
    assert not any(x.is_contiguous() for x in inputs)
    check_policy(backend, torch.float32, inputs, dual_clip=3.0, agg="seq-mean-token-sum")


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
def test_policy_loss_empty_mask(backend, agg):
    logprobs, old, advantages, mask = policy_inputs(4, 6, torch.float32, seed=5)
    empty = torch.zeros_like(mask)
    inputs = [with_garbage(x, empty) for x in (logprobs, old, advantages)]
    check_policy(backend, torch.float32, (*inputs, empty), dual_clip=3.0, agg=agg)


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
def test_policy_loss_without_grad(backend):
    logprobs, old, advantages, mask = policy_inputs(5, 17, torch.float32, seed=6)
    loss, stats = run_with(backend, ops.ppo_policy_loss, logprobs, old, advantages, mask, dual_clip=3.0)
    expected_loss, expected_stats = reference.ppo_policy_loss(
        *map(f64, (logprobs, old, advantages)), mask, dual_clip=3.0
    )
    assert not loss.requires_grad
    assert_close(loss, expected_loss, name="ppo_policy_loss loss (no grad)")
    for name in POLICY_STATS:
        assert_close(stats[name], expected_stats[name], name=f"ppo_policy_loss {name} (no grad)")


def correction_weights(B, T, dtype, mask, seed):
    """token_weights as the rollout correction makes them: truncated ratios in (0, 2], whole rows of 0 (masked
    sequences), nan/inf garbage at padding."""
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0).clamp(min=1e-3).to(DEVICE)
    weights[0] = 0.0
    return with_garbage(weights.to(dtype), mask)


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("dual_clip,clip_high", [(None, None), (3.0, 0.28)])
def test_policy_loss_token_weights(backend, agg, dual_clip, clip_high):
    logprobs, old, advantages, mask = policy_inputs(5, 17, torch.float32, seed=7)
    weights = correction_weights(5, 17, torch.float32, mask, seed=7)
    check_policy(
        backend,
        torch.float32,
        (logprobs, old, advantages, mask),
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        denominator=37.0,
        token_weights=weights,
    )


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("shape,dtype", shape_dtype_cases())
def test_policy_loss_token_weights_shapes_dtypes(backend, shape, dtype):
    logprobs, old, advantages, mask = policy_inputs(*shape, dtype, seed=sum(shape))
    weights = transposed_copy(correction_weights(*shape, dtype, mask, seed=sum(shape)))  # strided, input dtype
    check_policy(backend, dtype, (logprobs, old, advantages, mask), dual_clip=3.0, token_weights=weights)


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
def test_policy_loss_unit_token_weights_change_nothing(backend):
    logprobs, old, advantages, mask = policy_inputs(5, 17, torch.float32, seed=8)
    plain, plain_stats = run_with(backend, ops.ppo_policy_loss, logprobs, old, advantages, mask, dual_clip=3.0)
    ones = torch.ones_like(logprobs)
    weighted, stats = run_with(
        backend, ops.ppo_policy_loss, logprobs, old, advantages, mask, dual_clip=3.0, token_weights=ones
    )
    assert torch.equal(plain, weighted)
    assert all(torch.equal(plain_stats[k], stats[k]) for k in POLICY_STATS)


# ----------------------------------------------------------------------------------------------
# policy loss with the KL to the reference in it
# ----------------------------------------------------------------------------------------------


def reference_logprobs_for(logprobs, mask, seed, extreme=False):
    """Reference log-probs around the policy's (KL of order 0.1), some log-ratios of +-30 when `extreme`, garbage at
    padding."""
    lp = torch.where(mask.bool(), logprobs.double(), 0.0)
    ref = lp + randn(*lp.shape, dtype=torch.float64, scale=0.4, seed=seed)
    if extreme:
        pick = torch.rand(*lp.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        ref = torch.where(pick < 0.1, lp + 30, torch.where(pick > 0.9, lp - 30, ref))
    return with_garbage(ref.to(logprobs.dtype), mask)


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("estimator", reference.KL_ESTIMATORS)
@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_with_kl(backend, estimator, agg, dual_clip):
    logprobs, old, advantages, mask = policy_inputs(5, 17, torch.float32, seed=7)
    ref = reference_logprobs_for(logprobs, mask, seed=8)
    check_policy_with_kl(
        backend,
        torch.float32,
        (logprobs, old, advantages, mask),
        dual_clip=dual_clip,
        agg=agg,
        ref_logprobs=ref,
        kl_loss_coef=0.3,
        kl_estimator=estimator,
    )


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("shape,dtype", shape_dtype_cases())
def test_policy_loss_with_kl_shapes_dtypes(backend, shape, dtype):
    logprobs, old, advantages, mask = policy_inputs(*shape, dtype, seed=sum(shape) + 1)
    ref = reference_logprobs_for(logprobs, mask, seed=sum(shape))
    check_policy_with_kl(
        backend,
        dtype,
        (logprobs, old, advantages, mask),
        clip_high=0.28,
        dual_clip=3.0,
        agg="seq-mean-token-mean",
        ref_logprobs=ref,
        kl_loss_coef=0.05,
    )


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_policy_loss_with_kl_and_token_weights(backend, estimator):
    """The rollout correction weighs the policy-gradient term only; the KL term is the same with or without it."""
    logprobs, old, advantages, mask = policy_inputs(5, 17, torch.float32, seed=11)
    ref = reference_logprobs_for(logprobs, mask, seed=12)
    weights = correction_weights(5, 17, torch.float32, mask, seed=13)
    check_policy_with_kl(
        backend,
        torch.float32,
        (logprobs, old, advantages, mask),
        dual_clip=3.0,
        ref_logprobs=ref,
        kl_loss_coef=0.3,
        kl_estimator=estimator,
        token_weights=weights,
    )
    zero = torch.where(mask.bool(), torch.zeros_like(weights), weights)  # garbage kept at padding
    kl_only, _ = reference.ppo_policy_loss(
        logprobs.double(),
        old.double(),
        advantages.double(),
        mask,
        ref_logprobs=ref.double(),
        kl_loss_coef=0.3,
        kl_estimator=estimator,
        token_weights=zero.double(),
    )
    _, stats = reference.ppo_policy_loss(
        logprobs.double(), old.double(), advantages.double(), mask, ref_logprobs=ref.double(), kl_estimator=estimator
    )
    torch.testing.assert_close(kl_only, 0.3 * stats["ref_kl"].double(), rtol=1e-6, atol=0)  # stats are float32


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
@pytest.mark.parametrize("estimator", reference.KL_ESTIMATORS)
def test_policy_loss_with_kl_extreme_log_ratios(backend, estimator):
    """Log-ratios of +-30 against the reference: k3 of -30 is e^30 (fits float32), its gradient too."""
    logprobs, old, advantages, mask = policy_inputs(5, 17, torch.float32, seed=9)
    ref = reference_logprobs_for(logprobs, mask, seed=10, extreme=True)
    check_policy_with_kl(
        backend,
        torch.float32,
        (logprobs, old, advantages, mask),
        ref_logprobs=ref,
        kl_loss_coef=1e-3,
        kl_estimator=estimator,
    )


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
def test_policy_loss_kl_stat_without_coefficient_and_empty_mask(backend):
    """ref_kl is reported whatever kl_loss_coef (0 here: the loss is plain PPO's); an empty mask gives 0s."""
    logprobs, old, advantages, mask = policy_inputs(6, 9, torch.float32, seed=11)
    ref = reference_logprobs_for(logprobs, mask, seed=12)
    check_policy_with_kl(backend, torch.float32, (logprobs, old, advantages, mask), ref_logprobs=ref)
    plain, _ = run_with(backend, ops.ppo_policy_loss, logprobs, old, advantages, mask)
    with_ref, stats = run_with(backend, ops.ppo_policy_loss, logprobs, old, advantages, mask, ref_logprobs=ref)
    assert torch.equal(plain, with_ref) and stats["ref_kl"] > 0
    empty = torch.zeros_like(mask)
    inputs = [with_garbage(x, empty) for x in (logprobs, old, advantages)]
    check_policy_with_kl(
        backend, torch.float32, (*inputs, empty), ref_logprobs=with_garbage(ref, empty), kl_loss_coef=0.5
    )


@pytest.mark.parametrize("backend", backend_params("ppo_policy_loss"))
def test_policy_loss_with_kl_noncontiguous(backend):
    logprobs, old, advantages, mask = policy_inputs(7, 10, torch.float32, seed=13)
    ref = reference_logprobs_for(logprobs, mask, seed=14)
    inputs = [transposed_copy(x) for x in (logprobs, old, advantages, mask.bool())]
    check_policy_with_kl(
        backend,
        torch.float32,
        inputs,
        ref_logprobs=transposed_copy(ref),
        kl_loss_coef=0.2,
        kl_estimator="k2",
        agg="seq-mean-token-sum",
    )


def test_policy_loss_kl_arguments_are_checked():
    logprobs, old, advantages, mask = policy_inputs(3, 4, torch.float32, seed=15)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        ops.ppo_policy_loss(logprobs, old, advantages, mask, kl_loss_coef=0.1)
    with pytest.raises(ValueError, match="kl estimator"):
        ops.ppo_policy_loss(logprobs, old, advantages, mask, ref_logprobs=old, kl_estimator="k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        ops.ppo_policy_loss(logprobs, old, advantages, mask, ref_logprobs=old[:, :2], kl_loss_coef=0.1)


# ----------------------------------------------------------------------------------------------
# value loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params("ppo_value_loss"))
@pytest.mark.parametrize("agg", reference.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("denominator", [None, 37.0])
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_options(backend, agg, denominator, clip):
    inputs = value_inputs(5, 17, torch.float32, seed=1)
    check_value(backend, torch.float32, inputs, clip=clip, agg=agg, denominator=denominator)


@pytest.mark.parametrize("backend", backend_params("ppo_value_loss"))
@pytest.mark.parametrize("shape,dtype", shape_dtype_cases())
def test_value_loss_shapes_dtypes(backend, shape, dtype):
    inputs = value_inputs(*shape, dtype, seed=sum(shape))
    check_value(backend, dtype, inputs, clip=0.2, agg="seq-mean-token-sum")


@pytest.mark.parametrize("backend", backend_params("ppo_value_loss"))
def test_value_loss_noncontiguous_empty_mask(backend):
    values, old, returns, mask = value_inputs(7, 10, torch.float32, seed=4)
    inputs = [transposed_copy(x) for x in (values, old, returns, mask)]
    assert not any(x.is_contiguous() for x in inputs)
    check_value(backend, torch.float32, inputs, clip=0.3, agg="seq-mean-token-mean", denominator=0.5)
    empty = torch.zeros_like(mask)
    check_value(backend, torch.float32, [with_garbage(x, empty) for x in (values, old, returns)] + [empty], clip=0.2)


def test_approx_kl_is_k3_under_the_old_policy():
    """approx_kl estimates KL(old || new) from tokens sampled by the old policy: mean of (r - 1) - log r."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 7, generator=g, dtype=torch.float64)
    new = old + 0.5 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    _, stats = reference.ppo_policy_loss(new, old, torch.randn(3, 7, generator=g, dtype=torch.float64), mask)
    r = torch.exp(new - old)
    torch.testing.assert_close(stats["approx_kl"].double(), ((r - 1) - torch.log(r)).mean(), rtol=1e-6, atol=0)
