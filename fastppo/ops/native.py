"""The native C++ kernels of `csrc/`, compiled into `fastppo._C` by setup.py (placeholder until they exist)."""

from __future__ import annotations

try:
    from fastppo import _C  # noqa: F401
except ImportError as error:  # built optionally; dispatch falls back
    _C = None
    IMPORT_ERROR = str(error)
else:
    IMPORT_ERROR = None


def unavailable_reason(op: str, device_type: str) -> str | None:
    if _C is None:
        return f"fastppo._C not built ({IMPORT_ERROR})"
    return f"no native kernel for {op}"
