"""gae on every backend, against the float64 reference."""

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
    randn,
    random_mask,
    run_with,
    transposed_copy,
    with_garbage,
)

# The interpreter evaluates the discarded branch of where() on the nan/inf padding too.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def check_gae(backend, rewards, values, mask, gamma, lam, dtype):
    advantages, returns = run_with(backend, ops.gae, rewards, values, mask, gamma, lam)
    expected = reference.gae(f64(rewards), f64(values), mask, gamma, lam)
    for name, out, exp in zip(("advantages", "returns"), (advantages, returns), expected, strict=True):
        assert out.dtype == torch.float32 and out.shape == rewards.shape and not out.requires_grad
        assert_close(out, exp, dtype, name=f"gae.{name}")


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
