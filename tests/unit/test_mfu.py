"""The CPU peak behind MFU: cached per CPU and XLA_FLAGS, never lowered by a measurement
on a busy machine (MFU over 100% came from a low first figure)."""

from __future__ import annotations

import json

from lm.train import mfu


def test_cpu_peak_keeps_the_best_figure_per_xla_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(mfu, "CACHE", tmp_path)
    figures = iter([50e9, 20e9, 1e9, 60e9])  # what successive measurements give
    monkeypatch.setattr(mfu, "measure_cpu_matmul_flops", lambda: next(figures))
    monkeypatch.setenv("XLA_FLAGS", "")
    assert mfu.cpu_peak_flops() == 50e9
    assert mfu.cpu_peak_flops() == 50e9                   # cached: nothing measured
    assert mfu.cpu_peak_flops(refresh=True) == 50e9       # a busy re-measurement (20e9)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert mfu.cpu_peak_flops() == 1e9                    # other flags: their own entry
    monkeypatch.setenv("XLA_FLAGS", "")
    assert mfu.cpu_peak_flops(refresh=True) == 60e9
    table = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert sorted(table.values()) == [1e9, 60e9]


def test_mfu_is_model_flops_over_the_peak_of_all_devices():
    assert mfu.mfu(6e6, 1e4, 1e11, 2) == 6e6 * 1e4 / 2e11
