"""Which implementation a kernel call gets on this backend.

The Pallas kernels here are written in the Pallas GPU (Triton) style: compiled on
NVIDIA GPUs, interpreted on CPU (correct, slow: tests and references). On TPU they have
not been lowered through Mosaic yet, so a request for them falls back to the XLA path
with a logged reason rather than risking a compile failure mid-run.
"""

from __future__ import annotations

import logging

import jax
from jax.experimental.pallas import triton as pallas_triton

log = logging.getLogger("lmlab.kernels")

# The GPU lowering the Pallas kernels are written for, stated on every pallas_call rather
# than left to JAX's default: Triton. (JAX 0.10 lowers a pallas_call without
# compiler_params through Mosaic GPU, where these kernels do not lower; 0.12 through
# Triton, which it deprecates.) Interpret mode (CPU) ignores it. Warps and stages are
# Triton's defaults (4 warps; 3 stages on CUDA, 1 on ROCm). tests/test_kernels_lowering.py
# checks on CPU that the kernels lower for CUDA to Triton custom calls; only a real GPU
# can check that Triton compiles them and that they run correctly and fast
# (tests/test_kernels_*.py and benchmarks/kernel_bench.py on the GPU).
GPU_COMPILER_PARAMS = pallas_triton.CompilerParams(num_warps=4, num_stages=None)

_WARNED: set[tuple[str, str]] = set()


def resolve(kernel: str, impl: str) -> str:
    """'pallas' or 'xla' for `impl` in {'auto', 'pallas', 'xla'}. auto = pallas on GPU,
    xla elsewhere (on CPU the XLA path is the fast one; interpret mode is for tests)."""
    if impl not in ("auto", "pallas", "xla"):
        raise ValueError(f"{kernel}: impl must be 'auto', 'pallas' or 'xla', got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        return "pallas" if backend == "gpu" else "xla"
    if impl == "pallas" and backend not in ("gpu", "cpu"):
        if (kernel, backend) not in _WARNED:
            _WARNED.add((kernel, backend))
            log.warning("%s: the Pallas kernel is untested on %s (written for the GPU "
                        "lowering); using the XLA implementation", kernel, backend)
        return "xla"
    return impl
