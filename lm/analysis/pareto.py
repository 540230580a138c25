"""The Pareto front of compressed models: quality against size, per recipe.

A sweep of compressed variants (experiments/compress.py: a parent, pruned and healed
children, students of the same shapes trained from scratch) is read as one row per
recipe: the validation loss over seeds (mean, Student-t interval) against three sizes,
each what the deployed model costs:

    params          non-zero parameters (a 2:4-sparse matrix counts half its entries)
    bytes           the weights at 2 bytes each (bf16); a 2:4 matrix stored compressed as
                    NVIDIA's sparse tensor cores read it: the kept half plus a 2-bit index
                    per kept value (9/16 of its dense bytes)
    flops/token     the model's forward FLOPs per token (training FLOPs / 3, the 6N
                    convention; a distilling run's teacher not counted); a 2:4 matrix's
                    matmul at half its dense FLOPs (sparse tensor cores)

A recipe is on the front for a size when no other recipe is at most as large and has a
lower mean loss. Downstream task accuracies in the summaries (`tasks/<task>/acc`, from
`evals.tasks`) are averaged per recipe beside the loss. The run's summary.json gives `params`, `flops_per_token` and, for a
sparse run, `sparse_params` (the entries under N:M masks) and `sparse_pattern` ("2:4");
a run without a recipe tag (the parent, trained by the experiment's prepare) is named by
its directory. Runs with no validation loss (a pruned child never trained or evaluated
as a run) are left out.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

BYTES_PER_PARAM = 2          # bf16 weights as served
SIZES = {"params": "non-zero params", "bytes": "weight bytes", "flops": "FLOPs/token"}


def _field(row: pd.Series, key: str, default: float) -> float:
    v = row.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return default
    return v if np.isfinite(v) else default


def deployed_sizes(row: pd.Series) -> dict[str, float]:
    """{params, bytes, flops} of one run's deployed model (see the module docstring).
    summary.json's flops_per_token is the training step's (a distilling run's includes
    its teacher: distill_flops_per_token, taken off here)."""
    params = _field(row, "params", math.nan)
    sparse = _field(row, "sparse_params", 0.0)
    pattern = row.get("sparse_pattern")
    n, m = (int(x) for x in pattern.split(":")) if sparse and isinstance(pattern, str) else (1, 1)
    index_bits = math.ceil(math.log2(m)) if n < m else 0  # 2:4: a 2-bit index per kept value
    kept = sparse * n / m
    forward = (_field(row, "flops_per_token", math.nan)
               - _field(row, "distill_flops_per_token", 0.0)) / 3
    return {"params": params - sparse + kept,
            "bytes": BYTES_PER_PARAM * (params - sparse + kept) + kept * index_bits / 8,
            "flops": forward - 2 * (sparse - kept)}  # 2 FLOPs per weight; zeros skipped


def recipe_of(runs: pd.DataFrame) -> pd.Series:
    """Each run's recipe: its arm tag, else its directory name (the parent)."""
    arm = runs["arm"] if "arm" in runs else pd.Series([None] * len(runs), index=runs.index)
    return arm.where(arm.notna() & (arm.astype(str) != ""), runs["run"].astype(str))


def pareto_table(runs: pd.DataFrame, loss: str = "final_val_loss") -> pd.DataFrame:
    """One row per recipe: sizes, loss mean / interval / seeds, and `front_<size>` flags.
    Runs without a finite loss (diverged, failed) are left out of the means."""
    from lm.analysis.seeds import interval
    rows = []
    for recipe, group in runs.groupby(recipe_of(runs), sort=False):
        sizes = pd.DataFrame([deployed_sizes(r) for _, r in group.iterrows()])
        values = pd.to_numeric(group[loss], errors="coerce").to_numpy(float)
        iv = interval(values)
        tasks = {c: float(pd.to_numeric(group[c], errors="coerce").mean())
                 for c in runs.columns if c.startswith("tasks/") and c.endswith("/acc")}
        rows.append({"recipe": recipe, **{k: float(sizes[k].median()) for k in SIZES},
                     "loss": iv.mean, "loss_lo": iv.lo, "loss_hi": iv.hi, "seeds": iv.n,
                     **tasks})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table[table["seeds"] > 0].reset_index(drop=True)
    for size in SIZES:
        table[f"front_{size}"] = on_front(table[size].to_numpy(), table["loss"].to_numpy())
    return table.sort_values("params", ascending=False, ignore_index=True)


def on_front(size: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Whether each point is Pareto-optimal (minimise both): no other point has
    size <= its size and a lower loss, or a smaller size and the same loss."""
    ok = np.isfinite(size) & np.isfinite(loss)
    out = np.zeros(len(size), bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = others & (size <= size[i]) & (loss <= loss[i]) & (
            (size < size[i]) | (loss < loss[i]))
        out[i] = not dominated.any()
    return out


def figure(table: pd.DataFrame, path: Path) -> Path:
    """Loss against each size (three panels, log x): each recipe a point with its
    interval, coloured by its kind and marked by its model ("depth50-heal_kd": model
    depth50, kind heal_kd; a name without "-", the parent, is both), the front dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    parts = [r.split("-", 1) if "-" in r else [r, r] for r in table["recipe"]]
    models = list(dict.fromkeys(p[0] for p in parts))
    kinds = list(dict.fromkeys(p[1] for p in parts))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^Dv<>pP*hX"
    color = {k: colors[i % len(colors)] for i, k in enumerate(kinds)}
    marker = {m: markers[i % len(markers)] for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, len(SIZES), figsize=(5 * len(SIZES) + 2, 4), sharey=True)
    for ax, (size, label) in zip(axes, SIZES.items()):
        for (_, r), (model, kind) in zip(table.iterrows(), parts):
            err = None if not np.isfinite(r["loss_lo"]) else [
                [r["loss"] - r["loss_lo"]], [r["loss_hi"] - r["loss"]]]
            ax.errorbar(r[size], r["loss"], yerr=err, fmt=marker[model], capsize=3,
                        color=color[kind], alpha=0.85)
        front = table[table[f"front_{size}"]].sort_values(size)
        ax.plot(front[size], front["loss"], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    handles = ([Line2D([], [], color=color[k], marker="o", ls="", label=k) for k in kinds]
               + [Line2D([], [], color="gray", marker=marker[m], ls="", label=m)
                  for m in models if m not in kinds])
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle("Compressed models: loss against size (colour: recipe; marker: model; "
                 "dashed: the Pareto front)")
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (5 * len(SIZES) + 2), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(runs: pd.DataFrame, out: Path) -> str:
    """The table as text (sizes, loss with interval, * = on the front) and the figure."""
    table = pareto_table(runs)
    if table.empty:
        return "no runs"
    lines = [f"{'recipe':<28} {'params':>10} {'bytes':>10} {'flops/tok':>10} "
             f"{'loss':>8} {'95% interval':>17} {'seeds':>5}  front"]
    for _, r in table.iterrows():
        iv = ("" if not np.isfinite(r["loss_lo"]) else
              f"[{r['loss_lo']:.3f}, {r['loss_hi']:.3f}]")
        front = ",".join(s for s in SIZES if r[f"front_{s}"]) or "-"
        tasks = "".join(f"  {c.split('/')[1]} {r[c]:.3f}" for c in table.columns
                        if c.startswith("tasks/") and np.isfinite(r[c]))
        lines.append(f"{r['recipe']:<28} {r['params']:>10.4g} {r['bytes']:>10.4g} "
                     f"{r['flops']:>10.4g} {r['loss']:>8.4f} {iv:>17} {r['seeds']:>5}  "
                     f"{front}{tasks}")
    path = figure(table, out / "pareto.png")
    return "\n".join(lines) + f"\nplot: {path}"
