"""The LR-sweep figures of the stability and transfer papers, drawn one way.

Wortsman et al. (2023) figure 1 and Tensor Programs V figure 1 are the same picture: a
panel per arm (qk-layernorm on / off; SP / muP; an optimizer; a norm placement), the
learning rate on a log x axis, the final loss on y, and one line per model size in a
sequential colour map, so that "the curve moves with size" and "the curves stack" read
at a glance. Every point is the mean over seeds with its 95% Student-t interval; a
diverged run is a cross at the loss it is charged (L_init, or the panel's top); the
best LR of a curve is a star, hollow when it sits on the grid's edge (a bound).

    lr_panels(runs, path, panel="arm", colour="model.d_model")
    precursor_panels(table, path, panel="arm", colour="model.d_model")
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from lm.analysis.scaling import _pyplot, save_figure
from lm.analysis.seeds import interval


def _ordered(values) -> list:
    """Unique values, numerically sorted when they are numbers, else in order of appearance."""
    uniq = list(dict.fromkeys(values))
    try:
        return sorted(uniq, key=float)
    except (TypeError, ValueError):
        return uniq


def _colours(values: list) -> dict:
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    n = len(values)
    return {v: cmap(0.85 * i / max(n - 1, 1)) for i, v in enumerate(values)}


def _stats(lrs: np.ndarray, vals: np.ndarray):
    grid = np.unique(lrs)
    ivs = [interval(vals[lrs == x]) for x in grid]
    return grid, np.array([iv.mean for iv in ivs]), np.array([
        iv.half if iv.n > 1 else 0.0 for iv in ivs])


def _label(col: str, value) -> str:
    short = col.rsplit(".", 1)[-1]
    return f"{short} {value}"


def lr_panels(runs: pd.DataFrame, path, *, panel: str = "arm", colour: str = "model.d_model",
              lr: str = "optim.lr", loss: str = "final_val_loss",
              loss_init: float | None = None, optima: pd.DataFrame | None = None,
              notes: Mapping | None = None, title: str = "final loss vs learning rate") -> Path:
    """Final loss vs LR: a panel per `panel` value, a line per `colour` value (mean and 95%
    interval over the seeds at each LR). `loss_init`: the cap diverged runs are charged
    (Wortsman's L_init); without it they are drawn at the panel's top. `optima`: an
    `lr_optima`-like table (panel, colour, lr_best, edge) whose best LRs are starred.
    `notes`: {(panel value, colour value): text} appended to the legend (e.g. the LR
    sensitivity). Writes a PNG; returns its path."""
    plt = _pyplot()
    done = runs[~runs["status"].isin(["missing", "running"])]
    panels = _ordered(done[panel]) if panel in done else [None]
    shades = _colours(_ordered(done[colour]))
    cols = min(len(panels), 3)  # rows of at most 3 panels: each stays legible
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols + 0.6, 6.0), 4.0 * rows + 0.3),
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    finite = done[loss].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    best = finite.min() if finite.size else 0.0
    top = loss_init if loss_init is not None else (
        min(float(np.percentile(finite, 95)), best + 2.5) if finite.size else 1.0)
    for ax, p in zip(axes.flat, panels):
        part = done if p is None else done[done[panel] == p]
        for c in _ordered(part[colour]):
            g = part[part[colour] == c]
            lrs = g[lr].to_numpy(float)
            vals = g[loss].to_numpy(float)
            bad = g["status"].astype(str).str.startswith(("diverged", "failed")).to_numpy() \
                | ~np.isfinite(vals)
            shown = np.where(bad, top, np.minimum(vals, top))
            grid, mean, half = _stats(lrs, shown)
            label = _label(colour, c)
            if notes and (p, c) in notes:
                label += f" ({notes[(p, c)]})"
            ax.errorbar(grid, mean, yerr=half, fmt="-o", ms=3.5, capsize=2, lw=1.4,
                        color=shades[c], label=label)
            if bad.any():
                ax.scatter(lrs[bad], shown[bad], marker="x", s=50, color=shades[c], zorder=3)
            if optima is not None:
                row = optima[(optima[colour] == c) & (True if p is None else optima[panel] == p)]
                if len(row) and math.isfinite(row["lr_best"].iloc[0]):
                    x = float(row["lr_best"].iloc[0])
                    y = float(np.interp(math.log(x), np.log(grid), mean))
                    edge = bool(row["edge"].iloc[0])
                    ax.scatter([x], [y], marker="*", s=160, zorder=4, edgecolor=shades[c],
                               facecolor="none" if edge else shades[c], linewidth=1.2)
        ax.set(xscale="log", xlabel=lr, title="" if p is None else _label(panel, p))
        ax.grid(alpha=0.3, which="both", lw=0.5)
        ax.legend(fontsize=7, loc="upper left" if loss_init is None else "best")
    for row in axes:
        row[0].set_ylabel(f"{loss}" + (" (diverged = L_init)" if loss_init is not None else ""))
    axes[0][0].set_ylim(best - 0.1 * max(top - best, 0.1), top + 0.05 * max(top - best, 0.1))
    fig.suptitle(f"{title}\nmean and 95% interval over seeds; star: best LR (hollow: on "
                 "the grid's edge, a bound)", fontsize=8.5)
    return save_figure(fig, plt, path)


def precursor_panels(table: pd.DataFrame, path, *, panel: str = "arm",
                     colour: str = "model.d_model", lr: str = "optim.lr") -> Path:
    """Wortsman et al.'s instability precursors at the end of training vs LR: the max
    attention logit (top row, log y) and the drift of the output softmax's mean log Z
    (bottom row), a column per `panel` value, a line per `colour` value, mean and 95%
    interval over seeds. `table`: `stability.precursors(runs)`."""
    plt = _pyplot()
    panels = _ordered(table[panel]) if panel in table else [None]
    shades = _colours(_ordered(table[colour]))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels) + 0.6, 7.0),
                             sharey="row", squeeze=False)
    for j, p in enumerate(panels):
        part = table if p is None else table[table[panel] == p]
        for c in _ordered(part[colour]):
            g = part[part[colour] == c]
            lrs = g[lr].to_numpy(float)
            for i, col in enumerate(("attn_logit_max", "logz_drift")):
                grid, mean, half = _stats(lrs, g[col].to_numpy(float))
                axes[i][j].errorbar(grid, mean, yerr=half, fmt="-o", ms=3, capsize=2,
                                    color=shades[c], label=_label(colour, c))
        axes[0][j].set(xscale="log", yscale="log",
                       title="" if p is None else _label(panel, p))
        axes[1][j].set(xscale="log", xlabel=lr)
        for i in range(2):
            axes[i][j].grid(alpha=0.3, which="both", lw=0.5)
    axes[0][0].set_ylabel("max attention logit (end of training)")
    axes[1][0].set_ylabel("mean log Z: end - start")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("instability precursors: attention-logit growth (top), output-logit "
                 "drift (bottom)", fontsize=9)
    return save_figure(fig, plt, path)


def residual_panels(table: pd.DataFrame, path, *, panel: str = "arm",
                    colour: str = "model.n_layers", lr: str = "optim.lr") -> Path:
    """Residual-stream RMS after each layer (log y) at the end of training: a panel per
    `panel` value (norm placement), a line per `colour` value (depth), each at its
    group's best LR (lowest mean final loss) and averaged over seeds, so that growth with
    depth compares like with like. `table`: `stability.residual_growth_table(runs, by)`
    with `panel`, `colour` and `lr` among `by`."""
    plt = _pyplot()
    panels = _ordered(table[panel]) if panel in table else [None]
    shades = _colours(_ordered(table[colour]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.6, 3.8),
                             sharey=True, squeeze=False)
    for ax, p in zip(axes[0], panels):
        part = table if p is None else table[table[panel] == p]
        for c in _ordered(part[colour]):
            g = part[part[colour] == c]
            means = g.groupby(lr)["final_val_loss"].mean()
            if not np.isfinite(means.to_numpy(float)).any():
                continue
            at = g[g[lr] == means.idxmin()]
            profiles = np.array([[float(x) for x in s.split()] for s in at["profile"]])
            ax.plot(np.arange(1, profiles.shape[1] + 1), profiles.mean(axis=0), "-o", ms=3,
                    color=shades[c], label=f"{_label(colour, c)} (LR {means.idxmin():.2g})")
        ax.set(yscale="log", xlabel="layer", title="" if p is None else _label(panel, p))
        ax.grid(alpha=0.3, which="both", lw=0.5)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("residual RMS after the layer")
    fig.suptitle("residual stream growth with depth (each at its best LR, mean over seeds)",
                 fontsize=9)
    return save_figure(fig, plt, path)
