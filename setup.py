"""Build script: the Python package, plus the native kernels `fastppo._C` when this machine can build them.

The native extension is optional. Without torch in the build environment (pip's default build isolation), without
a C++ compiler, or if the build fails, the install still succeeds and fastppo falls back to its other backends.
Install with `pip install --no-build-isolation -e .` so the build sees your torch.
  FASTPPO_SKIP_NATIVE=1   never build the extension
  FASTPPO_FORCE_CUDA=1    compile the CUDA sources even when no GPU is visible (needs nvcc)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

# `kernels/` is a source folder of its own that installs as the subpackage fastppo.kernels (see pyproject.toml).
packages = find_packages(include=["fastppo", "fastppo.*"]) + ["fastppo.kernels"]


def native_extension_args():
    if os.environ.get("FASTPPO_SKIP_NATIVE") == "1" or not glob.glob("csrc/*.cpp"):
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("fastppo: torch is not importable at build time, skipping the native kernels", file=sys.stderr)
        return {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    use_cuda = (
        bool(cuda_sources)
        and cpp_extension.CUDA_HOME is not None
        and (os.environ.get("FASTPPO_FORCE_CUDA") == "1" or __import__("torch").cuda.is_available())
    )
    # -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC will not
    # if-convert a float comparison that selects a value (`mask != 0 ? x : 0`), so such loops stay scalar.
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastppo._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": flags + ["-DFASTPPO_WITH_CUDA"], "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension("fastppo._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed native build is a warning, never a failed install."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure must leave the install working
                print(f"fastppo: WARNING: native kernels not built ({error}); falling back to torch", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001
                print(f"fastppo: WARNING: native kernels not built ({error}); falling back to torch", file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}}


setup(packages=packages, **native_extension_args())
