"""Hyperparameter transfer across width, and optimizer comparisons, from an LR sweep with
seeds: runs tagged by arm (parametrisation or optimizer) x model.d_model x optim.lr x seed.

    lr_optima(runs)            per (arm, width): the best LR (a parabola through the best
                               grid point and its neighbours in log LR, on the mean over
                               seeds) with a bootstrap interval over seeds, and the best
                               mean loss with its interval
    transfer_penalty(runs)     per arm: the loss at the largest width when it uses the
                               smallest width's best LR, minus its own best (interval:
                               bootstrap over seeds, paired)
    optimizer_table(runs)      lr_optima plus optimizer-state bytes per parameter and
                               tokens/s of the best LR's runs

A diverged or failed run counts as an infinitely bad loss at its LR (it is not dropped,
which would make a too-large LR look fine). `lm analyze --lr-transfer WORKDIR` and
`lm analyze --optimizers WORKDIR` print these tables (experiments/mup_transfer.py,
experiments/optimizers.py)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

WIDTH, LR, SEED, LOSS = "model.d_model", "optim.lr", "seed", "final_val_loss"


def _loss_grid(runs: pd.DataFrame) -> pd.DataFrame:
    """[lr x seed] final validation loss; inf where the run diverged or did not finish."""
    ok = runs["status"] == "completed"
    loss = runs[LOSS].where(ok, np.inf).fillna(np.inf)
    return (pd.DataFrame({LR: runs[LR], SEED: runs[SEED], "loss": loss})
            .pivot_table(index=LR, columns=SEED, values="loss", aggfunc="mean")
            .sort_index())


def _best_lr(lrs: np.ndarray, mean_loss: np.ndarray) -> float:
    """The minimum of a parabola in log10(lr) through the best grid point and its two
    neighbours (the grid point itself at an edge or when the parabola opens downward)."""
    i = int(np.argmin(mean_loss))
    if not np.isfinite(mean_loss[i]):
        return math.nan
    if 0 < i < len(lrs) - 1 and np.all(np.isfinite(mean_loss[i - 1:i + 2])):
        x, y = np.log10(lrs[i - 1:i + 2]), mean_loss[i - 1:i + 2]
        a, b, _ = np.polyfit(x, y, 2)
        if a > 0:
            return float(10 ** np.clip(-b / (2 * a), x[0], x[-1]))
    return float(lrs[i])


def _boot_seeds(grid: pd.DataFrame, n_boot: int, rng: np.random.Generator):
    """Resamples of the seed columns (with replacement); the full set when one seed."""
    cols = np.arange(grid.shape[1])
    if len(cols) < 2:
        return [cols]
    return [rng.choice(cols, size=len(cols)) for _ in range(n_boot)]


def lr_optima(runs: pd.DataFrame, by: Sequence[str] = ("arm", WIDTH), n_boot: int = 500,
              confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    rows = []
    for key, g in runs.groupby(list(by), sort=True):
        grid = _loss_grid(g)
        lrs, values = grid.index.to_numpy(float), grid.to_numpy(float)
        mean = values.mean(axis=1)
        best_i = int(np.argmin(mean))
        boots = _boot_seeds(grid, n_boot, rng)
        lr_b = [_best_lr(lrs, values[:, c].mean(axis=1)) for c in boots]
        loss_b = [values[best_i, c].mean() for c in boots]
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))),
                     "seeds": grid.shape[1], "lr_best": _best_lr(lrs, mean),
                     "lr_lo": np.percentile(lr_b, q[0]), "lr_hi": np.percentile(lr_b, q[1]),
                     "grid_lr": lrs[best_i], "loss": mean[best_i],
                     "loss_lo": np.percentile(loss_b, q[0]), "loss_hi": np.percentile(loss_b, q[1]),
                     "diverged": int(np.sum(~np.isfinite(values)))})
    return pd.DataFrame(rows)


def transfer_penalty(runs: pd.DataFrame, arm: str = "arm", n_boot: int = 500,
                     confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per arm: the smallest width's best grid LR used at the largest width."""
    rng = np.random.default_rng(seed)
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    rows = []
    for name, g in runs.groupby(arm, sort=True):
        widths = sorted(g[WIDTH].unique())
        small, large = _loss_grid(g[g[WIDTH] == widths[0]]), _loss_grid(g[g[WIDTH] == widths[-1]])
        seeds = small.columns.intersection(large.columns)
        lrs = small.index.intersection(large.index)
        small, large = small.loc[lrs, seeds].to_numpy(float), large.loc[lrs, seeds].to_numpy(float)

        def penalty(cols):
            transferred = lrs[int(np.argmin(small[:, cols].mean(axis=1)))]
            at_large = large[:, cols].mean(axis=1)
            return float(at_large[list(lrs).index(transferred)] - at_large.min()), transferred
        value, lr = penalty(np.arange(len(seeds)))
        boot = [penalty(c)[0] for c in _boot_seeds(pd.DataFrame(small), n_boot, rng)]
        rows.append({arm: name, "small_width": widths[0], "large_width": widths[-1],
                     "transferred_lr": lr, "best_lr_large": lrs[int(np.argmin(large.mean(axis=1)))],
                     "penalty": value, "penalty_lo": np.percentile(boot, q[0]),
                     "penalty_hi": np.percentile(boot, q[1])})
    return pd.DataFrame(rows)


def _tokens_per_s(run_path: str) -> float:
    from lm.analysis import results
    m = results.metrics(run_path)
    if "tokens_per_s" not in m:
        return math.nan
    tps = m.loc[m["kind"] == "train", "tokens_per_s"].dropna().to_numpy(float)
    return float(np.median(tps[1:] if len(tps) > 1 else tps)) if len(tps) else math.nan


def optimizer_table(runs: pd.DataFrame, **kw) -> pd.DataFrame:
    table = lr_optima(runs, **kw)
    extra = []
    for _, row in table.iterrows():
        g = runs[(runs["arm"] == row["arm"]) & (runs[WIDTH] == row[WIDTH])
                 & (runs[LR] == row["grid_lr"])]
        extra.append({"state_bytes_per_param": float(g["optimizer_state_bytes_per_param"].median())
                      if "optimizer_state_bytes_per_param" in g else math.nan,
                      "tokens_per_s": float(np.nanmedian([_tokens_per_s(p) for p in g["path"]]))})
    return pd.concat([table, pd.DataFrame(extra)], axis=1)


def _fmt(df: pd.DataFrame) -> str:
    with pd.option_context("display.width", 250, "display.max_columns", None):
        return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def report(workdir: str, optimizers: bool = False) -> str:
    from lm.analysis.results import load_sweep
    runs = load_sweep(workdir)
    if "arm" not in runs:
        runs["arm"] = "all"
    lines = []
    if optimizers:
        lines += ["Best loss per optimizer and width (LR tuned on the grid; 95% bootstrap "
                  "intervals over seeds):", _fmt(optimizer_table(runs))]
    else:
        lines += ["Best LR per arm and width (parabola in log LR; 95% bootstrap intervals "
                  "over seeds):", _fmt(lr_optima(runs)), "",
                  "Penalty of the smallest width's best LR at the largest width:",
                  _fmt(transfer_penalty(runs))]
    return "\n".join(lines)
