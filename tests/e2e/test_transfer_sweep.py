"""LR-transfer and optimizer tables from an LR x width x seed sweep: the best LR (with its
interval over seeds), the transfer penalty, a diverged run counted as a loss; the
experiment specs expand and validate (full and --smoke); the smoke sweep end to end."""

from __future__ import annotations


import pytest
from conftest import ROOT, lm


@pytest.mark.slow
def test_mup_transfer_smoke_sweep_end_to_end(tmp_path):
    work = tmp_path / "mup"
    result = lm("sweep", str(ROOT / "experiments" / "mup_transfer.py"), "--workdir", str(work),
                "--smoke", "--parallel", "2", timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    result = lm("analyze", "--lr-transfer", str(work))
    assert result.returncode == 0, result.stderr
    assert "Best LR per arm and width" in result.stdout and "mup" in result.stdout
