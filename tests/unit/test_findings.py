"""The findings page's measuring helpers: verdicts from intervals, the loss at each
group's best LR (a diverged run is a bad loss, an optimum on the edge is flagged), slopes
per seed against log2 width."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lm.analysis import findings as f


def test_verdicts_follow_the_intervals():
    below, above, across = (-0.3, -0.1), (0.1, 0.2), (-0.1, 0.1)
    assert f.sign_verdict([below, below], "<0") == f.REPRODUCED
    assert f.sign_verdict([below, across], "<0") == f.PARTLY
    assert f.sign_verdict([across, across], "<0") == f.NOT_RESOLVED
    assert f.sign_verdict([above, across], "<0") == f.NOT_REPRODUCED
    assert f.sign_verdict([above], ">0") == f.REPRODUCED
    assert f.sign_verdict([(math.nan, math.nan)], "<0") == f.NOT_RESOLVED  # one seed
    assert f.iv(0.5, math.nan, math.nan) == "+0.500 (no interval)"


def _runs(losses: dict, diverged=()) -> pd.DataFrame:
    rows = []
    for (arm, lr), per_seed in losses.items():
        for seed, loss in enumerate(per_seed):
            rows.append({"arm": arm, "optim.lr": lr, "seed": seed, "final_val_loss": loss,
                         "status": "diverged at step 5" if (arm, lr) in diverged
                         else "completed"})
    return pd.DataFrame(rows)


def test_loss_at_best_lr_charges_divergence_and_flags_the_edge():
    runs = _runs({("a", 1e-3): [3.0, 3.1], ("a", 1e-2): [2.5, 2.7], ("a", 1e-1): [2.0, 2.1],
                  ("b", 1e-3): [3.0, 3.2], ("b", 1e-2): [2.9, 2.8], ("b", 1e-1): [2.6, 2.7]},
                 diverged={("a", 1e-1)})  # its last eval (2.0) must not count
    at = f.loss_at_best_lr(runs, ["arm"]).set_index(["arm", "seed"])
    assert at.loc[("a", 0), "lr"] == 1e-2 and at.loc[("a", 1), "loss"] == 2.7
    assert at.loc[("a", 0), "edge"] == ""
    assert at.loc[("b", 0), "lr"] == 1e-1 and at.loc[("b", 0), "edge"] == "high"


def test_per_seed_slope_recovers_a_known_slope():
    rows = [{"seed": s, "w": w, "y": 0.3 * math.log2(w) + 0.01 * s * (w == 64)}
            for s in range(4) for w in (32, 64, 128)]
    slope = f.per_seed_slope(pd.DataFrame(rows), "w", "y")
    assert slope.n == 4 and slope.lo <= 0.3 <= slope.hi
    assert slope.mean == pytest.approx(0.3, abs=1e-9)
