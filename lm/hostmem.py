"""Transparent huge pages for the host allocator, set before the process starts.

Why: XLA:CPU allocates a train step's temporaries (~850 MiB for the 5M reference
shape) afresh every step. Allocations that large are mmap'd by glibc and returned on
free, so every step touches ~200k new 4 KiB pages: ~200k page faults and ~0.4 s of
kernel time per step on 2 cores. Where the kernel gives huge pages on request
(transparent_hugepage=madvise, the common default), glibc's `glibc.malloc.hugetlb=1`
tunable asks for them, and the faults drop ~250x. Tunables are read at process start,
so the `lm` command re-executes itself once with the tunable set. Opt out with
LMLAB_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None


def huge_page_env(environ: dict, thp_mode: str | None, glibc: tuple[int, ...] | None):
    """The environment to re-execute with, or None when there is nothing to gain: not
    glibc >= 2.35 (the tunable's first release), huge pages off or already always on,
    the tunable already set, or the user opted out."""
    if environ.get("LMLAB_HUGE_PAGES", "1") == "0" or glibc is None or glibc < (2, 35):
        return None
    if thp_mode is None or "[madvise]" not in thp_mode:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return dict(environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)


def huge_pages_active() -> bool:
    return TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_huge_pages(argv: list[str]) -> None:
    """Replace this process by `python -m lm.cli ARGV` with the tunable set, when that
    helps (see huge_page_env). Call before anything heavy is imported."""
    if sys.platform != "linux":
        return
    try:
        thp_mode = THP_MODE.read_text()
    except OSError:
        thp_mode = None
    env = huge_page_env(dict(os.environ), thp_mode, _glibc_version())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "lm.cli", *argv], env)
