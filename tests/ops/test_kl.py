"""kl_penalty (forward and backward) and shape_rewards on every backend, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from fastppo import ops
from fastppo.ops import reference
from tests.ops.helpers import (
    FLOAT_DTYPES,
    assert_close,
    assert_grad_close,
    backend_params,
    f64,
    randn,
    random_mask,
    run_with,
    transposed_copy,
    with_garbage,
)

# gpu: on a GPU these run the compiled kernels on CUDA tensors (bench/gpu_proof.py selects `-m gpu`).
# The interpreter evaluates the discarded branch of where() on the nan/inf padding too.
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

ESTIMATORS = reference.KL_ESTIMATORS


def log_ratio_pair(shape, dtype, seed):
    """(logprobs, ref_logprobs) rounded to dtype: log-probs <= 0 and log-ratios of either sign, a few of +-30."""
    logprobs = -randn(*shape, dtype=torch.float64, seed=seed).abs() * 3 - 0.1
    ref = logprobs + randn(*shape, dtype=torch.float64, seed=seed + 1)
    extreme = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.1
    signs = torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(seed + 2)) < 0.5, -30.0, 30.0)
    ref = torch.where(extreme.to(ref.device), logprobs + signs.to(ref.device).double(), ref)
    return logprobs.to(dtype), ref.to(dtype)


# ----------------------------------------------------------------------------------------------
# kl_penalty
# ----------------------------------------------------------------------------------------------

KL_CASES = (
    [pytest.param(e, d, (5, 17), False, id=f"{e}-{str(d)[6:]}") for e in ESTIMATORS for d in FLOAT_DTYPES]
    + [
        pytest.param("k3", torch.float32, shape, False, id=f"k3-{'x'.join(map(str, shape))}")
        for shape in ((1, 1), (3, 1), (64, 129), (2, 3, 7))
    ]
    + [pytest.param(e, torch.float32, (17, 5), True, id=f"{e}-noncontiguous") for e in ("k2", "k3", "abs")]
)


@pytest.mark.parametrize("backend", backend_params("kl_penalty"))
@pytest.mark.parametrize("estimator,dtype,shape,noncontiguous", KL_CASES)
def test_kl_penalty(backend, estimator, dtype, shape, noncontiguous):
    logprobs, ref = log_ratio_pair(shape, dtype, seed=len(shape) + shape[-1])
    if noncontiguous:
        logprobs, ref = transposed_copy(logprobs), transposed_copy(ref)
        assert not logprobs.is_contiguous()
    logprobs.requires_grad_(True)
    ref.requires_grad_(True)
    out = run_with(backend, ops.kl_penalty, logprobs, ref, estimator)
    ref64 = [f64(logprobs).requires_grad_(True), f64(ref).requires_grad_(True)]
    expected = reference.kl_penalty(*ref64, estimator)
    assert out.dtype == torch.float32 and out.shape == logprobs.shape
    assert_close(out, expected, dtype, name=f"kl_penalty[{estimator}]")

    grad_out = randn(*shape, seed=7)
    grads = torch.autograd.grad(out, (logprobs, ref), grad_out)
    expected_grads = torch.autograd.grad(expected, ref64, f64(grad_out))
    for name, grad, expected_grad, x in zip(
        ("logprobs", "ref_logprobs"), grads, expected_grads, (logprobs, ref), strict=True
    ):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert_grad_close(grad, expected_grad, dtype, name=f"d kl_penalty[{estimator}] / d {name}")


@pytest.mark.parametrize("backend", backend_params("kl_penalty"))
def test_kl_penalty_one_input_requires_grad(backend):
    logprobs, ref = log_ratio_pair((3, 5), torch.float32, seed=3)
    ref = ref[:1].expand(3, 5)  # a 0-stride view
    logprobs.requires_grad_(True)
    out = run_with(backend, ops.kl_penalty, logprobs, ref, "k3")
    (grad,) = torch.autograd.grad(out.sum(), logprobs)
    assert_grad_close(grad, -torch.expm1(-(f64(logprobs) - f64(ref))), torch.float32, "d k3 / d logprobs")


# ----------------------------------------------------------------------------------------------
# shape_rewards
# ----------------------------------------------------------------------------------------------

REWARD_CASES = [pytest.param(e, d, (5, 17), id=f"{e}-{str(d)[6:]}") for e in ESTIMATORS for d in FLOAT_DTYPES] + [
    pytest.param("k3", torch.float32, shape, id=f"k3-{'x'.join(map(str, shape))}")
    for shape in ((1, 1), (3, 1), (64, 129), (3, 1100))  # 1100: three 512-wide tiles per row
]


def check_shape_rewards(backend, scores, logprobs, ref, mask, kl_coef, estimator, dtype):
    rewards, kl = run_with(backend, ops.shape_rewards, scores, logprobs, ref, mask, kl_coef, estimator)
    expected_rewards, expected_kl = reference.shape_rewards(
        f64(scores), f64(logprobs), f64(ref), mask, kl_coef, estimator
    )
    for name, out, expected in (("rewards", rewards, expected_rewards), ("kl", kl, expected_kl)):
        assert out.dtype == torch.float32 and out.shape == logprobs.shape and not out.requires_grad
        assert_close(out, expected, dtype, name=f"shape_rewards[{estimator}].{name}")


@pytest.mark.parametrize("backend", backend_params("shape_rewards"))
@pytest.mark.parametrize("estimator,dtype,shape", REWARD_CASES)
def test_shape_rewards(backend, estimator, dtype, shape):
    B, T = shape
    seed = B + T
    mask = random_mask(B, T, seed=seed, empty_rows=(1,) if B > 2 else (), full_rows=(2,) if B > 2 else ())
    logprobs, ref = log_ratio_pair(shape, dtype, seed=seed)
    scores = randn(B, dtype=dtype, scale=3.0, seed=seed + 5)
    logprobs, ref = with_garbage(logprobs, mask), with_garbage(ref, mask)
    check_shape_rewards(backend, scores, logprobs, ref, mask, 0.05, estimator, dtype)


@pytest.mark.parametrize("backend", backend_params("shape_rewards"))
def test_shape_rewards_noncontiguous_and_bool_mask(backend):
    B, T = 6, 11
    mask = random_mask(B, T, seed=4, empty_rows=(0,), full_rows=(5,))
    logprobs, ref = log_ratio_pair((B, T), torch.float32, seed=4)
    logprobs, ref = transposed_copy(with_garbage(logprobs, mask)), transposed_copy(with_garbage(ref, mask))
    scores = randn(2 * B, scale=3.0, seed=8)[::2]  # a strided (B,) view
    bool_mask = transposed_copy(mask.bool())
    assert not (logprobs.is_contiguous() or bool_mask.is_contiguous() or scores.is_contiguous())
    check_shape_rewards(backend, scores, logprobs, ref, bool_mask, 0.1, "k1", torch.float32)


@pytest.mark.parametrize("backend", backend_params("shape_rewards"))
def test_shape_rewards_empty_mask_and_holes(backend):
    B, T = 4, 9
    logprobs, ref = log_ratio_pair((B, T), torch.float32, seed=6)
    scores = randn(B, scale=3.0, seed=6)
    empty = torch.zeros(B, T, dtype=torch.int64, device=logprobs.device)
    check_shape_rewards(backend, scores, with_garbage(logprobs, empty), ref, empty, 0.2, "k2", torch.float32)
    # Not a prefix: the score still lands on the last valid token, wherever it is.
    holes = (torch.rand(B, T, generator=torch.Generator().manual_seed(6)) < 0.5).to(logprobs.device)
    check_shape_rewards(backend, scores, with_garbage(logprobs, holes), ref, holes, 0.2, "k3", torch.float32)
