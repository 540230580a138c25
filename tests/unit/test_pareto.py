"""The compression Pareto table: deployed sizes (2:4 counted as served), intervals over
seeds, and the front, on a hand-built results table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lm.analysis import pareto


def test_front_keeps_exactly_the_undominated_points():
    size = np.array([10.0, 8.0, 8.0, 5.0, 3.0, np.nan])
    loss = np.array([2.0, 2.5, 2.2, 2.4, 3.0, 1.0])
    # 8/2.5 is dominated by 8/2.2; 5/2.4 beats nothing smaller but is beaten by nothing
    # at <= 5 with lower loss; a NaN size is never on the front.
    assert pareto.on_front(size, loss).tolist() == [True, False, True, True, True, False]


def test_sizes_count_2_4_matrices_as_sparse_tensor_cores_serve_them():
    dense = pareto.deployed_sizes(pd.Series({"params": 1000, "flops_per_token": 6000}))
    assert dense == {"params": 1000, "bytes": 2000, "flops": 2000}
    sparse = pareto.deployed_sizes(pd.Series({"params": 1000, "flops_per_token": 6000,
                                              "sparse_params": 800, "sparse_pattern": "2:4"}))
    assert sparse["params"] == 600                          # half of the 800 kept
    assert sparse["bytes"] == 2 * (200 + 800 * 9 / 16)     # values + 2-bit indices
    assert sparse["flops"] == 2000 - 800                    # 2 FLOPs x 400 skipped weights
    student = pareto.deployed_sizes(pd.Series({"params": 1000, "flops_per_token": 9000,
                                               "distill_flops_per_token": 3000}))
    assert student["flops"] == 2000                         # the teacher is not deployed


def test_table_means_seeds_names_the_parent_and_marks_the_front(tmp_path):
    runs = pd.DataFrame([
        {"run": "parent", "arm": None, "params": 1000, "flops_per_token": 6000,
         "final_val_loss": 2.0},
        *({"run": f"depth-kd-s{s}", "arm": "depth-kd", "params": 600,
           "flops_per_token": 3600, "final_val_loss": l, "tasks/copy/acc": a}
          for s, (l, a) in enumerate([(2.3, 0.5), (2.5, 0.7)])),
        {"run": "depth-scratch-s0", "arm": "depth-scratch", "params": 600,
         "flops_per_token": 3600, "final_val_loss": 2.6},
        {"run": "diverged", "arm": "depth-scratch", "params": 600,
         "flops_per_token": 3600, "final_val_loss": math.nan},
        {"run": "pruned/depth", "arm": None, "params": 600, "flops_per_token": math.nan,
         "final_val_loss": math.nan},  # a child never trained: no row
    ])
    table = pareto.pareto_table(runs).set_index("recipe")
    assert list(table.index) == ["parent", "depth-kd", "depth-scratch"]
    kd = table.loc["depth-kd"]
    assert kd["loss"] == pytest.approx(2.4) and kd["seeds"] == 2
    assert kd["loss_lo"] < 2.3 and kd["loss_hi"] > 2.5      # Student-t, n = 2
    assert kd["tasks/copy/acc"] == pytest.approx(0.6)
    assert table.loc["depth-scratch", "seeds"] == 1         # the NaN run is left out
    assert table["front_params"].tolist() == [True, True, False]
    text = pareto.report(runs, tmp_path)
    assert "depth-kd" in text and "copy 0.600" in text and (tmp_path / "pareto.png").is_file()
