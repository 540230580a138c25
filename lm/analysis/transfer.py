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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Optimum:
    """The best LR of a sweep: `lr` is the vertex of a parabola in log10(lr) through the
    best grid point and its two neighbours when the grid brackets it (`edge` ""), else
    the grid point itself with `edge` "low" / "high": the optimum lies at or beyond the
    grid's end, so the value is a bound, not an estimate."""
    lr: float
    edge: str = ""

    def __str__(self) -> str:
        if not math.isfinite(self.lr):
            return "none finite"
        return {"low": f"<={self.lr:.2g} (low edge)", "high": f">={self.lr:.2g} (high edge)"
                }.get(self.edge, f"{self.lr:.3g}")


def grid_optimum(lrs: np.ndarray, mean_loss: np.ndarray) -> Optimum:
    """The optimum of a loss-vs-LR curve on a grid (see `Optimum`); NaN when no loss is
    finite. A flat or downward-opening parabola keeps the best grid point."""
    lrs, mean_loss = np.asarray(lrs, float), np.asarray(mean_loss, float)
    i = int(np.argmin(mean_loss))
    if not np.isfinite(mean_loss[i]):
        return Optimum(math.nan)
    if len(lrs) > 1 and i in (0, len(lrs) - 1):
        return Optimum(float(lrs[i]), "low" if i == 0 else "high")
    if 0 < i < len(lrs) - 1 and np.all(np.isfinite(mean_loss[i - 1:i + 2])):
        x, y = np.log10(lrs[i - 1:i + 2]), mean_loss[i - 1:i + 2]
        a, b, _ = np.polyfit(x, y, 2)
        if a > 0:
            return Optimum(float(10 ** np.clip(-b / (2 * a), x[0], x[-1])))
    return Optimum(float(lrs[i]))


def _boot_seeds(grid: pd.DataFrame, n_boot: int, rng: np.random.Generator):
    """Resamples of the seed columns (with replacement); the full set when one seed."""
    cols = np.arange(grid.shape[1])
    if len(cols) < 2:
        return [cols]
    return [rng.choice(cols, size=len(cols)) for _ in range(n_boot)]


def _small_sample(estimate: float, boots, n: int, confidence: float,
                  log: bool = False) -> tuple[float, float]:
    """A percentile bootstrap interval over n seeds, widened for the small sample: the
    bootstrap spread of a mean over n resampled seeds is sqrt((n-1)/n) of the true one
    and the normal quantile claims too much at n = 3..5, so each side's distance from
    the estimate is scaled by sqrt(n/(n-1)) * t_{n-1} / z (in log space for an LR).
    With one seed there is no interval (NaN)."""
    from scipy import stats
    b = np.asarray([x for x in boots if np.isfinite(x)], float)
    if n < 2 or b.size == 0 or not math.isfinite(estimate):
        return math.nan, math.nan
    f = (lambda v: np.log(v)) if log else (lambda v: v)
    g = (lambda v: float(np.exp(v))) if log else float
    tail = (1 - confidence) / 2
    k = math.sqrt(n / (n - 1)) * stats.t.ppf(1 - tail, n - 1) / stats.norm.ppf(1 - tail)
    e = f(estimate)
    lo, hi = np.percentile(f(b), [tail * 100, (1 - tail) * 100])
    return (min(g(e - k * max(e - lo, 0.0)), estimate),
            max(g(e + k * max(hi - e, 0.0)), estimate))


def lr_optima(runs: pd.DataFrame, by: Sequence[str] = ("arm", WIDTH), n_boot: int = 500,
              confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per group `by`: the best LR (`grid_optimum` of the mean over seeds; `edge` says
    when it sits on the grid's edge), its bootstrap interval over seeds (`edge_share`:
    the share of resamples whose optimum is on an edge), and the best grid LR's mean loss
    with its Student-t interval. `lr_boot` keeps the resampled optima (for `lr_drift`)."""
    from lm.analysis.seeds import interval
    rng = np.random.default_rng(seed)
    rows = []
    for key, g in runs.groupby(list(by), sort=True):
        grid = _loss_grid(g)
        lrs, values = grid.index.to_numpy(float), grid.to_numpy(float)
        mean = values.mean(axis=1)
        best_i = int(np.argmin(mean))
        best = grid_optimum(lrs, mean)
        boots = _boot_seeds(grid, n_boot, rng)
        opt_b = [grid_optimum(lrs, values[:, c].mean(axis=1)) for c in boots]
        lr_b = np.array([o.lr for o in opt_b])
        lr_lo, lr_hi = _small_sample(best.lr, lr_b, grid.shape[1], confidence, log=True)
        loss_iv = interval(values[best_i], confidence)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))),
                     "seeds": grid.shape[1], "lr_best": best.lr, "edge": best.edge,
                     "lr_lo": lr_lo, "lr_hi": lr_hi,
                     "edge_share": float(np.mean([bool(o.edge) for o in opt_b])),
                     "grid_lr": lrs[best_i], "loss": mean[best_i],
                     "loss_lo": loss_iv.lo, "loss_hi": loss_iv.hi,
                     "diverged": int(np.sum(~np.isfinite(values))), "lr_boot": lr_b})
    return pd.DataFrame(rows)


def lr_drift(optima: pd.DataFrame, arm: str = "arm", confidence: float = 0.95) -> pd.DataFrame:
    """Per arm: how the best LR moves with width, as the slope of log2(best LR) against
    log2(width) (0: it transfers; -1: it halves whenever the width doubles), with a
    bootstrap interval (the resampled optima of `lr_optima`). `edge` names the widths
    whose optimum sits on the grid's edge: then the slope is a bound, not a measurement."""
    rows = []
    for name, g in optima.groupby(arm, sort=True):
        g = g.sort_values(WIDTH)
        x = np.log2(g[WIDTH].to_numpy(float))
        if len(x) < 2:
            continue
        slope = float(np.polyfit(x, np.log2(g["lr_best"].to_numpy(float)), 1)[0])
        boots = np.stack([np.resize(b, max(len(b) for b in g["lr_boot"])) for b in g["lr_boot"]])
        slopes = [np.polyfit(x, np.log2(boots[:, j]), 1)[0] for j in range(boots.shape[1])
                  if np.all(np.isfinite(boots[:, j]))]
        lo, hi = _small_sample(slope, slopes, int(g["seeds"].min()), confidence)
        rows.append({arm: name, "widths": f"{int(g[WIDTH].min())}-{int(g[WIDTH].max())}",
                     "slope": slope, "slope_lo": lo, "slope_hi": hi,
                     "seeds": int(g["seeds"].min()),
                     "edge": ", ".join(f"{int(w)}:{e}" for w, e in zip(g[WIDTH], g["edge"]) if e)})
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
                     "penalty_hi": np.percentile(boot, q[1]), "seeds": len(seeds),
                     # the small width's optimum on the grid's edge: the LR transferred
                     # is a bound, so the penalty is too
                     "small_edge": grid_optimum(lrs.to_numpy(float), small.mean(axis=1)).edge})
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


def readable_optima(optima: pd.DataFrame, by: Sequence[str] = ("arm", WIDTH)) -> pd.DataFrame:
    """`lr_optima` for reading: the best LR as a value with its interval, or as a bound
    when it sits on the grid's edge; the loss with its interval; the seed count."""
    rows = []
    for _, r in optima.iterrows():
        best = Optimum(r["lr_best"], r["edge"])
        rows.append({**{c: r[c] for c in by}, "seeds": r["seeds"], "best LR": str(best),
                     "95% interval": "-" if r["edge"] else f"[{r['lr_lo']:.2g}, {r['lr_hi']:.2g}]",
                     "loss": f"{r['loss']:.4f} [{r['loss_lo']:.4f}, {r['loss_hi']:.4f}]",
                     "diverged": r["diverged"]})
    return pd.DataFrame(rows)


def report(workdir: str, optimizers: bool = False) -> str:
    """`lm analyze --lr-transfer` / `--optimizers`: the tables, and the loss-vs-LR figure
    (a panel per arm, a colour per width) in WORKDIR/analysis/."""
    from pathlib import Path

    from lm.analysis import figures
    from lm.analysis.results import load_sweep
    runs = load_sweep(workdir)
    runs = runs[~runs["status"].isin(["missing", "running"])].copy()  # nothing to read yet
    if "arm" not in runs:
        runs["arm"] = "all"
    optima = lr_optima(runs)
    figure = figures.lr_panels(runs, Path(workdir) / "analysis" / "lr_transfer.png",
                               panel="arm", colour=WIDTH, optima=optima,
                               title="each optimizer on its own LR grid, per width" if optimizers
                               else "LR transfer across width (Tensor Programs V, fig. 1)")
    lines = []
    if optimizers:
        table = optimizer_table(runs)
        lines += ["Best loss per optimizer and width (LR tuned on its own grid; 95% bootstrap "
                  "intervals over seeds; an optimum on the grid's edge is a bound):",
                  _fmt(readable_optima(table).assign(
                      state_bytes_per_param=table["state_bytes_per_param"],
                      tokens_per_s=table["tokens_per_s"].round()))]
    else:
        lines += ["Best LR per arm and width (parabola in log LR; 95% bootstrap intervals "
                  "over seeds; an optimum on the grid's edge is a bound, not a value):",
                  _fmt(readable_optima(optima)), "",
                  "Drift of the best LR with width: slope of log2(best LR) vs log2(width) "
                  "(0 = transfers; 95% bootstrap interval):",
                  _fmt(lr_drift(optima)), "",
                  "Penalty of the smallest width's best LR at the largest width:",
                  _fmt(transfer_penalty(runs))]
    lines.append(f"  plot: {figure}")
    return "\n".join(lines)
