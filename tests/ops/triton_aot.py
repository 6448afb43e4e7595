"""Ahead-of-time compile of every Triton kernel in `kernels/` for a GPU this machine need not have.

The interpreter (TRITON_INTERPRET=1, how the op tests run without a GPU) accepts code a real compile rejects and
registers never run out in it. This compiles each kernel as its launcher actually launches it, for one NVIDIA
architecture, through Triton's own compiler and its bundled ptxas, and reports per configuration:

    registers per thread, spill bytes (the stack frame: no kernel here has local arrays, so it is all spills),
    shared memory bytes, and the format reached (cubin; ptx only when no ptxas is found: no registers then)

How the configurations are found: each case below calls a real launcher with `meta` tensors (shapes, dtypes and
strides but no memory) while `JITFunction.run` is replaced by a recorder, so the grid-independent part of every
launch (argument types, Triton's integer/alignment specialization, constexprs, num_warps, enable_fp_fusion) is
exactly what a GPU run would compile; Triton's own binder and option parser turn it into the compile call.
Identical compiles are made once.

Run in a process where TRITON_INTERPRET is unset, before any kernel module is imported (under the interpreter
@triton.jit makes interpreter objects that cannot be compiled):

    python -m tests.ops.triton_aot --arch 90          # a table
    python -m tests.ops.triton_aot --arch 80 --json   # {"kernels": [...], "rows": [...]} for the test
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import NamedTuple

import torch

ARCHS = (80, 90)  # A100, H100/H200
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


class Case(NamedTuple):
    name: str  # what the launcher was asked to do, e.g. "token_logprobs (4096, 151936) entropy=True sliced=False bf16"
    dtype: torch.dtype  # the inputs' float dtype: spills fail the test unless it is float64
    run: Callable[[], object]  # calls the launcher (forward, and backward where there is a backward kernel)


class Launch(NamedTuple):
    case: Case
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


# ----------------------------------------------------------------------------------------------
# the cases: the launchers' configurations, one per dtype and flag combination
# ----------------------------------------------------------------------------------------------


def meta(*shape, dtype=torch.float32, grad=False):
    return torch.zeros(shape, dtype=dtype, device="meta").requires_grad_(grad)


def backward(*outputs):
    """Backpropagate ones from the outputs that need a gradient (meta tensors: no arithmetic happens)."""
    outputs = [x for x in outputs if x.requires_grad]
    torch.autograd.backward(outputs, [torch.ones_like(x) for x in outputs])


def variants(**flags: tuple):
    """(dtype, flags) to compile: every dtype with each flag at its first (heaviest) value, and every flag
    combination in float32. Register pressure grows with both, but a cross product would double the test's time."""
    first = {name: values[0] for name, values in flags.items()}
    yield from ((dtype, first) for dtype in ALL_DTYPES)
    for combination in itertools.product(*flags.values()):
        chosen = dict(zip(flags, combination, strict=True))
        if chosen != first:
            yield torch.float32, chosen


def label(op: str, shape, dtype, flags: dict) -> str:
    return " ".join([op, str(shape), *(f"{k}={v}" for k, v in flags.items()), DTYPE_NAMES[dtype]])


def token_logprob_cases():
    from fastppo.kernels import linear_logprobs, sample, token_logprobs

    def logprobs(shape, sliced, entropy, dtype):
        """Log-probs (and entropy) of (..., V) logits and their backward; `sliced` scores logits[:, :-1] of a
        (B, T+1, V) tensor, a 3-d view whose strides are not multiples of 16 with an odd V."""
        logits = meta(*shape, dtype=dtype, grad=True)
        logits = logits[:, :-1] if sliced else logits
        tokens = meta(*logits.shape[:-1], dtype=torch.int64)
        if entropy:
            backward(*token_logprobs.token_logprobs_and_entropy(logits, tokens))
        else:
            backward(token_logprobs.token_logprobs(logits, tokens))

    layouts = (((4096, 151936), False), ((4, 65, 32001), True))
    for shape, sliced in layouts:
        for dtype, flags in variants(entropy=(True, False)):
            run = functools.partial(logprobs, shape, sliced, flags["entropy"], dtype)
            yield Case(label("token_logprobs", shape, dtype, flags | {"sliced": sliced}), dtype, run)
    yield Case("token_logprobs (9, 7)", torch.float32, functools.partial(logprobs, (9, 7), False, True, torch.float32))
    # Row offsets past 2^31 elements: 64-bit strides.
    big = (8, 16385, 151936)
    run = functools.partial(logprobs, big, True, False, torch.bfloat16)
    yield Case(label("token_logprobs", big, torch.bfloat16, {"sliced": True}), torch.bfloat16, run)

    # linear_token_logprobs runs the same launchers on (rows, 4096) tiles of logits, the backward in place; its
    # matmuls cannot run on meta tensors (no autocast there), so its tile kernels are called directly.
    def tile(dtype):
        logits, tokens, rows = meta(256, 4096, dtype=dtype), meta(256, dtype=torch.int64), meta(256)
        linear_logprobs.TRITON_KERNELS.forward(logits, tokens, 1.0)
        linear_logprobs.TRITON_KERNELS.backward(logits, tokens, rows, rows, rows, rows, 1.0)

    for dtype in (torch.float32, torch.bfloat16):
        yield Case(label("linear_token_logprobs tile", (256, 4096), dtype, {}), dtype, functools.partial(tile, dtype))
    for dtype in ALL_DTYPES:
        run = functools.partial(sample.sample_tokens, meta(64, 151936, dtype=dtype), meta(64))
        yield Case(label("sample_tokens", (64, 151936), dtype, {}), dtype, run)


def sequence_cases():
    """The (B, T) ops. The row-block kernels at a long-response shape and at a short one, whose blocks differ."""
    from fastppo.kernels import gae, group_advantages, kl, ppo_loss, whiten

    estimators = ("k3", "k1", "k2", "abs")  # k3 (its expm1 series) first: the most registers

    def shape_rewards(shape, dtype, estimator):
        scores, lp, ref = meta(shape[0], dtype=dtype), meta(*shape, dtype=dtype), meta(*shape, dtype=dtype)
        kl.shape_rewards(scores, lp, ref, meta(*shape, dtype=torch.int64), 0.05, estimator)

    def policy(shape, dtype, dual_clip, grad, token_weights, kl_in_loss):
        lp, old, adv = meta(*shape, dtype=dtype, grad=grad), meta(*shape, dtype=dtype), meta(*shape, dtype=dtype)
        weights = meta(*shape, dtype=dtype) if token_weights else None
        ref = meta(*shape, dtype=dtype) if kl_in_loss else None
        ppo_loss.ppo_policy_loss(
            lp,
            old,
            adv,
            meta(*shape, dtype=torch.int64),
            dual_clip=dual_clip,
            token_weights=weights,
            ref_logprobs=ref,
            kl_loss_coef=0.1 if kl_in_loss else 0.0,
        )

    def value(shape, dtype, clip, grad):
        v, old, ret = meta(*shape, dtype=dtype, grad=grad), meta(*shape, dtype=dtype), meta(*shape, dtype=dtype)
        ppo_loss.ppo_value_loss(v, old, ret, meta(*shape, dtype=torch.int64), clip=clip)

    row_block_ops = (
        ("shape_rewards", shape_rewards, {"estimator": estimators}),
        (
            "ppo_policy_loss",
            policy,
            {
                "dual_clip": (3.0, None),
                "grad": (True, False),
                "token_weights": (True, False),
                "kl_in_loss": (True, False),
            },
        ),
        ("ppo_value_loss", value, {"clip": (0.2, None), "grad": (True, False)}),
    )
    for op, launch, flags in row_block_ops:
        for shape in ((64, 1024), (512, 16)):
            for dtype, chosen in variants(**flags):
                yield Case(label(op, shape, dtype, chosen), dtype, functools.partial(launch, shape, dtype, **chosen))

    shape = (64, 1024)

    def kl_penalty(dtype, estimator):
        backward(kl.kl_penalty(meta(*shape, dtype=dtype, grad=True), meta(*shape, dtype=dtype, grad=True), estimator))

    def masked_whiten(dtype, shift_mean):
        whiten.masked_whiten(meta(*shape, dtype=dtype), meta(*shape, dtype=torch.bool), shift_mean)

    def advantages(dtype, per_row_lam, decoupled):
        lam = meta(shape[0], dtype=torch.float32) if per_row_lam else 0.95
        gae.gae(
            meta(*shape, dtype=dtype),
            meta(*shape, dtype=dtype),
            meta(*shape, dtype=torch.int64),
            1.0,
            lam,
            1.0 if decoupled else None,
        )

    def length_adaptive_lam(dtype):
        gae.length_adaptive_lam(meta(*shape, dtype=torch.int64), 0.05)

    def group_scores(dtype, estimator):
        group_advantages.group_advantages(meta(shape[0], dtype=dtype), 8, estimator)

    for op, launch, flags in (
        ("kl_penalty", kl_penalty, {"estimator": estimators}),
        ("masked_whiten", masked_whiten, {"shift_mean": (False, True)}),
        ("gae", advantages, {"per_row_lam": (True, False), "decoupled": (True, False)}),
        ("length_adaptive_lam", length_adaptive_lam, {}),
        ("group_advantages", group_scores, {"estimator": ("grpo", "dr_grpo", "rloo")}),
    ):
        for dtype, chosen in variants(**flags):
            yield Case(label(op, shape, dtype, chosen), dtype, functools.partial(launch, dtype, **chosen))


def cases() -> list[Case]:
    return [*token_logprob_cases(), *sequence_cases()]


# ----------------------------------------------------------------------------------------------
# recording the launches, compiling them
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording(launches: list, case: Case):
    """While active, `kernel[grid](...)` appends a Launch instead of running anything."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(case, self, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = run


def record_launches(only: str = "") -> list[Launch]:
    from triton.runtime.jit import JITFunction

    launches = []
    for case in cases():
        if only not in case.name:
            continue
        with recording(launches, case):
            case.run()
    for launch in launches:
        assert isinstance(launch.kernel, JITFunction), "kernels were imported under TRITON_INTERPRET=1"
    return launches


def bin_tool(name: str) -> str | None:
    """A tool shipped with Triton's NVIDIA backend (cuobjdump), or None."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def compile_request(launch: Launch, target):
    """(ASTSource, options) for a launch, by the same binder and option parsing as JITFunction.run."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def has_ptxas(arch: int) -> bool:
    """Whether Triton finds the ptxas it uses for sm_<arch> (bundled, or TRITON_PTXAS_PATH)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        get_ptxas(arch)
    except RuntimeError:
        return False
    return True


# Without a ptxas, Triton cannot ask it which PTX version to emit: PTX ISA 8.4 (CUDA 12.4) has sm_80 and sm_90a.
FALLBACK_PTX_VERSION = 84


@contextlib.contextmanager
def ptx_only():
    """Stop the compile at PTX, for want of a ptxas to make a cubin."""
    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend

    make_cubin, mock_version = CUDABackend.make_cubin, knobs.nvidia.mock_ptx_version
    CUDABackend.make_cubin = lambda self, src, metadata, options, capability: b""  # an empty cubin: none made
    knobs.nvidia.mock_ptx_version = "no ptxas"  # only names the cache entries, apart from real ones
    try:
        yield
    finally:
        CUDABackend.make_cubin, knobs.nvidia.mock_ptx_version = make_cubin, mock_version


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (one) kernel in a cubin, from `cuobjdump --dump-resource-usage`."""
    cuobjdump = bin_tool("cuobjdump")
    if cuobjdump is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if "REG:" in x)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}


def config_label(launch: Launch, source) -> str:
    constexprs = {launch.kernel.arg_names[path[0]]: value for path, value in source.constants.items()}
    flags = ", ".join(f"{k}={v}" for k, v in constexprs.items())
    warps = launch.kwargs.get("num_warps", 4)
    return f"{launch.case.name} [{flags}; num_warps={warps}]"


def compile_all(arch: int, only: str = "") -> list[dict]:
    """One row per distinct compile of every recorded launch (of the cases whose name contains `only`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    cubin = has_ptxas(arch)
    rows, seen = [], set()
    for launch in record_launches(only):
        source, options = compile_request(launch, target)
        key = (launch.kernel.cache_key, str(source.signature), str(source.constants), str(source.attrs), str(options))
        if key in seen:
            continue
        seen.add(key)
        row = {
            "kernel": launch.kernel.__name__,
            "config": config_label(launch, source),
            "dtype": DTYPE_NAMES[launch.case.dtype],
            "arch": f"sm_{arch}",
            "num_warps": options.num_warps,
            "explicit_fp_fusion": "enable_fp_fusion" in launch.kwargs,
        }
        try:
            if cubin:
                compiled = triton.compile(source, target=target, options=options.__dict__)
            else:
                with ptx_only():
                    ptx_options = options.__dict__ | {"ptx_version": options.ptx_version or FALLBACK_PTX_VERSION}
                    compiled = triton.compile(source, target=target, options=ptx_options)
        except Exception as error:  # noqa: BLE001 - reported per configuration, the test names it
            row["error"] = f"{type(error).__name__}: {str(error).strip()[-2000:]}"
            rows.append(row)
            continue
        row["format"] = "cubin" if compiled.asm["cubin"] else "ptx"
        row["smem"] = compiled.metadata.shared
        usage = resource_usage(compiled.asm["cubin"]) if compiled.asm["cubin"] else {}
        row["regs"] = usage.get("REG")
        row["spill_bytes"] = usage.get("STACK")
        rows.append(row)
    return rows


def kernel_names() -> list[str]:
    """Every launchable @triton.jit kernel in kernels/ (by convention named *_kernel; the rest are device
    functions), so that a kernel without a case here is noticed."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fastppo.kernels

    names = set()
    for module_info in pkgutil.iter_modules(fastppo.kernels.__path__):
        module = importlib.import_module(f"fastppo.kernels.{module_info.name}")
        names.update(
            name for name, x in vars(module).items() if isinstance(x, JITFunction) and name.endswith("_kernel")
        )
    return sorted(names)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'kernel':<28} {'arch':<5} {'regs':>4} {'spill':>5} {'smem':>6} {'to':<5}  config"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['kernel']:<28} {row['arch']:<5} COMPILE ERROR  {row['config']}")
            continue
        regs, spills = ("-", "-") if row["regs"] is None else (row["regs"], row["spill_bytes"])
        lines.append(
            f"{row['kernel']:<28} {row['arch']:<5} {regs:>4} {spills:>5} {row['smem']:>6} {row['format']:<5}  "
            f"{row['config']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=ARCHS, default=90)
    parser.add_argument("--only", default="", help="only the cases whose name contains this, e.g. 'shape_rewards'")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for the test)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = compile_all(args.arch, args.only)
    print(json.dumps({"kernels": kernel_names(), "rows": rows}) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
