"""Launch settings every Triton kernel in this folder passes, so a kernel's results do not depend on the Triton version.

This folder installs as `fastppo.kernels` (in a checkout, fastppo/kernels/__init__.py points that package here). It
has no `__init__.py` on purpose: from the repository root, where pytest, `python -m bench`, `python -c` and
`torchrun -m` put the checkout on `sys.path`, a regular package here would be imported in place of Hugging Face's
`kernels`, which transformers imports. Without one, an installed `kernels` always wins, and where none is installed
`import kernels` finds only an empty namespace, which transformers treats as not installed. tests/test_packaging.py
holds that rule for every folder of the checkout.

One op family per file, each read top-down: the math, the @triton.jit kernel, the launcher, the autograd.Function,
and last the functional entry point that `fastppo.ops.dispatch` calls (same name and signature as the reference).
Modules are imported on demand by the dispatcher, so importing the package does not import Triton.
"""

# Every launch passes this as `enable_fp_fusion`: a * b + c contracted to one FMA (one rounding instead of two, and
# faster). Triton 3.9 fuses by default but warns that 3.10 will not; saying it at each launch keeps the results
# independent of the Triton version and leaves TRITON_DEFAULT_FP_FUSION, a process-wide setting, to the user. The
# interpreter never fuses: tests/ops/helpers.py's GPU tolerances cover the difference, and
# tests/ops/test_triton_compile.py checks that every launch passes this.
FP_FUSION = True
