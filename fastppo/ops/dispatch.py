"""Backend selection: which implementation of an op runs for tensors on a given device.

Backends, each a module exporting functions with the same names and signatures as `fastppo.ops.reference`:
  torch   `fastppo.ops.reference`: plain PyTorch, runs everywhere, the specification
  native  `fastppo.ops.native`: the C++ kernels of `csrc/` (`fastppo._C`), for CPU tensors (CUDA when built)
  triton  `fastppo.kernels.*`: Triton kernels, for CUDA tensors (CPU tensors too under TRITON_INTERPRET=1)

`auto` (the default) takes the first backend in PREFERENCE that is available for the device and implements the
op. `FASTPPO_BACKEND=torch|native|triton|auto` or `set_backend(...)` forces one; a forced backend that cannot run
an op raises instead of silently falling back, so a benchmark never measures something else than it says.

float64 inputs: a backend module whose kernels compute in float32 lists the ops it does compute in float64 as
FLOAT64_OPS (the native one does); float64 inputs of its other ops run the torch backend, exact in float64.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings

BACKENDS = ("torch", "native", "triton")

# Where each backend keeps each op. Triton kernels live one family per file in kernels/.
_TRITON_MODULES = {
    "token_logprobs": "fastppo.kernels.token_logprobs",
    "token_logprobs_and_entropy": "fastppo.kernels.token_logprobs",
    "linear_token_logprobs": "fastppo.kernels.linear_logprobs",
    "sample_tokens": "fastppo.kernels.sample",
    "kl_penalty": "fastppo.kernels.kl",
    "shape_rewards": "fastppo.kernels.kl",
    "gae": "fastppo.kernels.gae",
    "length_adaptive_lam": "fastppo.kernels.gae",
    "group_advantages": "fastppo.kernels.group_advantages",
    "masked_whiten": "fastppo.kernels.whiten",
    "ppo_policy_loss": "fastppo.kernels.ppo_loss",
    "ppo_value_loss": "fastppo.kernels.ppo_loss",
}
# decode_attention has none: it serves the lean decode steps of a CPU (a GPU decodes with transformers or vLLM).
OPS = (*_TRITON_MODULES, "decode_attention")

# The torch backend runs the references, except where a reference is too wasteful to use for real: the
# linear log-prob reference materializes the (N, V) logits, so its torch backend is the chunked version.
_TORCH_MODULES = {"linear_token_logprobs": "fastppo.ops.linear_logprobs"}

# Fastest first. Interpreted Triton on a CPU is for testing only, so `auto` never picks it there.
PREFERENCE = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}

_forced: str | None = None


def _env_backend() -> str | None:
    name = os.environ.get("FASTPPO_BACKEND", "auto").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTPPO_BACKEND must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every op ('torch', 'native', 'triton'), or go back to automatic choice ('auto'/None)."""
    global _forced
    if name in (None, "auto"):
        _forced = None
        return
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    _forced = name


def get_backend() -> str:
    """The forced backend, or 'auto'."""
    return _forced or _env_backend() or "auto"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run a block with a forced backend: `with use_backend("triton"): ...`."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import(module_name: str):
    return importlib.import_module(module_name)


def _module_for(backend: str, op: str):
    if backend == "torch":
        return _import(_TORCH_MODULES.get(op, "fastppo.ops.reference"))
    if backend == "native":
        return _import("fastppo.ops.native")
    return _import(_TRITON_MODULES[op])


def unavailable_reason(backend: str, op: str, device_type: str) -> str | None:
    """None when `backend` can run `op` on `device_type` tensors, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if device_type == "cpu" and not triton_interpreted():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton has no {device_type} support here"
        if op not in _TRITON_MODULES:
            return f"no Triton kernel for {op}"
        if device_type == "cuda" and not _import("torch").cuda.is_available():
            return "no CUDA device"
        try:
            module = _module_for("triton", op)
        except ImportError as error:
            return f"Triton kernels not importable ({error})"
        return None if hasattr(module, op) else f"no Triton kernel for {op}"
    if backend == "native":
        try:
            native = _module_for("native", op)
        except ImportError as error:
            return f"native extension not importable ({error})"
        return native.unavailable_reason(op, device_type)
    raise ValueError(f"unknown backend {backend!r}")


def select(op: str, device_type: str) -> str:
    """The backend that runs `op` on tensors of `device_type` now."""
    forced = _forced or _env_backend()
    if forced is not None:
        reason = unavailable_reason(forced, op, device_type)
        if reason is not None:
            raise RuntimeError(f"backend {forced!r} was forced but cannot run {op} on {device_type}: {reason}")
        return forced
    for backend in PREFERENCE.get(device_type, ("torch",)):
        if unavailable_reason(backend, op, device_type) is None:
            return backend
    return "torch"


@functools.cache
def _warn_fallback_once(device_type: str) -> None:
    reason = unavailable_reason("native", "gae", device_type)
    if device_type == "cpu" and reason is not None:
        warnings.warn(f"fastppo: native CPU kernels unavailable ({reason}); using the PyTorch reference", stacklevel=3)


def implementation(op: str, device_type: str, dtype=None):
    """The function that implements `op` for `device_type` tensors under the current backend choice; `dtype` is
    that of the op's float inputs (None where it has none)."""
    backend = select(op, device_type)
    if backend == "torch" and _forced is None and _env_backend() is None:
        _warn_fallback_once(device_type)
    module = _module_for(backend, op)
    if dtype is not None and dtype == _import("torch").float64 and op not in getattr(module, "FLOAT64_OPS", OPS):
        # Those kernels compute in float32: float64 inputs (gradchecks, exact tests) get the float64 reference.
        module = _module_for("torch", op)
    return getattr(module, op)


def report(device_types: tuple[str, ...] = ("cpu", "cuda")) -> list[dict[str, str]]:
    """For `fastppo doctor`: per op and device, the chosen backend and why each faster one was passed over."""
    rows = []
    for device_type in device_types:
        for op in OPS:
            try:
                chosen = select(op, device_type)
            except RuntimeError as error:
                chosen, why = "error", str(error)
            else:
                skipped = []
                for backend in PREFERENCE.get(device_type, ("torch",)):
                    if backend == chosen:
                        break
                    skipped.append(f"{backend}: {unavailable_reason(backend, op, device_type)}")
                why = "; ".join(skipped) or ("forced" if get_backend() != "auto" else "fastest available")
            rows.append({"device": device_type, "op": op, "backend": chosen, "why": why})
    return rows
