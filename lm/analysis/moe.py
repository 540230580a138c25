"""Mixture-of-experts runs: loss at equal active compute, and how balanced the routing
stays (from the per-layer `moe_load/<layer>/<expert>` records `lm train` writes).

Imbalance is `max_load` = n_experts x the largest expert's share of the assignments,
averaged over the MoE layers: 1 is perfectly balanced, n_experts is every token on one
expert. (The max / min ratio, also logged, is infinite as soon as one expert starves.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lm.analysis import results
from lm.analysis.scaling import _pyplot, save_figure

_LOAD = re.compile(r"moe_load/(\d+)/(\d+)")


def is_moe(runs: pd.DataFrame) -> pd.Series:
    pattern = runs.get("model.channel_pattern", pd.Series("f", index=runs.index))
    return pattern.astype(str).str.contains("e")


def load_imbalance(run) -> pd.DataFrame:
    """Per train record of one run: `step` and `max_load` (see the module doc); empty
    for a run without MoE layers. `run`: a run dir or a metrics DataFrame."""
    m = run if isinstance(run, pd.DataFrame) else results.metrics(run)
    train = m[m["kind"] == "train"] if "kind" in m else m
    cols = [c for c in train.columns if _LOAD.fullmatch(str(c))]
    if not cols or train.empty:
        return pd.DataFrame({"step": [], "max_load": []})
    layers = sorted({int(_LOAD.fullmatch(c).group(1)) for c in cols})
    per_layer = []
    for layer in layers:
        mine = [c for c in cols if int(_LOAD.fullmatch(c).group(1)) == layer]
        loads = train[mine].astype(float).to_numpy()
        per_layer.append(loads.max(axis=1) * len(mine))
    return pd.DataFrame({"step": train["step"].to_numpy(),
                         "max_load": np.mean(per_layer, axis=0)})


def moe_table(runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """One row per run: the `by` columns, total and active parameters, training FLOPs,
    final validation loss, and the imbalance at the end and averaged over training."""
    rows = []
    for _, r in runs.iterrows():
        imb = load_imbalance(r["path"])
        rows.append({**{c: r[c] for c in by}, "params": r.get("params"),
                     "active_params": r.get("active_params", r.get("params")),
                     "training_flops": r.get("training_flops"),
                     "final_val_loss": r.get("final_val_loss"),
                     "max_load_final": imb["max_load"].iloc[-1] if len(imb) else np.nan,
                     "max_load_mean": imb["max_load"].mean() if len(imb) else np.nan})
    return pd.DataFrame(rows)


def plot_moe(runs: pd.DataFrame, path, *, label: Sequence[str]) -> Path:
    """Three panels, one line per run: train loss vs step, vs training FLOPs (active
    compute), and the load imbalance vs step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, (_, r) in enumerate(runs.iterrows()):
        m = results.metrics(r["path"])
        train = m[m["kind"] == "train"]
        name = ", ".join(f"{r[c]}" for c in label)
        colour = f"C{i % 10}"
        tokens_per_step = float(r["batch_size"]) * float(r["data.seq_len"])
        axes[0].plot(train["step"], train["loss"], color=colour, label=name)
        axes[1].plot(train["step"] * tokens_per_step * float(r["flops_per_token"]),
                     train["loss"], color=colour, label=name)
        imb = load_imbalance(m)
        if len(imb):
            axes[2].plot(imb["step"], imb["max_load"], color=colour, label=name)
    axes[0].set(xlabel="step", ylabel="train loss", title="loss vs steps")
    axes[1].set(xlabel="training FLOPs (active)", ylabel="train loss", xscale="log",
                title="loss vs compute")
    axes[2].set(xlabel="step", ylabel="n_experts x max expert load (1 = balanced)",
                title="load imbalance")
    for ax in axes:
        ax.legend(fontsize=6)
    return save_figure(fig, plt, path)
