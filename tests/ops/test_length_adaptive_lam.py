"""length_adaptive_lam (VAPO's per-sequence GAE lambda) on every backend, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from fastppo import ops
from fastppo.ops import reference
from tests.ops.helpers import assert_close, backend_params, hard_mask, run_with, transposed_copy

# gpu: on a GPU these run the compiled kernels on CUDA tensors (bench/gpu_proof.py selects `-m gpu`).
pytestmark = pytest.mark.gpu


def check_lam(backend, mask, alpha):
    lam = run_with(backend, ops.length_adaptive_lam, mask, alpha)
    assert lam.dtype == torch.float32 and lam.shape == mask.shape[:1]
    # float32 output: one rounding of the float64 value.
    assert_close(lam, reference.length_adaptive_lam(mask, alpha, torch.float64), name="length_adaptive_lam", atol=0)


@pytest.mark.parametrize("backend", backend_params("length_adaptive_lam"))
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (6, 37), (5, 300)])
@pytest.mark.parametrize("alpha", [0.05, 1.0, 1e-4])
def test_length_adaptive_lam(backend, shape, alpha):
    check_lam(backend, hard_mask(*shape, seed=sum(shape)), alpha)


@pytest.mark.parametrize("backend", backend_params("length_adaptive_lam"))
def test_length_adaptive_lam_mask_dtypes_and_layouts(backend):
    """bool, float and non-contiguous masks; holes count as padding (length = the number of valid tokens)."""
    mask = hard_mask(7, 40, seed=3)
    check_lam(backend, mask.bool(), 0.05)
    check_lam(backend, transposed_copy(mask.float()), 0.05)
    holes = (torch.rand(7, 40, generator=torch.Generator().manual_seed(4)) < 0.5).to(mask.device)
    check_lam(backend, holes, 0.05)
    check_lam(backend, torch.zeros(0, 5, dtype=torch.int64, device=mask.device), 0.05)
    check_lam(backend, torch.zeros(3, 0, dtype=torch.int64, device=mask.device), 0.05)


def test_length_adaptive_lam_values():
    """1 - 1/(alpha L), clamped: 0 up to L = 1/alpha, rising toward 1; an empty row gets 0."""
    lengths = torch.tensor([0, 1, 20, 21, 40, 200])
    mask = torch.arange(200) < lengths[:, None]
    lam = ops.length_adaptive_lam(mask, 0.05)
    expected = torch.tensor([0.0, 0.0, 0.0, 1 - 20 / 21, 0.5, 0.9])
    torch.testing.assert_close(lam, expected)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ops.length_adaptive_lam(mask, 0.0)
