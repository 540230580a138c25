"""Seed statistics (lm/analysis/seeds.py) on synthetic data with known spread, and the
seed axis of sweep specs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lm.analysis import seeds


def test_interval_is_the_student_t_interval_by_hand():
    iv = seeds.interval([1.0, 2.0, 4.0])
    mean, sd = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    t975_df2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)
    assert iv.mean == pytest.approx(mean) and iv.std == pytest.approx(sd)
    assert iv.half == pytest.approx(t975_df2 * sd / math.sqrt(3))
    one = seeds.interval([3.0, float("nan")])
    assert one.n == 1 and math.isnan(one.half) and str(one) == "3 (n=1)"


@pytest.mark.parametrize("n", [2, 3, 5])
def test_intervals_cover_the_true_mean_95_percent_of_the_time(n):
    """20,000 synthetic studies of n seeds from N(mu, sigma): the 95% interval covers mu
    in 95% of them (binomial standard error 0.15%), and the pooled noise floor recovers
    sigma."""
    rng = np.random.default_rng(n)
    mu, sigma, studies = 3.0, 0.2, 20_000
    draws = rng.normal(mu, sigma, size=(studies, n))
    covered = 0
    for row in draws[:4000]:  # the interval code path itself, on a subset
        iv = seeds.interval(row)
        covered += iv.lo <= mu <= iv.hi
    assert abs(covered / 4000 - 0.95) < 0.012
    from scipy import stats
    half = stats.t.ppf(0.975, n - 1) * draws.std(axis=1, ddof=1) / math.sqrt(n)
    coverage = np.mean(np.abs(draws.mean(axis=1) - mu) <= half)
    assert abs(coverage - 0.95) < 0.006
    df = pd.DataFrame({"config": np.repeat(np.arange(200), n),
                       "loss": draws[:200].reshape(-1)})
    assert seeds.noise_floor(df, "loss", ["config"]) == pytest.approx(sigma, rel=0.1)


def test_paired_difference_cancels_the_shared_seed_noise():
    """Arm b = arm a + 0.05 + small noise, with large seed-to-seed noise shared by both:
    the paired interval resolves the 0.05 that an unpaired comparison could not."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1.0, size=6)
    rows = [{"arm": "a", "seed": s, "loss": 2 + shared[s]} for s in range(6)]
    rows += [{"arm": "b", "seed": s, "loss": 2.05 + shared[s] + rng.normal(0, 0.005)}
             for s in range(6)]
    d = seeds.paired_difference(pd.DataFrame(rows), "loss", "arm", "b", "a")
    r = d.iloc[0]
    assert r["pairs"] == 6 and r["ci_lo"] > 0.03 and r["ci_hi"] < 0.07
    assert r["diff"] == pytest.approx(0.05, abs=0.01)
    floor = seeds.noise_floor(pd.DataFrame(rows), "loss", ["arm"])
    assert floor > 4 * 0.05  # the per-arm spread is the shared noise: far above the difference


def test_seed_table_groups_configurations_and_counts_nonfinite():
    df = pd.DataFrame({"lr": [1, 1, 1, 2, 2], "seed": [0, 1, 2, 0, 1],
                       "loss": [1.0, 1.2, 1.4, 3.0, float("nan")]})
    t = seeds.seed_table(df, "loss", ["lr"])
    assert list(t["n"]) == [3, 1] and list(t["n_nonfinite"]) == [0, 1]
    assert t["mean"].iloc[0] == pytest.approx(1.2)
    assert seeds.seed_column(df) == "seed"


def test_sweep_seeds_repeat_every_trial_as_the_last_axis():
    from lm.config import ConfigError
    from lm.sweep import Grid, Sweep, expand
    trials = expand(Sweep(axes=[Grid("optim.lr", [1e-3, 1e-2])], seeds=2,
                          overrides={"steps": 10, "optim.warmup_steps": 1}))
    assert [t.name for t in trials] == ["lr=1e-3,seed=0", "lr=1e-3,seed=1",
                                        "lr=0.01,seed=0", "lr=0.01,seed=1"]
    assert trials[1].overrides[-1] == "seed=1" and trials[1].tags["seed"] == 1
    assert len(expand(Sweep(seeds=[3, 5, 7], overrides={"steps": 10, "optim.warmup_steps": 1}))) == 3
    with pytest.raises(ConfigError, match="Sweep.seeds and an axis over seed"):
        expand(Sweep(axes=[Grid("seed", [0, 1])], seeds=2))
