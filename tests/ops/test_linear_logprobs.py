"""linear_token_logprobs: every backend against matmul + log_softmax + gather in float64, forward and all gradients.

Tolerances: float32 inputs meet TOLERANCES[float32]. With bf16 inputs the torch backend computes the logits in
float32 (TOLERANCES[bf16]); the Triton backend computes them with a bf16 matmul, like the unfused model, so its
logits carry one bf16 rounding (relative 2^-8): its tolerance is that of plain PyTorch in bf16, measured per case.
Gradients come back in the input dtype (one rounding allowed by `assert_grad_close`).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastppo import ops
from fastppo.ops import reference
from fastppo.ops.linear_logprobs import linear_token_logprobs_with
from tests.ops.helpers import (
    DEVICE,
    assert_close,
    assert_grad_close,
    backend_params,
    f64,
    poisoned_outputs,
    randn,
    run_with,
    seeded,
)

# gpu: on a GPU these run the compiled kernels on CUDA tensors (bench/gpu_proof.py selects `-m gpu`).
pytestmark = pytest.mark.gpu

BACKENDS = backend_params("linear_token_logprobs")


def make_inputs(lead_shape, H, V, dtype, with_bias, seed=0):
    hidden = randn(*lead_shape, H, dtype=dtype, seed=seed)
    weight = randn(V, H, dtype=dtype, scale=H**-0.5 * 2, seed=seed + 1)
    bias = randn(V, dtype=dtype, seed=seed + 2) if with_bias else None
    tokens = torch.randint(0, V, lead_shape, generator=seeded(seed)).to(DEVICE)
    return hidden, weight, bias, tokens


def unfused_error(hidden, weight, bias, tokens, temperature, expected):
    """The error plain PyTorch makes in the inputs' dtype: the yardstick for a low-precision backend."""
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden, weight, bias)
        logprobs, entropy = reference.token_logprobs_and_entropy(logits.float(), tokens, temperature)
    return [float((got.double() - want).abs().max()) for got, want in zip((logprobs, entropy), expected, strict=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "lead_shape, H, V, with_bias, temperature",
    [
        ((9,), 5, 7, False, 1.0),
        ((2, 7), 19, 1000, True, 0.8),
        ((1,), 16, 50257, False, 1.0),
        ((3, 1), 33, 257, True, 1.3),
    ],
    ids=["N9-V7", "B2T7-V1000-bias", "T1-V50257", "B3T1-V257-bias"],
)
def test_matches_reference(backend, dtype, lead_shape, H, V, with_bias, temperature):
    hidden, weight, bias, tokens = make_inputs(lead_shape, H, V, dtype, with_bias, seed=V)
    params = [p.detach().requires_grad_(True) for p in (hidden, weight, bias) if p is not None]
    hidden, weight, bias = params[0], params[1], params[2] if with_bias else None
    logprobs, entropy = run_with(
        backend, ops.linear_token_logprobs, hidden, weight, tokens, temperature, bias, with_entropy=True
    )
    params64 = [f64(p).requires_grad_(True) for p in params]
    bias64 = params64[2] if with_bias else None
    expected = reference.linear_token_logprobs(params64[0], params64[1], tokens, temperature, bias64, True)

    low_precision_matmul = dtype != torch.float32 and backend == "triton"
    yardstick = unfused_error(hidden.detach(), weight.detach(), bias, tokens, temperature, expected)
    for got, want, name, plain_error in zip(
        (logprobs, entropy), expected, ("logprobs", "entropy"), yardstick, strict=True
    ):
        atol = 2 * plain_error + 1e-3 if low_precision_matmul else None
        assert_close(got, want, dtype, name=name, atol=atol)

    w_logp = randn(*lead_shape, dtype=torch.float64, seed=21)
    w_entropy = randn(*lead_shape, dtype=torch.float64, seed=22)
    (logprobs.double() * w_logp + entropy.double() * w_entropy).sum().backward()
    (expected[0] * w_logp + expected[1] * w_entropy).sum().backward()
    for p, p64, name in zip(params, params64, ("hidden", "weight", "bias")[: len(params)], strict=True):
        assert p.grad.dtype == p.dtype
        scale = float(p64.grad.abs().max()) * (8 if low_precision_matmul else 1)
        assert_grad_close(p.grad, p64.grad, dtype, name=f"grad {name}", scale=max(scale, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    """N = 0 (a micro-batch whose responses are all empty): empty outputs, and zero gradients, not unwritten ones."""
    hidden, weight, _, tokens = make_inputs((0,), 8, 300, torch.float32, False)
    hidden, weight = hidden.requires_grad_(True), weight.requires_grad_(True)
    logprobs, entropy = run_with(backend, ops.linear_token_logprobs, hidden, weight, tokens, with_entropy=True)
    assert logprobs.shape == entropy.shape == (0,)
    run_with(backend, lambda: (logprobs.sum() + entropy.sum()).backward())
    assert hidden.grad.shape == (0, 8) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_and_frozen_weight(backend):
    """with_entropy=False returns one tensor; a frozen LM head gets no gradient while hidden still does."""
    hidden, weight, _, tokens = make_inputs((4, 6), 8, 97, torch.float32, False, seed=3)
    hidden.requires_grad_(True)
    logprobs = run_with(backend, ops.linear_token_logprobs, hidden, weight, tokens)
    logprobs.sum().backward()
    hidden64 = f64(hidden).requires_grad_(True)
    expected = reference.linear_token_logprobs(hidden64, f64(weight), tokens)
    expected.sum().backward()
    assert weight.grad is None
    assert_close(logprobs, expected, name="logprobs")
    assert_close(hidden.grad, hidden64.grad, name="grad hidden")


class AllocationTracker(TorchDispatchMode):
    """Records the largest tensor any op produces (numel), to show the (N, V) logits never exist."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_torch_backend_never_materializes_logits():
    N, H, V = 512, 16, 3000
    hidden, weight, bias, tokens = make_inputs((N,), H, V, torch.float32, True, seed=4)
    params = [p.requires_grad_(True) for p in (hidden, weight, bias)]
    with ops.use_backend("torch"), AllocationTracker() as tracker:
        logprobs, entropy = ops.linear_token_logprobs(*params[:2], tokens, 1.0, params[2], with_entropy=True)
        (logprobs.sum() + entropy.sum()).backward()
    assert tracker.largest <= N * V / 8, f"a tensor of {tracker.largest} elements exists; logits have {N * V}"
    with AllocationTracker() as unfused:  # the tracker itself sees the unfused logits
        reference.linear_token_logprobs(*params[:2], tokens, 1.0, params[2]).sum().backward()
    assert unfused.largest >= N * V


def test_bad_shapes_are_named():
    hidden, weight, _, tokens = make_inputs((4,), 8, 11, torch.float32, False)
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear_token_logprobs(hidden, weight.t(), tokens)
    with pytest.raises(ValueError, match="bias must be"):
        ops.linear_token_logprobs(hidden, weight, tokens, bias=torch.zeros(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_token", [-1, 97])
def test_out_of_range_token_raises(backend, bad_token):
    hidden, weight, _, tokens = make_inputs((4,), 8, 97, torch.float32, False, seed=6)
    tokens[1] = bad_token
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V=97\), got values in"):
        run_with(backend, ops.linear_token_logprobs, hidden, weight, tokens)


def chunk_kernels(backend: str):
    """The per-tile kernels a backend's linear_token_logprobs runs."""
    if backend == "torch":
        from fastppo.ops.linear_logprobs import TORCH_KERNELS

        return TORCH_KERNELS
    if backend == "native":
        from fastppo.ops.native import NATIVE_CHUNK_KERNELS

        return NATIVE_CHUNK_KERNELS
    from fastppo.kernels.linear_logprobs import TRITON_KERNELS

    return TRITON_KERNELS


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_backward_skips_entropy(backend):
    """with_entropy=False: the tiles' backward is handed no entropy gradient (None, not zeros) and skips its term."""
    kernels = chunk_kernels(backend)
    seen = []

    def backward(*args):
        seen.append(args[5] is not None)  # (logits, tokens, lse, entropy, grad_logprobs, grad_entropy, temperature)
        return kernels.backward(*args)

    hidden, weight, _, tokens = make_inputs((2,), 8, 200, torch.float32, False, seed=7)
    hidden.requires_grad_(True)
    with poisoned_outputs():
        logprobs = linear_token_logprobs_with(
            kernels._replace(backward=backward), hidden, weight, tokens, 0.9, None, False
        )
    logprobs.sum().backward()
    assert seen and not any(seen), "the tile backward was handed an entropy gradient"
    hidden64 = f64(hidden).requires_grad_(True)
    reference.linear_token_logprobs(hidden64, f64(weight), tokens, 0.9).sum().backward()
    assert_close(hidden.grad, hidden64.grad, name="grad hidden")
