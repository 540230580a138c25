"""The coordinate check separates muP from standard parametrisation: on a tiny width
ladder, block outputs and output logits grow with width under SP after a few Adam steps
and stay flat under muP (a log-log slope threshold with margin), so breaking a muP
multiplier (init, LR or output scale) fails here. Also the table / plot / CLI."""

from __future__ import annotations

import pytest
from conftest import sets

from lm.analysis import coord_check
from lm.config import TrainConfig, apply_overrides

LADDER = ["model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16", "data.seq_len=16",
          "batch_size=4", "optim.lr=1e-2", "optim.schedule=constant", "optim.warmup_steps=0",
          "optim.weight_decay=0", "optim.clip_norm=0", "steps=3", "data.prefetch=0"]
WIDTHS = [16, 64]  # two points: the slope is log(v64 / v16) / log 4


@pytest.fixture(scope="module")
def rows():
    return coord_check.run(apply_overrides(TrainConfig(), LADDER), WIDTHS, steps=3)


def test_mup_keeps_activations_flat_where_sp_grows(rows):
    last = coord_check.summary(rows)
    sp, mup = last["standard"], last["mup"]
    # Measured: SP block0 ~ +1.4, logits ~ +0.8; muP within +-0.25 (see the table).
    for q in ("block0", "logits_rms"):
        assert sp[q] > 0.6, (q, sp, mup)
        assert abs(mup[q]) < 0.35, (q, sp, mup)
        assert sp[q] - mup[q] > 0.5


def test_table_plot_and_cli(rows, tmp_path, lm_here):
    coord_check.save(rows, tmp_path, {"optim.name": "adamw"})
    text = coord_check.table(rows)
    assert "block0" in text and "logits_rms" in text and "w=64" in text and "w=16" in text
    result = lm_here("analyze", "--coord-check", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "mup: slope at the last step" in result.stdout
    assert (tmp_path / "coord_check.png").stat().st_size > 1000


def test_cli_without_a_coord_check_exits_2(tmp_path, lm_here):
    result = lm_here("analyze", "--coord-check", str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "coord_check.json" in result.stderr
