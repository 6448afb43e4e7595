"""`fastppo doctor`: which backend each op uses on this machine, and why the faster ones were passed over.

It imports torch and the kernels only: no model, no transformers, so it answers in a second. Run it first when an
install is slow or a backend is missing; `fastppo selfcheck` then checks the chosen backends' numbers.
"""

from __future__ import annotations

import platform


def versions() -> dict[str, str]:
    """The versions that decide the backends: Python, torch (and its CUDA), Triton, the native extension."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as error:
        info["triton"] = f"not importable ({error})"
    info["native"] = native_extension()
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    info["cpu bf16"] = cpu_bf16()
    return info


def cpu_bf16() -> str:
    """Whether `precision: bf16` pays on this CPU (see fastppo.runtime.precision)."""
    from fastppo.runtime.precision import cpu_multiplies_bf16

    if cpu_multiplies_bf16():
        return "native (AMX / AVX-512 BF16): precision: bf16 computes faster than float32"
    return "emulated (no AMX / AVX-512 BF16): keep precision float32 ('auto') on this CPU"


def native_extension() -> str:
    """Which native extension this process uses: prebuilt at install, compiled on first use, or none and why."""
    from fastppo.ops.native_build import load

    native = load()
    if native.module is None:
        return f"none: {native.detail}"
    how = "prebuilt fastppo._C" if native.origin == "prebuilt" else "compiled on first use"
    return f"{how}, {native.module.build_info()['threads']} threads ({native.detail})"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--device", action="append", choices=("cpu", "cuda"), help="device type to report (default: cpu and cuda)"
    )


def run(args) -> int:
    from fastppo.ops import dispatch

    for name, value in versions().items():
        print(f"{name:11s} {value}")
    print(f"\nbackend choice: {dispatch.get_backend()} (FASTPPO_BACKEND or fastppo.ops.set_backend to force one)")
    rows = dispatch.report(tuple(args.device or ("cpu", "cuda")))
    width = max(len(r["op"]) for r in rows)
    print(f"\n{'device':6s}  {'op':{width}s}  {'backend':7s}  why")
    for r in rows:
        print(f"{r['device']:6s}  {r['op']:{width}s}  {r['backend']:7s}  {r['why']}")
    return 0
