"""group_advantages (GRPO, Dr. GRPO, RLOO) on every backend, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from fastppo import ops
from fastppo.ops import reference
from tests.ops.helpers import FLOAT_DTYPES, assert_close, backend_params, f64, randn, run_with

# gpu: on a GPU these run the compiled kernels on CUDA tensors (bench/gpu_proof.py selects `-m gpu`).
pytestmark = pytest.mark.gpu

CASES = [
    (estimator, group_size)
    for estimator in reference.GROUP_ADVANTAGE_ESTIMATORS
    for group_size in (1, 2, 3, 8, 64)
    if not (estimator == "rloo" and group_size == 1)
]


def check_groups(backend, scores, group_size, estimator, dtype, eps=1e-6):
    advantages = run_with(backend, ops.group_advantages, scores, group_size, estimator, eps)
    assert advantages.dtype == torch.float32 and advantages.shape == scores.shape
    expected = reference.group_advantages(f64(scores), group_size, estimator, eps)
    assert_close(advantages, expected, dtype, name=f"group_advantages {estimator} G={group_size}")


@pytest.mark.parametrize("backend", backend_params("group_advantages"))
@pytest.mark.parametrize("estimator,group_size", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_group_advantages(backend, estimator, group_size, dtype):
    scores = randn(group_size * 5, dtype=dtype, scale=3.0, seed=group_size)
    check_groups(backend, scores, group_size, estimator, dtype)


@pytest.mark.parametrize("backend", backend_params("group_advantages"))
@pytest.mark.parametrize("estimator", reference.GROUP_ADVANTAGE_ESTIMATORS)
def test_group_advantages_hard_groups(backend, estimator):
    """Equal scores in a group (std 0: grpo gives 0, not nan), a large common offset, huge and tiny scales, a
    strided view."""
    equal = torch.full((8,), 0.7)
    offset = 1e4 + torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    huge = 1e30 * torch.randn(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tiny = 1e-20 * torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scores = torch.cat([equal.double(), offset, huge, tiny]).float().to(randn(1).device)
    check_groups(backend, scores, 4, estimator, torch.float32)
    strided = torch.stack([scores, -scores], 1)[:, 0]
    assert not strided.is_contiguous()
    check_groups(backend, strided, 8, estimator, torch.float32)
    check_groups(backend, scores[:0], 4, estimator, torch.float32)


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(
        reference.group_advantages(scores, 3, "dr_grpo"),
        torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64),
    )
    # std of (1, 2, 3) with Bessel's correction is 1
    grpo = reference.group_advantages(scores, 3, "grpo")  # and std 0 gives 0 / eps = 0
    torch.testing.assert_close(
        grpo, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64), atol=2e-6, rtol=0
    )
    # rloo: 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2
    torch.testing.assert_close(
        reference.group_advantages(scores, 3, "rloo"),
        torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0], dtype=torch.float64),
    )
    assert (reference.group_advantages(scores, 1, "grpo") == 0).all()  # a group of one: no std, advantage 0


@pytest.mark.parametrize(
    "scores,group_size,estimator,error",
    [
        (torch.zeros(6), 1, "rloo", "rloo needs group_size >= 2"),
        (torch.zeros(6), 4, "grpo", "whole groups"),
        (torch.zeros(6), 0, "grpo", "group_size must be a positive int"),
        (torch.zeros(6), 2, "ppo", "estimator must be one of"),
        (torch.zeros(2, 3), 3, "grpo", r"scores must be \(B,\)"),
        (torch.zeros(6, dtype=torch.int64), 3, "grpo", "floating-point"),
    ],
)
def test_group_advantages_rejects(scores, group_size, estimator, error):
    with pytest.raises((ValueError, TypeError), match=error):
        ops.group_advantages(scores, group_size, estimator)
