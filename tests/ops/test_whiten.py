"""masked_whiten on every backend, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from fastppo import ops
from fastppo.ops import reference
from tests.ops.helpers import (
    DEVICE,
    FLOAT_DTYPES,
    assert_close,
    backend_params,
    f64,
    randn,
    run_with,
    transposed_copy,
    with_garbage,
)

# gpu: on a GPU these run the compiled kernels on CUDA tensors (bench/gpu_proof.py selects `-m gpu`).
# The interpreter evaluates the discarded branch of where() on the nan/inf padding too.
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def random_bool_mask(shape, p, seed):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p).to(DEVICE)


def check_whiten(backend, x, mask, shift_mean, dtype, eps=1e-8):
    out = run_with(backend, ops.masked_whiten, x, mask, shift_mean, eps)
    expected = reference.masked_whiten(f64(x), mask, shift_mean, eps)
    assert out.dtype == torch.float32 and out.shape == x.shape and not out.requires_grad
    assert_close(out, expected, dtype, name=f"masked_whiten[shift_mean={shift_mean}]")


CASES = [
    pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}")
    for shape in ((1, 1), (3, 1), (5, 17), (64, 129), (2, 3, 7))
    for dtype in FLOAT_DTYPES
]


@pytest.mark.parametrize("backend", backend_params("masked_whiten"))
@pytest.mark.parametrize("shape,dtype", CASES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(backend, shape, dtype, shift_mean):
    mask = random_bool_mask(shape, 0.7, seed=sum(shape))
    mask.view(-1)[0] = True  # at least one valid element, even for (1, 1)
    x = with_garbage(randn(*shape, dtype=dtype, scale=2.0, seed=len(shape)) + 0.5, mask)
    check_whiten(backend, x, mask, shift_mean, dtype)


@pytest.mark.parametrize("backend", backend_params("masked_whiten"))
@pytest.mark.parametrize("n_valid", [0, 1, 2, 85])
def test_masked_whiten_few_valid(backend, n_valid):
    """Empty mask -> zeros; n = 1 -> variance over n (0), not n - 1; 85 = all valid."""
    mask = torch.zeros(5, 17, dtype=torch.int64, device=DEVICE)
    mask.view(-1)[torch.randperm(85, generator=torch.Generator().manual_seed(n_valid))[:n_valid].to(DEVICE)] = 1
    x = with_garbage(randn(5, 17, seed=n_valid), mask)
    for shift_mean in (True, False):
        check_whiten(backend, x, mask, shift_mean, torch.float32, eps=1e-5)


@pytest.mark.parametrize("backend", backend_params("masked_whiten"))
def test_masked_whiten_large_mean(backend):
    """|mean| = 100 std: sum(x^2) - n mean^2 in float32 would be off by ~1e-3 here."""
    mask = random_bool_mask((64, 129), 0.8, seed=11)
    x = with_garbage(randn(64, 129, seed=11) + 100.0, mask)
    check_whiten(backend, x, mask, True, torch.float32)


@pytest.mark.parametrize("backend", backend_params("masked_whiten"))
def test_masked_whiten_noncontiguous(backend):
    mask = random_bool_mask((9, 14), 0.6, seed=5)
    x = transposed_copy(with_garbage(randn(9, 14, dtype=torch.float16, seed=5), mask))
    int_mask = transposed_copy(mask.to(torch.int64))
    assert not (x.is_contiguous() or int_mask.is_contiguous())
    check_whiten(backend, x, int_mask, False, torch.float16)
