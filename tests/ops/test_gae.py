"""gae (one lambda, one per row, decoupled returns) on every backend, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from fastppo import ops
from fastppo.ops import reference
from tests.ops.helpers import (
    FLOAT_DTYPES,
    assert_close,
    backend_params,
    f64,
    hard_mask,
    randn,
    random_mask,
    run_with,
    transposed_copy,
    with_garbage,
)

# gpu: on a GPU these run the compiled kernels on CUDA tensors (bench/gpu_proof.py selects `-m gpu`).
# The interpreter evaluates the discarded branch of where() on the nan/inf padding too.
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def check_gae(backend, rewards, values, mask, gamma, lam, dtype, critic_lam=None):
    advantages, returns = run_with(backend, ops.gae, rewards, values, mask, gamma, lam, critic_lam)
    expected = reference.gae(f64(rewards), f64(values), mask, gamma, f64(lam), critic_lam)
    for name, out, exp in zip(("advantages", "returns"), (advantages, returns), expected, strict=True):
        assert out.dtype == torch.float32 and out.shape == rewards.shape and not out.requires_grad
        assert_close(out, exp, dtype, name=f"gae.{name}")


def row_lams(B: int, seed: int) -> torch.Tensor:
    """(B,) lambdas in [0, 1] with both ends present."""
    lam = torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lam[: min(B, 2)] = torch.tensor([0.0, 1.0], dtype=torch.float64)[: min(B, 2)]
    return lam.to(randn(1).device)


CASES = [
    pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}")
    for shape in ((1, 1), (3, 1), (5, 17), (64, 129))
    for dtype in FLOAT_DTYPES
]


@pytest.mark.parametrize("backend", backend_params("gae"))
@pytest.mark.parametrize("shape,dtype", CASES)
def test_gae(backend, shape, dtype):
    B, T = shape
    mask = random_mask(B, T, seed=B * T, empty_rows=(1,) if B > 2 else (), full_rows=(2,) if B > 2 else ())
    rewards = with_garbage(randn(B, T, dtype=dtype, seed=B), mask)
    values = with_garbage(randn(B, T, dtype=dtype, scale=2.0, seed=T), mask)
    check_gae(backend, rewards, values, mask, 0.99, 0.95, dtype)


@pytest.mark.parametrize("backend", backend_params("gae"))
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.0), (0.0, 0.5), (0.9, 0.7)])
def test_gae_discounts(backend, gamma, lam):
    mask = random_mask(6, 13, seed=3, empty_rows=(4,), full_rows=(0,))
    rewards = with_garbage(randn(6, 13, seed=4), mask)
    values = with_garbage(randn(6, 13, seed=5), mask)
    check_gae(backend, rewards, values, mask, gamma, lam, torch.float32)


@pytest.mark.parametrize("backend", backend_params("gae"))
def test_gae_noncontiguous_mixed_dtypes_bool_mask(backend):
    mask = random_mask(7, 10, seed=8, empty_rows=(3,), full_rows=(6,))
    rewards = transposed_copy(with_garbage(randn(7, 10, dtype=torch.bfloat16, seed=8), mask))
    values = randn(7, 20, seed=9)
    values[:, ::2] = with_garbage(values[:, ::2], mask)
    values = values[:, ::2]  # a column-strided view
    bool_mask = transposed_copy(mask.bool())
    assert not (rewards.is_contiguous() or values.is_contiguous() or bool_mask.is_contiguous())
    check_gae(backend, rewards, values, bool_mask, 0.97, 0.9, torch.bfloat16)


@pytest.mark.parametrize("backend", backend_params("gae"))
def test_gae_empty_mask_and_holes(backend):
    empty = torch.zeros(4, 9, dtype=torch.int64, device=randn(1).device)
    garbage = with_garbage(randn(4, 9, seed=1), empty)
    check_gae(backend, garbage, garbage, empty, 0.99, 0.95, torch.float32)
    # Not a prefix: padding in the middle of a row ends the episode there and the scan restarts after it.
    holes = (torch.rand(4, 9, generator=torch.Generator().manual_seed(2)) < 0.6).to(empty.device)
    check_gae(backend, with_garbage(randn(4, 9, seed=2), holes), randn(4, 9, seed=3), holes, 0.99, 0.95, torch.float32)


LAM_CASES = [
    pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}")
    for shape in ((1, 1), (4, 1), (6, 37), (5, 129))
    for dtype in FLOAT_DTYPES
]


@pytest.mark.parametrize("backend", backend_params("gae"))
@pytest.mark.parametrize("per_row", [False, True], ids=["one-lam", "lam-per-row"])
@pytest.mark.parametrize("critic_lam", [None, 1.0, 0.5])
@pytest.mark.parametrize("shape,dtype", LAM_CASES)
def test_gae_per_row_lambda_and_decoupled_returns(backend, per_row, critic_lam, shape, dtype):
    B, T = shape
    mask = hard_mask(B, T, seed=B + T)
    rewards = with_garbage(randn(B, T, dtype=dtype, seed=B), mask)
    values = with_garbage(randn(B, T, dtype=dtype, scale=2.0, seed=T), mask)
    lam = row_lams(B, seed=T).to(dtype) if per_row else 0.9
    check_gae(backend, rewards, values, mask, 0.99, lam, dtype, critic_lam)


@pytest.mark.parametrize("backend", backend_params("gae"))
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.bfloat16, 1e30), (torch.float16, 200.0)])
def test_gae_extreme_values(backend, dtype, scale):
    """Huge rewards and values (fp16: sums that still fit its range); with lambda 1 errors do not decay."""
    mask = hard_mask(5, 70, seed=11)
    rewards = with_garbage(randn(5, 70, dtype=dtype, scale=scale, seed=12), mask)
    values = with_garbage(randn(5, 70, dtype=dtype, scale=scale, seed=13), mask)
    check_gae(backend, rewards, values, mask, 1.0, row_lams(5, seed=14), dtype, critic_lam=1.0)


def test_decoupled_returns_are_a_second_gae():
    """The decoupled scan's returns are exactly GAE(critic_lam)'s, and its advantages GAE(lam)'s."""
    mask = hard_mask(6, 23, seed=15)
    rewards, values = randn(6, 23, dtype=torch.float64, seed=16), randn(6, 23, dtype=torch.float64, seed=17)
    lam = row_lams(6, seed=18)
    advantages, returns = ops.gae(rewards, values, mask, 0.97, lam, critic_lam=1.0)
    assert torch.equal(advantages, ops.gae(rewards, values, mask, 0.97, lam)[0])
    assert torch.equal(returns, ops.gae(rewards, values, mask, 0.97, 1.0)[1])


@pytest.mark.parametrize(
    "lam,critic_lam,error",
    [
        (torch.full((3,), 0.9), 1.5, "critic_lam must lie in"),
        (torch.full((4,), 0.9), None, "lam must be a float or"),
        (torch.tensor([0.5, 1.2, 0.9]), None, "every lam must lie in"),
        (torch.zeros(3, dtype=torch.int64), None, "lam must be a floating-point"),
        (-0.1, None, "lam must lie in"),
    ],
)
def test_gae_rejects_bad_lambdas(lam, critic_lam, error):
    rewards = randn(3, 5, seed=19).cpu()
    with pytest.raises((ValueError, TypeError), match=error):
        ops.gae(rewards, rewards, torch.ones(3, 5), 1.0, lam, critic_lam)
