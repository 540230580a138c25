"""Which implementation a kernel call gets on this backend.

The Pallas kernels here are written in the Pallas GPU (Triton) style: compiled on
NVIDIA GPUs, interpreted on CPU (correct, slow: tests and references). On TPU they have
not been lowered through Mosaic yet, so a request for them falls back to the XLA path
with a logged reason rather than risking a compile failure mid-run.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger("lmlab.kernels")
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
