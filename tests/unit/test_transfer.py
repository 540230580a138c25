"""LR-transfer and optimizer tables from an LR x width x seed sweep: the best LR (with its
interval over seeds), the transfer penalty, a diverged run counted as a loss; the
experiment specs expand and validate (full and --smoke); the smoke sweep end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from lm.analysis import stability, transfer
from lm.sweep.spec import expand, load_spec


def synthetic(optimum: dict, noise: float = 0.01, seeds=(0, 1, 2)) -> pd.DataFrame:
    """Loss = 3 + (log10 lr - log10 optimum[arm, width])^2 + seed noise."""
    rng = np.random.default_rng(0)
    rows = []
    for (arm, width), best in optimum.items():
        for lr in [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]:
            for seed in seeds:
                rows.append({"arm": arm, "model.d_model": width, "optim.lr": lr, "seed": seed,
                             "status": "completed", "path": "",
                             "final_val_loss": 3 + (math.log10(lr) - math.log10(best)) ** 2
                             + noise * rng.normal()})
    return pd.DataFrame(rows)


def test_best_lr_per_width_and_the_transfer_penalty():
    # SP: the optimum drifts 1e-2 -> 1e-3 with width; muP: it stays at 1e-2.
    runs = synthetic({("sp", 32): 1e-2, ("sp", 128): 1e-3, ("mup", 32): 1e-2, ("mup", 128): 1e-2})
    table = transfer.lr_optima(runs).set_index(["arm", "model.d_model"])
    for key, best in [(("sp", 32), 1e-2), (("sp", 128), 1e-3), (("mup", 128), 1e-2)]:
        row = table.loc[key]
        assert row["lr_lo"] <= row["lr_best"] <= row["lr_hi"]
        assert row["edge"] == ("low" if best == 1e-3 else "")  # the grid starts at 1e-3
        assert abs(math.log10(row["lr_best"] / best)) < 0.15, (key, row.to_dict())
        assert row["loss"] == pytest.approx(3 + (math.log10(row["grid_lr"] / best)) ** 2, abs=0.05)
    pen = transfer.transfer_penalty(runs).set_index("arm")
    # SP uses 1e-2 at width 128 where 1e-3 is best: (log10 1e-2 - log10 1e-3)^2 = 1.
    assert pen.loc["sp", "penalty"] == pytest.approx(1.0, abs=0.05)
    assert pen.loc["sp", "penalty_lo"] > 0.8
    assert pen.loc["mup", "penalty"] == pytest.approx(0.0, abs=0.03)


def test_a_diverged_run_is_a_bad_loss_not_a_missing_one():
    runs = synthetic({("sp", 32): 1e-1})
    big = runs["optim.lr"] == 1e-1
    runs.loc[big, "status"] = "diverged at step 3"
    runs.loc[big, "final_val_loss"] = 2.0  # the last eval before it diverged: ignored
    row = transfer.lr_optima(runs).iloc[0]
    assert row["grid_lr"] == 3e-2 and row["diverged"] == 3


def test_an_optimum_on_the_grids_edge_is_reported_as_a_bound_not_a_value():
    # the true optima lie below (1e-4) and above (1.0) the grid 1e-3 .. 1e-1
    runs = synthetic({("sp", 32): 1e-4, ("sp", 128): 1.0})
    table = transfer.lr_optima(runs)
    rows = table.set_index("model.d_model")
    assert rows.loc[32, "edge"] == "low" and rows.loc[32, "lr_best"] == 1e-3
    assert rows.loc[128, "edge"] == "high" and rows.loc[128, "lr_best"] == 1e-1
    assert (rows["edge_share"] == 1.0).all()
    readable = transfer.readable_optima(table)
    assert list(readable["best LR"]) == ["<=0.001 (low edge)", ">=0.1 (high edge)"]
    assert (readable["95% interval"] == "-").all()
    assert transfer.lr_drift(table).loc[0, "edge"] == "32:low, 128:high"
    assert transfer.transfer_penalty(runs).loc[0, "small_edge"] == "low"
    # Wortsman's LR-sensitivity table flags the same
    runs["model.vocab_size"] = 259
    sens = stability.lr_sensitivity_table(runs, ["model.d_model"]).set_index("model.d_model")
    assert sens.loc[32, "edge"] == "low" and sens.loc[128, "edge"] == "high"


def test_a_bracketed_parabola_recovers_a_known_optimum_with_an_interval_covering_it():
    truth = {("mup", 32): 10 ** -1.7, ("mup", 128): 10 ** -1.7,
             ("sp", 32): 10 ** -1.3, ("sp", 128): 10 ** -2.45}
    table = transfer.lr_optima(synthetic(truth, noise=0.03, seeds=range(5)))
    for _, row in table.iterrows():
        best = truth[(row["arm"], row["model.d_model"])]
        assert row["edge"] == "" and row["lr_lo"] <= best <= row["lr_hi"], row.to_dict()
        assert abs(math.log10(row["lr_best"] / best)) < 0.1
        assert row["lr_hi"] / row["lr_lo"] < 10 ** 0.5  # narrower than a grid step
    drift = transfer.lr_drift(table).set_index("arm")
    # muP: the optimum stays (slope 0); SP: log2(10^-1.15) / log2(4) = -1.91 per doubling
    assert drift.loc["mup", "slope_lo"] <= 0 <= drift.loc["mup", "slope_hi"]
    assert drift.loc["sp", "slope"] == pytest.approx(-1.91, abs=0.15)
    assert drift.loc["sp", "slope_hi"] < -1 and drift.loc["sp", "edge"] == ""


@pytest.mark.parametrize("spec", ["mup_transfer", "optimizers", "lr_sensitivity",
                                  "warmup_sensitivity", "norm_placement", "scaling_laws"])
def test_experiment_specs_expand_and_validate(spec):
    from lm.config import exec_python_file
    path = ROOT / "experiments" / f"{spec}.py"
    full, smoke = expand(load_spec(path)), expand(load_spec(path, smoke=True), smoke=True)
    assert len(full) >= 25 and 1 < len(smoke) <= 24 and len(smoke) < len(full)
    module = exec_python_file(path, "sweep spec")  # what the findings page reads
    assert module.PAPER and callable(module.findings)
    if spec == "optimizers":  # every optimizer on its own LR grid
        lrs = {t.tags["arm"]: set() for t in full}
        for t in full:
            lrs[t.tags["arm"]].add(next(o for o in t.overrides if o.startswith("optim.lr=")))
        assert set(lrs) == {"adamw", "lion", "adafactor", "muon", "sgd_sai"}
        assert all(len(v) >= 5 for v in lrs.values()) and lrs["lion"] != lrs["adamw"]


