"""Shared machinery for the op tests: every backend x dtype x shape is checked against the float64 reference.

- `backends()` lists the backends that can run on this machine's test device; `run_with(backend, fn, ...)`
  forces one for a call.
- `TOLERANCES[dtype]` is the (atol, rtol) a backend must meet against the float64 reference when its inputs are
  in `dtype`. Inputs are rounded to `dtype` first and the reference sees the same rounded values, so the tolerance
  covers only the kernel's own arithmetic (fp32 accumulation everywhere), not the input rounding. On a GPU the
  compiled Triton kernels differ from the interpreter in ways GPU_TOLERANCES states and covers.
- `poisoned_outputs()` makes every `torch.empty`/`empty_like` return nan-filled memory, so an output element a
  kernel forgets to write shows up as nan instead of as whatever the allocator left there.
- `assert_close(actual, expected, ...)` names the op and prints the worst mismatching indices.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from fastppo.ops import dispatch, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) against the float64 reference for outputs computed from inputs of this dtype, on the CPU: the native
# kernels, the references, and the Triton kernels in Triton's interpreter (numpy arithmetic).
CPU_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-3, 2e-3),  # inputs are exact in bf16; only the fp32 accumulation differs
    torch.float16: (2e-3, 2e-3),
}
# Compiled for a GPU, the Triton kernels differ from the interpreter in ways these must cover:
# - float32 tl.exp / tl.log compile to the approximate ex2.approx / lg2.approx: 2^-22 relative, plus the rounding of
#   x * log2(e) before ex2, 6e-8 |x| relative: 2e-6 at the |x| = 30 of the extreme log-ratio tests (float64 goes
#   through libdevice, correctly rounded or nearly). float32 gets 5e-5, 25x that error and 2.5x the CPU's
#   tolerance, a margin until a GPU run measures it.
# - a * b + c is one FMA (kernels/launch.py: FP_FUSION), rounded once instead of twice: well inside every tolerance.
# - a float32 value stored as bf16 by a kernel rounds to nearest on the GPU; the interpreter truncates, a whole ulp
#   where the GPU is off by half of one (ROUNDING_ULPS).
GPU_TOLERANCES = CPU_TOLERANCES | {torch.float32: (5e-5, 5e-5)}
TOLERANCES = GPU_TOLERANCES if DEVICE == "cuda" else CPU_TOLERANCES
# Ulps of the one rounding allowed for an output stored in a 16-bit dtype (see GPU_TOLERANCES).
ROUNDING_ULPS = 1.0 if dispatch.triton_interpreted() else 0.5
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def backends(op: str = "gae") -> list[str]:
    """Backends that can run `op` on DEVICE here (Triton on CPU needs TRITON_INTERPRET=1, set in conftest)."""
    return [b for b in dispatch.BACKENDS if dispatch.unavailable_reason(b, op, DEVICE) is None]


def backend_params(op: str):
    """pytest params over every backend, with the unavailable ones shown as skips that say why."""
    params = []
    for backend in dispatch.BACKENDS:
        reason = dispatch.unavailable_reason(backend, op, DEVICE)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(backend, id=backend, marks=marks))
    return params


def run_with(backend: str, fn, *args, **kwargs):
    with use_backend(backend), poisoned_outputs():
        return fn(*args, **kwargs)


@contextlib.contextmanager
def poisoned_outputs():
    """Fill fresh allocations with nan (or the int min) so unwritten output elements cannot pass a check."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).min)
        return t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed + int(os.environ.get("FASTPPO_TEST_SEED", "0")))


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    """Random normal values, rounded to `dtype`, on DEVICE."""
    x = torch.randn(*shape, generator=seeded(seed), dtype=torch.float64) * scale
    return x.to(dtype).to(DEVICE)


def random_mask(B: int, T: int, seed: int = 0, empty_rows=(), full_rows=(), one_rows=()) -> torch.Tensor:
    """(B, T) right-padded response mask with random lengths in [1, T], some rows forced empty, full or of length 1."""
    lengths = torch.randint(1, T + 1, (B,), generator=seeded(seed))
    for row in empty_rows:
        lengths[row] = 0
    for row in full_rows:
        lengths[row] = T
    for row in one_rows:
        lengths[row] = 1
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)
    return mask.to(DEVICE)


def f64(x):
    """A float64 copy of a float tensor (other tensors unchanged), for the reference."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double()
    return x


def assert_close(actual, expected, dtype=torch.float32, name="output", atol=None, rtol=None):
    """Compare with the float64 reference within TOLERANCES[dtype]; infinities and nans must match exactly."""
    default_atol, default_rtol = TOLERANCES[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_special = (actual == expected) | (actual.isnan() & expected.isnan())
    close = same_special | ((actual - expected).abs() <= atol + rtol * expected.abs())
    if not bool(close.all()):
        bad = (~close).nonzero()[:5].tolist()
        details = ", ".join(
            f"{tuple(i)}: {actual[tuple(i)].item():.8g} vs {expected[tuple(i)].item():.8g}" for i in bad
        )
        n_bad = int((~close).sum())
        raise AssertionError(f"{name}: {n_bad}/{close.numel()} elements off (atol={atol}, rtol={rtol}); {details}")


def hard_mask(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """A (B, T) mask with the hard rows wherever B allows: row 1 empty, row 2 full, row 3 of length 1."""
    return random_mask(
        B,
        T,
        seed,
        empty_rows=[r for r in (1,) if r < B],
        full_rows=[r for r in (2,) if r < B],
        one_rows=[r for r in (3,) if r < B],
    )


def transposed_copy(x: torch.Tensor) -> torch.Tensor:
    """The same values as x (B, T), laid out column-major: a non-contiguous view."""
    return x.t().contiguous().t()


def with_garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with nan/+inf/-inf at padded positions: none of it may reach an output."""
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype, device=x.device)
    return torch.where(mask.bool(), x, garbage[torch.arange(x.numel(), device=x.device).view(x.shape) % 3])


def assert_grad_close(actual, expected, dtype, name, scale=1.0):
    """Gradients come back in the input dtype, so one rounding to it (ROUNDING_ULPS) is allowed on top of TOLERANCES
    (and inf is right where the float64 gradient overflows it). `scale` is the gradients' natural size (a loss
    weight), which the absolute tolerance is relative to."""
    rounded = expected.to(dtype).double()
    expected = torch.where(rounded.isinf(), rounded, expected)
    atol, rtol = TOLERANCES[dtype]
    rtol += ROUNDING_ULPS * torch.finfo(dtype).eps
    assert_close(actual, expected, dtype, name=name, atol=atol * scale, rtol=rtol)
