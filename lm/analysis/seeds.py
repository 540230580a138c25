"""Seeds: means with confidence intervals, paired comparisons between arms, noise floors.

A configuration run over n seeds gives n values of a metric. `interval` is the mean with
its two-sided Student-t interval (the seeds are a small sample: n = 2..5, where the
normal quantile would claim too much; n = 1 has no interval). A comparison between arms
pairs runs by seed (same seed = same init and data order, so the arms' shared noise
cancels): the difference of means and its interval are those of the per-seed
differences. The *noise floor* of a metric is its seed-to-seed standard deviation,
pooled over configurations (the square root of the mean within-configuration variance):
a difference between arms smaller than it was not resolved by the study.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

SEED_COLUMNS = ("seed", "data.seed")


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    std: float  # sample standard deviation (ddof=1; NaN for one value)
    n: int

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4g} (n=1)"
        return f"{self.mean:.4g} ± {self.half:.2g}"


def interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of the finite values and its Student-t confidence interval."""
    from scipy import stats
    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, std, n)


def seed_column(df: pd.DataFrame) -> str | None:
    """The column that varies the seed in a results table (None: one seed)."""
    for c in SEED_COLUMNS:
        if c in df and df[c].astype(str).nunique() > 1:
            return c
    return None


def seed_table(df: pd.DataFrame, metric: str, by: Sequence[str],
               level: float = 0.95) -> pd.DataFrame:
    """One row per configuration (`by`): mean, interval and spread of `metric` over its
    seeds (non-finite values, e.g. diverged runs' NaN, are left out and counted)."""
    rows = []
    for key, g in df.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        vals = g[metric].to_numpy(float)
        iv = interval(vals, level)
        rows.append({**dict(zip(by, key)), "mean": iv.mean, "ci_lo": iv.lo, "ci_hi": iv.hi,
                     "std": iv.std, "n": iv.n, "n_nonfinite": int((~np.isfinite(vals)).sum())})
    return pd.DataFrame(rows)


def noise_floor(df: pd.DataFrame, metric: str, by: Sequence[str]) -> float:
    """Seed-to-seed standard deviation of `metric`, pooled over the configurations
    `by` (those with at least two finite values)."""
    variances, dofs = [], []
    for _, g in df.groupby(list(by), dropna=False):
        x = g[metric].to_numpy(float)
        x = x[np.isfinite(x)]
        if x.size >= 2:
            variances.append(x.var(ddof=1) * (x.size - 1))
            dofs.append(x.size - 1)
    return float(math.sqrt(sum(variances) / sum(dofs))) if dofs else math.nan


def paired_difference(df: pd.DataFrame, metric: str, arm: str, a, b, by: Sequence[str] = (),
                      pair: str = "seed", level: float = 0.95) -> pd.DataFrame:
    """metric(arm=a) - metric(arm=b), paired by `pair` within each configuration `by`:
    mean difference, its interval, and the number of pairs."""
    rows = []
    groups = df.groupby(list(by), sort=True, dropna=False) if by else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        left = g[g[arm] == a].set_index(pair)[metric]
        right = g[g[arm] == b].set_index(pair)[metric]
        common = left.index.intersection(right.index)
        iv = interval((left.loc[common].to_numpy(float) - right.loc[common].to_numpy(float)),
                      level)
        rows.append({**dict(zip(by, key)), "arm_a": a, "arm_b": b, "diff": iv.mean,
                     "ci_lo": iv.lo, "ci_hi": iv.hi, "pairs": iv.n})
    return pd.DataFrame(rows)


def paired_arm_lines(df: pd.DataFrame, metric: str, by: Sequence[str], pair: str, arm_order,
                     fmt: str, names: dict | None = None, count_pairs: bool = False) -> list[str]:
    """One line per arm after the first and configuration: its `metric` minus the first
    arm's, paired by `pair` (a seed column), with the 95% interval."""
    arms = list(dict.fromkeys(arm_order))
    rest = [c for c in by if c != "arm"]
    lines = []
    for other in arms[1:]:
        d = paired_difference(df, metric, "arm", other, arms[0], rest, pair=pair)
        for _, r in d.iterrows():
            where = ", ".join(f"{(names or {}).get(c, c)}={r[c]}" for c in rest)
            lines.append(f"  {other} - {arms[0]}{' @ ' + where if where else ''}: "
                         f"{r['diff']:+{fmt}} [{r['ci_lo']:+{fmt}}, {r['ci_hi']:+{fmt}}]"
                         + (f" ({r['pairs']} pairs)" if count_pairs else ""))
    return lines
