"""Every experiment of experiments/ in its --smoke mode, end to end, as a user runs it:
`lm sweep --smoke`, then `lm findings` (which runs the sweep's analyses and its
`findings()`, including `lm analyze --lr-transfer` / `--optimizers`' report) writes its
rows of the findings page with the paper's figures beside it."""

from __future__ import annotations

import pytest
from conftest import ROOT, lm

# experiment -> the figures its findings show
EXPERIMENTS = {
    "lr_sensitivity": {"lr_sweep.png", "precursors.png"},
    "warmup_sensitivity": {"lr_sweep.png"},
    "mup_transfer": {"lr_transfer.png"},
    "optimizers": {"lr_transfer.png"},
    "norm_placement": {"lr_sweep.png", "residual_growth.png"},
    "scaling_laws": {"loss_law.png"},
    "low_precision": {"lr_sweep.png"},
    "compress": {"pareto.png"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_smoke_sweep_gives_its_findings_rows_and_figures(name, tmp_path):
    work = tmp_path / name
    result = lm("sweep", str(ROOT / "experiments" / f"{name}.py"), "--workdir", str(work),
                "--smoke", "--parallel", "2", timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = EXPERIMENTS[name]
    out = tmp_path / "docs" / "findings.md"
    result = lm("findings", str(work), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    page = out.read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ")][1:]
    assert rows and rows[0].startswith(f"| [{name}](#{name}) (smoke) |"), page[:1500]
    verdicts = {"reproduced", "partly", "not reproduced", "not resolved", "-"}
    assert all(line.split("|")[4].strip().strip("*") in verdicts for line in rows), rows
    assert "on 2 cores" in page or "cores of" in page  # the wall time and the machine
    shown = {p.name for p in (tmp_path / "docs" / "findings" / name).glob("*.png")}
    assert figures <= shown, shown
    for png in figures:
        assert f"(findings/{name}/{png})" in page
