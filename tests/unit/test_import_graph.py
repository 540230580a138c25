"""The import graph of lm/ and kernels/ (benchmarks/import_cycles.py): no module-level
cycle, none of the tricks that make one work (mid-file imports, a module __getattr__),
and lm.config, which composes every section, in no cycle of any kind."""

from __future__ import annotations

import importlib.util

from conftest import ROOT


def _walker():
    spec = importlib.util.spec_from_file_location("import_cycles",
                                                  ROOT / "benchmarks" / "import_cycles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles_at_module_level_and_none_through_lm_config():
    walker = _walker()
    by_kind, mid_file, getattrs, _ = walker.graph()
    assert walker.cycles(by_kind, ("module",)) == []
    assert mid_file == [] and getattrs == []
    everything = walker.cycles(by_kind, ("module", "typing", "function"))
    assert not [c for c in everything if "lm.config" in c or "lm.schema" in c]
    # The optimizer package is acyclic even for type checkers.
    typed = walker.cycles(by_kind, ("module", "typing"))
    assert not [c for c in typed if any(m.startswith("lm.optim") for m in c)]
