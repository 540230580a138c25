"""The `lm` command re-executes itself with glibc's huge-page tunable (lm/hostmem.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY, lm, sets
from lm.hostmem import TUNABLE, _glibc_version, huge_page_env

MADVISE = "always [madvise] never"


def test_sets_the_tunable_only_where_it_helps():
    env = huge_page_env({"PATH": "/bin"}, MADVISE, (2, 36))
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    # Other tunables are kept.
    env = huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE, (2, 36))
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert huge_page_env({}, MADVISE, (2, 34)) is None  # tunable does not exist yet
    assert huge_page_env({}, MADVISE, None) is None  # not glibc (musl, macOS)
    assert huge_page_env({}, "[always] madvise never", (2, 36)) is None  # already huge
    assert huge_page_env({}, "always madvise [never]", (2, 36)) is None  # none to be had
    assert huge_page_env({}, None, (2, 36)) is None  # no THP in this kernel
    assert huge_page_env({"LMLAB_HUGE_PAGES": "0"}, MADVISE, (2, 36)) is None  # opted out
    # Already set (e.g. after the re-exec): no second re-exec.
    assert huge_page_env({"GLIBC_TUNABLES": TUNABLE}, MADVISE, (2, 36)) is None


def _thp_madvise() -> bool:
    try:
        return "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not (_thp_madvise() and (_glibc_version() or (0,)) >= (2, 35)),
                    reason="needs glibc >= 2.35 and transparent_hugepage=madvise")
def test_lm_command_runs_with_huge_pages(tmp_path):
    env = {"GLIBC_TUNABLES": ""}  # whatever the test process runs with
    r = lm("bench", *sets(*TINY), "--steps", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert "host allocator: transparent huge pages" in r.stdout
    r = lm("bench", *sets(*TINY), "--steps", "2", env={**env, "LMLAB_HUGE_PAGES": "0"})
    assert r.returncode == 0, r.stderr
    assert "host allocator: 4 KiB pages" in r.stdout
