"""Which implementation a kernel call gets, decided by the platform being compiled FOR.

That platform is not always `jax.default_backend()`: `lm compile` traces a TPU program
on a CPU host, and it must get the TPU kernels, not CPU interpret mode. Whoever traces a
program for devices sets it (`compiling_for(platform)`; lm.train.state does it for the
mesh's devices); outside such a context it is the default backend.

Per platform, `impl="pallas"` means:
  * gpu: the Pallas kernels written in the Triton style (kernels/*/flash.py, chunked.py);
  * tpu: Mosaic TPU kernels (splash attention from JAX, our TPU scan kernel);
  * cpu: the Triton-style kernels in Pallas's generic interpret mode (correct, slow: for
    tests; the TPU kernels are tested with TPU interpret mode explicitly).
`impl="auto"` is pallas on GPU and TPU and xla on CPU (where the XLA path is the fast one).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging

import jax
from jax.experimental.pallas import triton as pallas_triton

# The GPU lowering the Pallas kernels are written for, stated on every pallas_call rather
# than left to JAX's default: Triton. (JAX 0.10 lowers a pallas_call without
# compiler_params through Mosaic GPU, where these kernels do not lower; 0.12 through
# Triton, which it deprecates.) Interpret mode (CPU) ignores it. Warps and stages are
# Triton's defaults (4 warps; 3 stages on CUDA, 1 on ROCm). tests/test_kernels_lowering.py
# checks on CPU that the kernels lower for CUDA to Triton custom calls; only a real GPU
# can check that Triton compiles them and that they run correctly and fast
# (tests/test_kernels_*.py and benchmarks/kernel_bench.py on the GPU).
GPU_COMPILER_PARAMS = pallas_triton.CompilerParams(num_warps=4, num_stages=None)

log = logging.getLogger("lmlab.kernels")
PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmlab_target_platform",
                                                                     default=None)


def canonical_platform(name: str) -> str:
    """'cuda' / 'rocm' / 'gpu' -> 'gpu'; 'tpu', 'cpu' as they are."""
    name = name.lower()
    if name in ("cuda", "rocm", "gpu"):
        return "gpu"
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r} (expected one of {', '.join(PLATFORMS)})")
    return name


@contextlib.contextmanager
def compiling_for(platform: str):
    """Within this context, kernels are chosen for `platform` ('cpu', 'gpu'/'cuda', 'tpu')."""
    token = _TARGET.set(canonical_platform(platform))
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform the program being traced will run on."""
    target = _TARGET.get()
    return target if target is not None else canonical_platform(jax.default_backend())


_WARNED: set[tuple[str, str]] = set()


def resolve(kernel: str, impl: str, pallas_on: tuple[str, ...] = PLATFORMS) -> str:
    """'pallas' or 'xla' for `impl` in {'auto', 'pallas', 'xla'} on the target platform.
    `pallas_on`: the platforms the kernel has a Pallas implementation for; elsewhere a
    request for it falls back to xla with a logged reason."""
    if impl not in ("auto", "pallas", "xla"):
        raise ValueError(f"{kernel}: impl must be 'auto', 'pallas' or 'xla', got {impl!r}")
    platform = target_platform()
    if impl == "auto":
        impl = "xla" if platform == "cpu" else "pallas"
    if impl == "pallas" and platform not in pallas_on:
        if (kernel, platform) not in _WARNED:
            _WARNED.add((kernel, platform))
            log.warning("%s: no Pallas kernel for %s yet; using the XLA implementation",
                        kernel, platform)
        return "xla"
    return impl


def interpret_default() -> bool:
    """Whether a Triton-style Pallas kernel runs in interpret mode: on a CPU target."""
    return target_platform() == "cpu"
