"""Keep XLA:CPU's per-step buffers in the heap instead of fresh pages every step.

Why: XLA:CPU allocates a train step's temporaries (~700 MiB for the 5M reference shape)
afresh on every execution. glibc serves an allocation that large with mmap and unmaps
it on free, so every step touches ~200k new 4 KiB pages: ~200k page faults, ~0.4 s of
kernel time per step on 2 cores, and the page zeroing lands inside the forward pass.

The fix has two halves, both needed (measured: either alone leaves the faults):
  * glibc tunables `mmap_max=0` (large blocks come from the heap) and a 1 TiB
    `trim_threshold` (freed heap is kept, not returned to the kernel), so the next
    step's temporaries reuse the same, already-mapped memory;
  * synchronous CPU dispatch (`jax_cpu_enable_async_dispatch=False`), so the step's
    buffers are allocated on the calling thread (glibc's main arena, which grows the
    heap) rather than on an XLA worker thread.
Result: 0 page faults per step instead of ~200k. The cost: the process keeps its peak
heap until it exits (as a training process does anyway), and the Python thread waits
for each CPU step (the data pipeline prefetches on its own threads).

Tunables are read when a process starts, so the `lm` command re-executes itself once
with them set. Opt out with LMLAB_HOST_MALLOC=0. Accelerator backends are unaffected
(the dispatch flag is CPU-only; host allocations there are small).
"""

from __future__ import annotations

import os
import sys

TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=1099511627776")


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None


def host_malloc_env(environ: dict, glibc: tuple[int, ...] | None) -> dict | None:
    """The environment to re-execute with, or None: not glibc >= 2.26 (the tunables'
    first release), malloc tunables already chosen by the user (kept as they are), or
    opted out."""
    if environ.get("LMLAB_HOST_MALLOC", "1") == "0" or glibc is None or glibc < (2, 26):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(t.split("=")[0] in tunables for t in TUNABLES):
        return None
    value = ":".join(([tunables] if tunables else []) + list(TUNABLES))
    return dict(environ, GLIBC_TUNABLES=value)


def host_malloc_active() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return all(t in tunables for t in TUNABLES)


def reexec_with_host_malloc(argv: list[str]) -> None:
    """Replace this process by `python -m lm.cli ARGV` with the tunables set, when that
    helps (see host_malloc_env). Call before anything heavy is imported."""
    if sys.platform != "linux":
        return
    env = host_malloc_env(dict(os.environ), _glibc_version())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "lm.cli", *argv], env)


def configure_jax() -> None:
    """The in-process half: synchronous CPU dispatch, when the tunables are active."""
    if host_malloc_active():
        import jax
        jax.config.update("jax_cpu_enable_async_dispatch", False)
