"""sample_tokens on every backend: the same tokens as the float64 reference from the same uniform numbers, and
their log-probs within the dtype's tolerance of the float64 log_softmax."""

from __future__ import annotations

import pytest
import torch

from fastppo import ops
from fastppo.ops import reference
from tests.ops.helpers import FLOAT_DTYPES, assert_close, backend_params, randn, run_with

# gpu: on a GPU these run the compiled kernels on CUDA tensors (bench/gpu_proof.py selects `-m gpu`).
pytestmark = pytest.mark.gpu

# Triton's interpreter on a CPU runs one program (row) at a time: it gets fewer rows, and so a wider tolerance.
INTERPRETED = not torch.cuda.is_available()


def rows(backend: str, n: int) -> int:
    return min(n, 64) if backend == "triton" and INTERPRETED else n


def check_sample(backend, logits, uniform, temperature=1.0):
    tokens, logprobs = run_with(backend, ops.sample_tokens, logits, uniform, temperature)  # outputs poisoned
    expected, _ = reference.sample_tokens(logits.double(), uniform, temperature)
    assert tokens.dtype == torch.int64 and tokens.shape == logits.shape[:1]
    assert logprobs.dtype == torch.float32 and logprobs.shape == logits.shape[:1]
    # Identical except where u lands within rounding of a boundary between two tokens' cumulative probabilities:
    # with these sizes that has probability ~1e-4 per row, so allow one row in a thousand.
    assert (tokens != expected).float().mean() <= 1e-3, (tokens, expected)
    # Each drawn token's log-prob (whichever token was drawn) is the float64 log_softmax's at that token.
    exact = torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, tokens.clamp(min=0)[:, None])[:, 0]
    assert_close(logprobs, exact, torch.float32, "logprobs")
    return tokens


@pytest.mark.parametrize("backend", backend_params("sample_tokens"))
@pytest.mark.parametrize("V", [1, 7, 513, 1000, 50257])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference(backend, V, dtype):
    B = rows(backend, 2000) if V <= 1000 else (8 if backend == "triton" else 64)
    logits = randn(B, V, dtype=dtype, scale=3.0, seed=V)
    uniform = torch.rand(B, generator=torch.Generator().manual_seed(V))
    check_sample(backend, logits, uniform, temperature=0.7)


@pytest.mark.parametrize("backend", backend_params("sample_tokens"))
def test_masked_tokens_are_never_drawn_and_bad_rows_say_so(backend):
    B, V = rows(backend, 3000), 600
    logits = randn(B, V, seed=1)
    logits[:, ::2] = float("-inf")  # top-k / top-p masking leaves -inf behind
    uniform = torch.rand(B, generator=torch.Generator().manual_seed(2))
    uniform[:3] = torch.tensor([0.0, 0.5, 1.0 - 2**-24])  # both ends of [0, 1)
    tokens = check_sample(backend, logits, uniform)
    assert (tokens % 2 == 1).all()
    bad = randn(4, V, seed=3)
    bad[0, 5], bad[1, 7], bad[2] = float("nan"), float("inf"), float("-inf")
    tokens, logprobs = run_with(backend, ops.sample_tokens, bad, torch.full((4,), 0.5))
    assert tokens[:3].tolist() == [-1, -1, -1] and 0 <= tokens[3] < V
    assert logprobs[:3].isnan().all() and logprobs[3].isfinite()


@pytest.mark.parametrize("backend", backend_params("sample_tokens"))
def test_frequencies_follow_the_distribution(backend):
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    n = 20000 if not (backend == "triton" and INTERPRETED) else 1000
    logits = probs.log().expand(n, -1).contiguous()
    tokens, _ = run_with(backend, ops.sample_tokens, logits, torch.rand(n, generator=torch.Generator().manual_seed(0)))
    frequencies = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    torch.testing.assert_close(frequencies, probs, atol=4.5 * 0.5 / n**0.5, rtol=0)  # 4.5 sigma at most


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="uniform must be"):
        ops.sample_tokens(torch.zeros(2, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.sample_tokens(torch.zeros(2, 5), torch.zeros(2), 0.0)
