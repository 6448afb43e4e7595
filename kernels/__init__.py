"""Triton kernels for fastppo's fused ops, installed as `fastppo.kernels`.

One op family per file, each read top-down: the math, the @triton.jit kernel, the launcher, the autograd.Function,
and last the functional entry point that `fastppo.ops.dispatch` calls (same name and signature as the reference).
Modules are imported on demand by the dispatcher, so importing this package does not import Triton.
"""
