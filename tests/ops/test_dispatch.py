"""dispatch's float64 rule: a backend's float32 kernels hand float64 inputs to the torch backend (the reference)."""

from __future__ import annotations

import pytest
import torch

from fastppo import ops
from fastppo.ops import dispatch, reference
from tests.ops.helpers import assert_close, randn, run_with, seeded

NATIVE_MISSING = dispatch.unavailable_reason("native", "gae", "cpu")


@pytest.mark.skipif(NATIVE_MISSING is not None, reason=f"native kernels unavailable: {NATIVE_MISSING}")
@pytest.mark.parametrize("op", dispatch.OPS)
def test_native_float64_inputs_run_the_torch_backend_unless_the_kernel_takes_them(op):
    from fastppo.ops import native

    with ops.use_backend("native"):
        float32, float64 = (dispatch.implementation(op, "cpu", dtype) for dtype in (torch.float32, torch.float64))
    with ops.use_backend("torch"):
        torch_backend = dispatch.implementation(op, "cpu", torch.float64)
    assert float32 is getattr(native, op)
    assert float64 is (float32 if op in native.FLOAT64_OPS else torch_backend)


@pytest.mark.skipif(NATIVE_MISSING is not None, reason=f"native kernels unavailable: {NATIVE_MISSING}")
def test_native_linear_token_logprobs_takes_float64_inputs():
    """Its C++ tile kernel refuses float64 logits; the rule sends them to the torch backend's tiled version."""
    hidden, weight = (randn(*shape, dtype=torch.float64, seed=i).cpu() for i, shape in enumerate([(2, 5, 8), (33, 8)]))
    tokens = torch.randint(0, 33, (2, 5), generator=seeded(3))
    logprobs = run_with("native", ops.linear_token_logprobs, hidden, weight, tokens)
    assert logprobs.dtype == torch.float64
    expected = reference.linear_token_logprobs(hidden, weight, tokens)
    assert_close(logprobs, expected, dtype=torch.float64, name="linear_token_logprobs")
