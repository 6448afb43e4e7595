"""Which dtype the forward and backward passes compute in: the `precision` field of PPOConfig and DPOConfig.

Weights, optimizer state and the PPO math (advantages, KL, losses) stay float32 whatever this says; `bf16` runs the
models' matmuls under bf16 autocast. On CUDA that is the usual setting (TRL's and OpenRLHF's bf16). On a CPU it pays
only where the cores multiply bf16 natively (AMX or AVX-512 BF16: Sapphire Rapids and later, Zen 4 and later); an
AVX-512 CPU without them converts each bf16 operand to float32, which makes the products and a whole PPO iteration
slower than float32's (bench/README.md's precision rows). So 'auto' picks float32 on every CPU, and `fastppo doctor`
says whether this one has the instructions.
"""

from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("auto", "float32", "bf16")
PRECISION_HELP = (
    "What the models compute in: 'bf16' (autocast; weights, optimizer and losses stay float32), 'float32', or "
    "'auto': bf16 on CUDA, float32 on a CPU (bf16 pays only on CPUs with AMX / AVX-512 BF16: `fastppo doctor`)."
)


@functools.cache
def cpu_multiplies_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 dot-product instructions (Linux's cpuinfo flags; False where unreadable)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, None for plain float32: 'auto' is bf16 on CUDA only."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The context the models' forward (and so their backward) runs in."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
