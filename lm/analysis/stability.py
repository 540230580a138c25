"""Training-stability analysis after Wortsman et al. 2023, "Small-scale proxies for
large-scale Transformer training instabilities".

Their summary statistic is *LR sensitivity*: how much worse than its best a model gets,
on average, across a learning-rate sweep. With L* the best final loss over the sweep and
L_init the loss at initialisation,

    LR sensitivity = mean over LRs of [ min(L(lr), L_init) - L* ]

A diverged run (or any non-finite loss) counts as L_init, and losses are capped there,
so one divergence cannot dominate the mean, but a model that diverges over half the
grid scores high. Comparing the statistic across model sizes and arms (qk_norm, z_loss,
...) is how the paper shows an intervention flattens the LR curve.

The same paper tracks two instability precursors that `lm train` logs per step: the
largest attention logit (attention-logit growth, fixed by qk-layernorm) and the log
partition function of the output softmax (logit divergence, fixed by z-loss);
`stability_curves` extracts both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lm.analysis import results
from lm.analysis.scaling import _pyplot, save_figure

_ATTN = re.compile(r"attn_logit_max/(\d+)")
_RESID = re.compile(r"resid_rms/(\d+)")


def uniform_loss(vocab_size: int) -> float:
    """ln(vocab_size): the loss of a uniform prediction, which is what a freshly
    initialised LM (small init, ~zero logits) scores. The default L_init."""
    return math.log(vocab_size)


def lr_sensitivity(lrs: Sequence[float], losses: Sequence[float], loss_init: float) -> float:
    """LR sensitivity of one model size/arm (Wortsman et al. 2023, section 3.1).

    lrs, losses: the sweep, one final loss per run; non-finite losses (diverged) count as
    `loss_init`. Repeated LRs (seeds) are averaged after capping. L* is the best capped
    loss. Returns NaN when no run has a finite loss: there is no optimum to compare to.
    """
    lrs = np.asarray(lrs, float).reshape(-1)
    losses = np.asarray(losses, float).reshape(-1)
    if lrs.shape != losses.shape or lrs.size == 0:
        raise ValueError(f"need one loss per LR; got {lrs.size} LRs, {losses.size} losses")
    if not np.isfinite(losses).any():
        return math.nan
    capped = np.where(np.isfinite(losses), np.minimum(losses, loss_init), loss_init)
    per_lr = pd.Series(capped).groupby(lrs).mean().to_numpy()
    return float(np.mean(per_lr - per_lr.min()))


def lr_sensitivity_table(runs: pd.DataFrame, by: Sequence[str] | str, *,
                         lr: str = "optim.lr", loss: str = "final_val_loss",
                         loss_init: float | None = None) -> pd.DataFrame:
    """LR sensitivity per group of a `results.load` table.

    `by`: the columns that name a size/arm (e.g. ["model.d_model", "model.qk_norm"]).
    A run whose status starts with "diverged" counts as diverged even though its summary
    holds the last loss before divergence. Runs with status "missing" / "running" are
    left out (they have no result yet). `loss_init`: default ln(model.vocab_size) per
    group (see `uniform_loss`). Returns one row per group: the `by` columns,
    lr_sensitivity, best_lr, best_loss, edge ("low" / "high" when the best LR is the
    grid's end), n_lrs, n_diverged.
    """
    by = [by] if isinstance(by, str) else list(by)
    done = runs[~runs["status"].isin(["missing", "running"])]
    rows = []
    for key, g in done.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        diverged = g["status"].astype(str).str.startswith("diverged").to_numpy()
        vals = g[loss].to_numpy(float).copy()
        vals[diverged] = math.nan
        if loss_init is not None:
            init = loss_init
        elif "model.vocab_size" in g:
            init = uniform_loss(int(g["model.vocab_size"].iloc[0]))
        else:
            raise ValueError("pass loss_init: no model.vocab_size column to default it from")
        finite = np.isfinite(vals)
        best = int(np.argmin(np.where(finite, vals, np.inf))) if finite.any() else None
        rows.append({**dict(zip(by, key)),
                     "lr_sensitivity": lr_sensitivity(g[lr].to_numpy(float), vals, init),
                     "best_lr": g[lr].iloc[best] if best is not None else math.nan,
                     "best_loss": vals[best] if best is not None else math.nan,
                     # the best LR on the grid's end: a bound on the optimum, not a value
                     "edge": ("" if best is None or g[lr].nunique() < 2 else
                              "low" if g[lr].iloc[best] == g[lr].min() else
                              "high" if g[lr].iloc[best] == g[lr].max() else ""),
                     "n_lrs": int(g[lr].nunique()), "n_diverged": int(diverged.sum()),
                     "loss_init": init})
    return pd.DataFrame(rows)


def _train_records(run, per_layer: re.Pattern) -> tuple[pd.DataFrame, list[str]]:
    """A run's train records (`run`: a run dir or a metrics DataFrame) and its columns
    matching `per_layer` (name/<layer>), in layer order."""
    m = run if isinstance(run, pd.DataFrame) else results.metrics(run)
    train = m[m["kind"] == "train"] if "kind" in m else m
    layers = sorted((c for c in train.columns if per_layer.fullmatch(str(c))),
                    key=lambda c: int(per_layer.fullmatch(c).group(1)))
    return train, layers


def stability_curves(run) -> pd.DataFrame:
    """Per-step instability precursors of one run (train records only): `step`,
    `attn_logit_max` (max over layers of attn_logit_max/<i>; NaN if any layer's is NaN,
    since a NaN logit is itself the signal) and `logz_mean`.

    `run`: a run directory (read with `results.metrics`) or a metrics DataFrame.
    """
    train, layers = _train_records(run, _ATTN)
    out = pd.DataFrame({"step": train["step"].to_numpy()})
    out["attn_logit_max"] = (train[layers].astype(float).max(axis=1, skipna=False).to_numpy()
                             if layers else math.nan)
    out["logz_mean"] = (train["logz_mean"].astype(float).to_numpy()
                        if "logz_mean" in train else math.nan)
    return out


def residual_growth(run) -> np.ndarray:
    """RMS of the residual stream after each layer, at the run's last logged train step
    ([n_layers]; empty if the run logged none). How it grows with depth is what norm
    placement (pre / post / peri-LN, LayerNorm scaling) changes.

    `run`: a run directory or a metrics DataFrame."""
    train, layers = _train_records(run, _RESID)
    if not layers or train.empty:
        return np.zeros(0)
    return train[layers].astype(float).to_numpy()[-1]


def residual_growth_table(runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """One row per run of `runs` (`results.load`): the `by` columns, final loss, residual
    RMS after the first and last layer, their ratio (growth with depth) and the per-layer
    profile."""
    rows = []
    for _, r in runs.iterrows():
        prof = residual_growth(r["path"])
        if prof.size == 0:
            continue
        rows.append({**{c: r[c] for c in by}, "final_val_loss": r.get("final_val_loss"),
                     "rms_first": prof[0], "rms_last": prof[-1],
                     "growth": prof[-1] / prof[0],
                     "profile": " ".join(f"{x:.3g}" for x in prof)})
    return pd.DataFrame(rows)


def plot_residual_growth(table: pd.DataFrame, path, *, label: Sequence[str]) -> Path:
    """Residual RMS vs layer (log y), one line per run, labelled by `label` columns."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Colour by the first label column (the arm), line style by the last (e.g. the LR),
    # so two dozen lines stay tellable apart.
    colours = {v: f"C{i % 10}" for i, v in enumerate(table[label[0]].astype(str).unique())}
    styles = {v: s for v, s in zip(table[label[-1]].astype(str).unique(),
                                   ["-", "--", ":", "-."] * 8)}
    for _, r in table.iterrows():
        prof = [float(x) for x in r["profile"].split()]
        ax.plot(range(1, len(prof) + 1), prof, marker="o", ms=3,
                color=colours[str(r[label[0]])], linestyle=styles[str(r[label[-1]])],
                label=", ".join(f"{r[c]}" for c in label))
    ax.set(xlabel="layer", ylabel="residual RMS after the layer", yscale="log",
           title="residual stream growth with depth")
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, plt, path)


def lr_sensitivity_over_seeds(runs: pd.DataFrame, by: Sequence[str] | str, seed: str, *,
                              lr: str = "optim.lr", loss: str = "final_val_loss",
                              loss_init: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """LR sensitivity per group and seed, and its mean with a 95% interval over seeds.

    Returns (per_seed, summary): per_seed is `lr_sensitivity_table` of each seed's runs
    with a `seed` column; summary has per group the mean LR sensitivity, ci_lo, ci_hi,
    std (the seed-to-seed spread), n seeds, and the mean best loss and best LR."""
    from lm.analysis.seeds import seed_table
    by = [by] if isinstance(by, str) else list(by)
    parts = []
    for s, g in runs.groupby(seed, sort=True):
        t = lr_sensitivity_table(g, by, lr=lr, loss=loss, loss_init=loss_init)
        t.insert(len(by), "seed", s)
        parts.append(t)
    per_seed = pd.concat(parts, ignore_index=True)
    summary = seed_table(per_seed, "lr_sensitivity", by).rename(columns={"mean": "lr_sensitivity"})
    extra = per_seed.groupby(by, sort=True, dropna=False).agg(
        best_loss=("best_loss", "mean"), best_lr=("best_lr", "median"),
        n_diverged=("n_diverged", "sum")).reset_index()
    return per_seed, summary.merge(extra, on=by, how="left").drop(columns=["n_nonfinite"])


def precursors(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: the largest attention logit and the mean log Z of the output softmax at
    its last finite train record (the instability precursors of Wortsman et al.), and
    how far log Z drifted from its first record (logit divergence)."""
    rows = []
    for path in runs["path"]:
        c = stability_curves(path)
        ok = c[np.isfinite(c["logz_mean"].astype(float))]
        last = ok.iloc[-1] if len(ok) else None
        rows.append({"path": path,
                     "attn_logit_max": float(last["attn_logit_max"]) if last is not None else math.nan,
                     "logz_mean": float(last["logz_mean"]) if last is not None else math.nan,
                     "logz_drift": (float(last["logz_mean"] - ok["logz_mean"].iloc[0])
                                    if last is not None else math.nan)})
    return runs.merge(pd.DataFrame(rows, columns=["path", "attn_logit_max", "logz_mean",
                                                  "logz_drift"]), on="path", how="left")
