"""Build script: the Python package with the C++ sources, plus the native kernels `fastppo._C` when it can build them.

The prebuilt extension is optional. Without torch in the build environment (pip's default build isolation), without
a C++ compiler, or if the build fails, the install still succeeds: the C++ sources travel in the package
(`fastppo/csrc/`) and are compiled on first use against the installed torch (fastppo/ops/native_build.py).
`pip install --no-build-isolation -e .` builds `fastppo._C` now, with your torch.
  FASTPPO_SKIP_NATIVE=1   never build the extension here (first use may still compile it)
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

# `kernels/` (Triton) and `csrc/` (C++ sources) are source folders of their own that install as fastppo.kernels and
# fastppo/csrc (see pyproject.toml).
# (fastppo/kernels/__init__.py only points a checkout's fastppo.kernels at kernels/; the wheel does not carry it.)
packages = sorted(set(find_packages(include=["fastppo", "fastppo.*"])) | {"fastppo.kernels", "fastppo.csrc"})


def native_build_settings():
    """fastppo/ops/native_build.py, loaded by path: importing fastppo would need torch, which the build may lack."""
    spec = importlib.util.spec_from_file_location("native_build", os.path.join("fastppo", "ops", "native_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def native_extension_args():
    if os.environ.get("FASTPPO_SKIP_NATIVE") == "1" or not glob.glob("csrc/*.cpp"):
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "fastppo: torch is not importable at build time; the native kernels compile on first use instead",
            file=sys.stderr,
        )
        return {}
    settings = native_build_settings()
    sources = sorted(glob.glob("csrc/*.cpp"))
    flags = {"extra_compile_args": settings.CXX_FLAGS, "extra_link_args": settings.LINK_FLAGS}
    ext = cpp_extension.CppExtension("fastppo._C", sources, **flags)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed native build is a warning, never a failed install: first use tries again."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure must leave the install working
                print(f"fastppo: WARNING: native kernels not built ({error})", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001
                print(f"fastppo: WARNING: native kernels not built ({error})", file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}}


setup(packages=packages, **native_extension_args())
