"""Triton kernels for fastppo's fused ops. This folder installs as `fastppo.kernels`, and only as that.

One op family per file, each read top-down: the math, the @triton.jit kernel, the launcher, the autograd.Function,
and last the functional entry point that `fastppo.ops.dispatch` calls (same name and signature as the reference).
Modules are imported on demand by the dispatcher, so importing this package does not import Triton.

From the repository root (pytest, `python -m bench`, `python -c`, `torchrun -m`), the checkout is on `sys.path` and
this folder would be found as the top-level module `kernels`, a name that belongs to Hugging Face's `kernels`
package, which transformers imports. Imported under that name, this file hands the import to the installed package
(or fails as if the checkout were not there), so the folder never shadows it. It keeps its `__init__.py` because
setuptools' editable installs find no namespace package below a regular one. tests/test_packaging.py checks the
rule for every folder of the checkout.
"""

if __name__ != "fastppo.kernels":
    import os
    import sys

    def _import_without_checkout(name: str):
        """Imports `name` with this checkout's root off sys.path, and makes it what `import name` returns."""
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        del sys.modules[name]  # the half-made module of this file
        saved_path = sys.path[:]
        sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != checkout]
        try:
            module = __import__(name)
        except ImportError as error:
            raise ModuleNotFoundError(
                f"No module named {name!r} (this checkout's {name}/ folder is fastppo.kernels, never a top-level "
                f"module)",
                name=name,
            ) from error
        finally:
            sys.path[:] = saved_path
        sys.modules[name] = module  # the import system returns sys.modules[name] once this file has run
        return module

    _import_without_checkout(__name__)
