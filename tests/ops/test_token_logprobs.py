"""token_logprobs / token_logprobs_and_entropy: every backend against the float64 reference, forward and backward.

Tolerances: TOLERANCES[dtype] from helpers on the values; log-probs of rows holding +-1e4 logits are ~1e4 in size, so
the relative part of the tolerance applies. Gradients come back in the logits' dtype: `assert_grad_close` allows one
rounding to it on top.
"""

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
    backends,
    f64,
    randn,
    run_with,
    seeded,
)

# gpu: on a GPU these run the compiled kernels on CUDA tensors (bench/gpu_proof.py selects `-m gpu`).
pytestmark = pytest.mark.gpu

BACKENDS = backend_params("token_logprobs")


def random_tokens(shape, V, seed=0):
    return torch.randint(0, V, shape, generator=seeded(seed)).to(DEVICE)


def check_against_reference(backend, logits, tokens, temperature=1.0, dtype=torch.float32, grad=True):
    """Forward (log-probs and entropy) and the gradient of a random weighting of both."""
    logits = logits.detach().requires_grad_(grad)
    logprobs, entropy = run_with(backend, ops.token_logprobs_and_entropy, logits, tokens, temperature)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == tokens.shape

    logits64 = f64(logits).requires_grad_(grad)
    expected_logprobs, expected_entropy = reference.token_logprobs_and_entropy(logits64, tokens, temperature)
    assert_close(logprobs, expected_logprobs, dtype, name="logprobs")
    assert_close(entropy, expected_entropy, dtype, name="entropy")
    if not grad:
        return
    w_logp = randn(*tokens.shape, dtype=torch.float64, seed=11)
    w_entropy = randn(*tokens.shape, dtype=torch.float64, seed=12)
    (logprobs.double() * w_logp + entropy.double() * w_entropy).sum().backward()
    (expected_logprobs * w_logp + expected_entropy * w_entropy).sum().backward()
    assert logits.grad.dtype == logits.dtype
    assert_grad_close(logits.grad, logits64.grad, dtype, name="grad logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "lead_shape, V",
    [((9,), 7), ((2, 5), 1000), ((1,), 50257), ((3, 1), 257), ((2,), 151936)],
    ids=["N9-V7", "B2T5-V1000", "T1-V50257", "B3T1-V257", "N2-V151936"],
)
def test_matches_reference(backend, dtype, lead_shape, V):
    logits = randn(*lead_shape, V, dtype=dtype, scale=3.0, seed=V)
    check_against_reference(backend, logits, random_tokens(lead_shape, V, seed=V), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature(backend, temperature):
    logits = randn(4, 6, 333, scale=2.0, seed=1)
    check_against_reference(backend, logits, random_tokens((4, 6), 333, seed=1), temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_extreme_logits(backend, dtype):
    """+-1e4 and -inf entries: no overflow in the online logsumexp, and p log p = 0 where p = 0."""
    V = 301
    logits = randn(4, V, dtype=torch.float64, scale=3.0, seed=2)
    logits[0, 5] = 1e4
    logits[1, :50] = -1e4
    logits[2, ::3] = float("-inf")
    logits[3, 7] = -1e4
    tokens = torch.tensor([5, 60, 1, 7], device=DEVICE)  # finite logits; row 3 targets a -1e4 logit
    big = 6e4 if dtype == torch.float16 else 1e4  # fp16 tops out at 65504
    logits[0, 5] = big
    check_against_reference(backend, logits.to(dtype), tokens, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_of_single_finite_logit_and_minus_inf_target(backend):
    """A one-hot row has zero entropy; a target at a -inf logit has log-prob -inf (no gradient check: inf loss)."""
    logits = torch.full((2, 37), float("-inf"), device=DEVICE)
    logits[0, 3] = 1.5
    logits[1, :] = randn(37, seed=3)
    logits[1, 9] = float("-inf")
    tokens = torch.tensor([3, 9], device=DEVICE)
    check_against_reference(backend, logits, tokens, grad=False)
    logprobs, entropy = run_with(backend, ops.token_logprobs_and_entropy, logits, tokens)
    assert logprobs[0].item() == 0.0 and entropy[0].item() == 0.0
    assert logprobs[1].item() == float("-inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """PPO scores logits[:, :-1] against input_ids[:, 1:]: strided views, and a logits tensor with strided V."""
    logits = randn(3, 8, 129, seed=4)
    tokens = random_tokens((3, 8), 129, seed=4)
    check_against_reference(backend, logits[:, :-1], tokens[:, 1:])
    transposed = randn(129, 5, seed=5).t()  # (5, 129) with stride 5 along V
    check_against_reference(backend, transposed, random_tokens((5,), 129, seed=5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_gradient_and_int32_tokens(backend):
    logits = randn(6, 77, seed=6).requires_grad_(True)
    tokens = random_tokens((6,), 77, seed=6).to(torch.int32)
    logprobs = run_with(backend, ops.token_logprobs, logits, tokens, 0.9)
    logprobs.sum().backward()
    logits64 = f64(logits).requires_grad_(True)
    expected = reference.token_logprobs(logits64, tokens.long(), 0.9)
    expected.sum().backward()
    assert_close(logprobs, expected, name="logprobs")
    assert_close(logits.grad, logits64.grad, name="grad logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    logits = torch.zeros(0, 11, device=DEVICE)
    tokens = torch.zeros(0, dtype=torch.long, device=DEVICE)
    logprobs, entropy = run_with(backend, ops.token_logprobs_and_entropy, logits, tokens)
    assert logprobs.shape == entropy.shape == (0,)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="tokens has shape"):
        ops.token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        ops.token_logprobs(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        ops.token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_token", [-1, 37])
def test_out_of_range_token_raises(backend, bad_token):
    """Checked once, before any backend runs: the reference's gather would raise, a GPU kernel read outside the row."""
    logits = randn(3, 37, seed=7)
    tokens = torch.tensor([0, bad_token, 36], device=DEVICE)
    for op in (ops.token_logprobs, ops.token_logprobs_and_entropy):
        with pytest.raises(ValueError, match=r"tokens must lie in \[0, V=37\), got values in"):
            run_with(backend, op, logits, tokens)


def test_triton_kernel_masks_out_of_range_token():
    """Called directly, past the op's check, the kernel's masked load gives nan for such a token (never a read
    outside the row), and the right values for the other rows and for every entropy."""
    if "triton" not in backends("token_logprobs"):
        pytest.skip("no Triton here")
    from fastppo.kernels.token_logprobs import _forward

    logits = randn(3, 37, seed=7)
    tokens = torch.tensor([5, 37, -5], device=DEVICE)
    logprobs, entropy, _ = _forward(logits, tokens, 1.0)
    expected_logprobs, expected_entropy = reference.token_logprobs_and_entropy(f64(logits), tokens.clamp(0, 36))
    assert logprobs[1:].isnan().all()
    assert_close(logprobs[:1], expected_logprobs[:1], name="logprobs")
    assert_close(entropy, expected_entropy, name="entropy")


def spy_on_entropy_gradient(backend, monkeypatch) -> list[bool] | None:
    """Records, per backward of the backend's kernels, whether they were handed an entropy gradient; None for the
    torch backend, whose autograd computes only the gradients needed anyway."""
    seen = []

    def spy(backward):
        def recorded(*args, **kwargs):
            seen.append(args[5] is not None)  # (logits, tokens, lse, entropy, grad_logprobs, grad_entropy, ...)
            return backward(*args, **kwargs)

        return recorded

    if backend == "triton":
        from fastppo.kernels import token_logprobs as triton_kernels

        monkeypatch.setattr(triton_kernels, "_backward", spy(triton_kernels._backward))
    elif backend == "native":
        native_ops = torch.ops.fastppo
        monkeypatch.setattr(native_ops, "token_logprobs_backward", spy(native_ops.token_logprobs_backward))
    else:
        return None
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_backward_skips_entropy(backend, monkeypatch):
    """An entropy nobody differentiates reaches the backward as None, not as zeros, so its term is skipped
    (HAS_GRAD_ENTROPY=False in the Triton kernel); the gradient is still right."""
    seen = spy_on_entropy_gradient(backend, monkeypatch)
    logits = randn(5, 300, dtype=torch.bfloat16, scale=3.0, seed=8).requires_grad_(True)
    tokens = random_tokens((5,), 300, seed=8)
    logits64 = f64(logits).requires_grad_(True)
    reference.token_logprobs(logits64, tokens, 0.8).sum().backward()

    run_with(backend, ops.token_logprobs, logits, tokens, 0.8).sum().backward()
    assert_grad_close(logits.grad, logits64.grad, torch.bfloat16, name="grad logits (token_logprobs)")
    logits.grad = None
    logprobs, _unused_entropy = run_with(backend, ops.token_logprobs_and_entropy, logits, tokens, 0.8)
    logprobs.sum().backward()
    assert_grad_close(logits.grad, logits64.grad, torch.bfloat16, name="grad logits (entropy unused)")
    logprobs, entropy = run_with(backend, ops.token_logprobs_and_entropy, logits, tokens, 0.8)
    (logprobs.sum() + 0.01 * entropy.sum()).backward()
    if seen is not None:
        assert seen == [False, False, True]
