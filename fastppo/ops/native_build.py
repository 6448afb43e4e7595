"""Finding `fastppo._C`, the native C++ kernels of `csrc/`, or compiling it on first use.

A build that sees torch (`pip install --no-build-isolation`, a source checkout) leaves a prebuilt `fastppo._C`
beside the package. A plain `pip install` builds in an isolated environment without torch, so it can only ship the
C++ sources (as `fastppo/csrc/`); the first process that needs the kernels then compiles them with
`torch.utils.cpp_extension.load` against the torch actually installed, into a cache directory keyed by the torch
version, the Python version and a hash of the sources and flags, so a torch upgrade or a source change rebuilds
and an unchanged install never does. cpp_extension holds a file lock in that directory while it builds, so
concurrent processes build once and the others wait for it.

  FASTPPO_NO_JIT_BUILD=1   never compile on first use (the PyTorch reference is used where no prebuilt `_C` exists)
  TORCH_EXTENSIONS_DIR     where compiled kernels are cached (default: ~/.cache/fastppo, or $XDG_CACHE_HOME/fastppo)

setup.py reads the compiler flags below (it loads this file without importing fastppo or torch), so the prebuilt and
the compiled-on-first-use kernels are built the same way.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sys
import threading
from pathlib import Path

# -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC will not if-convert a
# float comparison that selects a value (`mask != 0 ? x : 0`), so such loops stay scalar.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]
MODULE_NAME = "fastppo_C"  # the compiled-on-first-use module; the prebuilt one is fastppo._C
NO_JIT_VARIABLE = "FASTPPO_NO_JIT_BUILD"
FAILURE_FILE = "build-failed.txt"  # a failed build is not retried by every process; deleting its folder retries


@dataclasses.dataclass(frozen=True)
class NativeModule:
    """The native extension this process uses: `origin` is "prebuilt", "jit" or None (then `detail` says why)."""

    module: object | None
    origin: str | None
    detail: str  # where it was loaded from, or why there is none


def source_dir() -> Path | None:
    """The folder holding the C++ sources: `fastppo/csrc/` in an installed wheel, `csrc/` in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if glob.glob(str(candidate / "*.cpp")):
            return candidate
    return None


def cache_dir(sources: list[str], torch_version: str) -> Path:
    """A folder per (torch, Python, sources + flags): a stale build is never loaded into a newer torch."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    digest.update(" ".join(CXX_FLAGS + LINK_FLAGS).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastppo"
    )
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"torch{torch_version}-{python}-{digest.hexdigest()[:16]}"


def _prebuilt() -> tuple[object | None, str]:
    try:
        from fastppo import _C
    except ImportError as error:
        return None, str(error)
    return _C, _C.__file__


def _put_ninja_on_path() -> None:
    # cpp_extension runs `ninja` from PATH; the `ninja` wheel puts it in the venv's bin/, which is not on PATH when a
    # venv's `fastppo` script is run without activating the venv.
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def _compile(directory: Path, sources: list[str]):
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{MODULE_NAME}*.so")) and not any(directory.glob(f"{MODULE_NAME}*.pyd")):
        print(
            f"fastppo: compiling the native CPU kernels once for this torch into {directory} "
            f"(a few minutes; {NO_JIT_VARIABLE}=1 skips it)",
            file=sys.stderr,
            flush=True,
        )
    return cpp_extension.load(
        name=MODULE_NAME,
        sources=sources,
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LINK_FLAGS,
        build_directory=str(directory),
        verbose=False,
    )


def _jit_built() -> NativeModule:
    if os.environ.get(NO_JIT_VARIABLE) == "1":
        return NativeModule(None, None, f"{NO_JIT_VARIABLE}=1 turns off compiling it on first use")
    sources_at = source_dir()
    if sources_at is None:
        return NativeModule(None, None, "no C++ sources were installed with the package to compile")
    import torch

    sources = sorted(glob.glob(str(sources_at / "*.cpp")))
    directory = cache_dir(sources + sorted(glob.glob(str(sources_at / "*.h"))), torch.__version__)
    failure = directory / FAILURE_FILE
    if failure.is_file():
        return NativeModule(None, None, f"an earlier build failed ({failure}; delete {directory} to retry)")
    try:
        module = _compile(directory, sources)
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a compile error: fall back, never crash
        reason = " ".join(str(error).split())[-500:]
        try:
            failure.write_text(reason + "\n")
        except OSError:
            pass  # an unwritable cache: the next process tries again
        return NativeModule(None, None, f"compiling it on first use failed: {reason}")
    return NativeModule(module, "jit", module.__file__)


_lock = threading.Lock()
_loaded: NativeModule | None = None


def load() -> NativeModule:
    """The native extension for this process: the prebuilt `fastppo._C`, else one compiled on first use."""
    global _loaded
    with _lock:  # two threads asking at once compile (or report) once
        if _loaded is None:
            module, detail = _prebuilt()
            if module is not None:
                _loaded = NativeModule(module, "prebuilt", detail)
            else:
                jit = _jit_built()
                _loaded = (
                    jit
                    if jit.module is not None
                    else NativeModule(None, None, f"fastppo._C not built ({detail}); {jit.detail}")
                )
        return _loaded
