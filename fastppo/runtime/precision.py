"""Which dtype the forward and backward passes compute in: the `precision` field of PPOConfig and DPOConfig.

Weights, optimizer state and the PPO math (advantages, KL, losses) stay float32 whatever this says; `bf16` runs the
models' matmuls under bf16 autocast, and the hf engine's decode multiplies bf16 copies of the weights. On CUDA that
is the usual setting (TRL's and OpenRLHF's bf16). On a CPU it pays only where the cores multiply bf16 natively (AMX
or AVX-512 BF16: Sapphire Rapids and later, Zen 4 and later); an AVX-512 CPU without them converts each bf16 operand
to float32, which makes the products and a whole PPO iteration slower than float32's (bench/README.md's precision
rows). So on a CPU 'auto' is bf16 only where the CPU has the instructions and a probe at start-up, the model's own
largest layer multiplied both ways, measured bf16 at least `MIN_SPEEDUP` times faster, for models of
`MIN_PARAMETERS` or more; float32 elsewhere. `fastppo doctor` says whether this CPU has the instructions, and the
trainer reports what bf16 changed (`precision/logprob_gap`).
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

PRECISIONS = ("auto", "float32", "bf16")
PRECISION_HELP = (
    "What the models compute in: 'bf16' (autocast; weights, optimizer and losses stay float32), 'float32', or "
    "'auto': bf16 on CUDA, and on a CPU with AMX / AVX-512 BF16 (`fastppo doctor`) for models of 10M+ parameters "
    "where a start-up probe at the model's shapes measured bf16 faster; float32 elsewhere."
)
# 'auto' on a CPU takes bf16 for models whose linear layers (the LM head aside) hold at least MIN_PARAMETERS: below
# that an iteration is mostly per-op overhead, which bf16 does not shorten, and a probe at such small shapes moves
# with the machine's load and thread count. For those, the probe multiplies PROBE_ROWS rows (a micro-batch's
# tokens) by the model's largest layer, and bf16 is taken when it is at least MIN_SPEEDUP times faster. Where bf16
# paid end to end (bench/README.md, AMD Zen 4): not at the bench config's 3M parameters of layers, at the varlen
# size's 25M and SmolLM2's 106M.
MIN_PARAMETERS = 10_000_000
PROBE_ROWS = 512
PROBE_SECONDS = 0.003  # one try of the probe, in float32
MIN_SPEEDUP = 1.5


def cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first CPU's `name` line of Linux's cpuinfo (flags, vendor_id...), "" where unreadable or absent."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == name), "")
    except OSError:
        return ""


@functools.cache
def cpu_multiplies_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 dot-product instructions (Linux's cpuinfo flags; False where unreadable)."""
    flags = cpuinfo_field("flags", cpuinfo).split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device, model=None) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, None for plain float32. 'auto' is bf16 on CUDA, and on a CPU
    where `bf16_pays_on_cpu(model)` (float32 without a model to probe)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision == "auto" and device.type == "cpu" and model is not None and bf16_pays_on_cpu(model):
        return torch.bfloat16
    return None


def bf16_pays_on_cpu(model) -> bool:
    """Whether this CPU multiplies bf16 natively, `model`'s linear layers (LM head aside) hold at least
    MIN_PARAMETERS and the probe at the largest of them measured bf16 autocast at least MIN_SPEEDUP times faster."""
    shapes = _linear_shapes(model)
    if not cpu_multiplies_bf16() or sum(out * inp for out, inp in shapes) < MIN_PARAMETERS:
        return False
    return bf16_speedup(*_largest(shapes)) >= MIN_SPEEDUP


def _linear_shapes(model) -> list[tuple[int, int]]:
    """(out, in) of every linear layer outside the LM head (whose vocabulary-wide product would make the probe as slow
    as a step; its rows are a body layer's anyway)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def _largest(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    return max(shapes, key=lambda shape: shape[0] * shape[1])


@functools.cache
def bf16_speedup(out_features: int, in_features: int, rows: int = PROBE_ROWS) -> float:
    """float32's time over bf16 autocast's for (rows, in) @ (in, out): each the best of a few tries of enough
    products to take a few milliseconds (a tiny product's time is mostly the call's, and a busy machine only ever
    makes a try slower). Measured once a process for each shape: the choice stays put within a run."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(rows, in_features, generator=g), torch.randn(out_features, in_features, generator=g)

    def seconds(repeats: int) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, weight)
        return time.perf_counter() - start

    seconds(1)  # the first call allocates
    repeats = max(1, min(1000, int(PROBE_SECONDS / max(seconds(1), 1e-7))))

    def best(tries: int = 5) -> float:
        seconds(1)
        return min(seconds(repeats) for _ in range(tries))

    float32 = best()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = best()
    return float32 / bf16


def describe(precision: str, dtype: torch.dtype | None, device: torch.device, model=None) -> str:
    """One line for the run's log: what `precision` resolved to here, and why."""
    chosen = "bf16" if dtype is not None else "float32"
    if precision != "auto" or device.type != "cpu":
        return f"precision {precision}: {chosen} on {device.type}"
    if not cpu_multiplies_bf16():
        return "precision auto: float32 (this CPU has neither AMX nor AVX-512 BF16)"
    shapes = _linear_shapes(model) if model is not None else []
    parameters = sum(out * inp for out, inp in shapes)
    if parameters < MIN_PARAMETERS:
        return (
            f"precision auto: float32 (the model's layers hold {parameters / 1e6:.1f}M parameters, under the "
            f"{MIN_PARAMETERS / 1e6:.0f}M below which bf16 does not pay)"
        )
    out, inp = _largest(shapes)
    return (
        f"precision auto: {chosen} (bf16 autocast multiplied {PROBE_ROWS} rows by the model's largest layer "
        f"{out}x{inp} {bf16_speedup(out, inp):.2f}x as fast as float32 here; the bar is {MIN_SPEEDUP}x)"
    )


def computed_in(dtype: torch.dtype | None) -> str:
    """What a checkpoint records of the run's precision, for `kept_on_resume`."""
    return "float32" if dtype is None else "bf16"


def kept_on_resume(precision: str, device: torch.device, recorded: str | None) -> torch.dtype | None | bool:
    """On resume, the autocast dtype the run's start chose (`recorded`: its `computed_in`), or False to resolve
    `precision` again. 'auto' on a CPU is a timing, and a run must not change precision halfway; an explicit
    precision is honoured, and a checkpoint that recorded nothing resolves again."""
    if precision != "auto" or device.type != "cpu" or recorded is None:
        return False
    return torch.bfloat16 if recorded == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The context the models' forward (and so their backward) runs in."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
