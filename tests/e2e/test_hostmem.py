"""The `lm` command re-executes itself with glibc malloc tunables that keep XLA:CPU's
per-step buffers in the heap (lm/hostmem.py)."""

from __future__ import annotations

import pytest

from conftest import TINY, lm, sets
from lm.hostmem import TUNABLES, _glibc_version, host_malloc_env

ALL = ":".join(TUNABLES)


def test_sets_the_tunables_only_where_they_apply():
    assert host_malloc_env({"PATH": "/bin"}, (2, 36)) == {"PATH": "/bin", "GLIBC_TUNABLES": ALL}
    # Other tunables are kept.
    env = host_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36))
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{ALL}"
    assert host_malloc_env({}, (2, 25)) is None  # tunables do not exist yet
    assert host_malloc_env({}, None) is None  # not glibc (musl, macOS)
    assert host_malloc_env({"LMLAB_HOST_MALLOC": "0"}, (2, 36)) is None  # opted out
    # The user's own choice, or already set (after the re-exec): no re-exec.
    assert host_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=4"}, (2, 36)) is None
    assert host_malloc_env({"GLIBC_TUNABLES": ALL}, (2, 36)) is None


@pytest.mark.slow
@pytest.mark.skipif((_glibc_version() or (0,)) < (2, 26), reason="needs glibc >= 2.26")
def test_lm_command_keeps_step_buffers_in_the_heap():
    r = lm("bench", *sets(*TINY), "--steps", "2", env={"GLIBC_TUNABLES": ""})
    assert r.returncode == 0, r.stderr
    assert "host allocator: step buffers kept in the heap" in r.stdout
    r = lm("bench", *sets(*TINY), "--steps", "2", env={"GLIBC_TUNABLES": "",
                                                       "LMLAB_HOST_MALLOC": "0"})
    assert r.returncode == 0, r.stderr
    assert "host allocator: fresh pages every step" in r.stdout
