"""Triton kernels for fastppo's fused ops, installed as `fastppo.kernels`.

One op family per file, each read top-down: the math, the @triton.jit kernel, the launcher, the autograd.Function,
and last the functional entry point that `fastppo.ops.dispatch` calls (same name and signature as the reference).
Modules are imported on demand by the dispatcher, so importing this package does not import Triton.
"""

# Every launch passes this as `enable_fp_fusion`: a * b + c contracted to one FMA (one rounding instead of two, and
# faster). Triton 3.9 fuses by default but warns that 3.10 will not; saying it at each launch keeps the results
# independent of the Triton version and leaves TRITON_DEFAULT_FP_FUSION, a process-wide setting, to the user. The
# interpreter never fuses: tests/ops/helpers.py's GPU tolerances cover the difference, and
# tests/ops/test_triton_compile.py checks that every launch passes this.
FP_FUSION = True
